# Cascade Mask R-CNN + Vim-T with the authors' released schedule instead of the paper's:
# 184375 iters, steps at 163889/177546, 250 warmup iters, layer-wise lr decay 0.837.
# Memory: add --cfg-options model.backbone.with_cp=True for activation checkpointing.
_base_ = [
    './_base_/models/cascade_mask_rcnn_vim_simplefpn.py',
    './_base_/datasets/coco_instance_lsj_1024.py',
    './_base_/schedules/adamw_layer-decay_step_184k.py',
    './_base_/default_runtime.py',
]

model = dict(
    backbone=dict(
        arch='tiny',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_t_midclstok_76p1acc.pth')),
    neck=dict(in_channels=192))
