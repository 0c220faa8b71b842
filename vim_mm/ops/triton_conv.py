"""Both directions' depthwise conv1d + SiLU of the Vim mixer in one Triton kernel (inference).

Vim's backward branch convolves the REVERSED sequence causally; in original token order that
is an anti-causal conv with the taps mirrored:

    u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k])
    u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k])

so both come from one read of ``x`` in its (batch, L, E) token-major layout (a slice of
``in_proj``'s output) with no flip and no transpose. Forward only: the Triton mixer uses it
when no gradient is needed; :func:`bidirectional_conv_torch` is the PyTorch twin.

:func:`bidirectional_conv_xproj` also applies both directions' ``x_proj`` to the tile of u it
has just made (still in registers), so that the inference path with the CUDA C++ scan could read
x once and never read u back for the two thin x_proj GEMMs (all three steps are memory-bound).
On the H200 it is still ~2x slower than the conv kernel + two GEMMs (255 registers per thread:
benchmarks/gpu_conv_xproj.py), so the mixer leaves it off (``BiMambaMixer.fuse_conv_xproj``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'

__all__ = ['bidirectional_conv', 'bidirectional_conv_torch', 'bidirectional_conv_xproj',
           'bidirectional_conv_xproj_torch', 'CONV_XPROJ_CONFIG']

# bidirectional_conv_xproj's launch: tokens per program, channels per loop step, warps and
# software-pipelining stages: the best of benchmarks/gpu_conv_xproj.py --sweep on the H200 at
# every shape timed (block_l 32-128, block_e 32/64, 4/8 warps, 1/2 stages)
CONV_XPROJ_CONFIG = dict(block_l=128, block_e=32, num_warps=8, num_stages=2)


def bidirectional_conv_torch(x, w_f, b_f, w_b, b_b):
    """x (batch, L, E) -> (u_f, u_b), each (batch, L, E); weights (E, W) or (E, 1, W)."""
    xc = x.transpose(1, 2)
    width = w_f.shape[-1]
    outs = []
    for w, b, pad in ((w_f, b_f, (width - 1, 0)), (w_b.flip(-1), b_b, (0, width - 1))):
        w = w.reshape(w.shape[0], 1, width).to(x.dtype)
        y = F.conv1d(F.pad(xc, pad), w, b.to(x.dtype), groups=xc.shape[1])
        outs.append(F.silu(y).transpose(1, 2))
    return outs[0], outs[1]


def _xproj_padded(u, w):
    """x_proj's output (batch, L, P), P = its width rounded up to 8 (16-byte rows for the GEMM
    and the CUDA C++ scan's loads), as the view [..., :width]; weights cast to u's dtype."""
    width = w.shape[0]
    return F.linear(u, F.pad(w.to(u.dtype), (0, 0, 0, -width % 8)))[..., :width]


def bidirectional_conv_xproj_torch(x, w_f, b_f, w_b, b_b, xproj_w_f, xproj_w_b,
                                   conv=bidirectional_conv_torch):
    """(u_f, u_b, x_dbl_f, x_dbl_b): ``conv`` (both directions: this module's PyTorch twin, or
    its Triton kernel where the mixer does not fuse) then each direction's x_proj (weights
    (width, E)) on its u; u contiguous, the x_dbl views of (batch, L, P)."""
    u_f, u_b = (u.contiguous() for u in conv(x, w_f, b_f, w_b, b_b))
    return u_f, u_b, _xproj_padded(u_f, xproj_w_f), _xproj_padded(u_b, xproj_w_b)


if triton is not None:
    @triton.jit
    def _bi_conv_kernel(x_ptr, sx_b, sx_l, wf_ptr, bf_ptr, wb_ptr, bb_ptr, uf_ptr, ub_ptr,
                        L, E, WIDTH: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_E: tl.constexpr):
        """One (BLOCK_L tokens, BLOCK_E channels) tile of both outputs; x's channel stride 1."""
        offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        acc_f = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
            bf_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        acc_b = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
            bb_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        x_row = x_ptr + bid * sx_b + offs_e[None, :]
        for k in tl.static_range(WIDTH):
            t_f = offs_l - (WIDTH - 1) + k
            m_f = (t_f >= 0) & (t_f < L)
            x_f = tl.load(x_row + t_f[:, None] * sx_l, mask=m_f[:, None] & mask_e[None, :],
                          other=0.0).to(tl.float32)
            w_f = tl.load(wf_ptr + offs_e * WIDTH + k, mask=mask_e, other=0.0).to(tl.float32)
            acc_f += x_f * w_f[None, :]
            t_b = offs_l + (WIDTH - 1) - k
            m_b = t_b < L
            x_b = tl.load(x_row + t_b[:, None] * sx_l, mask=m_b[:, None] & mask_e[None, :],
                          other=0.0).to(tl.float32)
            w_b = tl.load(wb_ptr + offs_e * WIDTH + k, mask=mask_e, other=0.0).to(tl.float32)
            acc_b += x_b * w_b[None, :]
        out = (bid * L + offs_l[:, None]) * E + offs_e[None, :]
        mask = (offs_l < L)[:, None] & mask_e[None, :]
        tl.store(uf_ptr + out, acc_f * tl.sigmoid(acc_f), mask=mask)
        tl.store(ub_ptr + out, acc_b * tl.sigmoid(acc_b), mask=mask)


