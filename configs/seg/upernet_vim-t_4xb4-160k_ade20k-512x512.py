# Vim-Ti + UperNet on ADE20K, the paper's setting (Appendix B; mIoU 41.0 reported):
# 4 GPUs x 4 images, AdamW lr 6e-5, 160k iterations, mixed precision, ImageNet-pretrained Vim-Ti.
_base_ = [
    '_base_/models/upernet_vim.py',
    '_base_/datasets/ade20k_512x512.py',
    '_base_/default_runtime.py',
    '_base_/schedules/schedule_160k.py',
]
model = dict(
    backbone=dict(
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/vim_t_midclstok_76p1acc.pth')))
optim_wrapper = dict(type='AmpOptimWrapper', loss_scale='dynamic')
