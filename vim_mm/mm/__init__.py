"""The OpenMMLab layer: registers vim_mm's pieces with mmengine, mmseg, mmdet and mmpretrain.

Imported by ``import vim_mm`` when mmengine is installed. Everything here is thin glue; the
model itself lives in ``vim_mm.models`` and needs torch only.
"""
from . import checkpoint_io  # noqa: F401  (torch>=2.6 checkpoint loading for mmengine)
from .registry import register_everywhere
from ..models import VisionMamba

register_everywhere('MODELS', VisionMamba)

from . import ln2d, necks, optim  # noqa: E402,F401
from . import classifier  # noqa: E402,F401
from . import datasets, distributed  # noqa: E402,F401
