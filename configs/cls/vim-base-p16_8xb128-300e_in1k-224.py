# Vim-B on ImageNet-1k, 300 epochs, 8 GPUs x 128 images (paper: 81.9 top-1), wd 0.05.
_base_ = [
    './_base_/models/vim_base.py',
    './_base_/datasets/imagenet_bs128_vim_224.py',
    './_base_/schedules/imagenet_bs1024_adamw_vim.py',
    './_base_/default_runtime.py',
]
