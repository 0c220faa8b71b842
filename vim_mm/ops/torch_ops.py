"""Pure-PyTorch twin of the Mamba kernels: the ground truth for every fast path.

Same math and argument layout as mamba-ssm's ``selective_scan_cuda`` and causal-conv1d, written
with whole-tensor operations so it runs (and differentiates) on any device. The recurrence
``h_t = a_t * h_{t-1} + b_t`` is solved by a chunked scan (:func:`linear_recurrence`): about
``2 sqrt(L)`` vectorised steps instead of a Python loop over the L tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ['linear_recurrence', 'selective_scan_torch', 'causal_conv1d_torch', 'mamba_inner_torch']


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Return ``h`` with ``h_t = a_t * h_{t-1} + b_t`` along dim 0 and ``h_{-1} = 0``.

    Two-level chunked scan: the sequence is cut into ``C`` chunks of ``T ~ sqrt(L)`` steps; one
    pass walks the ``T`` positions of all chunks at once, a second walks the ``C`` chunk
    boundaries, and a last vectorised correction adds each chunk's incoming state scaled by the
    decays inside the chunk. ``O(sqrt L)`` Python steps in all, each over ``~sqrt L`` tokens, and
    only products of decays in (0, 1], so it is as stable as the plain loop.
    """
    length = a.shape[0]
    if length == 0:
        return b
    T = chunk or chunk_length(length)
    C = -(-length // T)
    pad = C * T - length
    if pad:  # identity steps at the end (callers avoid this copy by padding their inputs)
        a = torch.cat([a, a.new_ones((pad,) + a.shape[1:])])
        b = torch.cat([b, b.new_zeros((pad,) + b.shape[1:])])
    a = a.reshape(C, T, *a.shape[1:])
    b = b.reshape(C, T, *b.shape[1:])
    local = torch.empty_like(b)
    state = local[:, 0] = b[:, 0]
    for t in range(1, T):  # within every chunk at once
        state = torch.addcmul(b[:, t], a[:, t], state)
        local[:, t] = state
    decay = torch.cumprod(a, dim=1)  # decay from each chunk's start to position t
    carry = torch.zeros_like(b[0, 0])
    carries = [carry]  # state entering each chunk
    for c in range(1, C):  # across chunk boundaries
        carry = torch.addcmul(local[c - 1, -1], decay[c - 1, -1], carry)
        carries.append(carry)
    h = torch.addcmul(local, decay, torch.stack(carries).unsqueeze(1))
    return h.reshape(C * T, *h.shape[2:])[:length]


def chunk_length(length: int) -> int:
    """Chunk size of :func:`linear_recurrence`: about sqrt(L) balances its two loops."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False):
    """Selective scan with the argument layout of ``selective_scan_cuda.fwd``.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, 1, N, L);
    D, delta_bias: (dim,). State and arithmetic in float32 (float64 for float64 inputs);
    the result has ``u``'s dtype.
    Returns ``(y + D * u) * silu(z)``.
    """
    dtype_in = u.dtype
    work = torch.promote_types(u.dtype, torch.float32)  # fp32 state; fp64 stays fp64
    u, delta, A = u.to(work), delta.to(work), A.to(work)
    if B.dim() == 4:
        B, C = B.squeeze(1), C.squeeze(1)
    B, C = B.to(work), C.to(work)
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    length = u.shape[-1]
    pad = -length % chunk_length(length)
    if pad:  # identity steps (delta = 0) so the scan needs no padded copy of its big inputs
        delta_s, u_s, B_s = (F.pad(t, (0, pad)) for t in (delta, u, B))
    else:
        delta_s, u_s, B_s = delta, u, B
    # time-major (L, batch, dim, N): decay and input of the recurrence for every state channel
    delta_t = delta_s.permute(2, 0, 1).unsqueeze(-1)
    decay = torch.exp(delta_t * A)
    drive = (delta_t * u_s.permute(2, 0, 1).unsqueeze(-1)) * B_s.permute(2, 0, 1).unsqueeze(2)
    states = linear_recurrence(decay, drive)[:length]
    y = torch.einsum('lbdn,bnl->bdl', states, C)
    if D is not None:
        y = y + D.to(work)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype_in)


def causal_conv1d_torch(x, weight, bias=None, activation: str | None = 'silu'):
    """Depthwise causal conv1d: x (batch, dim, L), weight (dim, width) or (dim, 1, width)."""
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    width = weight.shape[-1]
    out = F.conv1d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=width - 1, groups=x.shape[1])[..., :x.shape[-1]]
    return F.silu(out) if activation == 'silu' else out


def mamba_inner_torch(x, z, conv1d_weight, conv1d_bias, x_proj_weight, dt_proj_weight,
                      dt_proj_bias, A, D):
    """One direction of the Vim mixer after ``in_proj``: conv -> SiLU -> x_proj -> scan -> gate.

    x, z: (batch, E, L). Returns the gated scan output (batch, E, L), before ``out_proj``.
    """
    dt_rank = dt_proj_weight.shape[1]
    d_state = A.shape[-1]
    u = causal_conv1d_torch(x, conv1d_weight, conv1d_bias, 'silu')
    x_dbl = F.linear(u.transpose(1, 2), x_proj_weight)  # (batch, L, dt_rank + 2N)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=-1)
    delta = F.linear(dt, dt_proj_weight).transpose(1, 2)  # bias is applied inside the scan
    return selective_scan_torch(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), D, z,
                                delta_bias=dt_proj_bias, delta_softplus=True)
