# Vim-Ti + UperNet with the authors' released ADE20K recipe: 60k iterations, lr 1e-4 and
# layer-wise lr decay 0.92 (which their code never applied to Vim's layers; here it does).
_base_ = [
    '_base_/models/upernet_vim.py',
    '_base_/datasets/ade20k_512x512.py',
    '_base_/default_runtime.py',
    '_base_/schedules/schedule_60k.py',
]
model = dict(
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_t_midclstok_76p1acc.pth')))
optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(lr=1e-4),
    paramwise_cfg=dict(layer_decay_rate=0.92))
default_hooks = dict(checkpoint=dict(interval=6000))
