"""Both directions' x_proj of the Vim mixer as one skinny Triton GEMM (inference, forward only).

x_dbl[d] = u[d] @ W[d]^T for d in (forward, backward): u the conv's stacked (2, M, E) output
(16-bit), W (2, rows, E) with rows = dt_rank + 2 d_state padded to a multiple of 8 (48 for
Vim-Ti/S). Only ~48 output columns against E = 384-768 inputs: the GEMM is a read of u. A
program takes ``block_m`` tokens of one direction and all its rows (one ``tl.dot`` tile of
``block_n`` = rows padded to a power of two), so u is read once.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .triton_scan import INTERPRET  # noqa: E402  (TRITON_INTERPRET=1: CPU tests)

__all__ = ['x_proj_both', 'sweep_configs']


def sweep_configs() -> list[dict]:
    return [dict(block_m=bm, block_k=bk, num_warps=nw, num_stages=ns)
            for bm in (64, 128, 256) for bk in (64, 128) for nw in (4, 8) for ns in (3, 4)
            if (bm + 64) * bk * 2 * ns <= 200 * 1024]


if triton is not None:
    INTERP = tl.constexpr(INTERPRET)

    @triton.jit
    def _x_proj_kernel(u_ptr, w_ptr, out_ptr, M, K, ROWS, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        d = tl.program_id(1).to(tl.int64)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = (offs_m % M).to(tl.int64)  # rows past M re-read row r % M (never stored)
        offs_n = tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        u_ptrs = u_ptr + d * M * K + rows[:, None] * K + offs_k[None, :]
        w_ptrs = w_ptr + d * ROWS * K + (offs_n % ROWS)[None, :] * K + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(u_ptrs)
                b = tl.load(w_ptrs)
            else:
                a = tl.load(u_ptrs, mask=(offs_k < K - k)[None, :], other=0.)
                b = tl.load(w_ptrs, mask=(offs_k < K - k)[:, None], other=0.)
            if INTERP:  # the interpreter multiplies 16-bit operands as integers
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
            u_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out = out_ptr + d * M * ROWS + offs_m.to(tl.int64)[:, None] * ROWS + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty),
                 mask=(offs_m < M)[:, None] & (offs_n < ROWS)[None, :])


def x_proj_both(u2, w2, *, block_m: int = 128, block_k: int = 64, num_warps: int = 4,
                num_stages: int = 3):
    """u2 (2, ..., E) contiguous 16-bit, w2 (2, rows, E) in u2's dtype -> (2, ..., rows)."""
    if triton is None or not (u2.is_cuda or INTERPRET):
        raise RuntimeError('x_proj_both needs triton and a CUDA tensor (or TRITON_INTERPRET=1).')
    K, rows = u2.shape[-1], w2.shape[1]
    if (w2.dim() != 3 or w2.shape[0] != 2 or w2.shape[2] != K or u2.shape[0] != 2
            or w2.dtype != u2.dtype):
        raise ValueError(f'x_proj_both: u2 {tuple(u2.shape)} {u2.dtype} and w2 '
                         f'{tuple(w2.shape)} {w2.dtype} must be (2, ..., E) and (2, rows, E)')
    u2, w2 = u2.contiguous(), w2.contiguous()
    M = u2[0].numel() // max(K, 1)
    out = torch.empty(*u2.shape[:-1], rows, dtype=u2.dtype, device=u2.device)
    if M == 0:
        return out
    block_n = max(16, triton.next_power_of_2(rows))
    _x_proj_kernel[(triton.cdiv(M, block_m), 2)](
        u2, w2, out, M, K, rows, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=K % block_k == 0, num_warps=num_warps, num_stages=num_stages)
    return out
