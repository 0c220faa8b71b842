"""The bidirectional Vim mixer on mamba-ssm's selective-scan and causal-conv1d CUDA kernels.

One autograd function covers both directions and ``out_proj`` (like mamba-ssm's MambaInnerFn,
which the authors call once per direction): the convolution outputs and deltas are recomputed in
backward instead of stored, and the gated outputs are recomputed by the scan's backward kernel,
so per layer only ``xz``, the two ``x_proj`` outputs and the scan checkpoints are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_ops import linear_channel_first

try:  # the optional GPU extra: pip install vim_mm[cuda]
    import selective_scan_cuda
    from causal_conv1d.cpp_functions import (causal_conv1d_bwd_function,
                                             causal_conv1d_fwd_function)
    CUDA_KERNELS_AVAILABLE = True
    CUDA_IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a wheel built for another torch / CUDA
    CUDA_KERNELS_AVAILABLE = False
    CUDA_IMPORT_ERROR = exc

_custom_fwd = torch.amp.custom_fwd(device_type='cuda')
_custom_bwd = torch.amp.custom_bwd(device_type='cuda')


def scan_chunk(length: int) -> int:
    """Tokens per chunk of mamba-ssm's selective-scan kernels for a sequence of ``length``."""
    return 2048 if length > 1024 else max(128, 1 << (length - 1).bit_length())


def padded_length(length: int) -> int:
    """The length the kernels run at: the next multiple of the scan chunk, if that adds <= 1/16.

    The scan (and conv) kernels load vectors only when the length is a multiple of their chunk;
    unaligned, a chunk costs ~1.4x (bf16, H100): 6084 tokens (1248x1248) took longer per token
    than 6144 would. Zero tokens appended to either direction come after every real token of
    that scan, so they change no real output and receive zero gradient.
    """
    padded = -(-length // scan_chunk(length)) * scan_chunk(length)
    return padded if (padded - length) * 16 <= length else length


def _both_directions(xz, length: int):
    """``xz`` and its reverse along the sequence, each zero-padded at the end to ``length``."""
    L = xz.shape[-1]
    if length == L:
        return xz, xz.flip(-1)
    forward = F.pad(xz, (0, length - L))
    index = torch.cat([torch.arange(L - 1, -1, -1, device=xz.device),
                       torch.arange(L, length, device=xz.device)])
    return forward, forward.index_select(-1, index)  # one pass: reverse the tokens, keep pads


def _scan_inputs(x_dbl, dt_proj_w, dt_rank, d_state):
    """delta (B, E, L) and the contiguous (B, 1, N, L) B and C from x_dbl (B, R + 2N, L)."""
    delta = linear_channel_first(dt_proj_w, x_dbl[:, :dt_rank])
    B = x_dbl[:, dt_rank:dt_rank + d_state].unsqueeze(1).contiguous()
    C = x_dbl[:, dt_rank + d_state:].unsqueeze(1).contiguous()
    return delta, B, C


def _direction_forward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D):
    """Run one direction; returns what backward needs and the scan output."""
    dt_rank, d_state = dt_proj_w.shape[1], A.shape[-1]
    conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
    x_dbl = linear_channel_first(x_proj_w, conv_out)  # (B, R + 2N, L)
    delta, B, C = _scan_inputs(x_dbl, dt_proj_w, dt_rank, d_state)
    out, scan_state, out_z = selective_scan_cuda.fwd(conv_out, delta, A, B, C, D, z, dt_bias, True)
    return x_dbl, out, scan_state, out_z


def _direction_backward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                        x_dbl, scan_state, out, dout_y, dx, dz):
    """Backward of one direction, writing into the dx/dz views; returns parameter grads."""
    dt_rank, d_state = dt_proj_w.shape[1], A.shape[-1]
    conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
    delta, B, C = _scan_inputs(x_dbl, dt_proj_w, dt_rank, d_state)
    dconv_out, ddelta, dA, dB, dC, dD, ddt_bias, dz, out_z = selective_scan_cuda.bwd(
        conv_out, delta, A, B, C, D, z, dt_bias, dout_y, scan_state, out, dz, True, True)
    dx_dbl = torch.empty_like(x_dbl)
    dx_dbl[:, dt_rank:dt_rank + d_state] = dB.squeeze(1)
    dx_dbl[:, dt_rank + d_state:] = dC.squeeze(1)
    ddt_proj_w = torch.bmm(ddelta, x_dbl[:, :dt_rank].transpose(1, 2)).sum(0)
    dx_dbl[:, :dt_rank] = linear_channel_first(dt_proj_w.t(), ddelta)
    dx_proj_w = torch.bmm(dx_dbl, conv_out.transpose(1, 2)).sum(0)
    dconv_out = dconv_out + linear_channel_first(x_proj_w.t(), dx_dbl)
    _, dconv_w, dconv_b, _ = causal_conv1d_bwd_function(  # writes dx in place
        x, conv_w, conv_b, dconv_out, None, None, None, dx, False, True)
    return out_z, (dconv_w, dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA, dD)


