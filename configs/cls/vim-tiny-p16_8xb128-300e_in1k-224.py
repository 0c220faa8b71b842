# Vim-Ti on ImageNet-1k, 300 epochs, 8 GPUs x 128 images (paper: 76.1 top-1).
_base_ = [
    './_base_/models/vim_tiny.py',
    './_base_/datasets/imagenet_bs128_vim_224.py',
    './_base_/schedules/imagenet_bs1024_adamw_vim.py',
    './_base_/default_runtime.py',
]

# authors' pt-vim-t.sh: --weight-decay 0.1
optim_wrapper = dict(optimizer=dict(weight_decay=0.1))
