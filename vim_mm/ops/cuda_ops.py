"""The bidirectional Vim mixer on mamba-ssm's selective-scan and causal-conv1d CUDA kernels.

One autograd function covers both directions and ``out_proj`` (like mamba-ssm's MambaInnerFn,
which the authors call once per direction): the convolution outputs and deltas are recomputed in
backward instead of stored, and the gated outputs are recomputed by the scan's backward kernel,
so per layer only ``xz``, the two ``x_proj`` outputs and the scan checkpoints are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def _direction_forward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D):
    """Run one direction; returns what backward needs and the scan output."""
    L = x.shape[-1]
    dt_rank, d_state = dt_proj_w.shape[1], A.shape[-1]
    conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
    x_dbl = F.linear(conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1]), x_proj_w)
    delta = (dt_proj_w @ x_dbl[:, :dt_rank].t()).view(-1, x.shape[0], L).transpose(0, 1)
    B = x_dbl[:, dt_rank:dt_rank + d_state].view(x.shape[0], L, 1, d_state).permute(0, 2, 3, 1)
    C = x_dbl[:, -d_state:].view(x.shape[0], L, 1, d_state).permute(0, 2, 3, 1)
    B, C = B.contiguous(), C.contiguous()
    out, scan_state, out_z = selective_scan_cuda.fwd(conv_out, delta, A, B, C, D, z, dt_bias, True)
    return conv_out, x_dbl, delta, B, C, out, scan_state, out_z


def _direction_backward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                        x_dbl, scan_state, out, dout_y, dx, dz):
    """Backward of one direction, writing into the dx/dz views; returns parameter grads."""
    L = x.shape[-1]
    batch = x.shape[0]
    dt_rank, d_state = dt_proj_w.shape[1], A.shape[-1]
    conv_out = causal_conv1d_fwd_function(x, conv_w, conv_b, None, None, None, True)
    delta = (dt_proj_w @ x_dbl[:, :dt_rank].t()).view(-1, batch, L).transpose(0, 1)
    B = x_dbl[:, dt_rank:dt_rank + d_state].view(batch, L, 1, d_state).permute(0, 2, 3, 1)
    C = x_dbl[:, -d_state:].view(batch, L, 1, d_state).permute(0, 2, 3, 1)
    B, C = B.contiguous(), C.contiguous()
    dconv_out, ddelta, dA, dB, dC, dD, ddt_bias, dz, out_z = selective_scan_cuda.bwd(
        conv_out, delta, A, B, C, D, z, dt_bias, dout_y, scan_state, out, dz, True, True)
    dx_dbl = torch.empty_like(x_dbl)
    dx_dbl[:, dt_rank:dt_rank + d_state] = dB.squeeze(1).permute(0, 2, 1).reshape(-1, d_state)
    dx_dbl[:, -d_state:] = dC.squeeze(1).permute(0, 2, 1).reshape(-1, d_state)
    ddelta = ddelta.transpose(0, 1).reshape(ddelta.shape[1], -1)  # (E, batch * L)
    ddt_proj_w = ddelta @ x_dbl[:, :dt_rank]
    dx_dbl[:, :dt_rank] = ddelta.t() @ dt_proj_w
    conv_flat = conv_out.transpose(1, 2).reshape(-1, conv_out.shape[1])
    dx_proj_w = dx_dbl.t() @ conv_flat
    dconv_out = dconv_out + (dx_dbl @ x_proj_w).view(batch, L, -1).transpose(1, 2)
    _, dconv_w, dconv_b, _ = causal_conv1d_bwd_function(  # writes dx in place
        x, conv_w, conv_b, dconv_out.contiguous(), None, None, None, dx, False, True)
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
        x, z = xz.chunk(2, dim=1)
        xz_rev = xz.flip(-1)
        x_r, z_r = xz_rev.chunk(2, dim=1)
        _, x_dbl, _, _, _, out, scan_state, out_z = _direction_forward(
            x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D)
        _, x_dbl_b, _, _, _, out_b, scan_state_b, out_z_b = _direction_forward(
            x_r, z_r, conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b)
        merged = (out_z + out_z_b.flip(-1)) * 0.5  # (B, E, L)
        ctx.has_out_bias = out_proj_b is not None
        ctx.save_for_backward(xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
                              conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
                              out_proj_w, x_dbl, x_dbl_b, out, out_b, scan_state, scan_state_b)
        return F.linear(merged.transpose(1, 2), out_proj_w, out_proj_b)

    @staticmethod
    @_custom_bwd
    def backward(ctx, dout):
        (xz, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D,
         conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
         out_proj_w, x_dbl, x_dbl_b, out, out_b, scan_state, scan_state_b) = ctx.saved_tensors
        batch, L = xz.shape[0], xz.shape[-1]
        dout = dout.contiguous()
        dout_flat = dout.reshape(-1, dout.shape[-1])  # (batch * L, D)
        dmerged = (dout_flat @ out_proj_w).view(batch, L, -1).transpose(1, 2) * 0.5
        dmerged = dmerged.contiguous()
        x, z = xz.chunk(2, dim=1)
        dxz = torch.empty_like(xz)
        dx, dz = dxz.chunk(2, dim=1)
        out_z, grads = _direction_backward(x, z, conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A,
                                           D, x_dbl, scan_state, out, dmerged, dx, dz)
        xz_rev = xz.flip(-1)
        x_r, z_r = xz_rev.chunk(2, dim=1)
        dxz_rev = torch.empty_like(xz)
        dx_r, dz_r = dxz_rev.chunk(2, dim=1)
        out_z_b, grads_b = _direction_backward(
            x_r, z_r, conv_w_b, conv_b_b, x_proj_w_b, dt_proj_w_b, dt_bias_b, A_b, D_b,
            x_dbl_b, scan_state_b, out_b, dmerged.flip(-1).contiguous(), dx_r, dz_r)
        dxz += dxz_rev.flip(-1)
        merged = (out_z + out_z_b.flip(-1)) * 0.5
        dout_proj_w = dout_flat.t() @ merged.transpose(1, 2).reshape(-1, merged.shape[1])
        dout_proj_b = dout_flat.sum(0) if ctx.has_out_bias else None
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
