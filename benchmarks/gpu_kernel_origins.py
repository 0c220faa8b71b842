"""Which Python-level ops launch a given kind of kernel in a Vim-Ti inference step (GPU;
eighteenth session): the ops (with input shapes) behind memsets and copy kernels of an eager
step, then the kernels of the step's CUDA-graph replay by count and time.

    python benchmarks/gpu_kernel_origins.py > results/h200_probe_memset_copy_s18.txt
"""
import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm import VisionMamba  # noqa: E402
from vim_mm.models.cuda_graph import capture_cuda_graph  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--res', type=int, default=1024)
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--match', nargs='+', default=['Memset', 'copy', 'fill'],
                        help='kernel name parts (case-insensitive) whose launching ops to list')
    args = parser.parse_args()
    model = VisionMamba('tiny', img_size=args.res, backend='triton').cuda().eval()
    x = torch.randn(args.batch, 3, args.res, args.res, device='cuda')

    def step():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            return model(x)

    def wanted(name):
        return any(m.lower() in name.lower() for m in args.match)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                 record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    ops = collections.Counter()
    for e in prof.events():
        kernels = [k.name for k in getattr(e, 'kernels', []) if wanted(k.name)]
        if kernels:
            ops[(e.name, str(e.input_shapes)[:200], kernels[0][:80])] += 1
    print(f'== eager step, {args.res} px b{args.batch}: ops launching {args.match}')
    for key, n in ops.most_common(30):
        print(n, key)
    replay, _ = capture_cuda_graph(step)
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]][0] += 1
            kernels[e.name[:90]][1] += e.device_time_total / 1000
    print('== graph replay: count, ms, kernel')
    for name, (n, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f'{n:4d} {ms:8.3f} ms  {name}')


if __name__ == '__main__':
    main()
