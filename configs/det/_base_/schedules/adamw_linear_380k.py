# The Vim paper's COCO schedule (Appendix B): AdamW (betas 0.9/0.999, wd 0.1), lr 1e-4 at a total
# batch of 64, linear decay to 0 over 380k iterations (after a 250-iteration linear warmup).
# Weight decay is off for 1-D parameters, pos_embed and the SSM's A_log/D (the constructor with
# layer_decay_rate=1.0 applies only these exemptions). No gradient clipping.
max_iters = 380000
val_interval = 10000

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# Mixed precision (bf16 autocast; the scan state and the residual stream stay fp32).
# Use type='OptimWrapper' to train in fp32.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=None)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=250, end=max_iters),
]

auto_scale_lr = dict(enable=False, base_batch_size=64)
