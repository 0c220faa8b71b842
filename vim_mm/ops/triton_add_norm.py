"""Residual add + RMSNorm for inference, many token rows per program (Triton, forward only).

mamba-ssm's fused kernel (``vim_mm.ops.norm``, the authors' ``fused_add_norm``) gives each
row its own program: at Vim's widths (192 / 384 channels) that is one warp moving 1.5-3 KB,
and at 16 x 4097 tokens (Vim-Ti, bf16) it runs at ~3.3 TB/s on an H200. Here a program takes
``block_m`` rows at once (4 by default: 3.7 TB/s there), so more bytes are in flight per
program and the launch has fewer programs. Same arithmetic: the stream ``residual + x`` in
float32, its RMS over the row, ``normed`` rounded once to x's dtype. Forward only: training
keeps mamba-ssm's kernel (its backward).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .triton_scan import INTERPRET  # noqa: E402  (TRITON_INTERPRET=1: CPU tests)

__all__ = ['add_rms_norm_rows', 'DEFAULT_BLOCK_M', 'DEFAULT_NUM_WARPS']

# H200, bf16 (results/h200_layer_ops_norm_v1.json): 4 rows per program on 1-4 warps fastest
# at 16 x 4097 x 192 (40.9 us, mamba-ssm's 46.0), 16 x 6085 x 192 (58.2 / 66.0) and
# 16 x 4097 x 384 (77.2 / 78.4); 16-64 rows on fewer warps slower than mamba-ssm's
DEFAULT_BLOCK_M = 4
DEFAULT_NUM_WARPS = 2

if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, normed_ptr, new_res_ptr, M, N, eps,
                             HAS_RES: tl.constexpr, STORE_RES: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        s = tl.load(x_ptr + offs, mask=mask, other=0.).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + offs, mask=mask, other=0.)
        inv_rms = tl.rsqrt(tl.sum(s * s, axis=1) / N + eps)
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.).to(tl.float32)
        if STORE_RES:
            tl.store(new_res_ptr + offs, s, mask=mask)
        tl.store(normed_ptr + offs, (s * inv_rms[:, None] * w[None, :]).to(
            normed_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_rows(x, residual, weight, eps: float, *, out_dtype=None,
                      block_m: int = DEFAULT_BLOCK_M, num_warps: int = DEFAULT_NUM_WARPS):
    """x (..., N) float32/bf16/fp16, residual None or (..., N) float32, weight (N,) ->
    (normed in ``out_dtype`` (default x's), new_residual = residual + x in float32), contiguous.
    No autograd. Without a residual (the first block) a float32 x is the new residual itself,
    returned as it is (the PyTorch lines alias it too), not copied."""
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError('add_rms_norm_rows needs triton and a CUDA tensor '
                           '(or TRITON_INTERPRET=1).')
    N = x.shape[-1]
    if residual is not None and (residual.shape != x.shape or residual.dtype != torch.float32):
        raise ValueError(f'add_rms_norm_rows: residual {tuple(residual.shape)} {residual.dtype} '
                         f'must be {tuple(x.shape)} float32')
    if weight.shape != (N,):
        raise ValueError(f'add_rms_norm_rows: weight {tuple(weight.shape)} must be ({N},)')
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    normed = torch.empty_like(x, dtype=out_dtype or x.dtype)
    alias = residual is None and x.dtype == torch.float32
    new_res = x if alias else torch.empty(x.shape, dtype=torch.float32, device=x.device)
    M = x.numel() // max(N, 1)
    if M == 0 or N == 0:
        return normed, new_res
    _add_rms_norm_kernel[(triton.cdiv(M, block_m),)](
        x, new_res if residual is None else residual, weight.contiguous(), normed, new_res, M,
        N, float(eps), HAS_RES=residual is not None, STORE_RES=not alias, BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(N), num_warps=num_warps)
    return normed, new_res
