"""Register one class, unchanged, in the same-named registry of every installed OpenMMLab library."""
from __future__ import annotations

import importlib
import importlib.util

DOWNSTREAM = ('mmseg', 'mmdet', 'mmpretrain')


def installed_downstream() -> list[str]:
    return [pkg for pkg in DOWNSTREAM if importlib.util.find_spec(pkg) is not None]


def registries(kind: str, packages=None) -> list:
    """mmengine's root registry ``kind`` plus each downstream library's."""
    import mmengine.registry
    found = [getattr(mmengine.registry, kind)]
    for pkg in packages or installed_downstream():
        found.append(getattr(importlib.import_module(f'{pkg}.registry'), kind))
    return found


def register_everywhere(kind: str, cls, name: str | None = None, packages=None):
    """``type=name`` builds ``cls`` from mmengine, mmseg, mmdet and mmpretrain configs alike."""
    for registry in registries(kind, packages):
        registry.register_module(name=name or cls.__name__, module=cls, force=True)
    return cls
