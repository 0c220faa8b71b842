"""Residual add + RMSNorm in one pass: the first thing every Vim block does.

``add_rms_norm(x, residual, weight, eps, rowscale)`` returns ``(normed, new_residual)`` with
``new_residual = residual + rowscale * x`` (float32 or wider, the residual stream) and
``normed = RMSNorm(new_residual) * weight`` in ``x``'s dtype (bf16 under autocast: what the
next in_proj reads). On CUDA it is mamba-ssm's Triton kernel (the authors' ``fused_add_norm``):
one read of x and residual, one write of each output, instead of ~8 elementwise passes and a
dtype copy; where no gradient is needed, our own many-rows kernel (``triton_add_norm``, faster
at Vim's widths). Elsewhere, and with ``fused=False``, the PyTorch lines below compute the same
thing.
``rowscale`` (one factor per token row) carries stochastic depth into the add.
"""
from __future__ import annotations

import torch

try:  # part of the optional GPU extra (mamba-ssm)
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn as _triton_rms_norm_fn
except Exception:  # not installed, or no Triton / GPU
    _triton_rms_norm_fn = None

FUSED_NORM_AVAILABLE = _triton_rms_norm_fn is not None


def rms_norm(x, weight, eps: float):
    """RMSNorm over the last dim, computed in at least float32, no bias."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


def add_rms_norm_torch(x, residual, weight, eps, rowscale=None):
    work = torch.promote_types(x.dtype, torch.float32)
    added = x.to(work) if rowscale is None else x.to(work) * rowscale.to(work)[..., None]
    new_residual = added if residual is None else residual + added.to(residual.dtype)
    return rms_norm(new_residual, weight, eps).to(x.dtype), new_residual


def _kernel_inputs(x, residual, fused: bool) -> bool:
    """What both Triton kernels take: CUDA, 32/16-bit x, a float32 residual stream."""
    return (fused and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (residual is None or residual.dtype == torch.float32))


def use_fused_norm(x, residual, fused: bool = True) -> bool:
    return FUSED_NORM_AVAILABLE and _kernel_inputs(x, residual, fused)


def use_rows_kernel(x, residual, weight, rowscale, fused: bool = True) -> bool:
    """Whether :func:`~vim_mm.ops.triton_add_norm.add_rms_norm_rows` runs instead: no gradient
    needed, no stochastic-depth rowscale (inference)."""
    from .triton_add_norm import triton
    return (triton is not None and rowscale is None and _kernel_inputs(x, residual, fused)
            and not (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, residual, weight))))


def add_rms_norm(x, residual, weight, eps: float, rowscale=None, fused: bool = True,
                 out_dtype=None):
    """See the module docstring. x: (..., C); residual: None or (..., C); rowscale: x.shape[:-1].
    ``out_dtype``: normed's dtype where not x's (the first block's float32 stream under a 16-bit
    autocast: the dtype in_proj casts it to, written so by the rows kernel instead of cast by
    a copy; the same values either way).
    Where no gradient is needed on CUDA, the many-rows Triton kernel of
    :mod:`~vim_mm.ops.triton_add_norm` (H200, 16 x 4097 x 192: 40.9 us against 46.0 for
    mamba-ssm's; ``benchmarks/gpu_layer_ops.py --ops norm``)."""
    if use_rows_kernel(x, residual, weight, rowscale, fused):
        from .triton_add_norm import add_rms_norm_rows
        return add_rms_norm_rows(x, residual, weight, eps, out_dtype=out_dtype)
    if use_fused_norm(x, residual, fused):
        if rowscale is not None:  # one float32 factor per row of x
            rowscale = rowscale.expand(x.shape[:-1])
        normed, new_residual = _triton_rms_norm_fn(
            x, weight, None, residual=residual, eps=eps, rowscale=rowscale, prenorm=True,
            residual_in_fp32=True)
    else:
        normed, new_residual = add_rms_norm_torch(x, residual, weight, eps, rowscale)
    return (normed if out_dtype is None else normed.to(out_dtype)), new_residual
