"""``norm_cfg=dict(type='LN2d')`` for mmdet's heads, as ViTDet's box and mask heads use.

mmcv's ``build_norm_layer`` (inside ConvModule) looks the type up in the current scope's MODELS.
mmdet 3.3 itself has no 'LN2d' (only its projects/ViTDet registers one), so SimpleFPN's channel
LayerNorm is registered under that name in mmdet, unless mmdet already provides it.
"""
import importlib.util

from .necks import LayerNorm2d

if importlib.util.find_spec('mmdet') is not None:
    from mmdet.registry import MODELS

    if MODELS.get('LN2d') is None:
        MODELS.register_module(name='LN2d', module=LayerNorm2d)
