# The Vim authors' released COCO schedule (ViTDet's 100-epoch LSJ recipe): the paper schedule's
# AdamW (lr 1e-4 at batch 64, wd 0.1, 250-iteration warmup, bf16 AMP) with steps at
# 163889/177546 of 184375 iterations and layer-wise lr decay (0.837 for Vim-T).
_base_ = ['./adamw_linear_380k.py']

max_iters = 184375
train_cfg = dict(max_iters=max_iters)
optim_wrapper = dict(paramwise_cfg=dict(layer_decay_rate=0.837))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=250),
    dict(type='MultiStepLR', milestones=[163889, 177546], gamma=0.1, by_epoch=False, begin=0,
         end=max_iters),
]
