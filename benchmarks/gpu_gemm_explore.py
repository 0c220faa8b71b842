"""The mixer's three GEMMs against what bounds them, on a GPU (fifteenth session).

At Vim-Ti's token counts at 1024 and 1248 px (batch 16), bf16, CUDA-graph replays (median):

* the copy bandwidth of 100 MB (what a memory-bound kernel could reach);
* in_proj (K 192 -> N 768, writes four times what it reads), out_proj (K 768 -> N 192, over
  the scan's side-by-side halves) and both x_proj as one ``torch.bmm``, each under cuBLAS and
  cuBLASLt (``torch.backends.cuda.preferred_blas_library``);
* in_proj and out_proj as Triton GEMMs: a tile per program over a small sweep, and a
  persistent program per SM loading and storing by TMA descriptors (error against cuBLAS).

    python benchmarks/gpu_gemm_explore.py --out results/h200_gemm_explore_v1.json

Not part of any path of the model: what it found is in benchmarks/README.md, "Fifteenth
session".
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import graph_median_ms as bench  # noqa: E402

TOKENS = {1024: 16 * 4097, 1248: 16 * 6085}


@triton.jit
def _mm_tile_kernel(a_ptr, w_ptr, c_ptr, M, N: tl.constexpr, K: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C = A W^T, one (BM, BN) tile per program (N % BN == 0, K % BK == 0)."""
    pid = tl.program_id(0)
    pid_m, pid_n = pid // (N // BN), pid % (N // BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in tl.static_range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=offs_m[:, None] < M,
                    other=0.)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None])
        acc = tl.dot(a, w, acc)
    tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=offs_m[:, None] < M)


@triton.jit
def _mm_tma_kernel(a_ptr, w_ptr, c_ptr, M, N: tl.constexpr, K: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PROGRAMS: tl.constexpr):
    """C = A W^T, persistent: PROGRAMS programs walk the tiles, TMA loads and stores."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BN, BK])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BM, BN])
    n_tiles = tl.cdiv(M, BM) * (N // BN)
    for tile in tl.range(tl.program_id(0), n_tiles, PROGRAMS, flatten=True):
        pid_m, pid_n = tile // (N // BN), tile % (N // BN)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            acc = tl.dot(a_desc.load([pid_m * BM, k0]), w_desc.load([pid_n * BN, k0]).T, acc)
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(c_ptr.dtype.element_ty))


def triton_best(a, w, c, ref, nbytes):
    """The fastest setting of each Triton GEMM that compiles and fits (None where none does)."""
    M, K = a.shape
    N = w.shape[0]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sweeps = dict(
        triton_tile=[dict(BM=bm, BN=bn, BK=64, num_warps=nw, num_stages=ns) for bm, bn, nw, ns
                     in itertools.product([64, 128, 256], [64, 128, 256], [4, 8], [2, 3])],
        triton_tma_persistent=[dict(BM=bm, BN=bn, BK=64, num_warps=nw, num_stages=ns)
                               for bm, bn, nw, ns
                               in itertools.product([128, 256], [64, 128, 256], [4, 8], [2, 3])])
    found = {}
    for impl, settings in sweeps.items():
        best = None
        for s in settings:
            if s['BN'] > N or K % s['BK'] or N % s['BN'] or s['BM'] * s['BN'] > 128 * 256:
                continue
            if impl == 'triton_tile':
                grid = (triton.cdiv(M, s['BM']) * (N // s['BN']),)
                call = lambda s=s, g=grid: _mm_tile_kernel[g](a, w, c, M, N, K, **s)  # noqa: E731
            else:
                call = lambda s=s: _mm_tma_kernel[(sms,)](  # noqa: E731
                    a, w, c, M, N, K, PROGRAMS=sms, **s)
            try:
                call()
                torch.cuda.synchronize()
            except Exception as e:  # out of shared memory, unsupported: skip the setting
                print(impl, s, 'skipped:', repr(e)[:120], flush=True)
                continue
            err = ((c.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ms = bench(call)
            if best is None or ms < best['ms']:
                best = dict(setting=s, ms=ms, TBps=nbytes / ms / 1e9, rel_err=err)
        found[impl] = best
    return found


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--no-triton', action='store_true', help='cuBLAS / cuBLASLt rows only')
    args = parser.parse_args()
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8,
                                                                 device='cuda'))
    rows = []
    src = torch.randn(50 * 2**20, device='cuda', dtype=torch.bfloat16)  # 100 MiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    rows.append(dict(op='copy 100 MiB', ms=ms, TBps=2 * src.numel() * 2 / ms / 1e9))
    print(rows[-1], flush=True)
    for res, M in TOKENS.items():
        g = torch.Generator(device='cuda').manual_seed(0)
        x = torch.randn(M, 192, device='cuda', dtype=torch.bfloat16, generator=g)
        y = torch.randn(M, 768, device='cuda', dtype=torch.bfloat16, generator=g)
        us = torch.randn(2, M, 384, device='cuda', dtype=torch.bfloat16, generator=g)
        w_in = torch.randn(768, 192, device='cuda', dtype=torch.bfloat16, generator=g) / 14
        w_out = torch.randn(192, 768, device='cuda', dtype=torch.bfloat16, generator=g) / 28
        w_x = torch.randn(2, 48, 384, device='cuda', dtype=torch.bfloat16, generator=g) / 20
        ops = dict(in_proj=(lambda: F.linear(x, w_in), x, w_in),
                   out_proj=(lambda: F.linear(y, w_out), y, w_out),
                   x_proj_bmm=(lambda: torch.bmm(us, w_x.transpose(1, 2)), None, None))
        for name, (fn, a, w) in ops.items():
            out = fn()
            nbytes = sum(t.numel() * t.element_size() for t in (out,) + (
                (a, w) if a is not None else (us, w_x)))
            for lib in ('cublas', 'cublaslt'):
                torch.backends.cuda.preferred_blas_library(lib)
                ms = bench(fn)
                rows.append(dict(res=res, op=name, impl=lib, ms=ms, TBps=nbytes / ms / 1e9))
                print(rows[-1], flush=True)
            torch.backends.cuda.preferred_blas_library('cublas')
            if a is None or args.no_triton:
                continue
            c = torch.empty_like(out)
            for impl, best in triton_best(a, w, c, out, nbytes).items():
                rows.append(dict(res=res, op=name, impl=impl, **(best or dict(ms=None))))
                print(rows[-1], flush=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=' '.join(sys.argv), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
