"""vim_mm: Vision Mamba (Vim) for the OpenMMLab 2.x stack.

``import vim_mm`` gives the torch-only model; when mmengine is installed it also registers
VisionMamba, the necks, the classifier, the optimizer constructor and the demo datasets with
mmseg / mmdet / mmpretrain (configs: ``custom_imports=dict(imports=['vim_mm'])``).
"""
import importlib.util

from .models import VisionMamba
from .version import __version__

__all__ = ['VisionMamba', '__version__']

if importlib.util.find_spec('mmengine') is not None:
    from . import mm  # noqa: F401  (registration side effects)
