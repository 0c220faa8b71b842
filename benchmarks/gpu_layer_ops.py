"""Time the kernels around the scan in one Vim layer, and candidate replacements, on a GPU.

At the token counts of Vim-Ti at 1024 and 1248 px and Vim-S at 1024 px (batch 16), bf16,
CUDA-graph replays (``triton.testing.do_bench``, median), each candidate checked against a
reference:

* ``conv``: both directions' conv1d + SiLU (``triton_conv.bidirectional_conv``, stream kernel)
  with its SiLU exact, by ex2/rcp.approx, or by tanh.approx (``silu=``) on one and two warps,
  error against the fp32 PyTorch twin;
* ``x_proj``: both directions' x_proj as two ``F.linear`` or one ``torch.bmm`` over the conv's
  stacked (2, B, L, E) output (what the mixer runs);
* ``norm``: the residual add + RMSNorm alone, mamba-ssm's kernel (a row per program) against
  ``triton_add_norm.add_rms_norm_rows`` over rows per program and warps;
* ``conv_xproj``: both convs and both x_proj as one CUDA C++ kernel (``cuda_conv_xproj``, the
  mixer's default since the sixteenth session) against the conv + bmm pair, per tile shape
  (``--tiles``) and per other kernel source (``--ab``), errors against the fp32 twin.

    python benchmarks/gpu_layer_ops.py --out results/h200_layer_ops_v2.json
    python benchmarks/gpu_layer_ops.py --ops conv x_proj --shapes 1
    python benchmarks/gpu_layer_ops.py --ops conv_xproj --tiles 64x64x2 32x64x4
    git show 553cf17:vim_mm/ops/csrc/conv_xproj_fwd.cu > /tmp/bulk.cu   # u by bulk copies
    python benchmarks/gpu_layer_ops.py --ops conv_xproj --tiles 64x64x2 --ab /tmp/bulk.cu

Fourteenth session (benchmarks/README.md): results/h200_layer_ops_v1.json (conv, x_proj and
the ``out_norm`` candidate below), ``_norm_v1``, ``_xproj_v1``. Two candidates were timed and
removed (commit 62910fb has them and this script's ops for them): out_proj + the next block's
add + RMSNorm as one Triton GEMM (``out_norm``: 102 us at best at 16 x 4097 against 87 for
cuBLAS + mamba-ssm's norm) and both x_proj as one skinny Triton GEMM (38.4 us, bmm 38.5).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm.ops.norm import add_rms_norm  # noqa: E402
from vim_mm.ops.triton_conv import bidirectional_conv, bidirectional_conv_torch  # noqa: E402
from timing import graph_median_ms as bench  # noqa: E402

# (name, batch, L, d_model): E = 2 d_model channels in the mixer
SHAPES = [('vim-t 1024 b16', 16, 4097, 192), ('vim-t 1248 b16', 16, 6085, 192),
          ('vim-s 1024 b16', 16, 4097, 384)]
CONV_SETTINGS = [dict(), dict(num_warps=2)]
# x_proj's rows: Vim-Ti's 12 + 2 x 16 padded to a multiple of 8 (Vim-S has 24 + 32 = 56; its
# shape here keeps 48, as every recorded result did)
ROWS_PADDED = 48


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def time_conv(rows, name, batch, L, E):
    x = torch.randn(batch, L, 2 * E, device='cuda', dtype=torch.bfloat16)[..., :E]
    w_f, w_b = (torch.randn(E, 1, 4, device='cuda') * 0.5 for _ in range(2))
    b_f, b_b = (torch.randn(E, device='cuda') for _ in range(2))
    want = bidirectional_conv_torch(x.float(), w_f, b_f, w_b, b_b)
    for silu in ('exact', 'exp', 'tanh'):
        for setting in CONV_SETTINGS:
            def fn(setting=setting, silu=silu):
                return bidirectional_conv(x, w_f, b_f, w_b, b_b, silu=silu, **setting)
            err = max(rel_err(a, b) for a, b in zip(fn(), want))
            ms = bench(fn)
            rows.append(dict(op='conv', shape=name, silu=silu, setting=setting, ms=ms,
                             rel_err=err, GBps=3 * batch * L * E * 2 / ms / 1e6))
            print(json.dumps(rows[-1]), flush=True)


def time_x_proj(rows, name, batch, L, E):
    u2 = torch.randn(2, batch, L, E, device='cuda', dtype=torch.bfloat16)
    w2 = torch.randn(2, ROWS_PADDED, E, device='cuda', dtype=torch.bfloat16) * E ** -0.5
    want = [F.linear(u, w) for u, w in zip(u2, w2)]
    candidates = {
        'two F.linear': lambda: [F.linear(u, w) for u, w in zip(u2, w2)],
        'one bmm': lambda: torch.bmm(u2.view(2, batch * L, E), w2.transpose(1, 2)),
    }
    for label, fn in candidates.items():
        got = [g.reshape(batch, L, -1) for g in fn()]
        ms = bench(fn)
        err = max(rel_err(g, w) for g, w in zip(got, want))
        rows.append(dict(op='x_proj', shape=name, how=label, ms=ms, rel_err=err,
                         GBps=2 * batch * L * E * 2 / ms / 1e6))
        print(json.dumps(rows[-1]), flush=True)


NORM_SETTINGS = [dict(block_m=m, num_warps=w) for m in (4, 8, 16, 32, 64) for w in (1, 2, 4, 8)
                 if m >= w]


def use_tile(tile: str):
    """Sets the fused conv + x_proj kernel's tokens per block, channels per chunk and,
    optionally, the blocks per SM its registers are bounded for and the chunks staged
    ('TLxCC[xMIN_BLOCKS[xSTAGES]]'; NTH = 4 TL threads: a warp per 16-token slice and
    direction): ``cuda_conv_xproj.TILE``, which overrides the per-shape choice ('auto')."""
    from vim_mm.ops import cuda_conv_xproj as cx
    if tile == 'auto':
        cx.TILE = None
        return
    tokens, channels, *more = (int(v) for v in tile.split('x'))
    cx.TILE = cx.Tile(tokens, channels, *(more + [2, 2][len(more):])[:2])


def time_conv_xproj(rows, name, batch, L, E, tiles=('auto',), sources=()):
    """The fused conv + x_proj kernel (``cuda_conv_xproj``) per tile shape, and with the first
    tile per other kernel source (``--ab``: a file with the same kernel arguments, e.g. an
    older commit's or an edited copy), against the pair it replaces: the stream conv, then one
    bmm (what the mixer runs before it); all checked against the fp32 twin."""
    from vim_mm.ops import cuda_conv_xproj as cx
    x = torch.randn(batch, L, 2 * E, device='cuda', dtype=torch.bfloat16)[..., :E]
    w_f, w_b = (torch.randn(E, 1, 4, device='cuda') * 0.5 for _ in range(2))
    b_f, b_b = (torch.randn(E, device='cuda') for _ in range(2))
    w2 = torch.randn(2, ROWS_PADDED, E, device='cuda', dtype=torch.bfloat16) * E ** -0.5
    taps, bias = cx.stack_conv_weights(w_f, b_f, w_b, b_b)  # the mixer caches them
    want_u, want_xd = cx.conv_xproj_reference(x, taps, bias, w2)

    def pair():
        us = bidirectional_conv(x, w_f, b_f, w_b, b_b)
        return us, torch.bmm(us.flatten(1, 2), w2.transpose(1, 2)).unflatten(1, (batch, L))

    tree_source = cx.SOURCE
    runs = ([('conv + bmm', None, None)] + [(f'fused {t}', t, tree_source) for t in tiles]
            + [(f'fused {tiles[0]} {Path(s).name}', tiles[0], Path(s)) for s in sources])
    for label, tile, source in runs:
        fn = pair
        if tile is not None:
            use_tile(tile)
            cx.SOURCE = source
            cx._kernels.clear()
            fn = lambda: cx.conv_xproj(x, taps, bias, w2)  # noqa: E731
        u, xd = fn()
        ms = bench(fn)
        rows.append(dict(op='conv_xproj', shape=name, how=label, ms=ms,
                         rel_err_u=rel_err(u, want_u), rel_err_xd=rel_err(xd, want_xd),
                         GBps=batch * L * (3 * E + 2 * ROWS_PADDED) * 2 / ms / 1e6))
        print(json.dumps(rows[-1]), flush=True)
    cx.SOURCE = tree_source
    cx._kernels.clear()
    use_tile('auto')


def time_norm(rows, name, batch, L, D):
    """The residual add + RMSNorm alone: mamba-ssm's kernel (a row per program) against
    ``triton_add_norm.add_rms_norm_rows`` (block_m rows per program)."""
    from vim_mm.ops.norm import add_rms_norm_torch
    from vim_mm.ops.triton_add_norm import add_rms_norm_rows
    x = torch.randn(batch, L, D, device='cuda', dtype=torch.bfloat16)
    residual = torch.randn(batch, L, D, device='cuda')
    norm_w = torch.rand(D, device='cuda') + 0.5
    want = add_rms_norm_torch(x, residual, norm_w, 1e-5)
    candidates = [('mamba-ssm', {}, lambda: add_rms_norm(x, residual, norm_w, 1e-5))] + [
        ('rows', st, lambda st=st: add_rms_norm_rows(x, residual, norm_w, 1e-5, **st))
        for st in NORM_SETTINGS]
    for label, setting, fn in candidates:
        got = fn()
        ms = bench(fn)
        rows.append(dict(op='norm', shape=name, how=label, setting=setting, ms=ms,
                         rel_err_normed=rel_err(got[0], want[0]),
                         rel_err_residual=rel_err(got[1], want[1]),
                         GBps=batch * L * D * (2 + 4 + 4 + 2) / ms / 1e6))
        print(json.dumps(rows[-1]), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ops', nargs='+', default=['conv', 'x_proj', 'norm'])
    parser.add_argument('--shapes', type=int, default=len(SHAPES), help='the first N shapes')
    parser.add_argument('--tiles', nargs='+', default=['auto'],
                        help="conv_xproj's tile shapes: TLxCC[xMIN_BLOCKS[xSTAGES]] (tokens x "
                        "channels) or auto (the kernel's choice per shape)")
    parser.add_argument('--ab', nargs='*', default=[],
                        help='conv_xproj: other kernel sources to time with the first tile')
    parser.add_argument('--out')
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, batch, L, D in SHAPES[:args.shapes]:
        if 'conv' in args.ops:
            time_conv(rows, name, batch, L, 2 * D)
        if 'x_proj' in args.ops:
            time_x_proj(rows, name, batch, L, 2 * D)
        if 'norm' in args.ops:
            time_norm(rows, name, batch, L, D)
        if 'conv_xproj' in args.ops:
            time_conv_xproj(rows, name, batch, L, 2 * D, args.tiles, args.ab)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                                  torch=torch.__version__,
                                                  command=' '.join(sys.argv), rows=rows),
                                             indent=1))


if __name__ == '__main__':
    main()
