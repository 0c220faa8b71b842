"""Patch embedding plus position embedding in one Triton kernel (inference under autocast).

What the backbone computes before its first layer, for non-overlapping P x P patches:

    tokens = F.linear(patches(image.to(dtype)), W.to(dtype), bias.to(dtype))   # (B, gh gw, N)
    stream = tokens + pos                                                       # float32

(``dtype`` the autocast dtype, ``W`` the conv weight flattened to (N, C P P), pixels past the
image's bottom/right edge zero, as ``PatchEmbed`` pads). Done by PyTorch that is a cast copy of
the image, a copy that gathers the patches, the GEMM and an add. :func:`patch_embed_with_position`
is one kernel: an implicit GEMM whose A tiles are read straight from the image (BLOCK_M
consecutive tokens; a token's P pixels of an image row are contiguous, and so are its
neighbours'), cast to ``dtype`` in registers; bias, the rounding of the tokens to ``dtype`` (what
F.linear returns) and the position embedding are its epilogue. On an H200, bf16, CUDA graphs
(``benchmarks/gpu_patch_embed.py``, eleventh session): 0.346 -> 0.137 ms at 1024 x 1024 b16,
0.139 -> 0.066 ms at 224 x 224 b128, the same values; end to end +1.3% at 224, 1024 and 2048 px.
Forward only; :func:`patch_embed_with_position_torch` is the PyTorch twin.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ['patch_embed_with_position', 'patch_embed_with_position_torch', 'default_settings',
           'offsets_fit']

# Triton's CPU interpreter (3.8) multiplies bf16 tiles wrongly in tl.dot: there (INTERPRET) the
# kernel multiplies the same 16-bit values as float32 (the products are exact either way)
from .triton_scan import INTERPRET  # noqa: E402


def patch_embed_with_position_torch(image, weight, bias, pos, patch: int, dtype: torch.dtype,
                                    cls_token=None):
    """image (B, C, H, W); weight (N, C, P, P); bias (N,) or None; pos (1 or B, gh gw, N).
    Returns ``bf16/fp16 tokens + pos`` in pos's dtype, (B, gh gw, N), the patches of the image
    zero-padded at its bottom/right to whole patches. With ``cls_token`` (1, 1, N) it is inserted
    in the middle of the tokens first, as Vim does (pos then has gh gw + 1 rows)."""
    b, c, h, w = image.shape
    gh, gw = -(-h // patch), -(-w // patch)
    x = F.pad(image, (0, gw * patch - w, 0, gh * patch - h)).to(dtype)
    patches = x.reshape(b, c, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5)
    tokens = F.linear(patches.reshape(b, gh * gw, -1), weight.reshape(weight.shape[0], -1).to(dtype),
                      None if bias is None else bias.to(dtype))
    if cls_token is not None:
        mid = tokens.shape[1] // 2
        tokens = torch.cat([tokens[:, :mid].to(pos.dtype), cls_token.expand(b, 1, -1).to(pos.dtype),
                            tokens[:, mid:].to(pos.dtype)], dim=1)
    return tokens + pos


if triton is not None:
    @triton.jit
    def _patch_embed_kernel(img_ptr, si_b, si_c, si_h, si_w, H, W, gh, gw, M,
                            w_ptr, bias_ptr, pos_ptr, sp_b, sp_t, out_ptr, so_b, so_t, N, MID,
                            CIN: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                            HAS_BIAS: tl.constexpr, CLS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BF16: tl.constexpr,
                            DOT_IN_FP32: tl.constexpr):
        """One program: BLOCK_M consecutive tokens of the batch (row-major patches, across patch
        rows and images) times BLOCK_N output channels. K walks the weight's (c, i, j) order,
        ROWS image rows of one channel (ROWS * P columns of K) at a time: a token's P pixels of
        an image row are contiguous, and so are the neighbouring tokens' of the same patch row.
        Output channels vary fastest over the programs, so the programs of the same tokens run
        together and share their image rows in L2. CLS: patch token t is row t + (t >= MID) of
        the output and the position (the class token's row is written by the wrapper)."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token of the batch
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, ROWS * P)  # image row i0 + kk // P, column kk % P of the patch
        K: tl.constexpr = CIN * P * P
        cdtype = tl.bfloat16 if BF16 else tl.float16
        m_ok, n_ok = m < M, n < N
        b, t = m // (gh * gw), m % (gh * gw)
        gy, gx = t // gw, t % gw
        col = gx[:, None] * P + (kk % P)[None, :]  # image column, [BLOCK_M, ROWS * P]
        col_ok = m_ok[:, None] & (col < W)
        base = img_ptr + b[:, None] * si_b + col * si_w
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(CIN * (P // ROWS)):
            c = kb // (P // ROWS)
            row = gy[:, None] * P + (kb % (P // ROWS)) * ROWS + (kk // P)[None, :]
            a = tl.load(base + c * si_c + row * si_h, mask=col_ok & (row < H), other=0.)
            k = kb * ROWS * P + kk
            wt = tl.load(w_ptr + n[None, :] * K + k[:, None], mask=n_ok[None, :], other=0.)
            a, wt = a.to(cdtype), wt.to(cdtype)
            if DOT_IN_FP32:  # the interpreter (see INTERPRET)
                acc = tl.dot(a.to(tl.float32), wt.to(tl.float32), acc)
            else:
                acc = tl.dot(a, wt, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.).to(cdtype).to(tl.float32)[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        r = t + (t >= MID).to(t.dtype) if CLS else t  # the token's row
        pos = tl.load(pos_ptr + b[:, None] * sp_b + r[:, None] * sp_t + n[None, :], mask=ok,
                      other=0.)
        out = acc.to(cdtype).to(tl.float32) + pos.to(tl.float32)
        tl.store(out_ptr + b[:, None] * so_b + r[:, None] * so_t + n[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=ok)


def offsets_fit(image, patch: int, n_out: int) -> bool:
    """Whether the image's and the output's elements fit the kernel's 32-bit offsets."""
    b, _, h, w = image.shape
    return max(image.numel(), b * (-(-h // patch) * -(-w // patch) + 1) * n_out) < 2 ** 31


def default_settings(n_out: int) -> dict:
    """The kernel's tile settings for N output channels: the fastest of 24 on an H200 at Vim-Ti
    (N = 192: 4 of 5 sizes, within 5% at the fifth) and Vim-S (384) widths, one sweep
    (results/h200_patch_embed_v2.json)."""
    if n_out % 128 == 0:
        return dict(block_m=128, block_n=128, rows=2, num_warps=4, num_stages=3)
    return dict(block_m=128, block_n=64, rows=4, num_warps=4, num_stages=3)


def patch_embed_with_position(image, weight, bias, pos, patch: int, dtype: torch.dtype,
                              cls_token=None, **settings):
    """The Triton kernel for :func:`patch_embed_with_position_torch` (same arguments and result;
    ``dtype`` bf16 or fp16; pos float32, (1 or B, gh gw [+ 1], N) with unit channel stride).
    ``settings``: block_m, block_n, rows (image rows per K step, dividing the patch size),
    num_warps, num_stages, each defaulting to :func:`default_settings`."""
    if triton is None:
        raise RuntimeError('patch_embed_with_position needs Triton')
    b, c, h, w = image.shape
    n_out = weight.shape[0]
    unknown = set(settings) - {'block_m', 'block_n', 'rows', 'num_warps', 'num_stages'}
    if unknown:
        raise TypeError(f'patch_embed_with_position: unknown settings {sorted(unknown)}')
    settings = {**default_settings(n_out), **settings}
    rows = settings['rows']
    if weight.shape[1:] != (c, patch, patch) or patch % rows:
        raise ValueError(f'patch_embed_with_position: weight {tuple(weight.shape)} does not match '
                         f'{c} channels and {patch}x{patch} patches (rows={rows} must divide it)')
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f'patch_embed_with_position: dtype must be bf16 or fp16, got {dtype}')
    gh, gw = -(-h // patch), -(-w // patch)
    rows_out = gh * gw + int(cls_token is not None)
    if pos.shape[-2:] != (rows_out, n_out) or pos.stride(-1) != 1:
        raise ValueError(f'patch_embed_with_position: pos {tuple(pos.shape)} should be '
                         f'(1 or {b}, {rows_out}, {n_out}) with unit channel stride')
    if not offsets_fit(image, patch, n_out):
        raise ValueError('patch_embed_with_position: the kernel addresses the image and the '
                         f'tokens in 32 bits; split the batch of {tuple(image.shape)}')
    weight = weight.reshape(n_out, -1).contiguous()
    out = torch.empty(b, rows_out, n_out, dtype=pos.dtype, device=image.device)
    sp_b = pos.stride(0) if pos.shape[0] > 1 else 0
    block_m, block_n = settings['block_m'], settings['block_n']
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(b * gh * gw, block_m))
    _patch_embed_kernel[grid](
        image, *image.stride(), h, w, gh, gw, b * gh * gw, weight,
        bias if bias is not None else weight,
        pos, sp_b, pos.stride(-2), out, out.stride(0), out.stride(1), n_out,
        gh * gw // 2, CIN=c, P=patch, ROWS=rows, HAS_BIAS=bias is not None,
        CLS=cls_token is not None, BLOCK_M=block_m, BLOCK_N=block_n,
        BF16=dtype == torch.bfloat16, DOT_IN_FP32=INTERPRET, num_warps=settings['num_warps'],
        num_stages=settings['num_stages'])
    if cls_token is not None:  # the middle row: the class token plus its position
        mid = gh * gw // 2
        out[:, mid] = cls_token.reshape(1, n_out).to(out.dtype) + pos[:, mid].to(out.dtype)
    return out
