"""The backbone's output feature map in one Triton kernel (inference): the last residual add,
the final RMSNorm and the transpose to (B, C, H, W).

At an output index the backbone computes, for the stream ``residual`` (B, L, C) float32 and the
block's output ``x`` (B, L, C, 16-bit under autocast):

    stream = residual + x.float()
    feat = stream * rsqrt(mean(stream ** 2) + eps) * weight      # the last index: norm_f
    out = feat.transpose(1, 2).reshape(B, C, H, W).contiguous()

which in PyTorch is a cast copy, the add, five elementwise and reduction passes of the norm and a
strided copy over (B, L, C) float32 tensors. :func:`add_norm_to_featmap` reads ``residual`` and
``x`` once and writes ``out`` once: a program normalizes BLOCK_T whole token rows (the norm
needs all C channels of a token) and stores them channel-major (Triton's layout conversion makes
the transposed store coalesced). On an H200 (eleventh session, same call, CUDA graphs): Vim-Ti
1024 x 1024 b16 989.3 -> 1008.8 img/s end to end (+2.0%; the kernel alone was not timed).
Forward only; :func:`add_norm_to_featmap_torch` is the twin.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ['add_norm_to_featmap', 'add_norm_to_featmap_torch', 'offsets_fit']


def add_norm_to_featmap_torch(residual, x, weight, eps: float, grid, cls_token: bool = False):
    """residual (B, L, C) float32, x (B, L, C); weight (C,) or None (no norm) -> (B, C, *grid)
    float32, L = grid[0] * grid[1] (+ 1 with ``cls_token``: the class token's middle row,
    which the feature map leaves out)."""
    stream = residual + x.to(residual.dtype)
    if cls_token:
        mid = (stream.shape[1] - 1) // 2
        stream = torch.cat([stream[:, :mid], stream[:, mid + 1:]], dim=1)
    if weight is not None:
        stream = stream * torch.rsqrt(stream.pow(2).mean(-1, keepdim=True) + eps) * weight.to(
            stream.dtype)
    return stream.transpose(1, 2).reshape(stream.shape[0], -1, *grid).contiguous()


if triton is not None:
    @triton.jit
    def _add_norm_featmap_kernel(res_ptr, sr_b, sr_t, x_ptr, sx_b, sx_t, w_ptr, out_ptr, so_b,
                                 so_c, L, C, eps, MID, NORM: tl.constexpr, CLS: tl.constexpr,
                                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        """Feature-map position t of batch row b for BLOCK_T positions; with CLS its stream row
        is t + (t >= MID) (the class token's row MID is left out)."""
        pid_t, b = tl.program_id(0), tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.arange(0, BLOCK_C)
        ok = (t[:, None] < L) & (c[None, :] < C)
        r = t + (t >= MID).to(t.dtype) if CLS else t
        s = tl.load(res_ptr + b * sr_b + r[:, None] * sr_t + c[None, :], mask=ok, other=0.)
        s += tl.load(x_ptr + b * sx_b + r[:, None] * sx_t + c[None, :], mask=ok,
                     other=0.).to(tl.float32)
        if NORM:
            mean_sq = tl.sum(s * s, axis=1) / C
            w = tl.load(w_ptr + c, mask=c < C, other=0.).to(tl.float32)
            s = s * tl.rsqrt(mean_sq + eps)[:, None] * w[None, :]
        tl.store(out_ptr + b * so_b + c[None, :] * so_c + t[:, None], s, mask=ok)


def offsets_fit(residual, x) -> bool:
    """Whether both (B, L, C) inputs and the (B, C, L) output fit the kernel's 32-bit offsets."""
    b, rows, C = residual.shape
    return max(residual.stride(0), x.stride(0), rows * C) * b < 2 ** 31


def add_norm_to_featmap(residual, x, weight, eps: float, grid, cls_token: bool = False,
                        block_t: int = 32, num_warps: int = 4):
    """The Triton kernel for :func:`add_norm_to_featmap_torch` (same arguments and result;
    residual float32, both with unit channel stride)."""
    if triton is None:
        raise RuntimeError('add_norm_to_featmap needs Triton')
    b, rows, C = residual.shape
    L = rows - int(cls_token)  # feature-map positions
    if (x.shape != residual.shape or residual.dtype != torch.float32 or L != grid[0] * grid[1]
            or residual.stride(-1) != 1 or x.stride(-1) != 1):
        raise ValueError(f'add_norm_to_featmap: residual {tuple(residual.shape)} '
                         f'{residual.dtype} and x {tuple(x.shape)} must match, float32 residual, '
                         f'unit channel stride, {L} positions = grid {tuple(grid)}')
    if not offsets_fit(residual, x):
        raise ValueError('add_norm_to_featmap: the kernel addresses in 32 bits; split the batch '
                         f'of {tuple(residual.shape)}')
    out = torch.empty(b, C, *grid, dtype=torch.float32, device=residual.device)
    _add_norm_featmap_kernel[(triton.cdiv(L, block_t), b)](
        residual, residual.stride(0), residual.stride(1), x, x.stride(0), x.stride(1),
        weight if weight is not None else residual, out, out.stride(0), out.stride(1), L, C,
        float(eps), (rows - 1) // 2, NORM=weight is not None, CLS=cls_token, BLOCK_T=block_t,
        BLOCK_C=triton.next_power_of_2(C), num_warps=num_warps)
    return out
