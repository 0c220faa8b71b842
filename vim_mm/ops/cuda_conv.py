"""Both directions' conv1d + SiLU of the Vim mixer as a CUDA C++ kernel (inference; NVRTC).

The same outputs as :func:`vim_mm.ops.triton_conv.bidirectional_conv` (the anti-causal
backward conv with mirrored taps, no flips) from 16-byte accesses: a thread owns 8 channels and
``run`` consecutive tokens and has every row it reads in flight at once
(``csrc/bimamba_conv_fwd.cu`` says why). Needs CUDA, 16-bit activations, a multiple of 8
channels, rows 16-byte aligned and a conv of width <= 4 (:func:`cuda_conv_problem` says what
is missing); ``bidirectional_conv_torch`` is the twin.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ['bidirectional_conv_cuda', 'cuda_conv_problem', 'DEFAULT_SETTINGS']

SOURCE = Path(__file__).parent / 'csrc' / 'bimamba_conv_fwd.cu'
WIDTH = 4  # the kernel's taps (narrower convs get leading zero taps)
# tokens per thread and the block's (channel groups, token runs): untimed guesses
DEFAULT_SETTINGS = dict(run=4, block=(64, 2))
_kernels: dict = {}


def cuda_conv_problem(x: torch.Tensor, width: int) -> str | None:
    """None when :func:`bidirectional_conv_cuda` can run on ``x`` (batch, L, E), else why not."""
    if not x.is_cuda or not hasattr(torch.cuda, '_compile_kernel'):
        return 'needs a CUDA tensor and torch.cuda._compile_kernel (NVRTC)'
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f'needs bf16/fp16 activations (got {x.dtype})'
    if x.dim() != 3 or x.shape[-1] % 8:
        return f'needs (batch, L, E) with E a multiple of 8 (got {tuple(x.shape)})'
    if width > WIDTH:
        return f'handles conv widths <= {WIDTH} (got {width})'
    if (x.stride(-1) != 1 or x.stride(1) % 8 or x.stride(0) % 8 or x.data_ptr() % 16
            or x.shape[1] * x.stride(1) >= 2 ** 31 or x.stride(0) >= 2 ** 31):
        return 'needs token-major rows, 16-byte aligned, a batch row within 2^31 elements'
    return None


def _kernel(dtype: torch.dtype, run: int):
    key = (dtype, run, torch.cuda.current_device())
    if key not in _kernels:
        defines = f'#define RUN {run}\n#define FP16 {int(dtype == torch.float16)}\n'
        _kernels[key] = torch.cuda._compile_kernel(defines + SOURCE.read_text(), 'vim_bi_conv')
    return _kernels[key]


def bidirectional_conv_cuda(x, w_f, b_f, w_b, b_b, *, run: int | None = None, block=None):
    """x (batch, L, E) -> (u_f, u_b), each contiguous (batch, L, E) in x's dtype; weights (E, W)
    or (E, 1, W), biases (E,), accumulated in fp32. ``run``: tokens per thread; ``block``:
    (channel groups of 8, token runs) per block."""
    width = w_f.shape[-1]
    problem = cuda_conv_problem(x, width)
    if problem:
        raise ValueError(f'bidirectional_conv_cuda {problem}; use '
                         'vim_mm.ops.triton_conv.bidirectional_conv instead.')
    batch, L, E = x.shape
    if w_f.numel() != E * width or w_b.numel() != E * width or b_f.numel() != E \
            or b_b.numel() != E:
        raise ValueError(f'conv weights must be (E, W) or (E, 1, W) and biases (E,) for E={E}')
    run = run or DEFAULT_SETTINGS['run']
    gx, gy = block or DEFAULT_SETTINGS['block']
    w_f, w_b = (F.pad(w.reshape(E, width).float(), (WIDTH - width, 0)).contiguous()
                for w in (w_f, w_b))
    u_f = torch.empty(batch, L, E, dtype=x.dtype, device=x.device)
    u_b = torch.empty_like(u_f)
    if u_f.numel() == 0:
        return u_f, u_b
    gx = min(gx, E // 8)
    grid = (math.ceil(E // 8 / gx), math.ceil(L / (run * gy)), batch)
    _kernel(x.dtype, run)(grid=grid, block=(gx, gy, 1),
                          args=[x, x.stride(0), x.stride(1), w_f, b_f.float().contiguous(), w_b,
                                b_b.float().contiguous(), u_f, u_b, L, E])
    return u_f, u_b
