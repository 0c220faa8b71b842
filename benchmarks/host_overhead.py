"""Host (Python) time of one Vim-Ti forward, Triton path vs mamba-ssm path, bf16 inference.

Prints, per path and size, the time to enqueue one forward (and with a final synchronize) and a
cProfile of five forwards by own time: where the launch overhead that CUDA graphs remove comes
from.

    python benchmarks/host_overhead.py > results/h100_hostprof_224.txt     # 224 px, batch 128
    python benchmarks/host_overhead.py --res 1024 --batch 1 --top 30
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
from benchmark import build  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--res', type=int, nargs='+', default=[224])
parser.add_argument('--batch', type=int, nargs='+', default=[128])
parser.add_argument('--top', type=int, default=22)
args = parser.parse_args()
for (res, batch), name in ((rb, n) for rb in zip(args.res, args.batch)
                           for n in ('vim-t@triton', 'vim-t@cuda')):
    model = build(name, res, None, False).cuda().eval()
    x = torch.randn(batch, 3, res, res, device='cuda')

    def forward():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            model(x)
    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        forward()
    t_enqueue = (time.perf_counter() - t0) / 10
    torch.cuda.synchronize()
    t_all = (time.perf_counter() - t0) / 10
    print(f'{name} {res} b{batch}: host enqueue {t_enqueue * 1e3:.1f} ms/forward, '
          f'with sync {t_all * 1e3:.1f} ms', flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5):
        forward()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats('tottime').print_stats(args.top)
    print('\n'.join(line[:160] for line in text.getvalue().splitlines()[:args.top + 28]), flush=True)
