"""Time the twelfth session's fused kernels against the kernels they replace, and sweep their
tile settings (GPU). CUDA-graph replays, median of do_bench; errors against the unfused lines.

* ``conv_xproj``: both directions' conv1d + SiLU and both x_proj GEMMs
  (``vim_mm/ops/triton_conv_xproj.py``) against the stream conv kernel + two cuBLAS GEMMs.
* ``norm_in_proj``: the block's residual add + RMSNorm and in_proj
  (``vim_mm/ops/triton_norm_linear.py``) against mamba-ssm's Triton norm + a cuBLAS GEMM.

    python benchmarks/gpu_fusions.py --out results/h200_fusions_v1.json [--sweep]
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm.models.cuda_graph import capture_cuda_graph  # noqa: E402
from vim_mm.ops.norm import add_rms_norm  # noqa: E402
from vim_mm.ops.triton_conv import bidirectional_conv  # noqa: E402

# (batch, tokens, d_model): Vim-Ti at 1024 / 1248 / 2048 / 224 / 512 px, Vim-S at 1024 px
SHAPES = [(16, 4097, 192), (16, 6085, 192), (4, 16385, 192), (128, 197, 192), (32, 1025, 192),
          (16, 4097, 384)]
CONV_GRID = dict(chunk_l=(32, 64, 128), block_e=(128, 512), num_warps=(2, 4, 8), unroll=(4, 8))
NORM_GRID = dict(block_m=(64, 128), block_n=(128, 256), block_k=(64,), num_warps=(4, 8),
                 num_stages=(2, 3))


def timed(fn):
    from triton.testing import do_bench
    replay = capture_cuda_graph(fn)[0]
    return do_bench(replay, warmup=25, rep=100, return_mode='median')


def rel_err(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def settings(grid):
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def conv_rows(batch, L, d_model, sweep):
    from vim_mm.ops.triton_conv_xproj import conv_xproj
    E, P = 2 * d_model, 48 if d_model == 192 else 56
    g = torch.Generator(device='cuda').manual_seed(L)
    xz = torch.randn(batch, L, 2 * E, device='cuda', generator=g).bfloat16()
    x = xz[..., :E]
    params = [torch.randn(E, 1, 4, device='cuda', generator=g) / 2,
              torch.randn(E, device='cuda', generator=g) / 4,
              torch.randn(E, 1, 4, device='cuda', generator=g) / 2,
              torch.randn(E, device='cuda', generator=g) / 4]
    p_f, p_b = (torch.randn(P, E, device='cuda', generator=g).bfloat16() / E ** 0.5
                for _ in range(2))

    def unfused():
        u_f, u_b = bidirectional_conv(x, *params)
        return u_f, u_b, F.linear(u_f, p_f), F.linear(u_b, p_b)

    want = unfused()
    rows = [dict(op='conv_xproj', impl='conv + 2 GEMMs', batch=batch, L=L, d_model=d_model,
                 ms=timed(unfused),
                 conv_ms=timed(lambda: bidirectional_conv(x, *params)))]
    for option in [{}] + (settings(CONV_GRID) if sweep else []):
        row = dict(op='conv_xproj', impl='fused', option=option, batch=batch, L=L,
                   d_model=d_model)
        try:
            got = conv_xproj(x, *params, p_f, p_b, **option)
            row['err_u'] = max(rel_err(a, b) for a, b in zip(got[:2], want[:2]))
            row['err_xdbl'] = max(rel_err(a, b) for a, b in zip(got[2:], want[2:]))
            row['ms'] = timed(lambda: conv_xproj(x, *params, p_f, p_b, **option))
        except Exception as e:  # a setting that cannot compile or fit
            row['error'] = repr(e)[:300]
        rows.append(row)
    return rows


def norm_rows(batch, L, d_model, sweep):
    from vim_mm.ops.triton_norm_linear import add_norm_linear
    C, N = d_model, 4 * d_model
    g = torch.Generator(device='cuda').manual_seed(L + 1)
    x = torch.randn(batch, L, C, device='cuda', generator=g).bfloat16()
    residual = torch.randn(batch, L, C, device='cuda', generator=g) * 3
    norm_w = torch.rand(C, device='cuda', generator=g) + 0.5
    w_in = (torch.randn(N, C, device='cuda', generator=g) / C ** 0.5).bfloat16()

    def unfused():
        hidden, new_residual = add_rms_norm(x, residual, norm_w, 1e-5)
        return F.linear(hidden, w_in), new_residual

    want = unfused()
    rows = [dict(op='norm_in_proj', impl='norm + GEMM', batch=batch, L=L, d_model=d_model,
                 ms=timed(unfused),
                 norm_ms=timed(lambda: add_rms_norm(x, residual, norm_w, 1e-5)))]
    for option in [{}] + (settings(NORM_GRID) if sweep else []):
        row = dict(op='norm_in_proj', impl='fused', option=option, batch=batch, L=L,
                   d_model=d_model)
        try:
            got = add_norm_linear(x, residual, norm_w, 1e-5, w_in, **option)
            row['err_out'] = rel_err(got[0], want[0])
            row['err_residual'] = rel_err(got[1], want[1])
            row['ms'] = timed(lambda: add_norm_linear(x, residual, norm_w, 1e-5, w_in, **option))
        except Exception as e:
            row['error'] = repr(e)[:300]
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    parser.add_argument('--sweep', action='store_true', help='time every setting of the grids')
    parser.add_argument('--ops', default='conv_xproj,norm_in_proj')
    parser.add_argument('--shapes', type=int, default=len(SHAPES), help='the first N shapes')
    parser.add_argument('--sweep-shapes', type=int, default=1,
                        help='--sweep at the first N shapes (the defaults only at the others)')
    args = parser.parse_args()
    rows = []
    for i, (batch, L, d_model) in enumerate(SHAPES[:args.shapes]):
        for op in args.ops.split(','):
            for row in {'conv_xproj': conv_rows, 'norm_in_proj': norm_rows}[op](
                    batch, L, d_model, args.sweep and i < args.sweep_shapes):
                rows.append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(dict(  # after every row
                    command=' '.join(['python benchmarks/gpu_fusions.py'] + sys.argv[1:]),
                    device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == '__main__':
    main()
