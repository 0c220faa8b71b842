# The Vim authors' released COCO schedule (ViTDet's 100-epoch LSJ recipe): AdamW (betas
# 0.9/0.999, wd 0.1), lr 1e-4 at a total batch of 64, 250-iteration warmup, steps at
# 163889/177546 of 184375 iterations, and layer-wise lr decay (0.837 for Vim-T) with no weight
# decay on 1-D parameters, pos_embed and the SSM's A_log/D. No gradient clipping.
max_iters = 184375
val_interval = 10000

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=val_interval)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# Mixed precision (bf16 autocast); use type='OptimWrapper' to train in fp32.
optim_wrapper = dict(
    type='AmpOptimWrapper',
    dtype='bfloat16',
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=0.837),
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=None)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', milestones=[163889, 177546], gamma=0.1, by_epoch=False, begin=0,
         end=max_iters),
]

auto_scale_lr = dict(enable=False, base_batch_size=64)
