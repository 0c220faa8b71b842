"""Both directions' depthwise conv1d + SiLU AND both x_proj GEMMs of the Vim mixer in one Triton
kernel (inference), built on the streaming conv kernel's register economy.

What it fuses (x the first half of in_proj's output: a (batch, L, E) slice of a (batch, L, 2E)
tensor, channel stride 1; bf16 under autocast):

    u_f, u_b = bidirectional_conv(x, w_f, b_f, w_b, b_b)        # triton_conv's 'stream' kernel
    x_dbl_f, x_dbl_b = F.linear(u_f, p_f), F.linear(u_b, p_b)   # p (P, E) in x's dtype

:func:`conv_xproj_torch` is the PyTorch twin, :func:`conv_xproj` the kernel.

Why: on an H200 at 16 x 4097 tokens (Vim-Ti, E = 384, bf16) the stream conv kernel takes ~61 us
per layer and the two x_proj GEMMs ~37 us, most of it re-reading both u tensors (100 MB) that
the conv kernel has just written to HBM. Fused, every u chunk is multiplied while it is still in
L1/L2, so HBM sees x read once and u / x_dbl written once.

The previous attempt (commit 1a530f7, ``_bi_conv_xproj_kernel`` in triton_conv.py; reverted in
e69c6b2, benchmarks/README.md) built each (BLOCK_L, BLOCK_E) u tile from 7 shifted masked tile
loads of x and fed it to ``tl.dot`` directly: correct, but 282 us against 140 us for the
separate kernels, because the shifted x tiles, the conv accumulators and both x_proj
accumulators were all live at once: 255 registers per thread in every config (spills, few warps
per SM, few bytes in flight); even its conv part alone was slower than the stream kernel.

This design keeps the two parts apart in time, so their registers are never live together.
One program covers CHUNK_L tokens of one sequence and ALL E channels, in two phases:

1. the conv, exactly as :func:`vim_mm.ops.triton_conv._bi_conv_stream_kernel` does it: for each
   block of BLOCK_E channels (all warps side by side across the channels), walk the chunk's
   tokens with a sliding window of rows x[t-3..t+3] held as loop values (UNROLL row loads in
   flight per step), storing each u_f / u_b row (rounded to x's dtype) to the outputs. Per
   thread: a few channels x (6 window rows + UNROLL new rows + 8 taps + 2 biases).
2. ``tl.debug_barrier()`` (bar.sync: the CTA's global stores are visible to all its threads),
   then x_proj: the chunk's u_f is read back as (CHUNK_L, BLOCK_K) tiles (L1/L2 hits: the
   program wrote them a moment ago) and ``acc += tl.dot(u_tile, p_f_tile^T)`` over E, fp32
   accumulator (CHUNK_L, BLOCK_P) (BLOCK_P = P rounded up to a power of 2, masked); x_dbl_f is
   stored (rounded to x's dtype); then the same for the backward direction, so only one
   accumulator is live at a time. The dot takes u as stored, i.e. rounded, as the separate
   GEMM reads it.

It has NOT been compiled for or timed on a GPU yet: only the CPU tests (Triton's interpreter,
tests/test_triton_conv_xproj2.py) have run. Register counts, speed and the defaults are
unchecked; see :func:`conv_xproj` for what they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# TRITON_INTERPRET=1 (CPU tests). Triton's CPU interpreter multiplies bf16 tiles wrongly in
# tl.dot: there the kernel multiplies the same 16-bit values as float32 (exact products)
from .triton_scan import INTERPRET  # noqa: E402
from .triton_conv import bidirectional_conv_torch  # noqa: E402

__all__ = ['conv_xproj', 'conv_xproj_applies', 'conv_xproj_torch', 'MAX_WIDTH']

MAX_WIDTH = 4  # the kernel's window is written out for W = 4 (narrower: leading zero taps)


def conv_xproj_applies(x: torch.Tensor) -> bool:
    """Whether :func:`conv_xproj` can run where ``x`` lives: triton and a CUDA tensor (or
    Triton's interpreter)."""
    return triton is not None and (x.is_cuda or INTERPRET)


def conv_xproj_torch(x, w_f, b_f, w_b, b_b, p_f, p_b):
    """The twin: ``bidirectional_conv_torch`` then each direction's x_proj.

    x (batch, L, E); conv weights (E, W) or (E, 1, W), biases (E,); p_f, p_b (P, E) in x's
    dtype. Returns (u_f, u_b, x_dbl_f, x_dbl_b): u (batch, L, E), x_dbl (batch, L, P)."""
    u_f, u_b = bidirectional_conv_torch(x, w_f, b_f, w_b, b_b)
    return u_f, u_b, F.linear(u_f, p_f), F.linear(u_b, p_b)


if triton is not None:
    @triton.jit
    def _conv_xproj_kernel(x_ptr, sx_b, sx_l, wf_ptr, bf_ptr, wb_ptr, bb_ptr, pf_ptr, pb_ptr,
                           uf_ptr, ub_ptr, yf_ptr, yb_ptr, L, E, P, CHUNK_L: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_P: tl.constexpr, UNROLL: tl.constexpr,
                           DOT_IN_FP32: tl.constexpr):
        """Tokens [t0, t0 + CHUNK_L) of one sequence, all E channels (taps (E, 4) row-major).

        Phase 1 is the stream kernel's loop (see its docstring in triton_conv.py) inside a loop
        over channel blocks; phase 2 reads the chunk's u back for the dots. Only phase 1's or
        phase 2's values are live at a time. Offsets: the batch/row terms go into int64
        scalar base pointers, the offsets within a chunk are int32.
        DOT_IN_FP32: fp32 activations (ieee products, no tf32) or the interpreter (bf16 dot
        bug; the same 16-bit values multiplied as float32).
        """
        t0 = tl.program_id(0) * CHUNK_L
        bid = tl.program_id(1).to(tl.int64)
        t_end = tl.minimum(t0 + CHUNK_L, L)
        row0 = bid * L + t0  # the chunk's first row of the outputs (int64)
        x_seq = x_ptr + bid * sx_b
        uf_chunk = uf_ptr + row0 * E
        ub_chunk = ub_ptr + row0 * E
        cdtype = uf_ptr.dtype.element_ty  # x's dtype: u and x_dbl are rounded to it

        # ---- phase 1: both convs, a sliding window over the chunk's tokens per channel block
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
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
            x_row = x_seq + offs_e
            # the window before the first token: x[t0-3 .. t0+2] (zero off the ends); written
            # out (a nested @triton.jit helper breaks where the module was imported before the
            # interpreter was switched on, as the test suite does)
            th = t0 - 3
            xm3 = tl.load(x_row + th.to(tl.int64) * sx_l, mask=mask_e & (th >= 0) & (th < L),
                          other=0.0).to(tl.float32)
            th = t0 - 2
            xm2 = tl.load(x_row + th.to(tl.int64) * sx_l, mask=mask_e & (th >= 0) & (th < L),
                          other=0.0).to(tl.float32)
            th = t0 - 1
            xm1 = tl.load(x_row + th.to(tl.int64) * sx_l, mask=mask_e & (th >= 0) & (th < L),
                          other=0.0).to(tl.float32)
            x00 = tl.load(x_row + t0.to(tl.int64) * sx_l, mask=mask_e & (t0 < L),
                          other=0.0).to(tl.float32)
            th = t0 + 1
            xp1 = tl.load(x_row + th.to(tl.int64) * sx_l, mask=mask_e & (th < L),
                          other=0.0).to(tl.float32)
            th = t0 + 2
            xp2 = tl.load(x_row + th.to(tl.int64) * sx_l, mask=mask_e & (th < L),
                          other=0.0).to(tl.float32)
            px = x_row + (t0 + 3).to(tl.int64) * sx_l  # x[t + 3]
            pf = uf_chunk + offs_e
            pb = ub_chunk + offs_e
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
                    tl.store(pf + i * E, (acc_f * tl.sigmoid(acc_f)).to(cdtype), mask=m)
                    tl.store(pb + i * E, (acc_b * tl.sigmoid(acc_b)).to(cdtype), mask=m)
                    xm3, xm2, xm1, x00, xp1, xp2 = xm2, xm1, x00, xp1, xp2, xp3
                px += UNROLL * sx_l
                pf += UNROLL * E
                pb += UNROLL * E

        # the chunk's u, written by all the CTA's threads, is read back by all of them
        tl.debug_barrier()

        # ---- phase 2: x_dbl = u @ p^T over the chunk, one direction after the other
        offs_l = tl.arange(0, CHUNK_L)
        mask_l = t0 + offs_l < L
        offs_k = tl.arange(0, BLOCK_K)
        offs_p = tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        u_off = offs_l[:, None] * E  # within the chunk: int32
        mask_y = mask_l[:, None] & mask_p[None, :]
        y_off = offs_l[:, None] * P + offs_p[None, :]

        acc = tl.zeros((CHUNK_L, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, E, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < E
            u = tl.load(uf_chunk + u_off + kk[None, :], mask=mask_l[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(pf_ptr + offs_p[None, :] * E + kk[:, None],  # p_f^T (BLOCK_K, BLOCK_P)
                        mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            if DOT_IN_FP32:
                acc = tl.dot(u.to(tl.float32), w.to(tl.float32), acc, input_precision='ieee')
            else:
                acc = tl.dot(u, w, acc)
        tl.store(yf_ptr + row0 * P + y_off, acc.to(cdtype), mask=mask_y)

        acc = tl.zeros((CHUNK_L, BLOCK_P), dtype=tl.float32)
        for k0 in range(0, E, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < E
            u = tl.load(ub_chunk + u_off + kk[None, :], mask=mask_l[:, None] & mask_k[None, :],
                        other=0.0)
            w = tl.load(pb_ptr + offs_p[None, :] * E + kk[:, None],
                        mask=mask_k[:, None] & mask_p[None, :], other=0.0)
            if DOT_IN_FP32:
                acc = tl.dot(u.to(tl.float32), w.to(tl.float32), acc, input_precision='ieee')
            else:
                acc = tl.dot(u, w, acc)
        tl.store(yb_ptr + row0 * P + y_off, acc.to(cdtype), mask=mask_y)


def _pow2(name, value, least=1):
    if value < least or value & (value - 1):
        raise ValueError(f'conv_xproj: {name} must be a power of 2 >= {least}, got {value}')


def conv_xproj(x, w_f, b_f, w_b, b_b, p_f, p_b, *, chunk_l: int = 64, block_e: int | None = None,
               block_k: int = 64, unroll: int = 8, num_warps: int = 4, num_stages: int = 2):
    """Triton version of :func:`conv_xproj_torch`: (u_f, u_b, x_dbl_f, x_dbl_b) from one launch,
    all contiguous in x's dtype, u (batch, L, E), x_dbl (batch, L, P).

    ``x`` (batch, L, E) in bf16/fp16/fp32 with channel stride 1 (any token/batch strides, e.g.
    the first half of in_proj's (batch, L, 2E) output; otherwise it is made contiguous); conv
    weights (E, W) or (E, 1, W) with W <= 4 (narrower: leading zero taps, as the stream conv
    does) and biases (E,), used in their own dtype (the twin rounds them to x's dtype first);
    ``p_f``, ``p_b`` x_proj's (P, E) weights in x's dtype. u is accumulated in fp32 and
    rounded to x's dtype; x_dbl multiplies those rounded u by p with fp32 accumulation (fp32
    x: exact fp32 products, no tf32) and is rounded at the end, as cuBLAS does for the twin
    (up to the summation order).

    Grid (cdiv(L, chunk_l), batch); a program covers ``chunk_l`` tokens and every channel:

    * ``chunk_l`` (power of 2 >= 16: the dot's M; shrunk to the sequence for short L),
    * ``block_e``: channels per step of the conv walk (power of 2); None takes up to 4
      channels per thread, ``min(next_pow2(E), 128 * num_warps)`` (E = 384 on 4 warps: one
      512-wide block, a quarter of it masked; 8-byte bf16 loads as in the stream kernel),
    * ``unroll``: tokens per step of the walk (row loads in flight per thread),
    * ``block_k`` (power of 2 >= 16): the dot's K step over E,
    * ``num_warps``, ``num_stages`` (the software pipeline of the dot loop only).

    The defaults are a starting point, not measured: this kernel has not run on a GPU yet.
    """
    name = 'conv_xproj'
    if triton is None or not (x.is_cuda or INTERPRET):
        raise RuntimeError(f'{name} needs triton and a CUDA tensor (or TRITON_INTERPRET=1).')
    if x.dim() != 3:
        raise ValueError(f'{name}: x must be (batch, L, E), got shape {tuple(x.shape)}')
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f'{name}: x must be bf16, fp16 or fp32, got {x.dtype}')
    batch, L, E = x.shape
    width = w_f.shape[-1]
    for wname, w in (('w_f', w_f), ('w_b', w_b)):
        if tuple(w.shape) not in ((E, width), (E, 1, width)):
            raise ValueError(f'{name}: {wname} {tuple(w.shape)} should be ({E}, {width}) or '
                             f'({E}, 1, {width}) for x with E = {E} channels')
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f'{name} handles conv widths 1 to {MAX_WIDTH}, got {width}')
    for bname, b in (('b_f', b_f), ('b_b', b_b)):
        if tuple(b.shape) != (E,):
            raise ValueError(f'{name}: {bname} {tuple(b.shape)} should be ({E},)')
    if p_f.dim() != 2 or p_f.shape[1] != E or p_f.shape != p_b.shape or p_f.shape[0] == 0:
        raise ValueError(f'{name}: p_f {tuple(p_f.shape)} and p_b {tuple(p_b.shape)} should '
                         f'both be (P, {E}) with P >= 1')
    if p_f.dtype != x.dtype or p_b.dtype != x.dtype:
        raise ValueError(f"{name}: p_f/p_b ({p_f.dtype}, {p_b.dtype}) must be in x's dtype "
                         f'{x.dtype}')
    _pow2('chunk_l', chunk_l, 16)
    _pow2('block_k', block_k, 16)
    _pow2('num_warps', num_warps)
    if block_e is not None:
        _pow2('block_e', block_e)
    if unroll < 1 or num_stages < 1:
        raise ValueError(f'{name}: unroll and num_stages must be >= 1, got {unroll}, '
                         f'{num_stages}')
    if x.stride(2) != 1:
        x = x.contiguous()
    P = p_f.shape[0]
    u_f = torch.empty(batch, L, E, dtype=x.dtype, device=x.device)
    u_b = torch.empty_like(u_f)
    y_f = torch.empty(batch, L, P, dtype=x.dtype, device=x.device)
    y_b = torch.empty_like(y_f)
    if batch * L == 0:
        return u_f, u_b, y_f, y_b
    if E == 0:  # nothing to convolve; x_proj of no channels
        return u_f, u_b, y_f.zero_(), y_b.zero_()
    w_f, w_b = (w.reshape(E, width) for w in (w_f, w_b))
    if width < MAX_WIDTH:  # leading zero taps: the same convs with W = 4
        w_f, w_b = (F.pad(w, (MAX_WIDTH - width, 0)) for w in (w_f, w_b))
    e_pow2 = triton.next_power_of_2(E)
    block_e = min(block_e or 128 * num_warps, e_pow2)
    block_k = min(block_k, max(16, e_pow2))
    chunk_l = min(chunk_l, max(16, triton.next_power_of_2(L)))
    grid = (triton.cdiv(L, chunk_l), batch)
    _conv_xproj_kernel[grid](
        x, x.stride(0), x.stride(1), w_f.contiguous(), b_f.contiguous(), w_b.contiguous(),
        b_b.contiguous(), p_f.contiguous(), p_b.contiguous(), u_f, u_b, y_f, y_b, L, E, P,
        CHUNK_L=chunk_l, BLOCK_E=block_e, BLOCK_K=block_k,
        BLOCK_P=max(16, triton.next_power_of_2(P)), UNROLL=unroll,
        DOT_IN_FP32=INTERPRET or x.dtype == torch.float32, num_warps=num_warps,
        num_stages=num_stages)
    return u_f, u_b, y_f, y_b
