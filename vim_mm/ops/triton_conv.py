"""Both directions' depthwise conv1d + SiLU of the Vim mixer in one Triton kernel (inference).

Vim's backward branch convolves the REVERSED sequence causally; in original token order that
is an anti-causal conv with the taps mirrored:

    u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k])
    u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k])

so both come from one read of ``x`` in its (batch, L, E) token-major layout (a slice of
``in_proj``'s output) with no flip and no transpose. Forward only: the Triton mixer uses it
when no gradient is needed; :func:`bidirectional_conv_torch` is the PyTorch twin.
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

__all__ = ['bidirectional_conv', 'bidirectional_conv_torch']


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
