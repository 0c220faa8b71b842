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

Shapes (mamba-ssm's): u, delta, z: (batch, E, L); A: (E, N), negative; B, C: (batch, N, L)
(or (batch, 1, N, L)); D, delta_bias: (E,). Any strides: mamba-ssm's channel-major layout, or
the token-major one Linear layers produce ((batch, L, E) storage seen as (batch, E, L), z a
slice of in_proj's output, B/C slices of x_proj's), which is the fast one: a token's channels
and its N states are then contiguous, so they load as vectors. The output (and du, ddelta, dz)
takes u's layout. Inputs fp32/bf16/fp16, state and arithmetic in fp32, output in u's dtype.

Algorithm: the sequence is cut into chunks (``ScanConfig.block_l`` tokens, by default as long
as the GPU can still be filled) and every kernel runs one program per (chunk, batch, channel
block), so short (L=197, big batch) and long (L=16k, small batch) inputs both fill the GPU.
A program gives every thread one channel with its N states in registers and walks the chunk
token by token (groups of ``fwd_step_l`` / ``step_l`` tokens per loop iteration, unrolled):
h = exp(dt A) h + dt B u is N exps and FMAs per token, and C.h a sum inside the thread; no warp
shuffles. The forward walk keeps the per-token address work to one scalar offset per tensor,
runs whole groups of tokens without masks (vector loads of B_t, C_t), loads the next group
while it computes the current one (software pipelining: loads no longer wait behind the
previous token's stores), and its registers are capped (``*_maxnreg``) so that more warps per
SM hide the remaining latency.
A forward that needs no backward (inference) is chunked only when the batch does not fill the
GPU by itself (``one_pass_programs``): the chunk summaries cost a second walk.
  forward:  (1) each chunk's end state from a zero start and its sum of dt, both directions;
            (2) a scan over the chunks turns them into every chunk's incoming state
                (the chunk's decay is exp(A * sum dt));
            (3) each chunk rescans from its incoming states: the forward direction walks left
                to right and writes its y, the backward direction walks right to left, adds
                its y and writes the gated average.
  backward: the incoming states of (2) are the only thing saved; the adjoint recurrence
            (dh_t = C_t g_t + exp(dt_{t+1} A) dh_{t+1}, mirrored for the backward direction)
            gets the same three passes; in pass (3) a walk along the scan direction stores
            the state every ``step_l`` tokens (a scratch buffer), then a walk against it
            recomputes each group of ``step_l`` states from its checkpoint and steps back
            through them, writing every gradient. dB/dC are summed over the program's
            channels (the only cross-thread reduction) and added atomically.
With a single chunk (L <= block_l) passes (1) and (2) are skipped.

``bidirectional_selective_scan_reference`` is the same op built from
:func:`selective_scan_torch` with explicit flips: the ground truth for tests.
"""
from __future__ import annotations

import inspect
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
    """Tile sizes. Chunks of ``block_l`` tokens (0: chosen per input, see ``bwd_programs``, and
    ``fwd_programs`` / ``one_pass_programs`` for a forward without gradients) are walked
    ``fwd_step_l`` (forward) / ``step_l`` (backward) tokens at a time; a program owns
    ``block_e`` channels, one per thread when ``block_e = 32 * num_warps``. The register caps
    were tuned for ``fwd_step_l=2`` on an H100; larger groups spill under them (set the caps
    to 0 when changing it)."""
    block_l: int = 0
    step_l: int = 4  # backward: tokens per unrolled step (and per state checkpoint)
    fwd_step_l: int = 2  # forward: tokens per unrolled, prefetched group
    # register caps of the forward passes (0: the compiler's choice): fewer registers, more
    # warps per SM to hide latency (swept on an H100, benchmarks/README.md "Fourth/Fifth session")
    summary_maxnreg: int = 80
    fwd_maxnreg: int = 104  # the final pass when chunked ...
    one_pass_maxnreg: int = 168  # ... and unchunked
    block_e: int = 128  # channels per program in the forward passes
    bwd_block_e: int = 128  # channels per program in the backward passes
    num_warps: int = 4
    bwd_num_warps: int = 4
    block_c: int = 32  # chunks per step of the carry scan
    bwd_programs: int = 1024  # block_l=0: the longest chunks giving the backward this many programs
    fwd_programs: int = 1024  # the same for a forward that needs no backward, ...
    one_pass_programs: int = 256  # ... which runs unchunked (one pass) from this many programs


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
    _STRIDES = ('su_b', 'su_e', 'su_l', 'sd_b', 'sd_e', 'sd_l', 'sB_b', 'sB_n', 'sB_l',
                'sC_b', 'sC_n', 'sC_l')
    _SIZES = {'E', 'L', 'n_chunks', 'chunk_l', 'n_ck', 'sz_b', 'sz_e', 'sz_l', 'sg_b', 'sg_e',
              'sg_l', 'so_b', 'so_e', 'so_l', 'sq_n', 'sq_l', *_STRIDES,
              *(s + d for s in _STRIDES for d in 'fb')}

    def _jit_any_size(fn):
        """triton.jit, not specialised on the sizes and strides: every (batch, L) would
        otherwise compile its own kernels (divisibility by 16), and the loads here are per
        token anyway."""
        names = inspect.signature(fn).parameters
        return triton.jit(fn, do_not_specialize=[n for n in names if n in _SIZES])

    def _jit_strided(fn):
        """triton.jit specialised on the strides (== 1, multiple of 16) but not on the sizes:
        a unit inner stride lets a token's N states (or a program's channels) load as vectors,
        and a model sees only a few stride patterns (they scale with L * E)."""
        names = inspect.signature(fn).parameters
        return triton.jit(fn, do_not_specialize=[n for n in ('E', 'L', 'N', 'n_chunks', 'chunk_l')
                                                 if n in names])

    # Layout. A program owns BLOCK_E channels (one per thread with BLOCK_E = 32 * num_warps) and
    # walks its chunk token by token (STEP tokens per loop iteration, unrolled). The states are
    # (BLOCK_N, BLOCK_E) tensors built only from 1-D per-channel vectors (BLOCK_E,) and per-state
    # columns (BLOCK_N, 1), so Triton's default layout applies: every thread holds all N states
    # of its channel, and the recurrence and the sums over N are in-thread (no warp shuffles).
    # For that reason states are read and written one state index n at a time (`_load_state`,
    # `_store_state`): a 2-D load would impose its coalesced layout on them.

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """Compose two steps of h -> a h + b (the first one applied first)."""
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _add2(a1, b1, a2, b2):
        return a1 + a2, b1 + b2

    # 16-bit inputs take approximate MUFU instructions for the per-token softplus and sigmoid
    # (libdevice's exact log is ~24 instructions in a serial chain, the exact sigmoid ~12, and a
    # bf16 input's rounding, 4e-3, dwarfs their ~1e-7 absolute error); fp32 inputs stay exact.
    # The interpreter runs the same formulas with tl.log2 / a division (PTX is GPU-only).
    PTX = tl.constexpr(not INTERPRET)
    LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _lg2_approx(x):
        if PTX:
            return tl.inline_asm_elementwise('lg2.approx.ftz.f32 $0, $1;', '=r,r', [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _rcp_approx(x):
        if PTX:
            return tl.inline_asm_elementwise('rcp.approx.ftz.f32 $0, $1;', '=r,r', [x],
                                             dtype=tl.float32, is_pure=True, pack=1)
        else:
            return 1.0 / x

    @triton.jit
    def _softplus(x, FAST: tl.constexpr):
        if FAST:
            sp = LN2 * _lg2_approx(1.0 + tl.exp2(tl.minimum(x, 20.0) * LOG2E))
        else:
            sp = tl.log(1.0 + tl.exp(tl.minimum(x, 20.0)))
        return tl.where(x > 20.0, x, sp)

    @triton.jit
    def _sigmoid(x, FAST: tl.constexpr):
        if FAST:
            s = _rcp_approx(1.0 + tl.exp2(-x * LOG2E))
        else:
            s = tl.sigmoid(x)
        return s

    @triton.jit
    def _token(i, lo, hi, REVERSE: tl.constexpr):
        """The i-th token of a walk over [lo, hi) (right to left if REVERSE)."""
        if REVERSE:
            t = hi - 1 - i
        else:
            t = lo + i
        return t

    @triton.jit
    def _load_e(ptr, s_b, s_e, s_l, bid, offs_e, t, mask):
        """Token t of a (batch, E, L) tensor: (BE,) fp32."""
        return tl.load(ptr + bid * s_b + offs_e * s_e + t * s_l, mask=mask,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _load_n(ptr, s_b, s_n, s_l, bid, offs_n, t, mask):
        """Token t of a (batch, N, L) tensor as a (BN, 1) column, fp32."""
        return tl.load(ptr + bid * s_b + offs_n * s_n + t * s_l, mask=mask,
                       other=0.0).to(tl.float32)[:, None]

    @triton.jit
    def _load_dt(d_ptr, sd_b, sd_e, sd_l, bias, bid, offs_e, t, mask, FAST: tl.constexpr):
        """softplus(delta + bias) (BE,), 0 (no decay, no input) outside ``mask``; and x."""
        x = _load_e(d_ptr, sd_b, sd_e, sd_l, bid, offs_e, t, mask) + bias
        return tl.where(mask, _softplus(x, FAST), 0.0), x

    @triton.jit
    def _load_state(ptr, base, n_stride, mask_e, N, BLOCK_N: tl.constexpr):
        """(BN, BE) state whose element (n, e) sits at ptr + base[e] + n * n_stride."""
        offs_n = tl.arange(0, BLOCK_N)
        h = tl.zeros((BLOCK_N, base.shape[0]), dtype=tl.float32)
        for n in tl.static_range(BLOCK_N):
            v = tl.load(ptr + base + n * n_stride, mask=mask_e & (n < N), other=0.0)
            h = tl.where(offs_n[:, None] == n, v.to(tl.float32)[None, :], h)
        return h

    @triton.jit
    def _store_state(ptr, base, n_stride, h, mask_e, N, BLOCK_N: tl.constexpr,
                     ATOMIC: tl.constexpr):
        """Write (or atomically add) a (BN, BE) state, laid out as in `_load_state`."""
        offs_n = tl.arange(0, BLOCK_N)
        for n in tl.static_range(BLOCK_N):
            v = tl.sum(tl.where(offs_n[:, None] == n, h, 0.0), axis=0)
            if ATOMIC:
                tl.atomic_add(ptr + base + n * n_stride, v, mask=mask_e & (n < N))
            else:
                tl.store(ptr + base + n * n_stride, v, mask=mask_e & (n < N))

    @triton.jit
    def _ld(ptrs, mask, MASKED: tl.constexpr):
        """Load as stored (converted at use, so prefetched tokens stay packed); unmasked when
        the caller knows every lane is in range (vector loads)."""
        if MASKED:
            v = tl.load(ptrs, mask=mask, other=0.0)
        else:
            v = tl.load(ptrs)
        return v

    @triton.jit
    def _fetch(t, u_row, su_l, d_row, sd_l, B_row, sB_l, C_row, sC_l, y_row, so_l, z_row, sz_l,
               m_e, m_n, MODE: tl.constexpr, MASK_E: tl.constexpr, MASK_N: tl.constexpr):
        """What token t of a walk reads (see `_scan_token`); placeholders for what MODE skips."""
        u = _ld(u_row + t * su_l, m_e, MASK_E)
        x = _ld(d_row + t * sd_l, m_e, MASK_E)
        B_t = _ld(B_row + t * sB_l, m_n, MASK_N)
        C_t, z, y = B_t, u, u
        if MODE > 0:
            C_t = _ld(C_row + t * sC_l, m_n, MASK_N)
        if MODE == 2:
            y = _ld(y_row + t * so_l, m_e, MASK_E)
            z = _ld(z_row + t * sz_l, m_e, MASK_E)
        return u, x, B_t, C_t, z, y

    @triton.jit
    def _fetch_group(i0, last, lo, hi, u_row, su_l, d_row, sd_l, B_row, sB_l, C_row, sC_l,
                     y_row, so_l, z_row, sz_l, m_e, m_n, MODE: tl.constexpr,
                     REVERSE: tl.constexpr, STEP: tl.constexpr, MASK_E: tl.constexpr,
                     MASK_N: tl.constexpr):
        """Tokens i0 .. i0+STEP-1 of the walk (clamped to the last one: always in range)."""
        group = ()
        for k in tl.static_range(STEP):
            t = _token(tl.minimum(i0 + k, last), lo, hi, REVERSE)
            group = group + (_fetch(t, u_row, su_l, d_row, sd_l, B_row, sB_l, C_row, sC_l,
                                    y_row, so_l, z_row, sz_l, m_e, m_n, MODE, MASK_E,
                                    MASK_N),)
        return group

    @triton.jit
    def _states_f32(v):
        """A token's N values of B or C in fp32. int32 means bf16 pairs loaded as words (see
        `_state_walk`): a bf16 is the top half of an fp32, so each unpacks with one shift or
        mask (the compiler's cvt path takes two instructions per value)."""
        if v.dtype == tl.int32:
            lo = (v << 16).to(tl.float32, bitcast=True)
            hi = (v & -65536).to(tl.float32, bitcast=True)
            f = tl.interleave(lo, hi)
        else:
            f = v.to(tl.float32)
        return f

    @triton.jit
    def _scan_token(t, h, dt_sum, fetched, y_row, so_l, A2, bias, D, m_e,
                    MODE: tl.constexpr, MASK_E: tl.constexpr):
        """One token of a walk: h = exp(dt A) h + dt B u, and (MODE > 0) its output.

        ``fetched`` is the token's `_fetch`; the output offset is a scalar (``t * so_l``)
        added to the program's row pointers, so the per-lane address work is one add."""
        u, x, B_t, C_t, z, y_in = fetched
        FAST: tl.constexpr = x.dtype != tl.float32
        u = u.to(tl.float32)
        x = x.to(tl.float32) + bias
        dt = _softplus(x, FAST)
        if MASK_E:
            dt = tl.where(m_e, dt, 0.0)  # lanes out of range: no decay, no input
        h = tl.exp2(dt[None, :] * A2) * h + _states_f32(B_t)[:, None] * (dt * u)[None, :]
        if MODE == 0:
            dt_sum += dt
        else:
            y = tl.sum(h * _states_f32(C_t)[:, None], axis=0) + D * u
            if MODE == 2:
                y += y_in.to(tl.float32)
                zz = z.to(tl.float32)
                y = 0.5 * y * zz * _sigmoid(zz, FAST)
            if MASK_E:
                tl.store(y_row + t * so_l, y, mask=m_e)
            else:
                tl.store(y_row + t * so_l, y)
        return h, dt_sum

    @triton.jit
    def _state_walk(u_ptr, su_b, su_e, su_l, d_ptr, sd_b, sd_e, sd_l, B_ptr, sB_b, sB_n, sB_l,
                    C_ptr, sC_b, sC_n, sC_l, A_ptr, D_ptr, bias_ptr, h, y_ptr, so_b, so_e, so_l,
                    z, sz_b, sz_e, sz_l,
                    bid, offs_e, offs_n, mask_e, mask_n, lo, hi, E, L, N,
                    MODE: tl.constexpr, REVERSE: tl.constexpr, STEP: tl.constexpr,
                    BLOCK_N: tl.constexpr, EVEN_E: tl.constexpr, EVEN_N: tl.constexpr,
                    BC_WORDS: tl.constexpr):
        """Walk tokens lo..hi-1 (hi-1..lo if REVERSE) through h = exp(dt A) h + dt B u.

        MODE 0: return the end state and the chunk's sum of dt (the chunk summary);
        MODE 1: write this direction's y = C.h + D u to y_ptr;
        MODE 2: add the other direction's y found in y_ptr and write the gated average.
        Software-pipelined: the loads of the next STEP tokens are issued before the current
        STEP are computed (a token's loads would otherwise wait behind the previous token's
        stores: one memory latency per token). Groups run without token masks (and without
        any mask when E and N fill the blocks: vector loads); the last partial group is
        guarded per token."""
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        A2 = _load_state(A_ptr, offs_e * N, 1, mask_e, N, BLOCK_N) * LOG2E
        dt_sum = tl.zeros_like(bias)
        u_row = u_ptr + bid * su_b + offs_e * su_e
        d_row = d_ptr + bid * sd_b + offs_e * sd_e
        y_row = y_ptr + bid * so_b + offs_e * so_e
        z_row = z + bid * sz_b + offs_e * sz_e
        if BC_WORDS:  # bf16 B, C with unit state stride: a token's N values as N/2 words
            offs_w = tl.arange(0, BLOCK_N // 2)
            B_row = (B_ptr + bid * sB_b).to(tl.pointer_type(tl.int32)) + offs_w
            C_row = (C_ptr + bid * sC_b).to(tl.pointer_type(tl.int32)) + offs_w
            sB_l = sB_l // 2
            sC_l = sC_l // 2
        else:
            B_row = B_ptr + bid * sB_b + offs_n * sB_n
            C_row = C_ptr + bid * sC_b + offs_n * sC_n
        n_tok = hi - lo
        n_full = n_tok // STEP * STEP
        last = n_tok - 1
        nxt = _fetch_group(0, last, lo, hi, u_row, su_l, d_row, sd_l, B_row, sB_l, C_row, sC_l,
                           y_row, so_l, z_row, sz_l, mask_e, mask_n, MODE, REVERSE, STEP,
                           not EVEN_E, not EVEN_N)
        for i0 in range(0, n_full, STEP):
            cur = nxt
            nxt = _fetch_group(i0 + STEP, last, lo, hi, u_row, su_l, d_row, sd_l, B_row, sB_l,
                               C_row, sC_l, y_row, so_l, z_row, sz_l, mask_e, mask_n, MODE,
                               REVERSE, STEP, not EVEN_E, not EVEN_N)
            for k in tl.static_range(STEP):
                h, dt_sum = _scan_token(_token(i0 + k, lo, hi, REVERSE), h, dt_sum, cur[k],
                                        y_row, so_l, A2, bias, D, mask_e, MODE, not EVEN_E)
        for k in tl.static_range(STEP - 1):  # the partial group, already fetched
            if n_full + k < n_tok:
                h, dt_sum = _scan_token(_token(n_full + k, lo, hi, REVERSE), h, dt_sum, nxt[k],
                                        y_row, so_l, A2, bias, D, mask_e, MODE, not EVEN_E)
        return h, dt_sum

    @_jit_strided
    def _fwd_kernel(u_f, su_bf, su_ef, su_lf, d_f, sd_bf, sd_ef, sd_lf, B_f, sB_bf, sB_nf, sB_lf,
                    C_f, sC_bf, sC_nf, sC_lf, A_f, D_f, bias_f,
                    u_b, su_bb, su_eb, su_lb, d_b, sd_bb, sd_eb, sd_lb, B_b, sB_bb, sB_nb, sB_lb,
                    C_b, sC_bb, sC_nb, sC_lb, A_b, D_b, bias_b,
                    z, sz_b, sz_e, sz_l, out, so_b, so_e, so_l, h_f, h_b, sum_f, sum_b,
                    E, L, N, n_chunks,
                    SUMMARY: tl.constexpr, HAS_CARRY: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_N: tl.constexpr, STEP: tl.constexpr, chunk_l,
                    EVEN_E: tl.constexpr, EVEN_N: tl.constexpr, BC_WORDS: tl.constexpr):
        """SUMMARY: each chunk's end states from zero and sums of dt (pass 1).
        Else: merged gated output of the chunk from its incoming states (pass 3): the forward
        direction writes its y into ``out``, the backward one adds its own and gates."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e, mask_n = offs_e < E, offs_n < N
        lo = cid * chunk_l
        hi = tl.minimum(lo + chunk_l, L)
        row = (bid * E + offs_e) * n_chunks + cid  # index into (batch, E, n_chunks)
        zero = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
        if SUMMARY:
            h, dt_sum = _state_walk(u_f, su_bf, su_ef, su_lf, d_f, sd_bf, sd_ef, sd_lf,
                                    B_f, sB_bf, sB_nf, sB_lf, C_f, sC_bf, sC_nf, sC_lf,
                                    A_f, D_f, bias_f, zero, out, so_b, so_e, so_l,
                                    z, sz_b, sz_e, sz_l, bid, offs_e, offs_n, mask_e, mask_n,
                                    lo, hi, E, L, N, 0, False, STEP, BLOCK_N, EVEN_E, EVEN_N,
                                    BC_WORDS)
            _store_state(h_f, row * N, 1, h, mask_e, N, BLOCK_N, False)
            tl.store(sum_f + row, dt_sum, mask=mask_e)
            h, dt_sum = _state_walk(u_b, su_bb, su_eb, su_lb, d_b, sd_bb, sd_eb, sd_lb,
                                    B_b, sB_bb, sB_nb, sB_lb, C_b, sC_bb, sC_nb, sC_lb,
                                    A_b, D_b, bias_b, zero, out, so_b, so_e, so_l,
                                    z, sz_b, sz_e, sz_l, bid, offs_e, offs_n, mask_e, mask_n,
                                    lo, hi, E, L, N, 0, True, STEP, BLOCK_N, EVEN_E, EVEN_N,
                                    BC_WORDS)
            _store_state(h_b, row * N, 1, h, mask_e, N, BLOCK_N, False)
            tl.store(sum_b + row, dt_sum, mask=mask_e)
        else:
            h = zero
            if HAS_CARRY:
                h = _load_state(h_f, row * N, 1, mask_e, N, BLOCK_N)
            _state_walk(u_f, su_bf, su_ef, su_lf, d_f, sd_bf, sd_ef, sd_lf,
                        B_f, sB_bf, sB_nf, sB_lf, C_f, sC_bf, sC_nf, sC_lf, A_f, D_f, bias_f, h,
                        out, so_b, so_e, so_l,
                        z, sz_b, sz_e, sz_l,
                        bid, offs_e, offs_n, mask_e, mask_n, lo, hi, E, L, N, 1, False, STEP,
                        BLOCK_N, EVEN_E, EVEN_N, BC_WORDS)
            h = zero
            if HAS_CARRY:
                h = _load_state(h_b, row * N, 1, mask_e, N, BLOCK_N)
            # the backward direction reads each y_fwd back from the thread that wrote it
            _state_walk(u_b, su_bb, su_eb, su_lb, d_b, sd_bb, sd_eb, sd_lb,
                        B_b, sB_bb, sB_nb, sB_lb, C_b, sC_bb, sC_nb, sC_lb, A_b, D_b, bias_b, h,
                        out, so_b, so_e, so_l,
                        z, sz_b, sz_e, sz_l,
                        bid, offs_e, offs_n, mask_e, mask_n, lo, hi, E, L, N, 2, True, STEP,
                        BLOCK_N, EVEN_E, EVEN_N, BC_WORDS)

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
    def _load_A_en(A_ptr, offs_e, offs_n, mask_en, N):
        return tl.load(A_ptr + offs_e[:, None] * N + offs_n[None, :], mask=mask_en,
                       other=0.0).to(tl.float32)

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
        A2 = _load_A_en(A_ptr, offs_e, offs_n, mask_en, N) * LOG2E
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
    def _adjoint_walk(d_ptr, sd_b, sd_e, sd_l, C_ptr, sC_b, sC_n, sC_l, A_ptr, bias_ptr,
                      z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l,
                      bid, offs_e, offs_n, mask_e, mask_n,
                      lo, hi, N, REVERSE: tl.constexpr, STEP: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        """Gradient the chunk sends to the state before it (after it if REVERSE), from zero:
        r <- exp(dt_t A) (r + C_t g_t), walked against the scan direction."""
        FAST: tl.constexpr = d_ptr.dtype.element_ty != tl.float32
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        A2 = _load_state(A_ptr, offs_e * N, 1, mask_e, N, BLOCK_N) * LOG2E
        r = tl.zeros_like(A2)
        for i0 in range(0, hi - lo, STEP):
            for k in tl.static_range(STEP):
                t = _token(i0 + k, lo, hi, not REVERSE)
                ok = (i0 + k) < hi - lo
                m_e = mask_e & ok
                dt, _ = _load_dt(d_ptr, sd_b, sd_e, sd_l, bias, bid, offs_e, t, m_e, FAST)
                C_t = _load_n(C_ptr, sC_b, sC_n, sC_l, bid, offs_n, t, mask_n & ok)
                zz = _load_e(z, sz_b, sz_e, sz_l, bid, offs_e, t, m_e)
                go = 0.5 * _load_e(dout, sg_b, sg_e, sg_l, bid, offs_e, t, m_e)
                g = go * zz * _sigmoid(zz, FAST)
                r = tl.exp2(dt[None, :] * A2) * (r + C_t * g[None, :])
        return r

    @_jit_any_size
    def _bwd_summary_kernel(d_f, sd_bf, sd_ef, sd_lf, C_f, sC_bf, sC_nf, sC_lf, A_f, bias_f,
                            d_b, sd_bb, sd_eb, sd_lb, C_b, sC_bb, sC_nb, sC_lb, A_b, bias_b,
                            z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l, q_f, q_b,
                            E, L, N, n_chunks,
                            BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                            STEP: tl.constexpr, chunk_l):
        """Pass 1 of the backward: each chunk's adjoint summary, both directions."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e, mask_n = offs_e < E, offs_n < N
        lo = cid * chunk_l
        hi = tl.minimum(lo + chunk_l, L)
        base = ((bid * E + offs_e) * n_chunks + cid) * N  # into (batch, E, n_chunks, N)
        r = _adjoint_walk(d_f, sd_bf, sd_ef, sd_lf, C_f, sC_bf, sC_nf, sC_lf, A_f, bias_f,
                          z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l,
                          bid, offs_e, offs_n, mask_e, mask_n,
                          lo, hi, N, False, STEP, BLOCK_N)
        _store_state(q_f, base, 1, r, mask_e, N, BLOCK_N, False)
        r = _adjoint_walk(d_b, sd_bb, sd_eb, sd_lb, C_b, sC_bb, sC_nb, sC_lb, A_b, bias_b,
                          z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l,
                          bid, offs_e, offs_n, mask_e, mask_n,
                          lo, hi, N, True, STEP, BLOCK_N)
        _store_state(q_b, base, 1, r, mask_e, N, BLOCK_N, False)

    @triton.jit
    def _grad_walk(u_ptr, su_b, su_e, su_l, d_ptr, sd_b, sd_e, sd_l, B_ptr, sB_b, sB_n, sB_l,
                   C_ptr, sC_b, sC_n, sC_l, A_ptr, D_ptr, bias_ptr, h, r, ckpt,
                   z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l,
                   du_ptr, dd_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr, dz,
                   so_b, so_e, so_l, sq_n, sq_l,
                   bid, offs_e, offs_n, mask_e, mask_n, lo, hi, ck_first, n_ck, E, L, N,
                   REVERSE: tl.constexpr, FIRST: tl.constexpr, STEP: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
        """All gradients of one direction on one chunk, from its incoming state h and the
        incoming adjoint r (what the tokens beyond the chunk's far end send back).

        Walk 1 (scan direction) stores the state at the start of every STEP tokens in
        ``ckpt``; walk 2 (adjoint direction) recomputes those STEP states from their checkpoint
        and steps back through them: dh = r + C g, r = exp(dt A) dh. Writes du, ddelta, adds
        dA, dD, ddelta_bias, dB, dC and y's share of dz (FIRST writes it, the other adds)."""
        FAST: tl.constexpr = d_ptr.dtype.element_ty != tl.float32
        idx = tl.arange(0, STEP)
        bias = tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        A2 = _load_state(A_ptr, offs_e * N, 1, mask_e, N, BLOCK_N) * LOG2E
        n_it = tl.cdiv(hi - lo, STEP)
        for j in range(0, n_it):
            _store_state(ckpt, ((bid * n_ck + ck_first + j) * N) * E + offs_e, E, h, mask_e, N,
                         BLOCK_N, False)
            for k in tl.static_range(STEP):
                t = _token(j * STEP + k, lo, hi, REVERSE)
                ok = (j * STEP + k) < hi - lo
                m_e = mask_e & ok
                u = _load_e(u_ptr, su_b, su_e, su_l, bid, offs_e, t, m_e)
                dt, _ = _load_dt(d_ptr, sd_b, sd_e, sd_l, bias, bid, offs_e, t, m_e, FAST)
                B_t = _load_n(B_ptr, sB_b, sB_n, sB_l, bid, offs_n, t, mask_n & ok)
                h = tl.exp2(dt[None, :] * A2) * h + B_t * (dt * u)[None, :]
        tl.debug_barrier()
        dA = tl.zeros_like(A2)
        dD = tl.zeros_like(bias)
        dbias = tl.zeros_like(bias)
        for jj in range(0, n_it):
            j = n_it - 1 - jj
            h = _load_state(ckpt, ((bid * n_ck + ck_first + j) * N) * E + offs_e, E, mask_e, N,
                            BLOCK_N)
            hist = tl.zeros((STEP, BLOCK_N, BLOCK_E), dtype=tl.float32)
            for k in tl.static_range(STEP):
                t = _token(j * STEP + k, lo, hi, REVERSE)
                ok = (j * STEP + k) < hi - lo
                m_e = mask_e & ok
                u = _load_e(u_ptr, su_b, su_e, su_l, bid, offs_e, t, m_e)
                dt, _ = _load_dt(d_ptr, sd_b, sd_e, sd_l, bias, bid, offs_e, t, m_e, FAST)
                B_t = _load_n(B_ptr, sB_b, sB_n, sB_l, bid, offs_n, t, mask_n & ok)
                h = tl.exp2(dt[None, :] * A2) * h + B_t * (dt * u)[None, :]
                hist = tl.where(idx[:, None, None] == k, h[None, :, :], hist)
            for kk in range(0, STEP):  # not unrolled: fewer spills, 3x faster compile
                k_back = STEP - 1 - kk
                i = j * STEP + k_back
                t = _token(i, lo, hi, REVERSE)
                ok = i < hi - lo
                m_e = mask_e & ok
                u = _load_e(u_ptr, su_b, su_e, su_l, bid, offs_e, t, m_e)
                dt, x = _load_dt(d_ptr, sd_b, sd_e, sd_l, bias, bid, offs_e, t, m_e, FAST)
                B_t = _load_n(B_ptr, sB_b, sB_n, sB_l, bid, offs_n, t, mask_n & ok)
                C_t = _load_n(C_ptr, sC_b, sC_n, sC_l, bid, offs_n, t, mask_n & ok)
                zz = _load_e(z, sz_b, sz_e, sz_l, bid, offs_e, t, m_e)
                go = 0.5 * _load_e(dout, sg_b, sg_e, sg_l, bid, offs_e, t, m_e)
                sig_z = _sigmoid(zz, FAST)
                g = go * zz * sig_z
                h_k = tl.sum(tl.where(idx[:, None, None] == k_back, hist, 0.0), axis=0)
                dtu = dt * u
                h_prev = h_k - B_t * dtu[None, :]  # exp(dt A) h_{t-/+1}: what the decay hit
                dh = r + C_t * g[None, :]
                ddt = tl.sum(dh * (B_t * u[None, :] + (A2 / LOG2E) * h_prev), axis=0) \
                    * _sigmoid(x, FAST)
                ddt = tl.where(m_e, ddt, 0.0)  # through softplus
                off = bid * so_b + offs_e * so_e + t * so_l
                tl.store(du_ptr + off, tl.sum(dh * B_t, axis=0) * dt + D * g, mask=m_e)
                tl.store(dd_ptr + off, ddt, mask=m_e)
                dA += dh * h_prev * dt[None, :]
                dD += g * u
                dbias += ddt
                dB_t, dC_t = tl.reduce((dh * dtu[None, :], h_k * g[None, :]), 1, _add2)
                nl_off = bid * N * L + offs_n * sq_n + t * sq_l
                tl.atomic_add(dB_ptr + nl_off, dB_t, mask=mask_n & ok, sem='relaxed')
                tl.atomic_add(dC_ptr + nl_off, dC_t, mask=mask_n & ok, sem='relaxed')
                y = tl.sum(h_k * C_t, axis=0) + D * u
                dz_t = go * y * sig_z * (1.0 + zz * (1.0 - sig_z))
                if not FIRST:
                    dz_t += tl.load(dz + off, mask=m_e, other=0.0).to(tl.float32)
                tl.store(dz + off, dz_t, mask=m_e)
                r = tl.exp2(dt[None, :] * A2) * dh
        _store_state(dA_ptr, offs_e * N, 1, dA, mask_e, N, BLOCK_N, True)
        tl.atomic_add(dD_ptr + offs_e, dD, mask=mask_e)
        tl.atomic_add(dbias_ptr + offs_e, dbias, mask=mask_e)

    @_jit_any_size
    def _bwd_kernel(u_ptr, su_b, su_e, su_l, d_ptr, sd_b, sd_e, sd_l, B_ptr, sB_b, sB_n, sB_l,
                    C_ptr, sC_b, sC_n, sC_l, A_ptr, D_ptr, bias_ptr,
                    z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l, h_in, q_in, ckpt,
                    du, dd, dA, dD, dbias, dB, dC, dz, so_b, so_e, so_l, sq_n, sq_l,
                    E, L, N, n_chunks, n_ck,
                    REVERSE: tl.constexpr, FIRST: tl.constexpr, BLOCK_E: tl.constexpr,
                    BLOCK_N: tl.constexpr, STEP: tl.constexpr, chunk_l):
        """Pass 3 of the backward: all gradients of one direction on one chunk for BLOCK_E
        channels (one launch per direction keeps the kernel small enough to compile fast)."""
        cid = tl.program_id(0)
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_n = tl.arange(0, BLOCK_N)
        mask_e, mask_n = offs_e < E, offs_n < N
        lo = cid * chunk_l
        hi = tl.minimum(lo + chunk_l, L)
        base = ((bid * E + offs_e) * n_chunks + cid) * N  # into (batch, E, n_chunks, N)
        ck_first = cid * (chunk_l // STEP)  # this chunk's checkpoints in (batch, n_ck, N, E)
        _grad_walk(u_ptr, su_b, su_e, su_l, d_ptr, sd_b, sd_e, sd_l, B_ptr, sB_b, sB_n, sB_l,
                   C_ptr, sC_b, sC_n, sC_l, A_ptr, D_ptr, bias_ptr,
                   _load_state(h_in, base, 1, mask_e, N, BLOCK_N),
                   _load_state(q_in, base, 1, mask_e, N, BLOCK_N), ckpt,
                   z, sz_b, sz_e, sz_l, dout, sg_b, sg_e, sg_l, du, dd, dA, dD, dbias, dB, dC, dz,
                   so_b, so_e, so_l, sq_n, sq_l,
                   bid, offs_e, offs_n, mask_e, mask_n, lo, hi, ck_first, n_ck, E, L, N,
                   REVERSE, FIRST, STEP, BLOCK_E, BLOCK_N)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk_length(batch: int, E: int, L: int, cfg: ScanConfig, inference: bool = False) -> int:
    """Tokens per chunk: ``cfg.block_l`` rounded up to whole steps, or (block_l=0) the longest
    chunks that still give the backward ``cfg.bwd_programs`` programs, but at least 32 tokens
    (shorter ones cost more in chunk states than they gain in parallelism)."""
    step = cfg.step_l
    if cfg.block_l:
        return _cdiv(cfg.block_l, step) * step
    if inference:  # chunks cost a second pass over the tokens: only when the GPU is not full
        blocks, programs = batch * _cdiv(E, cfg.block_e), cfg.fwd_programs
        if blocks >= cfg.one_pass_programs:
            return _cdiv(L, step) * step
    else:
        blocks, programs = batch * _cdiv(E, cfg.bwd_block_e), cfg.bwd_programs
    n_chunks = max(1, min(_cdiv(L, 32), programs // blocks))
    return _cdiv(_cdiv(L, n_chunks), step) * step


def _direction_args(u, delta, A, B, C, D, bias):
    """Kernel arguments of one direction: each tensor followed by its strides (any layout)."""
    B, C = (t.squeeze(1) if t.dim() == 4 else t for t in (B, C))
    return (u, *u.stride(), delta, *delta.stride(), B, *B.stride(), C, *C.stride(),
            A.contiguous(), D.contiguous(), bias.contiguous())


def _adjoint_args(d):
    """The part of :func:`_direction_args` the adjoint summary reads: delta, C, A, bias."""
    return (*d[4:8], *d[12:16], d[16], d[18])


def _token_major(t: torch.Tensor) -> bool:
    """A (batch, X, L) tensor stored as (batch, L, X): channels next to each other."""
    return t.stride(1) == 1 and t.shape[2] > 1


def _new(like: torch.Tensor, token_major: bool, dtype=None) -> torch.Tensor:
    """An empty (batch, X, L) tensor shaped like ``like``, stored channel- or token-major."""
    batch, X, L = like.shape
    dtype = dtype or like.dtype
    if token_major:
        return torch.empty(batch, L, X, dtype=dtype, device=like.device).transpose(1, 2)
    return torch.empty(batch, X, L, dtype=dtype, device=like.device)


def _carry(loc, sums, A, reverse: bool, cfg: ScanConfig):
    """Pass 2: incoming state of every chunk from the chunk summaries (batch, E, chunks, N)."""
    batch, E, n_chunks, N = loc.shape
    carry_in = torch.zeros_like(loc)
    block_e = min(cfg.block_e, 8)  # (block_c, block_e, N) tiles
    _carry_kernel[(_cdiv(E, block_e), batch)](
        loc, sums, A, carry_in, E, N, n_chunks, REVERSE=reverse, BLOCK_E=block_e,
        BLOCK_N=triton.next_power_of_2(N), BLOCK_C=cfg.block_c, num_warps=cfg.num_warps)
    return carry_in


def _bc_words(*directions) -> bool:
    """B and C of every direction can load as words (`_state_walk`): bf16, unit state stride,
    an even token stride and 4-byte aligned, with an even power-of-two N (no state mask)."""
    for d in directions:
        for t, (s_b, s_n, s_l) in ((d[8], d[9:12]), (d[12], d[13:16])):
            N = t.shape[1]
            if not (t.dtype == torch.bfloat16 and s_n == 1 and s_l % 2 == 0 and s_b % 2 == 0
                    and t.data_ptr() % 4 == 0 and N >= 2 and N & (N - 1) == 0):
                return False
    return True


def _maxnreg(cap: int) -> dict:
    return {'maxnreg': cap} if cap and not INTERPRET else {}


def _forward(fwd, bwd, z, block_l: int, cfg: ScanConfig):
    """Merged output and the chunks' incoming states / dt sums (what backward needs)."""
    u, A = fwd[0], fwd[16]
    batch, E, L = u.shape
    N = A.shape[1]
    n_chunks = _cdiv(L, block_l)
    block_n = triton.next_power_of_2(N)
    consts = dict(BLOCK_E=cfg.block_e, BLOCK_N=block_n, chunk_l=block_l, STEP=cfg.fwd_step_l,
                  num_warps=cfg.num_warps, EVEN_E=E % cfg.block_e == 0, EVEN_N=N == block_n,
                  BC_WORDS=_bc_words(fwd, bwd))
    grid = (n_chunks, batch, _cdiv(E, cfg.block_e))
    out = _new(u, _token_major(u))
    if n_chunks > 1:
        f32 = dict(dtype=torch.float32, device=u.device)
        loc_f, loc_b = (torch.empty(batch, E, n_chunks, N, **f32) for _ in range(2))
        sum_f, sum_b = (torch.empty(batch, E, n_chunks, **f32) for _ in range(2))
        _fwd_kernel[grid](*fwd, *bwd, z, *z.stride(), out, *out.stride(),
                          loc_f, loc_b, sum_f, sum_b, E, L, N, n_chunks,
                          SUMMARY=True, HAS_CARRY=False, **consts,
                          **_maxnreg(cfg.summary_maxnreg))
        h_f = _carry(loc_f, sum_f, fwd[16], False, cfg)
        h_b = _carry(loc_b, sum_b, bwd[16], True, cfg)
    else:  # one chunk: it starts from zero, no summaries needed
        h_f = h_b = sum_f = sum_b = out.new_empty(0, dtype=torch.float32)
    _fwd_kernel[grid](*fwd, *bwd, z, *z.stride(), out, *out.stride(),
                      h_f, h_b, sum_f, sum_b, E, L, N, n_chunks,
                      SUMMARY=False, HAS_CARRY=n_chunks > 1, **consts,
                      **_maxnreg(cfg.fwd_maxnreg if n_chunks > 1 else cfg.one_pass_maxnreg))
    return out, (h_f, h_b, sum_f, sum_b)


def _backward(fwd, bwd, z, dout, states, block_l: int, cfg: ScanConfig):
    """Gradients of both directions (in input order) and of z."""
    h_f, h_b, sum_f, sum_b = states
    u_f, A_f, u_b, A_b = fwd[0], fwd[16], bwd[0], bwd[16]
    batch, E, L = u_f.shape
    N = A_f.shape[1]
    n_chunks = _cdiv(L, block_l)
    n_ck = n_chunks * (block_l // cfg.step_l)
    consts = dict(BLOCK_E=cfg.bwd_block_e, BLOCK_N=triton.next_power_of_2(N), chunk_l=block_l,
                  STEP=cfg.step_l, num_warps=cfg.bwd_num_warps)
    grid = (n_chunks, batch, _cdiv(E, cfg.bwd_block_e))
    if n_chunks > 1:  # adjoint summaries (pass 1) and carries (pass 2)
        q_f, q_b = torch.empty_like(h_f), torch.empty_like(h_b)
        _bwd_summary_kernel[grid](
            *_adjoint_args(fwd), *_adjoint_args(bwd), z, *z.stride(),
            dout, *dout.stride(), q_f, q_b, E, L, N, n_chunks, **consts)
        q_f = _carry(q_f, sum_f, A_f, True, cfg)  # forward direction: gradients flow leftwards
        q_b = _carry(q_b, sum_b, A_b, False, cfg)
    else:  # one chunk: everything starts from zero
        h_f = h_b = q_f = q_b = torch.zeros(batch, E, 1, N, dtype=torch.float32,
                                            device=u_f.device)
    f32 = dict(dtype=torch.float32, device=u_f.device)
    token_major = _token_major(u_f)  # du, ddelta and dz share one layout (the kernel's so_*)
    dz = _new(u_f, token_major, z.dtype)
    ckpt = torch.empty(batch, n_ck, N, E, **f32)  # states at every step_l-th token
    grads = []
    for d, h, q in ((fwd, h_f, q_f), (bwd, h_b, q_b)):
        B_major = _token_major(d[8])  # dB, dC (fp32, summed atomically) like B
        g = dict(du=_new(u_f, token_major, d[0].dtype), ddelta=_new(u_f, token_major, d[4].dtype),
                 dA=torch.zeros(E, N, **f32), dD=torch.zeros(E, **f32),
                 dbias=torch.zeros(E, **f32), dB=_new(d[8], B_major, torch.float32).zero_(),
                 dC=_new(d[8], B_major, torch.float32).zero_())
        _bwd_kernel[grid](*d, z, *z.stride(), dout, *dout.stride(), h, q, ckpt, *g.values(),
                          dz, *dz.stride(), *g['dB'].stride()[1:], E, L, N, n_chunks,
                          n_ck, REVERSE=d is bwd, FIRST=d is fwd, **consts)
        grads.append(g)
    return grads, dz


class BidirectionalSelectiveScanFn(torch.autograd.Function):
    """Autograd wrapper: saves the inputs and the chunks' incoming states, recomputes the rest."""

    @staticmethod
    def forward(ctx, u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z, config=None, inference=False):
        cfg = config or DEFAULT_CONFIG
        fwd = _direction_args(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f)
        bwd = _direction_args(u_b, delta_b, A_b, B_b, C_b, D_b, bias_b)
        block_l = _chunk_length(*u_f.shape, cfg, inference=inference)
        out, states = _forward(fwd, bwd, z, block_l, cfg)
        ctx.cfg, ctx.block_l = cfg, block_l
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
        grads, dz = _backward(fwd, bwd, z, dout, states, ctx.block_l, ctx.cfg)
        result = []
        for g, dtypes, (sq_B, sq_C) in zip(grads, ctx.dtypes,
                                           (ctx.squeeze[0:2], ctx.squeeze[2:4])):
            A_t, B_t, C_t, D_t, bias_t = dtypes
            dB, dC = g['dB'].to(B_t), g['dC'].to(C_t)
            result += [g['du'], g['ddelta'], g['dA'].to(A_t), dB.unsqueeze(1) if sq_B else dB,
                       dC.unsqueeze(1) if sq_C else dC, g['dD'].to(D_t), g['dbias'].to(bias_t)]
        return (*result, dz, None, None)


def bidirectional_selective_scan(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                                 u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z,
                                 config: ScanConfig | None = None):
    """``(scan_fwd + scan_bwd) / 2 * silu(z)`` of (batch, E, L) inputs in original token order.

    The ``*_b`` direction runs right to left (see the module docstring); delta_softplus is
    always on, D and delta_bias are required (Vim has them). Returns (batch, E, L) in u's dtype.
    """
    if not TRITON_SCAN_AVAILABLE:
        raise RuntimeError('The Triton scan needs triton and a CUDA device '
                           '(or TRITON_INTERPRET=1).')
    args = (u_f, delta_f, A_f, B_f, C_f, D_f, bias_f, u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z)
    # no backward will follow (inference): the forward may chunk differently. Decided here:
    # inside Function.forward grad mode is always off, and under no_grad a parameter passed
    # through (D.float() of an fp32 D) still says requires_grad
    inference = not (torch.is_grad_enabled() and any(t.requires_grad for t in args))
    return BidirectionalSelectiveScanFn.apply(*args, config, inference)
