# Mask R-CNN + Vim-T (ViTDet-style), otherwise the paper's COCO setting: LSJ at 1024x1024,
# 8 GPUs x 8 images, AdamW lr 1e-4 wd 0.1, linear decay over 380k iters.
# Memory: add --cfg-options model.backbone.with_cp=True for activation checkpointing.
_base_ = [
    './_base_/models/mask_rcnn_vim_simplefpn.py',
    './_base_/datasets/coco_instance_lsj_1024.py',
    './_base_/schedules/adamw_linear_380k.py',
    './_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_t_midclstok_76p1acc.pth')),
    neck=dict(in_channels=192))
