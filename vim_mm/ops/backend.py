"""Which implementation runs the mixer: mamba-ssm CUDA kernels, the fused Triton scan, PyTorch.

``auto`` (the default) takes the mamba-ssm CUDA kernels for CUDA tensors when they import, else
PyTorch. ``triton`` is the fused bidirectional scan (vim_mm/ops/triton_scan.py), opt-in: its
inference is 1.2-1.5x faster at 512-2048 px on an H100 (equal at 224 b128, where Python
launches bound both paths; 3x there with the backbone's ``cuda_graph``), but its backward is
slower and needs more memory, so ``auto`` keeps mamba-ssm (benchmarks/README.md, "Fifth session").
Force a path with the ``backend`` argument of the model or the ``VIM_MM_BACKEND`` environment
variable; asking for a path where it cannot run is an error, never a silent fallback. Each
resolved choice is logged once.
"""
from __future__ import annotations

import logging
import os

from .cuda_ops import CUDA_IMPORT_ERROR, CUDA_KERNELS_AVAILABLE

BACKENDS = ('auto', 'cuda', 'triton', 'torch')
ENV_VAR = 'VIM_MM_BACKEND'
logger = logging.getLogger('vim_mm')
_announced: set = set()


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else $VIM_MM_BACKEND, else 'auto'."""
    choice = (backend or os.environ.get(ENV_VAR) or 'auto').lower()
    if choice not in BACKENDS:
        raise ValueError(f"Unknown Vim backend {choice!r} (from {'argument' if backend else ENV_VAR}); "
                         f'choose one of {BACKENDS}.')
    return choice


def resolve_backend(backend: str | None, device_type: str) -> str:
    """The backend that will run for tensors on ``device_type``."""
    choice = requested_backend(backend)
    if choice == 'auto':
        choice = 'cuda' if device_type == 'cuda' and CUDA_KERNELS_AVAILABLE else 'torch'
    elif choice == 'cuda':
        if not CUDA_KERNELS_AVAILABLE:
            raise RuntimeError(
                'Vim backend "cuda" was requested but the kernels do not import '
                f'({CUDA_IMPORT_ERROR!r}). Install them with `pip install -e .[cuda]` '
                f'(needs a CUDA toolchain), or use backend="torch" / {ENV_VAR}=torch.')
        if device_type != 'cuda':
            raise RuntimeError(f'Vim backend "cuda" needs CUDA tensors, got {device_type} ones; '
                               'move the model to a GPU or use backend="torch".')
    elif choice == 'triton':
        from .triton_scan import INTERPRET, TRITON_SCAN_AVAILABLE
        if not TRITON_SCAN_AVAILABLE or (device_type != 'cuda' and not INTERPRET):
            raise RuntimeError('Vim backend "triton" needs triton and CUDA tensors (or '
                               'TRITON_INTERPRET=1 for CPU tests); use backend="auto".')
    key = (choice, device_type)
    if key not in _announced:
        _announced.add(key)
        logger.info('vim_mm: bidirectional Mamba mixer runs on the %s path for %s tensors',
                    {'cuda': 'mamba-ssm/causal-conv1d CUDA kernel', 'triton': 'fused Triton scan',
                     'torch': 'PyTorch'}[choice],
                    device_type)
    return choice
