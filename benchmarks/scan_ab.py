"""Same-call A/B of the fused Triton scan's forward: this tree against an older triton_scan.py.

The H100 varies by up to ~30% between device calls, so a kernel change is only measured against
its predecessor inside one process. Vim-Ti shapes (E=384, N=16), bf16, token-major inputs
(what the Triton mixer passes), no gradients; time per call is the median of
``triton.testing.do_bench``; ``err`` is max |new - old| / max |old| on the same inputs.

    git show 34cf09e:vim_mm/ops/triton_scan.py > /tmp/triton_scan_old.py
    python benchmarks/scan_ab.py --old /tmp/triton_scan_old.py --out results/ab.json \\
        --configs '{}' '{"fwd_maxnreg": 128}'
    python benchmarks/scan_ab.py --calls 3 --shapes 16x4097   # a fixed workload for ncu
    python benchmarks/scan_ab.py --layouts token token_f32bc  # bf16 vs fp32 B and C
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_scan_check import make_inputs  # noqa: E402
from vim_mm.ops import triton_scan  # noqa: E402


def load_old(path: str):
    """Import a triton_scan.py from elsewhere as a sibling of vim_mm.ops.triton_scan (its
    relative imports resolve), registered in sys.modules (Triton looks kernels up there)."""
    name = 'vim_mm.ops._triton_scan_old'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--old', help='an older triton_scan.py to compare with')
    parser.add_argument('--configs', nargs='*', default=['{}'],
                        help='ScanConfig fields (JSON) of this tree to time, each')
    parser.add_argument('--shapes', nargs='*', default=['128x197', '16x4097', '16x6085',
                                                        '4x16385'], help='BATCHxL')
    parser.add_argument('--layouts', nargs='*', default=['token'],
                        help="gpu_scan_check's input layouts ('token_f32bc': fp32 B and C)")
    parser.add_argument('--calls', type=int, default=0,
                        help='only run this many calls per shape, untimed (for a profiler)')
    parser.add_argument('--out', help='JSON file to write')
    args = parser.parse_args()
    from triton.testing import do_bench
    old = load_old(args.old) if args.old else None
    configs = [json.loads(c) for c in args.configs]
    results = dict(device=torch.cuda.get_device_name(), configs=configs, shapes={})
    for shape, layout in ((s, lay) for s in args.shapes for lay in args.layouts):
        batch, L = (int(v) for v in shape.split('x'))
        inputs = make_inputs(batch, L, torch.bfloat16, layout=layout)
        if layout != 'token':
            shape = f'{shape}/{layout}'
        row = results['shapes'][shape] = {}
        with torch.no_grad():
            if args.calls:
                for _ in range(args.calls):
                    triton_scan.bidirectional_selective_scan(
                        *inputs, config=triton_scan.ScanConfig(**configs[0]))
                torch.cuda.synchronize()
                continue
            ref = None
            if old is not None:
                ref = old.bidirectional_selective_scan(*inputs).float()
                row['old_ms'] = do_bench(lambda: old.bidirectional_selective_scan(*inputs),
                                         warmup=25, rep=300, return_mode='median')
            for fields in configs:
                cfg = triton_scan.ScanConfig(**fields)
                key = json.dumps(fields)
                out = triton_scan.bidirectional_selective_scan(*inputs, config=cfg).float()
                row[f'new{key}_ms'] = do_bench(
                    lambda: triton_scan.bidirectional_selective_scan(*inputs, config=cfg),
                    warmup=25, rep=300, return_mode='median')
                if ref is not None:
                    row[f'new{key}_err'] = ((out - ref).abs().max() / ref.abs().max()).item()
        print(shape, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()
