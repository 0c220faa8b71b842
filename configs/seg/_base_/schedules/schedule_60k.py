# The authors' released ADE20K schedule: 60k iterations, same warm-up and linear decay; their
# lr and layer decay differ per model size and are set by the top configs.
_base_ = ['./schedule_160k.py']
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=60000),
]
train_cfg = dict(type='IterBasedTrainLoop', max_iters=60000, val_interval=6000)
