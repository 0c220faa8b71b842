"""A Vim block's output projection and the next block's residual add + RMSNorm in one Triton
kernel (inference).

Between two blocks the backbone computes, for the mixer's gated scan output ``y`` (B, L, K)
(16-bit under autocast; K = 2 * E: both scan directions' E channels side by side), the stream
``residual`` (B, L, N) float32 and the next block's norm weight:

    out = y @ weight.T + bias                        # out_proj, fp32 accumulate, rounded once
    new_res = residual + out.float()                 # (the first block: out.float())
    normed = (new_res * rsqrt(mean(new_res ** 2) + eps) * norm_weight).to(y.dtype)

which in PyTorch is a cuBLAS GEMM that writes ``out`` (B, L, N) and a second kernel that reads
it back with ``residual``: on an H200 at 16 x 4097 tokens (Vim-Ti, bf16) out_proj ~35 us plus
add + RMSNorm ~42 us per layer. :func:`linear_add_rms_norm` keeps ``out`` in registers: a
program owns BLOCK_M whole token rows and ALL N output columns, so the row's mean of squares is
taken in the GEMM's epilogue; ``y`` and ``residual`` are read once, ``new_res`` and ``normed``
written once, and one launch per layer is saved.

N is held as at most two power-of-two accumulators (``tl.dot`` needs power-of-two tiles): N =
192 as 128 + 64 and N = 384 as 256 + 128 columns, where padding to one 256 / 512 tile would
waste 25% / 33% of the tensor-core work (``split_n=False`` pads, so the two can be timed). The
default tiles (:func:`default_config`) are UNTIMED guesses for an H100/H200; :func:`sweep_configs`
lists the candidates for a GPU sweep. Forward only; :func:`linear_add_rms_norm_torch` is the
twin.
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

__all__ = ['linear_add_rms_norm', 'linear_add_rms_norm_torch', 'n_tiles', 'default_config',
           'sweep_configs', 'MAX_N']

MAX_N = 512  # output columns a program holds in its fp32 accumulators
SMEM_BYTES = 227 * 1024  # shared memory a block may use on sm_90 (H100/H200)


def linear_add_rms_norm_torch(y, weight, bias, residual, norm_weight, eps: float):
    """y (..., K) 16-bit, weight (N, K), bias (N,) or None, residual (..., N) float32 or None,
    norm_weight (N,) -> (normed (..., N) in y's dtype, new_res (..., N) float32). The linear
    runs in y's dtype (as under autocast: weight and bias cast to it)."""
    out = F.linear(y, weight.to(y.dtype), None if bias is None else bias.to(y.dtype))
    new_res = out.float() if residual is None else residual + out.float()
    normed = new_res * torch.rsqrt(new_res.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * norm_weight.float()).to(y.dtype), new_res


def n_tiles(N: int, split_n: bool = True):
    """The widths (BLOCK_N0, BLOCK_N1) of the two accumulators holding N columns (BLOCK_N1 = 0:
    one accumulator). Split: the largest power of two <= N, then the rest padded to a power of
    two, where that pads less than one tile (192 -> 128 + 64, 384 -> 256 + 128, 48 -> 32 + 16,
    100 -> 128 + 0); ``split_n=False``: one tile of the next power of two. At least 16 (tl.dot)."""
    padded = max(16, 1 << (N - 1).bit_length())
    first = padded // 2
    if not split_n or N == padded or first < 16:
        return padded, 0
    second = max(16, 1 << (N - first - 1).bit_length())
    return (first, second) if first + second < padded else (padded, 0)


def default_config(N: int) -> dict:
    """Tile settings by output width N: UNTIMED guesses for an H100/H200 (the sweep comes later).

    Compiled ahead of time for sm_90 with Triton 3.8 (no GPU run; the GPU has 3.6): N = 192 at
    block_m 64 on 4 warps is 255 registers per thread without spills and 96 KB of shared memory
    (3 stages of (64 + 192) x 64 bf16), so two programs fit an SM and one's epilogue can overlap
    the other's main loop (block_m 128 on 8 warps: also no spills, but 120 KB, one per SM).
    N = 384 (Vim-S) at block_m 64 on 8 warps: 255 registers, no spills, 168 KB, one per SM (on
    4 warps, or with block_m 128, its 192 fp32 accumulators per thread spill)."""
    if sum(n_tiles(N)) <= 256:
        return dict(block_m=64, block_k=64, num_warps=4, num_stages=3)
    return dict(block_m=64, block_k=64, num_warps=8, num_stages=3)


def sweep_configs(N: int, split_n=(True, False)) -> list[dict]:
    """Candidate settings for a GPU sweep at output width N (data only, no timing): block_m in
    {64, 128}, block_k in {32, 64, 128}, num_warps in {4, 8}, num_stages in {2, 3, 4}, and
    ``split_n`` both ways where it changes the tiles. Left out: settings whose pipeline buffers
    (num_stages * (block_m + tile width) * block_k * 2 bytes) pass sm_90's 227 KB of shared
    memory, or that hold more than 128 fp32 accumulators per thread (block_m * tile width /
    (32 * num_warps); at 192 they spilled when compiled for sm_90). The epilogue's layout
    conversions need shared memory too (up to 64 KB with one 256-wide tile), so a few settings
    kept here may still fail to launch: a benchmark should skip those."""
    configs = []
    splits = [s for s in split_n if s or n_tiles(N, True) != n_tiles(N, False)]
    for split in splits:
        width = sum(n_tiles(N, split))
        for block_m in (64, 128):
            for block_k in (32, 64, 128):
                for num_warps in (4, 8):
                    for num_stages in (2, 3, 4):
                        smem = num_stages * (block_m + width) * block_k * 2
                        acc_regs = block_m * width // (32 * num_warps)
                        if smem <= SMEM_BYTES and acc_regs <= 128:
                            configs.append(dict(block_m=block_m, block_k=block_k,
                                                num_warps=num_warps, num_stages=num_stages,
                                                split_n=split))
    return configs


if triton is not None:
    # Two workarounds for Triton's interpreter (3.8; numpy has no bf16, it keeps bf16 as uint16
    # bit patterns), never compiled for a GPU: its tl.dot multiplies bf16 operands as those
    # integers, so the operands go to fp32 first (exact); its fp32 -> bf16 cast truncates, so
    # _to_16bit rounds to nearest even by hand first (a GPU's cast, cvt.rn, rounds so itself).
    INTERP = tl.constexpr(INTERPRET)

    @triton.jit
    def _to_16bit(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to nearest (even) ``dtype`` (16-bit)."""
        if INTERP:
            if dtype == tl.bfloat16:  # RTNE on the bits; exact fp32 -> bf16 afterwards
                bits = x.to(tl.uint32, bitcast=True)
                bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                x = bits.to(tl.float32, bitcast=True)
        return x.to(dtype)

    @triton.jit
    def _linear_add_rms_norm_kernel(y_ptr, stride_ym, w_ptr, b_ptr, res_ptr, nw_ptr, normed_ptr,
                                    new_res_ptr, M, K, eps, N: tl.constexpr,
                                    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                                    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_K: tl.constexpr, BLOCK_N0: tl.constexpr,
                                    BLOCK_N1: tl.constexpr, SPLIT: tl.constexpr):
        """BLOCK_M rows of y (M, K) times the contiguous weight (N, K) into accumulators of
        columns [0, BLOCK_N0) and (SPLIT) [BLOCK_N0, BLOCK_N0 + BLOCK_N1), then the epilogue.

        The loop has no row or column masks: rows past M re-read row ``r % M`` and padded
        columns re-read weight row ``n % N`` (the values are dropped: zeroed before the mean of
        squares, not stored); only a K tail (not EVEN_K) is masked."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = (offs_m % M).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        n0 = tl.arange(0, BLOCK_N0)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_k[None, :]
        w0_ptrs = w_ptr + (n0 % N)[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N0) of W^T
        acc0 = tl.zeros((BLOCK_M, BLOCK_N0), dtype=tl.float32)
        if SPLIT:
            n1 = BLOCK_N0 + tl.arange(0, BLOCK_N1)
            w1_ptrs = w_ptr + (n1 % N)[None, :] * K + offs_k[:, None]
            acc1 = tl.zeros((BLOCK_M, BLOCK_N1), dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(y_ptrs)
                b0 = tl.load(w0_ptrs)
                if SPLIT:
                    b1 = tl.load(w1_ptrs)
            else:
                k_ok = offs_k < K - k
                a = tl.load(y_ptrs, mask=k_ok[None, :], other=0.)
                b0 = tl.load(w0_ptrs, mask=k_ok[:, None], other=0.)
                if SPLIT:
                    b1 = tl.load(w1_ptrs, mask=k_ok[:, None], other=0.)
            if INTERP:
                a = a.to(tl.float32)
                b0 = b0.to(tl.float32)
                if SPLIT:
                    b1 = b1.to(tl.float32)
            acc0 = tl.dot(a, b0, acc0)
            if SPLIT:
                acc1 = tl.dot(a, b1, acc1)
            y_ptrs += BLOCK_K
            w0_ptrs += BLOCK_K
            if SPLIT:
                w1_ptrs += BLOCK_K

        # epilogue: out rounded to y's dtype once, + residual in fp32, the row's RMS
        dtype = y_ptr.dtype.element_ty
        row_ok = (offs_m < M)[:, None]
        out_rows = offs_m.to(tl.int64)[:, None] * N
        n0_ok = n0 < N
        if HAS_BIAS:
            acc0 += tl.load(b_ptr + n0, mask=n0_ok, other=0.).to(tl.float32)[None, :]
        s0 = _to_16bit(acc0, dtype).to(tl.float32)
        if HAS_RES:
            s0 += tl.load(res_ptr + out_rows + n0[None, :], mask=row_ok & n0_ok[None, :],
                          other=0.)
        s0 = tl.where(n0_ok[None, :], s0, 0.)
        sum_sq = tl.sum(s0 * s0, axis=1)
        if SPLIT:
            n1_ok = n1 < N
            if HAS_BIAS:
                acc1 += tl.load(b_ptr + n1, mask=n1_ok, other=0.).to(tl.float32)[None, :]
            s1 = _to_16bit(acc1, dtype).to(tl.float32)
            if HAS_RES:
                s1 += tl.load(res_ptr + out_rows + n1[None, :], mask=row_ok & n1_ok[None, :],
                              other=0.)
            s1 = tl.where(n1_ok[None, :], s1, 0.)
            sum_sq += tl.sum(s1 * s1, axis=1)
        inv_rms = tl.rsqrt(sum_sq / N + eps)[:, None]

        nw0 = tl.load(nw_ptr + n0, mask=n0_ok, other=0.).to(tl.float32)
        ok0 = row_ok & n0_ok[None, :]
        tl.store(new_res_ptr + out_rows + n0[None, :], s0, mask=ok0)
        tl.store(normed_ptr + out_rows + n0[None, :],
                 _to_16bit(s0 * inv_rms * nw0[None, :], dtype), mask=ok0)
        if SPLIT:
            nw1 = tl.load(nw_ptr + n1, mask=n1_ok, other=0.).to(tl.float32)
            ok1 = row_ok & n1_ok[None, :]
            tl.store(new_res_ptr + out_rows + n1[None, :], s1, mask=ok1)
            tl.store(normed_ptr + out_rows + n1[None, :],
                     _to_16bit(s1 * inv_rms * nw1[None, :], dtype), mask=ok1)


def _power_of_2_at_least_16(value) -> bool:
    return isinstance(value, int) and value >= 16 and value & (value - 1) == 0


def linear_add_rms_norm(y, weight, bias, residual, norm_weight, eps: float, *, block_m=None,
                        block_k=None, num_warps=None, num_stages=None, split_n: bool = True):
    """The Triton kernel for :func:`linear_add_rms_norm_torch` (same arguments and results).

    ``y`` (..., K) bfloat16/float16 with unit channel stride (otherwise made contiguous; any
    token stride where the leading dims flatten to one), ``weight`` (N, K) in y's dtype, N <=
    :data:`MAX_N`; ``bias`` (N,) or None (cast to y's dtype, as autocast does), ``residual``
    (..., N) float32 or None, ``norm_weight`` (N,) any float dtype. Returns ``normed`` (..., N)
    in y's dtype and ``new_res`` (..., N) float32, both contiguous.

    Settings left None come from :func:`default_config` (untimed guesses); ``block_m`` and
    ``block_k`` are powers of two >= 16. ``split_n=False`` pads N to one power-of-two tile
    instead of two tiles (:func:`n_tiles`).
    """
    if triton is None or not (y.is_cuda or INTERPRET):
        raise RuntimeError('linear_add_rms_norm needs triton and a CUDA tensor '
                           '(or TRITON_INTERPRET=1).')
    if y.dtype not in (torch.bfloat16, torch.float16) or y.dim() < 2:
        raise ValueError(f'linear_add_rms_norm: y must be (..., K) bfloat16/float16, got '
                         f'{tuple(y.shape)} {y.dtype}')
    K = y.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype != y.dtype:
        raise ValueError(f'linear_add_rms_norm: weight {tuple(weight.shape)} {weight.dtype} must '
                         f'be (N, {K}) {y.dtype} for y {tuple(y.shape)}')
    N = weight.shape[0]
    if not 0 < N <= MAX_N:
        raise ValueError(f'linear_add_rms_norm: N = {N} output columns; the kernel holds at most '
                         f'{MAX_N}')
    lead = y.shape[:-1]
    for name, vec in (('bias', bias), ('norm_weight', norm_weight)):
        if vec is not None and (vec.shape != (N,) or not vec.dtype.is_floating_point):
            raise ValueError(f'linear_add_rms_norm: {name} {tuple(vec.shape)} {vec.dtype} must '
                             f'be ({N},) floating point')
    if residual is not None and (residual.shape != (*lead, N) or residual.dtype != torch.float32):
        raise ValueError(f'linear_add_rms_norm: residual {tuple(residual.shape)} '
                         f'{residual.dtype} must be {(*lead, N)} float32')
    config = default_config(N)
    block_m = block_m or config['block_m']
    block_k = block_k or config['block_k']
    if not (_power_of_2_at_least_16(block_m) and _power_of_2_at_least_16(block_k)):
        raise ValueError(f'linear_add_rms_norm: block_m {block_m} and block_k {block_k} must be '
                         'powers of two >= 16')

    y2 = y.reshape(-1, K)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    M = y2.shape[0]
    normed = torch.empty(*lead, N, dtype=y.dtype, device=y.device)
    new_res = torch.empty(*lead, N, dtype=torch.float32, device=y.device)
    if M == 0:
        return normed, new_res
    weight = weight.contiguous()
    bias = None if bias is None else bias.to(y.dtype).contiguous()
    residual = None if residual is None else residual.contiguous()
    block_n0, block_n1 = n_tiles(N, split_n)
    _linear_add_rms_norm_kernel[(triton.cdiv(M, block_m),)](
        y2, y2.stride(0), weight, weight if bias is None else bias,
        new_res if residual is None else residual, norm_weight.contiguous(), normed, new_res, M,
        K, float(eps), N=N, HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N0=block_n0,
        BLOCK_N1=max(block_n1, 16), SPLIT=block_n1 > 0,
        num_warps=num_warps or config['num_warps'], num_stages=num_stages or config['num_stages'])
    return normed, new_res
