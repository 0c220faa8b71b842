# Vim-B (D=768, 24 layers): Vim-Ti's classifier at width 768.
_base_ = ['./vim_tiny.py']

model = dict(
    # No published value is at hand for Vim-B (vim.md lists none; the authors' scripts we know
    # cover Ti and S). 0.5 follows the heavier regularisation of the wider model; verify it
    # against the authors' Vim-B recipe before a long run.
    backbone=dict(arch='base', drop_path_rate=0.5),
    head=dict(in_channels=768),
)
