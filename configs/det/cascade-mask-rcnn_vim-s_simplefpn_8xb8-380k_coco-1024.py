# Cascade Mask R-CNN + Vim-S, the Vim paper's COCO setting (see the Vim-T config).
# Memory: add --cfg-options model.backbone.with_cp=True for activation checkpointing.
_base_ = './cascade-mask-rcnn_vim-t_simplefpn_8xb8-380k_coco-1024.py'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_s_midclstok_80p5acc.pth')),
    neck=dict(in_channels=384))
