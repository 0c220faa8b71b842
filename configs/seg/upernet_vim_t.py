# Short name: Vim-Ti + UperNet on ADE20K, the paper's 160k setting.
_base_ = ['./upernet_vim-t_4xb4-160k_ade20k-512x512.py']
