# Vim-S + UperNet with the authors' released ADE20K recipe: 60k iterations, lr 2e-4 and
# layer-wise lr decay 0.95.
_base_ = ['./upernet_vim-t_4xb4-60k-ld0.92_ade20k-512x512.py']
model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_s_midclstok_80p5acc.pth')),
    neck=dict(in_channels=384),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
optim_wrapper = dict(optimizer=dict(lr=2e-4), paramwise_cfg=dict(layer_decay_rate=0.95))
