# The authors' (DeiT) ImageNet schedule for a total batch of 1024: AdamW lr 1e-3, wd 0.05,
# 5 warmup epochs from 1e-6, cosine to 1e-5 over 300 epochs, EMA of the weights, no grad clip.
optim_wrapper = dict(
    type='AmpOptimWrapper',  # mixed precision (fp16 autocast, dynamic loss scale); needs a GPU
    optimizer=dict(type='AdamW', lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05),
    # rate 1.0: no layer decay, only the weight-decay exemptions (pos_embed, cls_token, A_log,
    # A_b_log, D, D_b, norms and biases)
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0),
    clip_grad=None,
)

param_scheduler = [
    # warmup per iteration, 1e-6 -> 1e-3 (timm's warmup_lr 1e-6)
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=5,
         convert_to_iter_based=True),
    # cosine per epoch (as timm steps it) until max_epochs
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5),
]

train_cfg = dict(by_epoch=True, max_epochs=300, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# lr 1e-3 is for 1024 images per step; with another total batch, scale it linearly with
# `--cfg-options auto_scale_lr.enable=True`.
auto_scale_lr = dict(base_batch_size=1024)

# timm ModelEma(decay=0.99996), updated after every iteration: EMA momentum 1 - 0.99996.
# Validation and the saved 'state_dict' use the averaged weights (mmpretrain's EMAHook).
custom_hooks = [dict(type='EMAHook', momentum=4e-5, priority='ABOVE_NORMAL')]
