"""GPU check of the backbone's ``cuda_graph`` option: replays equal the eager forward, and speed.

For each mixer path (mamba-ssm kernels, fused Triton scan) and autocast bf16 / fp32: a Vim-Ti
with ``cuda_graph=True`` is fed two different batches of one shape (a recording, then a replay)
and one batch of a second shape, each call in its own autocast context with the allocator's
cache emptied before it (so a replay that reads memory its graph does not own faults); every
output must equal the eager forward of the same model bit for bit (same kernels, no atomics). Then the test-time case: batch 1 and 2 at 1024x1024,
bf16, eager vs graphed, wall clock per forward (host launches included: what tools/test.py sees).

    python benchmarks/gpu_cuda_graph_check.py --out results/h100_cuda_graph_check.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm import VisionMamba  # noqa: E402


def wall_ms(fn, repeats=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out')
    args = parser.parse_args()
    report, ok = dict(device=torch.cuda.get_device_name(), parity=[], timing=[]), True
    for backend in ('cuda', 'triton'):
        torch.manual_seed(0)
        model = VisionMamba('tiny', img_size=224, out_indices=(5, 11, 17, 23), backend=backend,
                            cuda_graph=True).cuda().eval()
        for dtype in (torch.bfloat16, torch.float32):
            for shape in ((2, 3, 512, 512), (2, 3, 512, 512), (1, 3, 384, 640)):
                # memory freed since the last call goes back to the driver: a graph that reads
                # a tensor it does not own (autocast's cached weights did) faults at its replay
                torch.cuda.empty_cache()
                x = torch.randn(shape, device='cuda')
                with torch.no_grad(), torch.autocast('cuda', dtype, enabled=dtype != torch.float32):
                    graphed = model(x)
                    eager = model._forward(x)
                diff = max((a.float() - b.float()).abs().max().item()
                           for a, b in zip(graphed, eager))
                row = dict(backend=backend, dtype=str(dtype), shape=shape, max_abs_diff=diff,
                           graphs=len(model._graphs.graphs))
                ok &= diff == 0.0
                report['parity'].append(row)
                print(json.dumps(row), flush=True)
        for batch in (1, 2):
            model._graphs.graphs.clear()  # room for this shape (the checks above used 4)
            x = torch.randn(batch, 3, 1024, 1024, device='cuda')
            row = dict(backend=backend, batch=batch, res=1024)
            for mode in ('eager', 'graph'):
                def step():
                    with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
                        return model(x) if mode == 'graph' else model._forward(x)
                row[f'{mode}_ms'] = wall_ms(step)
            assert len(model._graphs.graphs) == 1, 'the graphed step did not record a graph'
            row['speedup'] = row['eager_ms'] / row['graph_ms']
            report['timing'].append(row)
            print(json.dumps(row), flush=True)
    report['all_equal'] = ok
    print('PASS' if ok else 'FAIL', flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
