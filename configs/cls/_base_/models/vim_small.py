# Vim-S (D=384, 24 layers): Vim-Ti's classifier at width 384.
_base_ = ['./vim_tiny.py']

model = dict(
    # authors' pt-vim-s.sh: --drop-path 0.05
    backbone=dict(arch='small', drop_path_rate=0.05),
    head=dict(in_channels=384),
)
