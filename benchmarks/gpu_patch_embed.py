"""Time the one-kernel patch + position embedding (vim_mm/ops/triton_patch_embed.py) against
the PyTorch lines it replaces, and sweep its tile settings (GPU; eleventh session).

At each Vim-Ti/S input size: ``torch`` = what VisionMamba ran before (the image cast to the
autocast dtype, the patch copy, F.linear, the position added in float32), ``kernel`` = the
default settings, then every setting of the grid; CUDA-graph replays, median of do_bench.
The error columns compare with the float64 twin.

    python benchmarks/gpu_patch_embed.py --out results/h200_patch_embed_v1.json
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm.ops import triton_patch_embed as pe  # noqa: E402
from timing import graph_median_ms as timed  # noqa: E402

SHAPES = [(128, 224, 192), (32, 512, 192), (16, 1024, 192), (16, 1248, 192), (4, 2048, 192),
          (16, 1024, 384)]  # (batch, resolution, embed dims)
GRID = dict(block_m=(64, 128, 256), block_n=(64, 128), rows=(2, 4), num_warps=(4, 8),
            num_stages=(3,))


def torch_lines(image, weight, bias, pos, dtype):
    """VisionMamba's embedding before the kernel (PatchEmbed._embed_patches + the add)."""
    with torch.autocast('cuda', dtype=dtype):
        b, c, h, w = image.shape
        x = image.to(dtype)
        patches = x.reshape(b, c, h // 16, 16, w // 16, 16).permute(0, 2, 4, 1, 3, 5)
        tokens = torch.nn.functional.linear(patches.reshape(b, (h // 16) * (w // 16), -1),
                                            weight.reshape(weight.shape[0], -1), bias)
        return tokens + pos


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out')
    parser.add_argument('--dtype', default='bfloat16')
    parser.add_argument('--sweep', action='store_true', help='time every setting of GRID too')
    parser.add_argument('--grid', type=json.loads, default=None,
                        help='JSON dict replacing entries of GRID, e.g. \'{"block_n": [64, 256]}\'')
    parser.add_argument('--shapes', type=int, nargs='+', default=None,
                        help='indices into SHAPES (default: all)')
    args = parser.parse_args()
    grid = {**GRID, **(args.grid or {})}
    unknown = set(grid) - set(GRID)
    if unknown:
        parser.error(f'--grid: unknown settings {sorted(unknown)}; known: {sorted(GRID)}')
    shapes = SHAPES if args.shapes is None else [SHAPES[i] for i in args.shapes]
    dtype = getattr(torch, args.dtype)
    rows = []
    for batch, res, dims in shapes:
        g = torch.Generator(device='cuda').manual_seed(res)
        image = torch.randn(batch, 3, res, res, device='cuda', generator=g)
        weight = torch.randn(dims, 3, 16, 16, device='cuda', generator=g) / 28
        bias = torch.randn(dims, device='cuda', generator=g)
        pos = torch.randn(1, (res // 16) ** 2, dims, device='cuda', generator=g)
        want = pe.patch_embed_with_position_torch(image.double(), weight.double(), bias.double(),
                                                  pos.double(), 16, dtype)
        row = dict(batch=batch, res=res, dims=dims, dtype=args.dtype)
        with torch.no_grad():
            row['torch_ms'] = timed(lambda: torch_lines(image, weight, bias, pos, dtype))
            got = pe.patch_embed_with_position(image, weight, bias, pos, 16, dtype)
            row['kernel_err'] = ((got.double() - want).abs().max() / want.abs().max()).item()
            plain = torch_lines(image, weight, bias, pos, dtype)
            row['torch_err'] = ((plain.double() - want).abs().max() / want.abs().max()).item()
            row['kernel_ms'] = timed(lambda: pe.patch_embed_with_position(
                image, weight, bias, pos, 16, dtype))
            row['bytes_min'] = image.numel() * 4 + got.numel() * 4
            if args.sweep:
                row['sweep'] = []
                for values in itertools.product(*grid.values()):
                    opt = dict(zip(grid, values))
                    try:
                        ms = timed(lambda: pe.patch_embed_with_position(
                            image, weight, bias, pos, 16, dtype, **opt))
                    except Exception as e:  # too many registers / shared memory
                        ms = repr(e)[:120]
                    row['sweep'].append(dict(opt, ms=ms))
                ok = [s for s in row['sweep'] if isinstance(s['ms'], float)]
                row['best'] = min(ok, key=lambda s: s['ms'])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != 'sweep'}), flush=True)
        if args.out:  # after every shape: a partial run keeps what it timed
            Path(args.out).write_text(json.dumps(dict(
                command=' '.join(sys.argv), device=torch.cuda.get_device_name(), rows=rows),
                indent=1))


if __name__ == '__main__':
    main()
