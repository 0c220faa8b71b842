"""Host (Python) time of one Vim-Ti forward, Triton path vs mamba-ssm path, 224 b128, bf16.

Prints, per path, the time to enqueue one forward (and with a final synchronize) and a cProfile
of five forwards by own time: where the launch overhead that CUDA graphs remove comes from.

    python benchmarks/host_overhead.py > results/h100_hostprof_224.txt
"""
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tools'))
from benchmark import build  # noqa: E402

for name in ('vim-t@triton', 'vim-t@cuda'):
    model = build(name, 224, None, False).cuda().eval()
    x = torch.randn(128, 3, 224, 224, device='cuda')

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
    print(f'{name}: host enqueue {t_enqueue * 1e3:.1f} ms/forward, '
          f'with sync {t_all * 1e3:.1f} ms', flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5):
        forward()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats('tottime').print_stats(22)
    print('\n'.join(line[:160] for line in text.getvalue().splitlines()[:50]), flush=True)
