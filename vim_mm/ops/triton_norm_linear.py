"""A Vim block's residual add, RMSNorm and the mixer's in_proj in one Triton kernel (inference).

Every block starts with

    hidden, new_residual = add_rms_norm(x, residual, norm_weight, eps)    # vim_mm.ops.norm
    xz = F.linear(hidden, W_in)                                             # (M, C) -> (M, N)

with ``new_residual = residual + x.float()`` (float32, the stream), ``hidden`` its RMSNorm times
``norm_weight`` rounded to x's 16-bit dtype and ``W_in`` (N, C) in that dtype, no bias (N = 4 C
for Vim). That is two kernels (mamba-ssm's Triton norm, then cuBLAS), and ``hidden`` is written
to memory by the first and read back by the second. With K = C only 192 to 768 the GEMM does
little arithmetic per byte: both kernels are bound by memory traffic. :func:`add_norm_linear`
reads x and residual, writes new_residual and xz, and never stores ``hidden``: a program takes
BLOCK_M token rows and BLOCK_N output channels, sums the rows' squares over C in BLOCK_K chunks
(the programs of the first N tile store new_residual on the way), then walks C again,
normalizing each chunk in registers, rounding it to x's dtype exactly where ``add_rms_norm``
rounds ``hidden``, and multiplying it into a float32 accumulator (``tl.dot``). The N tiles of a
row block are neighbouring programs, so they run together and the re-reads of x and residual
come from L2. Not yet run on a GPU: it is tested on CPU with Triton's interpreter only, and its
tile settings (:data:`DEFAULT_SETTINGS`) are untuned guesses. Forward only;
:func:`add_norm_linear_torch` is the PyTorch twin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm import add_rms_norm_torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ['add_norm_linear', 'add_norm_linear_applies', 'add_norm_linear_torch',
           'DEFAULT_SETTINGS']

# Triton's CPU interpreter (3.8) multiplies bf16 tiles wrongly in tl.dot: there (INTERPRET) the
# kernel multiplies the same 16-bit values as float32 (the products are exact either way)
from .triton_scan import INTERPRET  # noqa: E402

# the kernel's tile settings: guesses, not yet tuned on a GPU
DEFAULT_SETTINGS = dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=2)


def add_norm_linear_applies(x: torch.Tensor) -> bool:
    """Whether :func:`add_norm_linear` can run where ``x`` lives: triton and a CUDA tensor
    (or Triton's interpreter). Any size: row offsets switch to 64 bits where needed."""
    return triton is not None and (x.is_cuda or INTERPRET)


def add_norm_linear_torch(x, residual, norm_weight, eps: float, weight):
    """x (..., C); residual None or (..., C); norm_weight (C,); weight (N, C). Returns
    ``(out, new_residual)``: ``out = F.linear(hidden, weight)`` (..., N) in weight's dtype, with
    ``hidden, new_residual = add_rms_norm_torch(x, residual, norm_weight, eps)``."""
    hidden, new_residual = add_rms_norm_torch(x, residual, norm_weight, eps)
    return F.linear(hidden.to(weight.dtype), weight), new_residual


if triton is not None:
    @triton.jit
    def _add_norm_linear_kernel(x_ptr, sx_m, res_ptr, sr_m, nw_ptr, w_ptr, out_ptr, newres_ptr,
                                M, N, C, eps, HAS_RES: tl.constexpr, OFF64: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr, BF16: tl.constexpr,
                                DOT_IN_FP32: tl.constexpr):
        """One program: rows [pid_m BLOCK_M, +BLOCK_M) times output channels [pid_n BLOCK_N,
        +BLOCK_N), on a 1-D grid with the N tile varying fastest. Pass 1 over C: the rows' sum
        of squares (pid_n == 0 stores new_residual). Pass 2 over C: reload, normalize, round to
        x's dtype, accumulate hidden @ weight^T in float32. out and new_residual are contiguous
        (M, N) and (M, C), weight contiguous (N, C); x and residual have row strides sx_m, sr_m.
        The chunk past C is masked to zeros: it adds nothing to the sum or the product."""
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = pid // n_tiles, pid % n_tiles
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = m < M, n < N
        rows = m.to(tl.int64) if OFF64 else m  # row offsets that may pass 2^31 elements
        cdtype = tl.bfloat16 if BF16 else tl.float16

        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + kk
            ok = m_ok[:, None] & (k < C)[None, :]
            s = tl.load(x_ptr + rows[:, None] * sx_m + k[None, :], mask=ok,
                        other=0.).to(tl.float32)
            if HAS_RES:
                s += tl.load(res_ptr + rows[:, None] * sr_m + k[None, :], mask=ok, other=0.)
            sum_sq += tl.sum(s * s, axis=1)
            if pid_n == 0:
                tl.store(newres_ptr + rows[:, None] * C + k[None, :], s, mask=ok)
        rstd = tl.rsqrt(sum_sq / C + eps)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            k = k0 + kk
            k_ok = k < C
            ok = m_ok[:, None] & k_ok[None, :]
            s = tl.load(x_ptr + rows[:, None] * sx_m + k[None, :], mask=ok,
                        other=0.).to(tl.float32)
            if HAS_RES:
                s += tl.load(res_ptr + rows[:, None] * sr_m + k[None, :], mask=ok, other=0.)
            nw = tl.load(nw_ptr + k, mask=k_ok, other=0.).to(tl.float32)
            h = (s * rstd[:, None] * nw[None, :]).to(cdtype)  # add_rms_norm's hidden
            wt = tl.load(w_ptr + n[None, :] * C + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                         other=0.)  # weight^T chunk, (BLOCK_K, BLOCK_N)
            if DOT_IN_FP32:  # the interpreter (see INTERPRET)
                acc = tl.dot(h.to(tl.float32), wt.to(tl.float32), acc)
            else:
                acc = tl.dot(h, wt, acc)
        tl.store(out_ptr + rows[:, None] * N + n[None, :], acc.to(cdtype),
                 mask=m_ok[:, None] & n_ok[None, :])


def _rows(t, C):
    """t (..., C) as (M, C) with unit channel stride (a copy only where a view cannot be)."""
    t2 = t.reshape(-1, C)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def add_norm_linear(x, residual, norm_weight, eps: float, weight, *, block_m=None, block_n=None,
                    block_k=None, num_warps=None, num_stages=None):
    """The Triton kernel for :func:`add_norm_linear_torch` (same arguments and result), one launch.

    x (..., C) bf16 or fp16; residual None or float32 of x's shape; norm_weight (C,) of any
    float dtype (used in float32); weight (N, C) in x's dtype. Returns ``out`` (..., N) in x's
    dtype and ``new_residual`` (..., C) float32, both contiguous. Settings left None come from
    :data:`DEFAULT_SETTINGS`; block sizes are powers of two, at least 16 (tl.dot's minimum).
    """
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError('add_norm_linear needs triton and a CUDA tensor (or '
                           'TRITON_INTERPRET=1); use add_norm_linear_torch elsewhere')
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                 num_stages=num_stages)
    settings = {key: DEFAULT_SETTINGS[key] if v is None else v for key, v in given.items()}
    for key in ('block_m', 'block_n', 'block_k'):
        b = settings[key]
        if not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f'add_norm_linear: {key}={b!r} must be a power of two >= 16')
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f'add_norm_linear: x must be bf16 or fp16 (cast it, or use '
                         f'add_norm_linear_torch), got {x.dtype}')
    C = x.shape[-1] if x.dim() else 0
    if C == 0 or weight.dim() != 2 or weight.shape[1] != C or norm_weight.shape != (C,):
        raise ValueError(f'add_norm_linear: x {tuple(x.shape)} must be (..., C) with C > 0, '
                         f'norm_weight (C,) and weight (N, C); got norm_weight '
                         f'{tuple(norm_weight.shape)}, weight {tuple(weight.shape)}')
    if weight.dtype != x.dtype:
        raise ValueError(f'add_norm_linear: weight is {weight.dtype} but x is {x.dtype}; cast the '
                         "weight to x's dtype (as autocast would)")
    if not norm_weight.is_floating_point():
        raise ValueError(f'add_norm_linear: norm_weight must be floating point, got '
                         f'{norm_weight.dtype}')
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_norm_linear: residual {tuple(residual.shape)} must have x's "
                             f'shape {tuple(x.shape)}')
        if residual.dtype != torch.float32:
            raise ValueError(f'add_norm_linear: residual must be float32 (the residual stream), '
                             f'got {residual.dtype}; pass residual.float()')
    tensors = [x, norm_weight, weight] + ([] if residual is None else [residual])
    if any(t.device != x.device for t in tensors):
        raise ValueError('add_norm_linear: x, residual, norm_weight and weight must be on one '
                         f'device, got {[str(t.device) for t in tensors]}')
    N = weight.shape[0]
    if N * C >= 2 ** 31:
        raise ValueError(f'add_norm_linear: the kernel addresses the weight {tuple(weight.shape)} '
                         'in 32 bits; split it along N')
    lead = x.shape[:-1]
    M = lead.numel()
    out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:  # nothing for the kernel to do
        new_residual = x.float() if residual is None else residual + x.float()
        return out, new_residual.contiguous()
    new_residual = torch.empty(*lead, C, dtype=torch.float32, device=x.device)
    x2 = _rows(x, C)
    res2 = None if residual is None else _rows(residual, C)
    weight = weight.contiguous()
    norm_weight = norm_weight.contiguous()
    strides = [x2.stride(0), C, N] + ([] if res2 is None else [res2.stride(0)])
    off64 = M * max(strides) >= 2 ** 31  # int32 offsets where every element fits them
    block_m, block_n = settings['block_m'], settings['block_n']
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _add_norm_linear_kernel[grid](
        x2, x2.stride(0), x2 if res2 is None else res2, 0 if res2 is None else res2.stride(0),
        norm_weight, weight, out, new_residual, M, N, C, float(eps), HAS_RES=res2 is not None,
        OFF64=off64, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=settings['block_k'],
        BF16=x.dtype == torch.bfloat16, DOT_IN_FP32=INTERPRET, num_warps=settings['num_warps'],
        num_stages=settings['num_stages'])
    return out, new_residual
