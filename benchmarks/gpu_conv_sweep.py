"""Time both directions' conv1d + SiLU kernels (``vim_mm/ops/triton_conv.py``) on a GPU.

The tiled kernel and the streaming one over a grid of its settings (block_e, num_warps,
unroll, chunk_l) at Vim shapes, x a token-strided half of in_proj's (batch, L, 2E) output in
bf16, as the mixer has it; CUDA-graph replays (``triton.testing.do_bench``, median), each
checked against the fp32 PyTorch twin. Tenth session: ``results/h200_scan_exp_ahead_conv_v1.json``
('conv' rows; that call ran the same loop from a scratch script).

    python benchmarks/gpu_conv_sweep.py --out conv_sweep.json
    python benchmarks/gpu_conv_sweep.py --shapes 3 --grid '{"block_e": [256], "num_warps": [1, 2]}'

Twelfth session, ``results/h200_conv_cuda_v1.json``: a CUDA C++ kernel with 16-byte accesses
(commit 1935ada, ``--cuda``; reverted: 111 us at best against 64.5 for the stream kernel at
16 x 4097 x 384) and a copy moving the same bytes (``torch.cat``: 151 us).

Fourteenth session: the SiLU by tanh.approx (``silu``, now the 16-bit default, on two warps),
``--grid '{"silu": ["tanh"], "block_e": [64, 128, 256], "num_warps": [2, 4], "unroll": [4, 8],
"chunk_l": [64, 128]}'``, ``results/h200_conv_sweep_tanh_v1.json``: the default fastest or
within 3% at each shape.

``--grid``: the stream settings to time instead (JSON, each key a list; unnamed settings keep
``bidirectional_conv``'s defaults), after the default setting. Twelfth session: 8 channels per
thread (16-byte accesses: block_e 256 on one warp), ``results/h200_conv_sweep_v2.json``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm.ops.triton_conv import bidirectional_conv, bidirectional_conv_torch  # noqa: E402
from timing import graph_median_ms  # noqa: E402

SHAPES = [(16, 4097, 384), (4, 16385, 384), (32, 1025, 384), (128, 197, 384), (16, 4097, 768)]
SETTINGS = [dict(impl='tile')] + [
    dict(impl='stream', block_e=be, num_warps=nw, unroll=un, chunk_l=cl)
    for be, nw, un, cl in itertools.product((64, 128), (1, 2), (2, 4, 8), (64, 128, 256))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out')
    parser.add_argument('--grid', help='JSON {setting: [values]} of stream settings')
    parser.add_argument('--shapes', type=int, default=len(SHAPES), help='the first N shapes')
    args = parser.parse_args()
    settings = SETTINGS
    if args.grid:
        grid = json.loads(args.grid)
        settings = [dict(impl='stream')] + [dict(impl='stream', **dict(zip(grid, values)))
                                            for values in itertools.product(*grid.values())]
    torch.manual_seed(0)
    rows = []
    for batch, L, E in SHAPES[:args.shapes]:
        x = torch.randn(batch, L, 2 * E, device='cuda', dtype=torch.bfloat16)[..., :E]
        w_f, w_b = (torch.randn(E, 1, 4, device='cuda') * 0.5 for _ in range(2))
        b_f, b_b = (torch.randn(E, device='cuda') for _ in range(2))
        want = bidirectional_conv_torch(x.float(), w_f, b_f, w_b, b_b)
        for setting in settings:
            def fn(setting=setting):
                return bidirectional_conv(x, w_f, b_f, w_b, b_b, **setting)
            err = max(((a.float() - b).abs().max() / b.abs().max()).item()
                      for a, b in zip(fn(), want))
            ms = graph_median_ms(fn)
            rows.append(dict(batch=batch, L=L, E=E, setting=setting, ms=ms, rel_err=err,
                             GBps=3 * batch * L * E * 2 / ms / 1e6))  # x read, u_f, u_b written
            print(json.dumps(rows[-1]), flush=True)
        best = min((r for r in rows if r['E'] == E and r['L'] == L and r['batch'] == batch),
                   key=lambda r: r['ms'])
        print(f'{batch}x{L}x{E}: best {best["ms"] * 1e3:.1f} us {best["setting"]}', flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                  command=' '.join(sys.argv), conv=rows),
                                             indent=1))


if __name__ == '__main__':
    main()
