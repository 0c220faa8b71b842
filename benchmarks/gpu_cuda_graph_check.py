"""GPU check of the backbone's ``cuda_graph`` option: replays equal the eager forward, and speed.

For each mixer path (mamba-ssm kernels, fused Triton scan) and autocast bf16 / fp32: a Vim-Ti
with ``cuda_graph=True`` is fed two different batches of one shape (a recording, then a replay)
and one batch of a second shape, each call in its own autocast context with the allocator's
cache emptied before it (so a replay that reads memory its graph does not own faults); every
output must equal the eager forward of the same model bit for bit (same kernels, no atomics). Then the test-time case: batch 1 and 2 at 1024x1024,
bf16, eager vs graphed, wall clock per forward (host launches included: what tools/test.py sees).
Between them (``check_updates``): replays after in-place parameter updates, writes through
``.data`` + ``eval()`` and ``load_state_dict`` equal the eager forward too.

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


def check_updates(model, backend, report) -> bool:
    """Replays after the parameters change in place still equal the eager forward: the graphs
    read the mixers' cached inference weights by address, which the backbone refreshes before a
    replay whose parameters changed version (an in-place update, ``load_state_dict``) and at
    ``eval()`` (writes through ``.data``, as mmengine's EMAHook makes them)."""
    x = torch.randn(2, 3, 512, 512, device='cuda')
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def in_place():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.01)

    def through_data():
        for p in model.parameters():
            p.data.copy_(p.data * 0.99)
        model.eval()

    def load():
        model.load_state_dict({k: v * 1.02 if v.is_floating_point() else v
                               for k, v in state.items()})

    ok = True
    for name, update in (('record', lambda: None), ('in_place', in_place),
                         ('through_data', through_data), ('load_state_dict', load)):
        update()
        with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
            graphed = model(x)
            eager = model._forward(x)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(graphed, eager))
        row = dict(backend=backend, update=name, max_abs_diff=diff,
                   graphs=len(model._graphs.graphs))
        ok &= diff == 0.0
        report.setdefault('updates', []).append(row)
        print(json.dumps(row), flush=True)
    model.load_state_dict(state)
    return ok


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
        ok &= check_updates(model, backend, report)
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
