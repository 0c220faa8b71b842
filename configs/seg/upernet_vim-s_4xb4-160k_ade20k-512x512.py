# Vim-S + UperNet on ADE20K, the paper's setting (Appendix B; mIoU 44.9 reported).
_base_ = ['./upernet_vim-t_4xb4-160k_ade20k-512x512.py']
model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_s_midclstok_80p5acc.pth')),
    neck=dict(in_channels=384),
    decode_head=dict(in_channels=[384, 384, 384, 384]),
    auxiliary_head=dict(in_channels=384))
