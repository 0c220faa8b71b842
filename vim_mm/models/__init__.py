"""Torch-only model code: the Vim backbone, its mixer and checkpoint conversion."""
from .backbones import ARCH_SETTINGS, VisionMamba
from .checkpoint import convert_vim_state_dict, load_pretrained, read_checkpoint

__all__ = ['ARCH_SETTINGS', 'VisionMamba', 'convert_vim_state_dict', 'load_pretrained',
           'read_checkpoint']
