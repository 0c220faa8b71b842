"""Pure-PyTorch twin of the Mamba kernels: the ground truth for every fast path.

Same math and argument layout as mamba-ssm's ``selective_scan_cuda`` and causal-conv1d, written
with whole-tensor operations so it runs (and differentiates) on any device. The recurrence
``h_t = a_t * h_{t-1} + b_t`` is solved by a chunked scan (:func:`_chunked_scan`): about
``2 sqrt(L)`` vectorised steps instead of a Python loop over the L tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ['linear_recurrence', 'selective_scan_torch', 'causal_conv1d_torch', 'mamba_inner_torch',
           'linear_channel_first']


def linear_channel_first(weight, x):
    """``weight @ x[b]`` for every b: (O, I) x (B, I, L) -> contiguous (B, O, L), no copy of x.

    Channel-first in and out, the layout the conv and scan kernels read: ``F.linear`` on a
    transposed view would first copy it into (B*L, I) rows and return (B, L, O)."""
    return torch.bmm(weight.expand(x.shape[0], *weight.shape), x)


def chunk_length(length: int) -> int:
    """Chunk size of the scan: about sqrt(L) balances its two sequential loops."""
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def _chunked_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The recurrence on tensors laid out (T, C, ...): position in chunk, chunk, rest.

    Token ``c * T + t`` sits at ``[t, c]``, so every step reads and writes contiguous slabs:
    pass 1 walks the T positions of all chunks at once (local states, decays since the chunk
    start), pass 2 the C chunk boundaries (state entering each chunk), and a broadcast
    multiply-add adds each chunk's incoming state. Without autograd it works in place.
    """
    T, C = a.shape[:2]
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        states, decays = [b[0]], [a[0]]
        for t in range(1, T):
            states.append(torch.addcmul(b[t], a[t], states[-1]))
            decays.append(decays[-1] * a[t])
        local, decay = torch.stack(states), torch.stack(decays)
        carries = [torch.zeros_like(b[0, 0])]
        for c in range(1, C):
            carries.append(torch.addcmul(local[-1, c - 1], decay[-1, c - 1], carries[-1]))
        return torch.addcmul(local, decay, torch.stack(carries))
    local, decay = torch.empty_like(b), torch.empty_like(a)
    local[0], decay[0] = b[0], a[0]
    for t in range(1, T):
        torch.addcmul(b[t], a[t], local[t - 1], out=local[t])
        torch.mul(decay[t - 1], a[t], out=decay[t])
    carries = torch.zeros_like(b[0])
    for c in range(1, C):
        torch.addcmul(local[-1, c - 1], decay[-1, c - 1], carries[c - 1], out=carries[c])
    return local.addcmul_(decay, carries)


def _to_chunks(x: torch.Tensor, T: int, pad_value: float = 0.) -> torch.Tensor:
    """(..., L) -> (T, C, ...), padded to C * T with ``pad_value``; token c * T + t at [t, c]."""
    length = x.shape[-1]
    C = -(-length // T)
    x = F.pad(x, (0, C * T - length), value=pad_value)
    x = x.reshape(*x.shape[:-1], C, T)
    # contiguous, so the big tensors built from these inherit the (T, C, ...) memory layout
    return x.permute(x.dim() - 1, x.dim() - 2, *range(x.dim() - 2)).contiguous()


def _from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`_to_chunks`: (T, C, ...) -> (..., L)."""
    x = x.permute(*range(2, x.dim()), 1, 0)
    return x.reshape(*x.shape[:-2], -1)[..., :length]


def linear_recurrence(a: torch.Tensor, b: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Return ``h`` with ``h_t = a_t * h_{t-1} + b_t`` along dim 0 and ``h_{-1} = 0``.

    Chunked scan in ``O(sqrt L)`` vectorised steps (:func:`_chunked_scan`); it multiplies only
    decays, so it is as stable as the plain loop. Padding steps are identities (a=1, b=0).
    """
    length = a.shape[0]
    if length == 0:
        return b
    T = chunk or chunk_length(length)
    a_c = _to_chunks(a.movedim(0, -1), T, pad_value=1.)
    b_c = _to_chunks(b.movedim(0, -1), T)
    return _from_chunks(_chunked_scan(a_c, b_c), length).movedim(-1, 0)


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
    T = chunk_length(length)
    # chunk layout (T, C, batch, dim[, N]); padded steps have delta = 0: decay 1, no input
    delta_c, u_c = _to_chunks(delta, T), _to_chunks(u, T)
    decay = (delta_c.unsqueeze(-1) * A).exp_()  # in place: one full-size buffer less
    drive = (delta_c * u_c).unsqueeze(-1) * _to_chunks(B, T).unsqueeze(-2)
    states = _chunked_scan(decay, drive)  # (T, C, batch, dim, N)
    y = _from_chunks(torch.einsum('tcbdn,tcbn->tcbd', states, _to_chunks(C, T)), length)
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
