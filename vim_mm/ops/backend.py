"""Which implementation runs the mixer: mamba-ssm CUDA kernels, the fused Triton scan, PyTorch.

``auto`` (the default), for CUDA tensors: inference recorded in the backbone's CUDA graphs
(``cuda_graph=True``, :func:`graphed_inference`) takes the token-major ``triton`` path, whose
inference scan is the CUDA C++ one (vim_mm/ops/cuda_scan.py): recorded whole, it runs 1.5-1.9x
the mamba-ssm path's images/s at 512-1248 px on an H200 (benchmarks/README.md, "Eighth session"),
but it launches more kernels from Python, so eagerly, where launches bound small batches
(1024 px batch 1: 38.6 against 33.0 ms of host time per forward, 43.9 against 23.8 ms of
wall clock in another run), and for training (its backward is slower and needs
more memory, "Fifth session") ``auto`` takes the mamba-ssm CUDA kernels when they import; else
``triton``. Without CUDA tensors (or without triton and mamba-ssm): PyTorch.
Force a path with the ``backend`` argument of the model or the ``VIM_MM_BACKEND`` environment
variable; asking for a path where it cannot run is an error, never a silent fallback. Each
resolved choice is logged once.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os

from .cuda_ops import CUDA_IMPORT_ERROR, CUDA_KERNELS_AVAILABLE

BACKENDS = ('auto', 'cuda', 'triton', 'torch')
ENV_VAR = 'VIM_MM_BACKEND'
logger = logging.getLogger('vim_mm')
_announced: set = set()
_graphed = contextvars.ContextVar('vim_mm_graphed_inference', default=False)


@contextlib.contextmanager
def graphed_inference():
    """Inference whose launches are recorded in a CUDA graph (warm-up and recording): ``auto``
    may take the path with more, cheaper kernels."""
    token = _graphed.set(True)
    try:
        yield
    finally:
        _graphed.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the explicit argument, else $VIM_MM_BACKEND, else 'auto'."""
    choice = (backend or os.environ.get(ENV_VAR) or 'auto').lower()
    if choice not in BACKENDS:
        raise ValueError(f"Unknown Vim backend {choice!r} (from {'argument' if backend else ENV_VAR}); "
                         f'choose one of {BACKENDS}.')
    return choice


def resolve_backend(backend: str | None, device_type: str, needs_grad: bool = True) -> str:
    """The backend that will run for tensors on ``device_type`` (``needs_grad``: whether the
    call must be differentiable; inference may take another path under ``auto``)."""
    choice = requested_backend(backend)
    if choice == 'auto':
        from .triton_scan import TRITON_SCAN_AVAILABLE
        triton = device_type == 'cuda' and TRITON_SCAN_AVAILABLE
        graphed = _graphed.get() and not needs_grad
        if device_type == 'cuda' and CUDA_KERNELS_AVAILABLE and not (graphed and triton):
            choice = 'cuda'
        else:
            choice = 'triton' if triton else 'torch'
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
    mode = 'training' if needs_grad else 'graphed inference' if _graphed.get() else 'inference'
    key = (choice, device_type, mode)
    if key not in _announced:
        _announced.add(key)
        logger.info('vim_mm: bidirectional Mamba mixer runs on the %s path for %s tensors (%s)',
                    {'cuda': 'mamba-ssm/causal-conv1d CUDA kernel',
                     'triton': 'token-major Triton / CUDA C++ scan', 'torch': 'PyTorch'}[choice],
                    device_type, mode)
    return choice