class BiMambaInnerFn(torch.autograd.Function):
    """``out_proj((fwd(x, z) + flip(bwd(flip(x), flip(z)))) / 2)`` for xz of shape (B, 2E, L)."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
                out_proj_w, out_proj_b):
        if torch.is_autocast_enabled('cuda'):
            dtype = torch.get_autocast_dtype('cuda')
            x_proj_w, dt_proj_w, x_proj_w_b, dt_proj_w_b, out_proj_w = (
                w.to(dtype) for w in (x_proj_w, dt_proj_w, x_proj_w_b, dt_proj_w_b, out_proj_w))
            out_proj_b = None if out_proj_b is None else out_proj_b.to(dtype)
        xz = xz.contiguous()
        conv_w, conv_w_b = conv_w.squeeze(1).contiguous(), conv_w_b.squeeze(1).contiguous()
        A, A_b = A.contiguous(), A_b.contiguous()
        D, D_b = D.float().contiguous(), D_b.float().contiguous()
        dt_bias, dt_bias_b = dt_bias.float().contiguous(), dt_bias_b.float().contiguous()
        L = xz.shape[-1]
        ctx.padded_length = padded_length(L)
        xz_f, xz_r = _both_directions(xz, ctx.padded_length)
        x, z = xz_f.chunk(2, dim=1)
        x_r, z_r = xz_r.chunk(2, dim=1)
        x_dbl, out, scan_state, out_z = _direction_forward(
            x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D)
        x_dbl_b, out_b, scan_state_b, out_z_b = _direction_forward(
            x_r, z_r, conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b)
        merged = (out_z[..., :L] + out_z_b[..., :L].flip(-1)) * 0.5  # (B, E, L)
        ctx.has_out_bias = out_proj_b is not None
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                              conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
                              out_proj_w, x_dbl, x_dbl_b, out, out_b, scan_state, scan_state_b)
        y = torch.bmm(merged.transpose(1, 2), out_proj_w.t().expand(xz.shape[0], -1, -1))
        return y if out_proj_b is None else y + out_proj_b

    @staticmethod
    @_custom_bwd
    def backward(ctx, dout):
        (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
         conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
         out_proj_w, x_dbl, x_dbl_b, out, out_b, scan_state, scan_state_b) = ctx.saved_tensors
        dout_t = dout.transpose(1, 2)  # (batch, D, L)
        dmerged = linear_channel_first(out_proj_w.t() * 0.5, dout_t)  # (batch, E, L)
        L = xz.shape[-1]
        xz_f, xz_r = _both_directions(xz, ctx.padded_length)
        dmerged_f, dmerged_r = _both_directions(dmerged, ctx.padded_length)
        x, z = xz_f.chunk(2, dim=1)
        dxz_f = torch.empty_like(xz_f)
        dx, dz = dxz_f.chunk(2, dim=1)
        out_z, grads = _direction_backward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A,
                                           D, x_dbl, scan_state, out, dmerged_f, dx, dz)
        x_r, z_r = xz_r.chunk(2, dim=1)
        dxz_r = torch.empty_like(xz_r)
        dx_r, dz_r = dxz_r.chunk(2, dim=1)
        out_z_b, grads_b = _direction_backward(
            x_r, z_r, conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
            x_dbl_b, scan_state_b, out_b, dmerged_r, dx_r, dz_r)
        dxz = dxz_f[..., :L] + dxz_r[..., :L].flip(-1)
        merged = (out_z[..., :L] + out_z_b[..., :L].flip(-1)) * 0.5
        dout_proj_w = torch.bmm(dout_t, merged.transpose(1, 2)).sum(0)
        dout_proj_b = dout.sum((0, 1)) if ctx.has_out_bias else None
        dconv_w, dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA, dD = grads
        dconv_w_b, dconv_b_b, dx_proj_w_b, ddt_proj_w_b, ddt_bias_b, dA_b, dD_b = grads_b
        return (dxz, dconv_w.unsqueeze(1), dconv_b, dx_proj_w, ddt_proj_w, ddt_bias, dA, dD,
                dconv_w_b.unsqueeze(1), dconv_b_b, dx_proj_w_b, ddt_proj_w_b, ddt_bias_b,
                dA_b, dD_b, dout_proj_w, dout_proj_b)


def bimamba_inner_cuda(xz, fwd: dict, bwd: dict, out_proj_weight, out_proj_bias=None):
    """xz: (B, 2E, L) -> (B, L, D). ``fwd``/``bwd`` hold each direction's parameters."""
    keys = ('conv_w', 'conv_b', 'x_proj_w', 'dt_proj_w', 'dt_bias', 'A', 'D')
    return BiMambaInnerFn.apply(xz, *(fwd[k] for k in keys), *(bwd[k] for k in keys),
                                out_proj_weight, out_proj_bias)
