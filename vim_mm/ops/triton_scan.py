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


@dataclass(frozen=True)
class ScanConfig:
    """Tile sizes. ``block_l`` is also the chunk length (forward and backward must agree)."""
    block_l: int = 32
    block_e: int = 8  # channels per program in the forward passes
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
    LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)

    # Tiles are (BLOCK_L, BLOCK_E, BLOCK_N) with the sequence on the slowest axis: with
    # BLOCK_E * BLOCK_N >= 32 * num_warps, Triton's default layout keeps a thread's part of a
    # row in its own registers, so the scans along the sequence need no warp shuffles (the sums
    # over N and the re-layout of the loaded 2-D tiles still do).

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """Compose two steps of h -> a h + b (the first one applied first)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _scan(a, b, h0, REVERSE: tl.constexpr):
        """h_t = a_t h_{t-/+1} + b_t along axis 0 of (BL, BE, BN) tiles, from h0 (BE, BN)."""
        decay, h = tl.associative_scan((a, b), 0, _combine, reverse=REVERSE)
        return h + decay * h0[None, :, :]

    @triton.jit
    def _row(x, cols, k):
        """x[k] of a (BL, ...) tile (Triton has no register indexing)."""
        return tl.sum(tl.where(cols[:, None, None] == k, x, 0.0), axis=0)

    @triton.jit
    def _softplus(x):
        return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))

    @triton.jit
    def _load_le(ptr, s_b, s_e, bid, offs_e, offs_l, mask):
        """A (BL, BE) tile of a (batch, E, L) tensor with unit stride along L, as fp32."""
        return tl.load(ptr + bid * s_b + offs_e[None, :] * s_e + offs_l[:, None], mask=mask,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _load_ln(ptr, s_b, s_n, s_l, bid, offs_n, offs_l, mask):
        """A (BL, BN) tile of a (batch, N, L) tensor, as fp32."""
        return tl.load(ptr + bid * s_b + offs_n[None, :] * s_n + offs_l[:, None] * s_l,
                       mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _load_dt(d_ptr, sd_b, sd_e, bias, bid, offs_e, offs_l, mask):
        """softplus(delta + bias) (BL, BE); 0 (no decay, no input) outside ``mask``; and x."""
        x = _load_le(d_ptr, sd_b, sd_e, bid, offs_e, offs_l, mask) + bias[None, :]
        return tl.where(mask, _softplus(x), 0.0), x

    @triton.jit
    def _load_A(A_ptr, offs_e, offs_n, mask_en, N):
        return tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _recurrence_inputs(u_ptr, su_b, su_e, d_ptr, sd_b, sd_e, B_ptr, sB_b, sB_n, sB_l,
                           A_ptr, bias_ptr, bid, offs_e, offs_n, offs_l, mask_e, mask_n, mask_l,
                           N):
        """Decays a and inputs b (BL, BE, BN) of one direction on one chunk, and their parts."""
        mask_le = mask_l[:, None] & mask_e[None, :]
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        A = _load_A(A_ptr, offs_e, offs_n, mask_e[:, None] & mask_n[None, :], N)
        u = _load_le(u_ptr, su_b, su_e, bid, offs_e, offs_l, mask_le)
        dt, x = _load_dt(d_ptr, sd_b, sd_e, bias, bid, offs_e, offs_l, mask_le)
        Bt = _load_ln(B_ptr, sB_b, sB_n, sB_l, bid, offs_n, offs_l,
                      mask_l[:, None] & mask_n[None, :])
        a = tl.exp2(dt[:, :, None] * (A * LOG2E)[None, :, :])
        b = (dt * u)[:, :, None] * Bt[:, None, :]
        return a, b, u, dt, x, A, Bt

    @triton.jit
    def _chunk_output(a, b, u, A, C_ptr, sC_b, sC_n, sC_l, D_ptr, h_ptr, state_off, bid,
                      offs_e, offs_n, offs_l, mask_e, mask_n, mask_l,
                      REVERSE: tl.constexpr, HAS_CARRY: tl.constexpr):
        """Ungated output y = C.h + D u (BL, BE) of one direction, from the chunk's carry."""
        if HAS_CARRY:
            h0 = tl.load(h_ptr + state_off, mask=mask_e[:, None] & mask_n[None, :], other=0.0)
        else:
            h0 = tl.zeros_like(A)
        h = _scan(a, b, h0, REVERSE)
        Ct = _load_ln(C_ptr, sC_b, sC_n, sC_l, bid, offs_n, offs_l,
                      mask_l[:, None] & mask_n[None, :])
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        return tl.sum(h * Ct[:, None, :], axis=2) + D[None, :] * u

    @triton.jit
    def _fwd_kernel(u_f, su_bf, su_ef, d_f, sd_bf, sd_ef, B_f, sB_bf, sB_nf, sB_lf,
                    C_f, sC_bf, sC_nf, sC_lf, A_f, D_f, bias_f,
                    u_b, su_bb, su_eb, d_b, sd_bb, sd_eb, B_b, sB_bb, sB_nb, sB_lb,
                    C_b, sC_bb, sC_nb, sC_lb, A_b, D_b, bias_b,
                    z, sz_b, sz_e, out, h_f, h_b, sum_f, sum_b, E, L, N, n_chunks,
                    SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
        """SUMMARY: each chunk's end states from zero and sums of dt (pass 1).
        Else: merged gated output of the chunk from its incoming states (pass 3)."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_L)
        offs_l = cid * BLOCK_L + cols
        mask_e, mask_n, mask_l = offs_e < E, offs_n < N, offs_l < L
        mask_en = mask_e[:, None] & mask_n[None, :]
        row = (bid * E + offs_e) * n_chunks + cid  # index into (batch, E, n_chunks)
        state_off = row[:, None] * N + offs_n[None, :]  # into (batch, E, n_chunks, N)
        a, b, u, dt, _, A, _ = _recurrence_inputs(
            u_f, su_bf, su_ef, d_f, sd_bf, sd_ef, B_f, sB_bf, sB_nf, sB_lf, A_f, bias_f,
            bid, offs_e, offs_n, offs_l, mask_e, mask_n, mask_l, N)
        if SUMMARY:  # masked tail steps are identities, so the edge rows are the end states
            h = _scan(a, b, tl.zeros_like(A), False)
            tl.store(h_f + state_off, _row(h, cols, BLOCK_L - 1), mask=mask_en)
            tl.store(sum_f + row, tl.sum(dt, axis=0), mask=mask_e)
        else:
            y = _chunk_output(a, b, u, A, C_f, sC_bf, sC_nf, sC_lf, D_f, h_f, state_off, bid,
                              offs_e, offs_n, offs_l, mask_e, mask_n, mask_l, False, HAS_CARRY)
        a, b, u, dt, _, A, _ = _recurrence_inputs(
            u_b, su_bb, su_eb, d_b, sd_bb, sd_eb, B_b, sB_bb, sB_nb, sB_lb, A_b, bias_b,
            bid, offs_e, offs_n, offs_l, mask_e, mask_n, mask_l, N)
        if SUMMARY:
            h = _scan(a, b, tl.zeros_like(A), True)
            tl.store(h_b + state_off, _row(h, cols, 0), mask=mask_en)
            tl.store(sum_b + row, tl.sum(dt, axis=0), mask=mask_e)
        else:
            y += _chunk_output(a, b, u, A, C_b, sC_bb, sC_nb, sC_lb, D_b, h_b, state_off, bid,
                               offs_e, offs_n, offs_l, mask_e, mask_n, mask_l, True, HAS_CARRY)
            mask_le = mask_l[:, None] & mask_e[None, :]
            zz = _load_le(z, sz_b, sz_e, bid, offs_e, offs_l, mask_le)
            tl.store(out + (bid * E + offs_e[None, :]) * L + offs_l[:, None],
                     0.5 * y * zz * tl.sigmoid(zz), mask=mask_le)

    @triton.jit
    def _carry_kernel(loc, sums, A_ptr, carry_in, E, N, n_chunks, REVERSE: tl.constexpr,
                      BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
        """Pass 2: carry_in[c] = exp(A sums[c -/+ 1]) carry_in[c -/+ 1] + loc[c -/+ 1].

        The chunk summaries (decay = exp(A * sum dt), local end state) are themselves scanned
        in tiles of BLOCK_C chunks; the inclusive result of chunk c is the carry into its
        neighbour, so it is stored one chunk over (carry_in comes zero-filled)."""
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_C)
        mask_e = offs_e < E
        mask_en = mask_e[:, None] & (offs_n < N)[None, :]
        A2 = _load_A(A_ptr, offs_e, offs_n, mask_en, N) * LOG2E
        rows = bid * E + offs_e
        carry = tl.zeros_like(A2)
        n_tiles = tl.cdiv(n_chunks, BLOCK_C)
        for k in range(0, n_tiles):
            if REVERSE:
                offs_c = (n_tiles - 1 - k) * BLOCK_C + cols
            else:
                offs_c = k * BLOCK_C + cols
            mask_c = offs_c < n_chunks
            s = tl.load(sums + rows[None, :] * n_chunks + offs_c[:, None],
                        mask=mask_c[:, None] & mask_e[None, :], other=0.0)
            off3 = (rows[None, :, None] * n_chunks + offs_c[:, None, None]) * N \
                + offs_n[None, None, :]
            mask3 = mask_c[:, None, None] & mask_en[None, :, :]
            lc = tl.load(loc + off3, mask=mask3, other=0.0)
            h = _scan(tl.exp2(s[:, :, None] * A2[None, :, :]), lc, carry, REVERSE)
            if REVERSE:
                dest = offs_c - 1
                carry = _row(h, cols, 0)
            else:
                dest = offs_c + 1
                carry = _row(h, cols, BLOCK_C - 1)
            mask_d = (dest >= 0) & (dest < n_chunks)
            tl.store(carry_in + off3 + (dest - offs_c)[:, None, None] * N, h,
                     mask=mask3 & mask_d[:, None, None])

    @triton.jit
    def _adjoint_decay(d_ptr, sd_b, sd_e, bias, A2, bid, offs_e, offs_l, cid, mask_e, L,
                       REVERSE: tl.constexpr, BLOCK_L: tl.constexpr):
        """Decays of the adjoint recurrence: exp(dt_{t+1} A) (exp(dt_{t-1} A) if REVERSE),
        1 where the neighbour lies outside the chunk (the carry already holds that step)."""
        lo = cid * BLOCK_L
        hi = tl.minimum(lo + BLOCK_L, L)
        if REVERSE:
            offs_nb = offs_l - 1
        else:
            offs_nb = offs_l + 1
        mask = ((offs_nb >= lo) & (offs_nb < hi))[:, None] & mask_e[None, :]
        dt_nb, _ = _load_dt(d_ptr, sd_b, sd_e, bias, bid, offs_e, offs_nb, mask)
        return tl.exp2(dt_nb[:, :, None] * A2[None, :, :])

    @triton.jit
    def _adjoint_summary(d_ptr, sd_b, sd_e, C_ptr, sC_b, sC_n, sC_l, A_ptr, bias_ptr, g,
                         bid, cid, offs_e, offs_n, offs_l, cols, mask_e, mask_n, mask_l, L, N,
                         REVERSE: tl.constexpr, BLOCK_L: tl.constexpr):
        """Gradient the chunk sends to the state before it (after it if REVERSE), from zero."""
        mask_le = mask_l[:, None] & mask_e[None, :]
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        A2 = _load_A(A_ptr, offs_e, offs_n, mask_e[:, None] & mask_n[None, :], N) * LOG2E
        dt, _ = _load_dt(d_ptr, sd_b, sd_e, bias, bid, offs_e, offs_l, mask_le)
        Ct = _load_ln(C_ptr, sC_b, sC_n, sC_l, bid, offs_n, offs_l,
                      mask_l[:, None] & mask_n[None, :])
        a_nb = _adjoint_decay(d_ptr, sd_b, sd_e, bias, A2, bid, offs_e, offs_l, cid, mask_e, L,
                              REVERSE, BLOCK_L)
        dh = _scan(a_nb, Ct[:, None, :] * g[:, :, None], tl.zeros_like(A2), not REVERSE)
        edge = BLOCK_L - 1 if REVERSE else 0
        dt_edge = tl.sum(tl.where(cols[:, None] == edge, dt, 0.0), axis=0)
        return tl.exp2(dt_edge[:, None] * A2) * _row(dh, cols, edge)

    @triton.jit
    def _bwd_summary_kernel(d_f, sd_bf, sd_ef, C_f, sC_bf, sC_nf, sC_lf, A_f, bias_f,
                            d_b, sd_bb, sd_eb, C_b, sC_bb, sC_nb, sC_lb, A_b, bias_b,
                            z, sz_b, sz_e, dout, sg_b, sg_e, q_f, q_b, E, L, N, n_chunks,
                            BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_L: tl.constexpr):
        """Pass 1 of the backward: each chunk's adjoint summary, both directions."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_L)
        offs_l = cid * BLOCK_L + cols
        mask_e, mask_n, mask_l = offs_e < E, offs_n < N, offs_l < L
        mask_le = mask_l[:, None] & mask_e[None, :]
        mask_en = mask_e[:, None] & mask_n[None, :]
        state_off = ((bid * E + offs_e) * n_chunks + cid)[:, None] * N + offs_n[None, :]
        zz = _load_le(z, sz_b, sz_e, bid, offs_e, offs_l, mask_le)
        g = 0.5 * _load_le(dout, sg_b, sg_e, bid, offs_e, offs_l, mask_le) * zz * tl.sigmoid(zz)
        q = _adjoint_summary(d_f, sd_bf, sd_ef, C_f, sC_bf, sC_nf, sC_lf, A_f, bias_f, g, bid,
                             cid, offs_e, offs_n, offs_l, cols, mask_e, mask_n, mask_l, L, N,
                             False, BLOCK_L)
        tl.store(q_f + state_off, q, mask=mask_en)
        q = _adjoint_summary(d_b, sd_bb, sd_eb, C_b, sC_bb, sC_nb, sC_lb, A_b, bias_b, g, bid,
                             cid, offs_e, offs_n, offs_l, cols, mask_e, mask_n, mask_l, L, N,
                             True, BLOCK_L)
        tl.store(q_b + state_off, q, mask=mask_en)

    @triton.jit
    def _bwd_direction(u_ptr, su_b, su_e, d_ptr, sd_b, sd_e, B_ptr, sB_b, sB_n, sB_l,
                       C_ptr, sC_b, sC_n, sC_l, A_ptr, D_ptr, bias_ptr, h_ptr, q_ptr,
                       du_ptr, dd_ptr, dA_ptr, dD_ptr, dbias_ptr, g, bid, cid, offs_e, offs_n,
                       offs_l, mask_e, mask_n, mask_l, state_off, E, L, N,
                       REVERSE: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_L: tl.constexpr):
        """Gradients of one direction on one channel block of one chunk.

        Writes du, ddelta and adds dA, dD, ddelta_bias; returns y (for dz) and this block's
        (BL, BN) contributions to dB and dC."""
        mask_le = mask_l[:, None] & mask_e[None, :]
        mask_en = mask_e[:, None] & mask_n[None, :]
        a, b, u, dt, x, A, Bt = _recurrence_inputs(
            u_ptr, su_b, su_e, d_ptr, sd_b, sd_e, B_ptr, sB_b, sB_n, sB_l, A_ptr, bias_ptr,
            bid, offs_e, offs_n, offs_l, mask_e, mask_n, mask_l, N)
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        if HAS_CARRY:
            h0 = tl.load(h_ptr + state_off, mask=mask_en, other=0.0)
            q0 = tl.load(q_ptr + state_off, mask=mask_en, other=0.0)
        else:
            h0 = tl.zeros_like(A)
            q0 = tl.zeros_like(A)
        h = _scan(a, b, h0, REVERSE)
        Ct = _load_ln(C_ptr, sC_b, sC_n, sC_l, bid, offs_n, offs_l,
                      mask_l[:, None] & mask_n[None, :])
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        y = tl.sum(h * Ct[:, None, :], axis=2) + D[None, :] * u
        a_nb = _adjoint_decay(d_ptr, sd_b, sd_e, bias, A * LOG2E, bid, offs_e, offs_l, cid,
                              mask_e, L, REVERSE, BLOCK_L)
        dh = _scan(a_nb, Ct[:, None, :] * g[:, :, None], q0, not REVERSE)
        h_prev = h - b  # = exp(dt A) h_{t-/+1}: what the decay multiplied
        ddt = tl.sum(dh * (Bt[:, None, :] * u[:, :, None] + h_prev * A[None, :, :]), axis=2)
        ddt = tl.where(mask_le, ddt * tl.sigmoid(x), 0.0)  # through softplus
        du = tl.sum(dh * Bt[:, None, :], axis=2) * dt + D[None, :] * g
        out_off = (bid * E + offs_e[None, :]) * L + offs_l[:, None]
        tl.store(du_ptr + out_off, du, mask=mask_le)
        tl.store(dd_ptr + out_off, ddt, mask=mask_le)
        tl.atomic_add(dA_ptr + offs_e[:, None] * N + offs_n[None, :],
                      tl.sum(dh * h_prev * dt[:, :, None], axis=0), mask=mask_en)
        tl.atomic_add(dD_ptr + offs_e, tl.sum(g * u, axis=0), mask=mask_e)
        tl.atomic_add(dbias_ptr + offs_e, tl.sum(ddt, axis=0), mask=mask_e)
        dB = tl.sum(dh * (dt * u)[:, :, None], axis=1)
        dC = tl.sum(h * g[:, :, None], axis=1)
        return y, dB, dC

    @triton.jit
    def _bwd_kernel(u_f, su_bf, su_ef, d_f, sd_bf, sd_ef, B_f, sB_bf, sB_nf, sB_lf,
                    C_f, sC_bf, sC_nf, sC_lf, A_f, D_f, bias_f,
                    u_b, su_bb, su_eb, d_b, sd_bb, sd_eb, B_b, sB_bb, sB_nb, sB_lb,
                    C_b, sC_bb, sC_nb, sC_lb, A_b, D_b, bias_b,
                    z, sz_b, sz_e, dout, sg_b, sg_e, h_f, h_b, q_f, q_b,
                    du_f, dd_f, dA_f, dD_f, dbias_f, dB_f, dC_f,
                    du_b, dd_b, dA_b, dD_b, dbias_b, dB_b, dC_b, dz,
                    E, L, N, n_chunks, E_PER_PROG,
                    HAS_CARRY: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_L: tl.constexpr):
        """Pass 3 of the backward: all gradients of one chunk for E_PER_PROG channels."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        e_lo = tl.program_id(2) * E_PER_PROG
        e_hi = tl.minimum(e_lo + E_PER_PROG, E)
        offs_n = tl.arange(0, BLOCK_N)
        offs_l = cid * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_n, mask_l = offs_n < N, offs_l < L
        dB_f_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        dC_f_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        dB_b_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        dC_b_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
        for e0 in range(e_lo, e_hi, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < e_hi
            mask_le = mask_l[:, None] & mask_e[None, :]
            state_off = ((bid * E + offs_e) * n_chunks + cid)[:, None] * N + offs_n[None, :]
            zz = _load_le(z, sz_b, sz_e, bid, offs_e, offs_l, mask_le)
            go = 0.5 * _load_le(dout, sg_b, sg_e, bid, offs_e, offs_l, mask_le)
            sig_z = tl.sigmoid(zz)
            g = go * zz * sig_z
            y_f, dB, dC = _bwd_direction(
                u_f, su_bf, su_ef, d_f, sd_bf, sd_ef, B_f, sB_bf, sB_nf, sB_lf,
                C_f, sC_bf, sC_nf, sC_lf, A_f, D_f, bias_f, h_f, q_f,
                du_f, dd_f, dA_f, dD_f, dbias_f, g, bid, cid, offs_e, offs_n, offs_l,
                mask_e, mask_n, mask_l, state_off, E, L, N, False, HAS_CARRY, BLOCK_L)
            dB_f_acc += dB
            dC_f_acc += dC
            y_b, dB, dC = _bwd_direction(
                u_b, su_bb, su_eb, d_b, sd_bb, sd_eb, B_b, sB_bb, sB_nb, sB_lb,
                C_b, sC_bb, sC_nb, sC_lb, A_b, D_b, bias_b, h_b, q_b,
                du_b, dd_b, dA_b, dD_b, dbias_b, g, bid, cid, offs_e, offs_n, offs_l,
                mask_e, mask_n, mask_l, state_off, E, L, N, True, HAS_CARRY, BLOCK_L)
            dB_b_acc += dB
            dC_b_acc += dC
            dsilu = sig_z * (1.0 + zz * (1.0 - sig_z))
            tl.store(dz + (bid * E + offs_e[None, :]) * L + offs_l[:, None],
                     go * (y_f + y_b) * dsilu, mask=mask_le)
        nl_off = (bid * N + offs_n[None, :]) * L + offs_l[:, None]
        mask_ln = mask_l[:, None] & mask_n[None, :]
        tl.atomic_add(dB_f + nl_off, dB_f_acc, mask=mask_ln)
        tl.atomic_add(dC_f + nl_off, dC_f_acc, mask=mask_ln)
        tl.atomic_add(dB_b + nl_off, dB_b_acc, mask=mask_ln)
        tl.atomic_add(dC_b + nl_off, dC_b_acc, mask=mask_ln)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _direction_args(u, delta, A, B, C, D, bias):
    """Kernel arguments of one direction: tensors with the strides the kernels index with."""
    u, delta = (t if t.stride(-1) == 1 else t.contiguous() for t in (u, delta))
    B, C = (t.squeeze(1) if t.dim() == 4 else t for t in (B, C))
    return (u, u.stride(0), u.stride(1), delta, delta.stride(0), delta.stride(1),
            B, *B.stride(), C, *C.stride(), A.contiguous(), D.contiguous(), bias.contiguous())


def _adjoint_args(d):
    """The part of :func:`_direction_args` the adjoint summary reads: delta, C, A, bias."""
    return (*d[3:6], *d[10:14], d[14], d[16])


def _carry(loc, sums, A, reverse: bool, cfg: ScanConfig):
    """Pass 2: incoming state of every chunk from the chunk summaries (batch, E, chunks, N)."""
    batch, E, n_chunks, N = loc.shape
    carry_in = torch.zeros_like(loc)
    block_e = cfg.block_e
    _carry_kernel[(_cdiv(E, block_e), batch)](
        loc, sums, A, carry_in, E, N, n_chunks, REVERSE=reverse, BLOCK_E=block_e,
        BLOCK_N=triton.next_power_of_2(N), BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return carry_in


def _forward(fwd, bwd, z, cfg: ScanConfig):
    """Merged output and the chunks' incoming states / dt sums (what backward needs)."""
    u, A = fwd[0], fwd[14]
    batch, E, L = u.shape
    N = A.shape[1]
    n_chunks = _cdiv(L, cfg.block_l)
    consts = dict(BLOCK_E=cfg.block_e, BLOCK_N=triton.next_power_of_2(N), BLOCK_L=cfg.block_l,
                  num_warps=cfg.num_warps)
    grid = (n_chunks, batch, _cdiv(E, cfg.block_e))
    out = torch.empty((batch, E, L), dtype=u.dtype, device=u.device)
    if n_chunks > 1:
        f32 = dict(dtype=torch.float32, device=u.device)
        loc_f, loc_b = (torch.empty(batch, E, n_chunks, N, **f32) for _ in range(2))
        sum_f, sum_b = (torch.empty(batch, E, n_chunks, **f32) for _ in range(2))
        _fwd_kernel[grid](*fwd, *bwd, z, z.stride(0), z.stride(1), out,
                          loc_f, loc_b, sum_f, sum_b, E, L, N, n_chunks,
                          SUMMARY=True, HAS_CARRY=False, **consts)
        h_f = _carry(loc_f, sum_f, fwd[14], False, cfg)
        h_b = _carry(loc_b, sum_b, bwd[14], True, cfg)
    else:  # one chunk: it starts from zero, no summaries needed
        h_f = h_b = sum_f = sum_b = out.new_empty(0, dtype=torch.float32)
    _fwd_kernel[grid](*fwd, *bwd, z, z.stride(0), z.stride(1), out,
                      h_f, h_b, sum_f, sum_b, E, L, N, n_chunks,
                      SUMMARY=False, HAS_CARRY=n_chunks > 1, **consts)
    return out, (h_f, h_b, sum_f, sum_b)


def _backward(fwd, bwd, z, dout, states, cfg: ScanConfig):
    """Gradients of both directions (in input order) and of z."""
    h_f, h_b, sum_f, sum_b = states
    u_f, A_f, u_b, A_b = fwd[0], fwd[14], bwd[0], bwd[14]
    batch, E, L = u_f.shape
    N = A_f.shape[1]
    BLOCK_N = triton.next_power_of_2(N)
    n_chunks = _cdiv(L, cfg.block_l)
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    has_carry = n_chunks > 1
    if has_carry:  # adjoint summaries (pass 1) and carries (pass 2)
        q_f, q_b = torch.empty_like(h_f), torch.empty_like(h_b)
        _bwd_summary_kernel[(n_chunks, batch, _cdiv(E, cfg.block_e))](
            *_adjoint_args(fwd), *_adjoint_args(bwd), z, z.stride(0), z.stride(1),
            dout, dout.stride(0), dout.stride(1), q_f, q_b, E, L, N, n_chunks,
            BLOCK_E=cfg.block_e, BLOCK_N=BLOCK_N, BLOCK_L=cfg.block_l, num_warps=cfg.num_warps)
        q_f = _carry(q_f, sum_f, A_f, True, cfg)  # forward direction: gradients flow leftwards
        q_b = _carry(q_b, sum_b, A_b, False, cfg)
    else:
        q_f = q_b = h_f
    grads = []
    for d in (fwd, bwd):
        f32 = dict(dtype=torch.float32, device=u_f.device)
        grads.append(dict(
            du=torch.empty((batch, E, L), dtype=d[0].dtype, device=u_f.device),
            ddelta=torch.empty((batch, E, L), dtype=d[3].dtype, device=u_f.device),
            dA=torch.zeros(E, N, **f32), dD=torch.zeros(E, **f32), dbias=torch.zeros(E, **f32),
            dB=torch.zeros(batch, N, L, **f32), dC=torch.zeros(batch, N, L, **f32)))
    dz = torch.empty((batch, E, L), dtype=z.dtype, device=z.device)
    # split the channel loop only as far as needed to fill the GPU (each split adds dB/dC once)
    splits = min(_cdiv(E, cfg.bwd_block_e), max(1, _cdiv(cfg.bwd_programs, n_chunks * batch)))
    e_per_prog = _cdiv(_cdiv(E, splits), cfg.bwd_block_e) * cfg.bwd_block_e
    keys = ('du', 'ddelta', 'dA', 'dD', 'dbias', 'dB', 'dC')
    _bwd_kernel[(n_chunks, batch, _cdiv(E, e_per_prog))](
        *fwd, *bwd, z, z.stride(0), z.stride(1), dout, dout.stride(0), dout.stride(1),
        h_f, h_b, q_f, q_b, *(grads[0][k] for k in keys), *(grads[1][k] for k in keys), dz,
        E, L, N, n_chunks, e_per_prog, HAS_CARRY=has_carry, BLOCK_E=cfg.bwd_block_e,
        BLOCK_N=BLOCK_N, BLOCK_L=cfg.block_l, num_warps=cfg.bwd_num_warps)
    return grads, dz


class BidirectionalSelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: saves the inputs and the chunks' incoming states, recomputes the rest."""

    @staticmethod
    def forward(ctx, u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z, config=None):
        cfg = config or DEFAULT_CONFIG
        z = z if z.stride(-1) == 1 else z.contiguous()
        fwd = _direction_args(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f)
        bwd = _direction_args(u_b, delta_b, A_b, B_b, C_b, D_b, bias_b)
        out, states = _forward(fwd, bwd, z, cfg)
        ctx.cfg = cfg
        ctx.squeeze = (B_f.dim() == 4, C_f.dim() == 4, B_b.dim() == 4, C_b.dim() == 4)
        ctx.dtypes = [tuple(t.dtype for t in params) for params in
                      ((A_f, B_f, C_f, D_f, bias_f), (A_b, B_b, C_b, D_b, bias_b))]
        ctx.save_for_backward(*(t for t in fwd if torch.is_tensor(t)),
                              *(t for t in bwd if torch.is_tensor(t)), z, *states)
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        fwd = _direction_args(*saved[0:2], saved[4], saved[2], saved[3], *saved[5:7])
        bwd = _direction_args(*saved[7:9], saved[11], saved[9], saved[10], *saved[12:14])
        z, states = saved[14], saved[15:19]
        grads, dz = _backward(fwd, bwd, z, dout, states, ctx.cfg)
        result = []
        for g, dtypes, (sq_B, sq_C) in zip(grads, ctx.dtypes,
                                           (ctx.squeeze[0:2], ctx.squeeze[2:4])):
            A_t, B_t, C_t, D_t, bias_t = dtypes
            dB, dC = g['dB'].to(B_t), g['dC'].to(C_t)
            result += [g['du'], g['ddelta'], g['dA'].to(A_t), dB.unsqueeze(1) if sq_B else dB,
                       dC.unsqueeze(1) if sq_C else dC, g['dD'].to(D_t), g['dbias'].to(bias_t)]
        return (*result, dz, None)


def bidirectional_selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                                 u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z,
                                 config: ScanConfig | None = None):
    """``(scan_fwd + scan_bwd) / 2 * silu(z)`` of (batch, E, L) inputs in original token order.

    The ``*_b`` direction runs right to left (see the module docstring); delta_softplus is
    always on, D and delta_bias are required (Vim has them). Returns (batch, E, L) in u's dtype.
    """
    if not TRITON_SCAN_AVAILABLE:
        raise RuntimeError('The Triton scan needs triton and a CUDA device (or TRITON_INTERPRET=1).')
    return BidirectionalSelectiveScanFn.apply(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                                              u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z, config)
