"""Built-in demo datasets, generated deterministically on first use (no download needed).

Each module registers its dataset only with the library it belongs to and only if installed.
"""
import importlib.util

if importlib.util.find_spec('mmseg') is not None:
    from . import demo_seg  # noqa: F401
if importlib.util.find_spec('mmdet') is not None:
    from . import demo_det  # noqa: F401
if importlib.util.find_spec('mmpretrain') is not None:
    from . import demo_cls  # noqa: F401
