"""Fused bidirectional selective scan of the Vim mixer in Triton ("Fast Vim").

One op computes both scan directions of a Vim layer and their merge,
``(fwd_scan + bwd_scan) / 2``, without a single flip. Every tensor is in the ORIGINAL token
order; the backward branch's recurrence simply runs right to left:

    forward  direction:  h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t     (t = 0 .. L-1)
    backward direction:  h_t = exp(dt_t A) h_{t+1} + dt_t B_t u_t     (t = L-1 .. 0)
    y_t = C_t . h_t + D u_t,   dt = softplus(delta + delta_bias),
    out = (y_fwd + y_bwd) / 2 * silu(z)

This is exactly Vim's ``flip(scan(flip(...)))`` for the backward branch: x_proj / dt_proj /
SiLU act per token and commute with the flip, and Vim's causal conv1d on the flipped sequence
equals an anti-causal conv (the kernel taps mirrored) on the original order, so the caller can
produce ``u_b``, ``delta_b``, ``B_b``, ``C_b`` in original order with no copies. ``z`` is shared.

Layout (mamba-ssm's): u, delta, z: (batch, E, L); A: (E, N), negative; B, C: (batch, N, L)
(or (batch, 1, N, L)); D, delta_bias: (E,). Only the last dim of the (batch, E, L) tensors must
be contiguous, B/C take any strides (e.g. views of the x_proj output). Inputs fp32/bf16/fp16,
state and arithmetic in fp32, the output has u's dtype.

Algorithm: the sequence is cut into chunks of ``block_l`` tokens and every kernel runs one
program per (chunk, batch, channel block), so short (L=197, big batch) and long (L=16k, small
batch) inputs both fill the GPU.
  forward:  (1) each chunk's end state from a zero start and its sum of dt, both directions;
            (2) a scan over the chunks turns them into every chunk's incoming state
                (the chunk's decay is exp(A * sum dt));
            (3) each chunk rescans from its incoming states and writes the merged output.
  backward: the incoming states of (2) are the only thing saved; the adjoint recurrence
            (dh_t = C_t g_t + exp(dt_{t+1} A) dh_{t+1}, mirrored for the backward direction)
            gets the same three passes; pass (3) recomputes h inside the chunk and writes every
            gradient. dB/dC are reduced over the channels inside a program (a loop over channel
            blocks), so each program adds its (N, block_l) tile once.
Within a chunk both recurrences are ``tl.associative_scan`` over pairs (decay, input).
With a single chunk (L <= block_l) passes (1) and (2) are skipped.

``bidirectional_selective_scan_reference`` is the same op built from
:func:`selective_scan_torch` with explicit flips: the ground truth for tests.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .torch_ops import selective_scan_torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the op is optional; the PyTorch path runs everywhere
    triton = None

INTERPRET = os.environ.get('TRITON_INTERPRET', '0') == '1'
TRITON_SCAN_AVAILABLE = triton is not None and (torch.cuda.is_available() or INTERPRET)

__all__ = ['TRITON_SCAN_AVAILABLE', 'ScanConfig', 'BidirectionalSelectiveScanFn',
           'bidirectional_selective_scan', 'bidirectional_selective_scan_reference']

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes. ``block_l`` is also the chunk length (forward and backward must agree)."""
    block_l: int = 64
    block_e: int = 4  # channels per program in the forward passes
    bwd_block_e: int = 4  # channels per step of the backward's channel loop
    num_warps: int = 4
    bwd_num_warps: int = 4
    block_c: int = 32  # chunks per step of the carry scan
    bwd_programs: int = 1024  # split the channel loop until the backward has this many programs


DEFAULT_CONFIG = ScanConfig(block_l=8, block_e=4, bwd_block_e=4, block_c=4) if INTERPRET \
    else ScanConfig()


def bidirectional_selective_scan_reference(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                                           u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z):
    """PyTorch twin of :func:`bidirectional_selective_scan` (same arguments, original order)."""
    out_f = selective_scan_torch(u_f, delta_f, A_f, B_f, C_f, D_f, z, bias_f, True)
    out_b = selective_scan_torch(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1),
                                 C_b.flip(-1), D_b, z.flip(-1), bias_b, True).flip(-1)
    return (out_f + out_b) / 2


if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """Compose two steps of h -> a h + b (the first one applied first)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan(a, b, h0, REVERSE: tl.constexpr):
        """h_t = a_t h_{t-/+1} + b_t along axis 2 of (BE, BN, BL) tiles, from state h0 (BE, BN)."""
        decay, h = tl.associative_scan((a, b), 2, _combine, reverse=REVERSE)
        return h + decay * h0[:, :, None]

    @triton.jit
    def _column(x, cols, k):
        """x[:, :, k] of a 3-D tile (Triton has no register indexing)."""
        return tl.sum(tl.where(cols[None, None, :] == k, x, 0.0), axis=2)

    @triton.jit
    def _softplus(x):
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def _load_dt(d_ptr, sd_b, sd_e, bias, bid, offs_e, offs_l, mask):
        """softplus(delta + bias) as fp32 (BE, BL); 0 (no decay, no input) outside ``mask``."""
        x = tl.load(d_ptr + bid * sd_b + offs_e[:, None] * sd_e + offs_l[None, :], mask=mask,
                    other=0.0).to(tl.float32) + bias[:, None]
        return tl.where(mask, _softplus(x), 0.0), x

    @triton.jit
    def _load_bl(ptr, s_b, s_n, s_l, bid, offs_n, offs_l, mask):
        return tl.load(ptr + bid * s_b + offs_n[:, None] * s_n + offs_l[None, :] * s_l,
                       mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _load_el(ptr, s_b, s_e, bid, offs_e, offs_l, mask):
        return tl.load(ptr + bid * s_b + offs_e[:, None] * s_e + offs_l[None, :], mask=mask,
                       other=0.0).to(tl.float32)

