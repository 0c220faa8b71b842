"""out_proj's GEMM, the next block's residual add and its RMSNorm as one Triton kernel, against
cuBLAS + the rows kernel (GPU; nineteenth session, measured slower, not wired into the model).

The idea: the mixer's output (B, L, C) is written by out_proj only to be read back by the next
block's add + RMSNorm; one kernel that keeps each row's C outputs in registers (three
accumulators of C / 3 columns) and normalises them there moves 337 instead of 411 MB per layer
at 16 x 6085 tokens. Outputs as the pair gives them (the GEMM's bf16 rounding kept before the
add; the new residual bit-identical in the call that timed it).

    python benchmarks/gpu_out_proj_norm.py   # writes $OUT/h200_out_proj_norm_v1.json

H200 (results/h200_out_proj_norm_v1.json, 7 tilings): the best 0.1067 / 0.1543 ms against
0.0949 / 0.1114 for the pair at 16 x 4097 / 16 x 6085 (cuBLAS alone 0.0431 / 0.0573): the
Triton GEMM is far slower than cuBLAS's, more than the bytes it saves.
"""
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm.ops.triton_add_norm import add_rms_norm_rows  # noqa: E402


@triton.jit
def _linear_add_norm(y_ptr, w_ptr, res_ptr, nw_ptr, normed_ptr, new_res_ptr, M, K, eps,
                     N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     NC: tl.constexpr, STAGES: tl.constexpr):
    # N = 3 * NC output columns (three accumulators of NC)
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    ks = tl.arange(0, BLOCK_K)
    cn = tl.arange(0, NC)
    acc0 = tl.zeros((BLOCK_M, NC), tl.float32)
    acc1 = tl.zeros((BLOCK_M, NC), tl.float32)
    acc2 = tl.zeros((BLOCK_M, NC), tl.float32)
    a_ptrs = y_ptr + rows.to(tl.int64)[:, None] * K + ks[None, :]
    b_ptrs = w_ptr + cn[None, :] * K + ks[:, None]  # (BLOCK_K, NC) view of W^T
    for k in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        a = tl.load(a_ptrs + k, mask=rmask[:, None], other=0.)
        b0 = tl.load(b_ptrs + k)
        b1 = tl.load(b_ptrs + k + NC * K)
        b2 = tl.load(b_ptrs + k + 2 * NC * K)
        acc0 = tl.dot(a, b0, acc0)
        acc1 = tl.dot(a, b1, acc1)
        acc2 = tl.dot(a, b2, acc2)
    # the GEMM's bf16 output, as the unfused path rounds it, then the add in fp32
    ro = rows.to(tl.int64)[:, None] * N + cn[None, :]
    et = normed_ptr.dtype.element_ty
    m = rmask[:, None]
    s0 = acc0.to(et).to(tl.float32) + tl.load(res_ptr + ro, mask=m, other=0.)
    s1 = acc1.to(et).to(tl.float32) + tl.load(res_ptr + ro + NC, mask=m, other=0.)
    s2 = acc2.to(et).to(tl.float32) + tl.load(res_ptr + ro + 2 * NC, mask=m, other=0.)
    ss = tl.sum(s0 * s0, axis=1) + tl.sum(s1 * s1, axis=1) + tl.sum(s2 * s2, axis=1)
    inv = tl.rsqrt(ss / N + eps)[:, None]
    tl.store(new_res_ptr + ro, s0, mask=rmask[:, None])
    tl.store(new_res_ptr + ro + NC, s1, mask=rmask[:, None])
    tl.store(new_res_ptr + ro + 2 * NC, s2, mask=rmask[:, None])
    w0 = tl.load(nw_ptr + cn).to(tl.float32)[None, :]
    w1 = tl.load(nw_ptr + NC + cn).to(tl.float32)[None, :]
    w2 = tl.load(nw_ptr + 2 * NC + cn).to(tl.float32)[None, :]
    tl.store(normed_ptr + ro, (s0 * inv * w0).to(et), mask=rmask[:, None])
    tl.store(normed_ptr + ro + NC, (s1 * inv * w1).to(et), mask=rmask[:, None])
    tl.store(normed_ptr + ro + 2 * NC, (s2 * inv * w2).to(et), mask=rmask[:, None])


def fused(y, w, res, nw, eps, block_m=128, block_k=64, stages=3, warps=8):
    M, K = y.shape
    N = w.shape[0]
    normed = torch.empty(M, N, dtype=y.dtype, device=y.device)
    new_res = torch.empty(M, N, dtype=torch.float32, device=y.device)
    _linear_add_norm[(triton.cdiv(M, block_m),)](y, w, res, nw, normed, new_res, M, K, eps, N=N,
                                                 BLOCK_M=block_m, BLOCK_K=block_k, NC=N // 3,
                                                 STAGES=stages, num_warps=warps)
    return normed, new_res


def unfused(y, w, res, nw, eps):
    h = torch.nn.functional.linear(y, w)
    return add_rms_norm_rows(h, res, nw, eps)


TILINGS = [(128, 64, 3, 8), (128, 64, 4, 8), (64, 64, 4, 4), (128, 128, 2, 8), (64, 128, 3, 4),
           (128, 32, 4, 8), (256, 64, 2, 8)]  # (block_m, block_k, stages, warps)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def main():
    from triton.testing import do_bench

    def bench(fn):
        return do_bench(fn, warmup=25, rep=200, return_mode='median')

    rows = []
    for M in (16 * 4097, 16 * 6085):  # Vim-Ti at 1024 and 1248 px, batch 16
        g = torch.Generator(device='cuda').manual_seed(0)
        y = torch.randn(M, 768, device='cuda', generator=g).bfloat16()
        w = (torch.randn(192, 768, device='cuda', generator=g) * 768 ** -0.5).bfloat16()
        res = torch.randn(M, 192, device='cuda', generator=g)
        nw = torch.rand(192, device='cuda', generator=g) + 0.5
        ref = unfused(y, w, res, nw, 1e-5)
        t_ref = bench(lambda: unfused(y, w, res, nw, 1e-5))
        t_gemm = bench(lambda: torch.nn.functional.linear(y, w))
        for bm, bk, st, wp in TILINGS:
            try:
                out = fused(y, w, res, nw, 1e-5, bm, bk, st, wp)
                err_n, err_r = rel(out[0], ref[0]), rel(out[1], ref[1])
                t = bench(lambda: fused(y, w, res, nw, 1e-5, bm, bk, st, wp))
            except Exception as e:  # a tiling that cannot compile or fit
                t, err_n, err_r = repr(e)[:120], None, None
            row = dict(M=M, block_m=bm, block_k=bk, stages=st, warps=wp, fused_ms=t,
                       unfused_ms=t_ref, cublas_gemm_ms=t_gemm, err_normed=err_n, err_res=err_r)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(os.environ.get('OUT', '.')) / 'h200_out_proj_norm_v1.json'
    out.write_text(json.dumps(dict(command='python benchmarks/gpu_out_proj_norm.py', rows=rows),
                              indent=1))


if __name__ == '__main__':
    main()