def bidirectional_conv(x, w_f, b_f, w_b, b_b, block_l: int = 32, block_e: int = 128):
    """Triton version of :func:`bidirectional_conv_torch` (outputs contiguous (batch, L, E))."""
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError('bidirectional_conv needs triton and a CUDA tensor '
                           '(or TRITON_INTERPRET=1).')
    if x.stride(2) != 1:
        x = x.contiguous()
    batch, L, E = x.shape
    width = w_f.shape[-1]
    w_f, w_b = (w.reshape(E, width).contiguous() for w in (w_f, w_b))
    u_f = torch.empty(batch, L, E, dtype=x.dtype, device=x.device)
    u_b = torch.empty_like(u_f)
    block_e = min(block_e, triton.next_power_of_2(E))
    grid = (triton.cdiv(L, block_l), batch, triton.cdiv(E, block_e))
    _bi_conv_kernel[grid](x, x.stride(0), x.stride(1), w_f, b_f.contiguous(), w_b,
                          b_b.contiguous(), u_f, u_b, L, E, WIDTH=width, BLOCK_L=block_l,
                          BLOCK_E=block_e)
    return u_f, u_b


if triton is not None:
    @triton.jit
    def _bi_conv_xproj_kernel(x_ptr, sx_b, sx_l, wf_ptr, bf_ptr, wb_ptr, bb_ptr, pf_ptr, pb_ptr,
                              uf_ptr, ub_ptr, df_ptr, db_ptr, L, E, NP, P,
                              WIDTH: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                              BLOCK_P: tl.constexpr, DOT_DTYPE: tl.constexpr,
                              PRECISION: tl.constexpr):
        """BLOCK_L tokens of one batch row: per BLOCK_E-channel step, both convs + SiLU (fp32,
        as _bi_conv_kernel), u stored in x's dtype, and u @ x_proj^T of both directions added
        to fp32 accumulators (x_proj rows >= NP masked to zero); x_dbl rows stored at the end.
        The dot's operands are u and x_proj in x's dtype, converted to DOT_DTYPE (x's dtype
        but for the interpreter's bf16, see bidirectional_conv_xproj)."""
        offs_l = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
        bid = tl.program_id(1).to(tl.int64)
        offs_p = tl.arange(0, BLOCK_P)
        dtype = uf_ptr.dtype.element_ty
        dbl_f = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
        dbl_b = tl.zeros((BLOCK_L, BLOCK_P), dtype=tl.float32)
        mask_l = offs_l < L
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            acc_f = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
                bf_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
            acc_b = tl.zeros((BLOCK_L, BLOCK_E), dtype=tl.float32) + tl.load(
                bb_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
            x_row = x_ptr + bid * sx_b + offs_e[None, :]
            # token shift s - (WIDTH-1): forward tap s for s <= WIDTH-1, backward tap
            # 2 (WIDTH-1) - s for s >= WIDTH-1 (the shift-0 row is loaded once for both)
            for s in tl.static_range(2 * WIDTH - 1):
                t = offs_l + s - (WIDTH - 1)
                xs = tl.load(x_row + t[:, None] * sx_l, mask=((t >= 0) & (t < L))[:, None]
                             & mask_e[None, :], other=0.0).to(tl.float32)
                if s <= WIDTH - 1:
                    w = tl.load(wf_ptr + offs_e * WIDTH + s, mask=mask_e, other=0.0)
                    acc_f += xs * w.to(tl.float32)[None, :]
                if s >= WIDTH - 1:
                    w = tl.load(wb_ptr + offs_e * WIDTH + 2 * (WIDTH - 1) - s, mask=mask_e,
                                other=0.0)
                    acc_b += xs * w.to(tl.float32)[None, :]
            u_f = (acc_f * tl.sigmoid(acc_f)).to(dtype)
            u_b = (acc_b * tl.sigmoid(acc_b)).to(dtype)
            out = (bid * L + offs_l[:, None]) * E + offs_e[None, :]
            mask = mask_l[:, None] & mask_e[None, :]
            tl.store(uf_ptr + out, u_f, mask=mask)
            tl.store(ub_ptr + out, u_b, mask=mask)
            w_off = offs_p[None, :] * E + offs_e[:, None]  # x_proj^T chunk (BLOCK_E, BLOCK_P)
            w_mask = mask_e[:, None] & (offs_p < NP)[None, :]
            w_f = tl.load(pf_ptr + w_off, mask=w_mask, other=0.0).to(dtype).to(DOT_DTYPE)
            w_b = tl.load(pb_ptr + w_off, mask=w_mask, other=0.0).to(dtype).to(DOT_DTYPE)
            dbl_f = tl.dot(u_f.to(DOT_DTYPE), w_f, dbl_f, input_precision=PRECISION)
            dbl_b = tl.dot(u_b.to(DOT_DTYPE), w_b, dbl_b, input_precision=PRECISION)
        out = (bid * L + offs_l[:, None]) * P + offs_p[None, :]
        mask = mask_l[:, None] & (offs_p < P)[None, :]
        tl.store(df_ptr + out, dbl_f.to(dtype), mask=mask)
        tl.store(db_ptr + out, dbl_b.to(dtype), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
               torch.float16: tl.float16} if triton is not None else {}


def bidirectional_conv_xproj(x, w_f, b_f, w_b, b_b, xproj_w_f, xproj_w_b, **config):
    """Triton version of :func:`bidirectional_conv_xproj_torch`: one read of x (batch, L, E)
    (any row stride, e.g. a slice of in_proj's output) makes u_f, u_b (contiguous, x's dtype)
    and x_dbl_f, x_dbl_b, views [..., :width] of (batch, L, P) tensors (P = width rounded up
    to 8; columns width..P are zeros). x_proj weights (width, E) of any float dtype are cast to
    x's dtype (as F.linear under autocast); conv weights stay as given, accumulated in fp32 (as
    :func:`bidirectional_conv`). ``config`` overrides :data:`CONV_XPROJ_CONFIG` (block_l,
    block_e, num_warps; num_stages too)."""
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError('bidirectional_conv_xproj needs triton and a CUDA tensor '
                           '(or TRITON_INTERPRET=1).')
    if x.stride(2) != 1:
        x = x.contiguous()
    batch, L, E = x.shape
    width, conv_width = xproj_w_f.shape[0], w_f.shape[-1]
    if xproj_w_f.shape != (width, E) or xproj_w_b.shape != (width, E):
        raise ValueError(f'x_proj weights must be ({width}, {E}): got '
                         f'{tuple(xproj_w_f.shape)}, {tuple(xproj_w_b.shape)}')
    cfg = {**CONV_XPROJ_CONFIG, **config}
    block_e = min(cfg['block_e'], max(16, triton.next_power_of_2(E)))
    P = width + (-width % 8)
    w_f, w_b = (w.reshape(E, conv_width).contiguous() for w in (w_f, w_b))
    u_f = torch.empty(batch, L, E, dtype=x.dtype, device=x.device)
    u_b = torch.empty_like(u_f)
    d_f = torch.empty(batch, L, P, dtype=x.dtype, device=x.device)
    d_b = torch.empty_like(d_f)
    # Triton's interpreter multiplies bf16 operands' bit patterns (triton 3.x): there the dot
    # takes them in fp32, exact (bf16 products are exact in fp32) and fp32-accumulated as on GPU
    upcast = INTERPRET and x.dtype == torch.bfloat16
    grid = (triton.cdiv(L, cfg['block_l']), batch)
    _bi_conv_xproj_kernel[grid](
        x, x.stride(0), x.stride(1), w_f, b_f.contiguous(), w_b, b_b.contiguous(),
        xproj_w_f.contiguous(), xproj_w_b.contiguous(), u_f, u_b, d_f, d_b, L, E, width, P,
        WIDTH=conv_width, BLOCK_L=cfg['block_l'], BLOCK_E=block_e,
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        DOT_DTYPE=tl.float32 if upcast else _TL_DTYPES[x.dtype],
        PRECISION='ieee' if x.dtype == torch.float32 or upcast else 'tf32',  # fp32 as F.linear
        **{k: cfg[k] for k in ('num_warps', 'num_stages') if k in cfg})
    return u_f, u_b, d_f[..., :width], d_b[..., :width]
