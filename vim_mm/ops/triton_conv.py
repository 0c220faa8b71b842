"""Both directions' depthwise conv1d + SiLU of the Vim mixer in one Triton kernel (inference).

Vim's backward branch convolves the REVERSED sequence causally; in original token order that
is an anti-causal conv with the taps mirrored:

    u_f[t] = silu(b_f + sum_k w_f[k] x[t - (W-1) + k])
    u_b[t] = silu(b_b + sum_k w_b[k] x[t + (W-1) - k])

so both come from one read of ``x`` in its (batch, L, E) token-major layout (a slice of
``in_proj``'s output) with no flip and no transpose. Forward only: the Triton mixer uses it
when no gradient is needed; :func:`bidirectional_conv_torch` is the PyTorch twin.

Two kernels, picked by ``impl`` (default :data:`DEFAULT_IMPL`) so they can be A/B-timed:

* ``'tile'``: one (BLOCK_L, BLOCK_E) output tile per program, built from 2W shifted masked
  loads of the whole tile (the shifted copies come from L1/L2, but all of them are live in
  registers at once: at 32 x 128 on 4 warps ptxas gives 177 registers per thread for bf16
  and 255 for fp32 on sm_90; ~1.8 TB/s on an H200).
* ``'stream'``: one program per (CHUNK_L tokens, BLOCK_E channels) walks its tokens in order
  with a sliding window of rows x[t-3..t+3] held in registers, so every x row is read once
  (plus a 6-row halo per chunk). See :func:`_bi_conv_stream_kernel`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from .triton_scan import INTERPRET  # noqa: E402  (TRITON_INTERPRET=1: CPU tests)

__all__ = ['bidirectional_conv', 'bidirectional_conv_torch', 'DEFAULT_IMPL']

# 'tile' or 'stream': the kernel bidirectional_conv runs by default ('stream': 1.4-1.6x
# faster on an H200: benchmarks/gpu_conv_sweep.py)
DEFAULT_IMPL = 'stream'
STREAM_WIDTH = 4  # the stream kernel's window is written out for W = 4 (narrower: zero taps)
SILU_MODES = {'exact': 0, 'exp': 1, 'tanh': 2}  # the stream kernel's SiLU (_silu)


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

    from .triton_scan import PTX, _sigmoid  # the scan's MUFU sigmoid (ex2 + rcp.approx)

    @triton.jit
    def _silu(x, SILU: tl.constexpr):
        """x sigmoid(x): SILU 0 exact (libdevice exp, IEEE division), 1 by the scan's
        approximate sigmoid (2 MUFU operations, relative error ~1e-7), 2 by tanh.approx as
        x (1 + tanh(x / 2)) / 2 (1 MUFU operation; the PTX manual bounds tanh.approx's relative
        error by 2^-11; on an H200 both approximate outputs meet assert_close's bf16
        tolerances against the fp32 twin element by element, tests/test_triton_conv_stream.py).
        The interpreter computes all three without PTX (exact up to fp32 rounding)."""
        if SILU == 2 and PTX:
            h = 0.5 * x
            t = tl.inline_asm_elementwise('tanh.approx.f32 $0, $1;', '=r,r', [h],
                                          dtype=tl.float32, is_pure=True, pack=1)
            return h + h * t
        elif SILU == 1:
            return x * _sigmoid(x, True)
        else:
            return x * tl.sigmoid(x)

    @triton.jit
    def _bi_conv_stream_kernel(x_ptr, sx_b, sx_l, wf_ptr, bf_ptr, wb_ptr, bb_ptr, uf_ptr, ub_ptr,
                               L, E, CHUNK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                               UNROLL: tl.constexpr, SILU: tl.constexpr = 0):
        """Tokens [t0, t0 + CHUNK_L) of BLOCK_E channels of one sequence, walked in order (W = 4).

        Why a sliding window: Triton cannot slice a register tile, so a halo tile loaded once
        cannot be cut into the 7 shifted views the two convs need. Instead the rows
        x[t-3..t+2] are loop values, renamed at each token (no data moves), and each token
        needs ONE new row, x[t+3]: every x row is read once, plus a 6-row halo per chunk.
        Per thread that is a few channels x (6 window rows + UNROLL new rows + 8 taps + 2
        biases), so registers stay low: ptxas (sm_90, bf16) gives 96 per thread at BLOCK_E=128
        on one warp (4 channels per thread, 8-byte loads) with UNROLL=4, 56 on two warps, 127
        for fp32 on one warp, against 177 (bf16) / 255 (fp32) for the tile kernel.

        Latency: a row per loop step would leave one load in flight per program, and Triton's
        pipeliner (``tl.range(num_stages=...)``) does not pipeline a load whose value is
        loop-carried (checked on sm_90 PTX: no cp.async is emitted). So each step handles
        UNROLL tokens: their UNROLL row loads are issued back to back (a tuple, before any
        store), then the UNROLL tokens are computed and stored. The loop stops at L, so only
        the step's tail tokens need a mask besides the channel one.
        """
        t0 = tl.program_id(0) * CHUNK_L
        bid = tl.program_id(1).to(tl.int64)
        offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        # taps (E, 4) row-major and biases, fp32, once per program
        wf0 = tl.load(wf_ptr + offs_e * 4 + 0, mask=mask_e, other=0.0).to(tl.float32)
        wf1 = tl.load(wf_ptr + offs_e * 4 + 1, mask=mask_e, other=0.0).to(tl.float32)
        wf2 = tl.load(wf_ptr + offs_e * 4 + 2, mask=mask_e, other=0.0).to(tl.float32)
        wf3 = tl.load(wf_ptr + offs_e * 4 + 3, mask=mask_e, other=0.0).to(tl.float32)
        wb0 = tl.load(wb_ptr + offs_e * 4 + 0, mask=mask_e, other=0.0).to(tl.float32)
        wb1 = tl.load(wb_ptr + offs_e * 4 + 1, mask=mask_e, other=0.0).to(tl.float32)
        wb2 = tl.load(wb_ptr + offs_e * 4 + 2, mask=mask_e, other=0.0).to(tl.float32)
        wb3 = tl.load(wb_ptr + offs_e * 4 + 3, mask=mask_e, other=0.0).to(tl.float32)
        bias_f = tl.load(bf_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        bias_b = tl.load(bb_ptr + offs_e, mask=mask_e, other=0.0).to(tl.float32)
        x_row = x_ptr + bid * sx_b + offs_e
        # the window before the first token: x[t0-3 .. t0+2] (the halo, zero off the ends)
        # (loads written out: a nested @triton.jit helper breaks where the module was imported
        # before the interpreter was switched on, as the test suite does)
        t = t0 - 3
        xm3 = tl.load(x_row + t.to(tl.int64) * sx_l, mask=mask_e & (t >= 0) & (t < L),
                      other=0.0).to(tl.float32)
        t = t0 - 2
        xm2 = tl.load(x_row + t.to(tl.int64) * sx_l, mask=mask_e & (t >= 0) & (t < L),
                      other=0.0).to(tl.float32)
        t = t0 - 1
        xm1 = tl.load(x_row + t.to(tl.int64) * sx_l, mask=mask_e & (t >= 0) & (t < L),
                      other=0.0).to(tl.float32)
        x00 = tl.load(x_row + t0.to(tl.int64) * sx_l, mask=mask_e & (t0 < L),
                      other=0.0).to(tl.float32)
        t = t0 + 1
        xp1 = tl.load(x_row + t.to(tl.int64) * sx_l, mask=mask_e & (t < L),
                      other=0.0).to(tl.float32)
        t = t0 + 2
        xp2 = tl.load(x_row + t.to(tl.int64) * sx_l, mask=mask_e & (t < L),
                      other=0.0).to(tl.float32)
        px = x_row + (t0 + 3).to(tl.int64) * sx_l  # x[t + 3]
        out = (bid * L + t0) * E + offs_e
        pf = uf_ptr + out
        pb = ub_ptr + out
        t_end = tl.minimum(t0 + CHUNK_L, L)
        for t in tl.range(t0, t_end, UNROLL):
            rows = ()  # x[t+3 .. t+3+UNROLL-1], all loads in flight before the first use
            for i in tl.static_range(UNROLL):
                rows = rows + (tl.load(px + i * sx_l, mask=mask_e & (t + 3 + i < L),
                                       other=0.0),)
            for i in tl.static_range(UNROLL):
                xp3 = rows[i].to(tl.float32)
                acc_f = bias_f + wf0 * xm3 + wf1 * xm2 + wf2 * xm1 + wf3 * x00
                acc_b = bias_b + wb0 * xp3 + wb1 * xp2 + wb2 * xp1 + wb3 * x00
                m = mask_e & (t + i < t_end)
                tl.store(pf + i * E, _silu(acc_f, SILU), mask=m)
                tl.store(pb + i * E, _silu(acc_b, SILU), mask=m)
                xm3, xm2, xm1, x00, xp1, xp2 = xm2, xm1, x00, xp1, xp2, xp3
            px += UNROLL * sx_l
            pf += UNROLL * E
            pb += UNROLL * E


def bidirectional_conv(x, w_f, b_f, w_b, b_b, block_l: int = 32, block_e: int = 128, *,
                       impl: str | None = None, chunk_l: int = 64, unroll: int = 8,
                       num_warps: int | None = None, silu: str | None = None):
    """Triton version of :func:`bidirectional_conv_torch`: (u_f, u_b) stacked, (2, batch, L, E).

    ``x`` (batch, L, E) in fp32/bf16/fp16 with channel stride 1 (any token/batch strides, e.g.
    a half of in_proj's (batch, L, 2E) output; otherwise it is made contiguous); weights (E, W)
    or (E, 1, W), biases (E,). Outputs in x's dtype, accumulated in fp32.

    ``impl``: 'tile' (tiles of ``block_l`` x ``block_e``) or 'stream' (chunks of ``chunk_l``
    tokens x ``block_e`` channels walked with a sliding window, ``unroll`` tokens, i.e. row
    loads in flight, per loop step); None takes :data:`DEFAULT_IMPL`. ``num_warps`` defaults
    to 4 for 'tile' (Triton's default) and 1 for 'stream'. 'stream' handles W <= 4 (narrower
    filters get leading zero taps); with W > 4 the default falls back to 'tile' and an
    explicit 'stream' raises.

    Stream defaults (block_e=128, chunk_l=64, unroll=8, one warp): of 36 settings (block_e
    64/128, 1/2 warps, unroll 2/4/8, chunk_l 64/128/256) at 5 Vim shapes, timed twice on an
    H200 (``benchmarks/gpu_conv_sweep.py``; results/h200_scan_exp_ahead_conv_v1.json and
    h200_conv_sweep_v1.json), on average 4.9% and at worst 8.3% slower than the fastest
    setting of a shape and run (two warps, the first run's pick: 6.5% / 21%; which setting is
    fastest changes between runs). 16 x 4097 x 384 in bf16: 58-61 us, against 85-87 us for
    'tile'.

    ``silu`` (stream kernel only): 'exact', 'exp' (exp2 + rcp.approx) or 'tanh'
    (tanh.approx): see :func:`_silu`. None: 'tanh' for 16-bit x (its error is within the
    output's rounding) on two warps unless ``num_warps`` says otherwise, 'exact' for fp32.
    H200, 16 x 4097 x 384 bf16 (``benchmarks/gpu_layer_ops.py``, results/h200_layer_ops_v1):
    exact 63.8 us, 'exp' 56.7, 'tanh' 54.8 on one warp and 49.1 on two (h200_layer_ops_review).

    The outputs are one (2, batch, L, E) tensor's two halves (``u_f, u_b = out`` unpacks it
    too), so both directions' x_proj can be one batched GEMM.
    """
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError('bidirectional_conv needs triton and a CUDA tensor '
                           '(or TRITON_INTERPRET=1).')
    width = w_f.shape[-1]
    if impl is None:
        impl = DEFAULT_IMPL if width <= STREAM_WIDTH else 'tile'
    if impl not in ('tile', 'stream'):
        raise ValueError(f"impl must be 'tile' or 'stream', got {impl!r}")
    if silu is None:
        silu = 'exact' if x.dtype == torch.float32 or impl == 'tile' else 'tanh'
        if silu == 'tanh' and num_warps is None:
            num_warps = 2
    if silu not in SILU_MODES:
        raise ValueError(f'silu must be one of {tuple(SILU_MODES)}, got {silu!r}')
    if impl == 'tile' and silu != 'exact':
        raise ValueError(f"silu={silu!r} is the stream kernel's; impl='tile' computes it exactly")
    if impl == 'stream' and width > STREAM_WIDTH:
        raise ValueError(f"impl='stream' handles conv widths <= {STREAM_WIDTH}, got {width}")
    if x.stride(2) != 1:
        x = x.contiguous()
    batch, L, E = x.shape
    w_f, w_b = (w.reshape(E, width).contiguous() for w in (w_f, w_b))
    u = torch.empty(2, batch, L, E, dtype=x.dtype, device=x.device)
    u_f, u_b = u
    if u.numel() == 0:
        return u
    block_e = min(block_e, triton.next_power_of_2(E))
    if impl == 'stream':
        if width < STREAM_WIDTH:  # leading zero taps: the same convs with W = 4
            w_f, w_b = (F.pad(w, (STREAM_WIDTH - width, 0)) for w in (w_f, w_b))
        grid = (triton.cdiv(L, chunk_l), batch, triton.cdiv(E, block_e))
        _bi_conv_stream_kernel[grid](x, x.stride(0), x.stride(1), w_f, b_f.contiguous(), w_b,
                                     b_b.contiguous(), u_f, u_b, L, E, CHUNK_L=chunk_l,
                                     BLOCK_E=block_e, UNROLL=unroll, SILU=SILU_MODES[silu],
                                     num_warps=num_warps or 1)
        return u
    grid = (triton.cdiv(L, block_l), batch, triton.cdiv(E, block_e))
    _bi_conv_kernel[grid](x, x.stride(0), x.stride(1), w_f, b_f.contiguous(), w_b,
                          b_b.contiguous(), u_f, u_b, L, E, WIDTH=width, BLOCK_L=block_l,
                          BLOCK_E=block_e, num_warps=num_warps or 4)
    return u
