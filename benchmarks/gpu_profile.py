"""Where the GPU time of a Vim-Ti step goes: CUDA kernel time by kernel name (torch.profiler).

    python benchmarks/gpu_profile.py --res 1024 1248 --batch 16 --mode infer --out results/prof.json

Kernels are grouped by a short family name (selective_scan_fwd, causal_conv1d, gemm, flip,
elementwise, norm, ...) so two implementations or two resolutions compare at a glance.
"""
from __future__ import annotations

import argparse
import json
import os.path as osp
import re
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

FAMILIES = [  # first match wins
    ('selective_scan_fwd', r'selective_scan_fwd'), ('selective_scan_bwd', r'selective_scan_bwd'),
    # our Triton kernels by their exact names (mamba-ssm's causal_conv1d_fwd_kernel and
    # _layer_norm_bwd_kernel end the same way; before this anchoring they were counted here)
    ('triton scan', r'^(_fwd_kernel|_carry_kernel|_bwd_kernel|_bwd_summary_kernel)$'),
    ('cuda scan', r'^vim_scan_'), ('conv + x_proj (fused)', r'^vim_conv_xproj'),
    ('triton conv', r'_bi_conv_kernel'), ('causal_conv1d', r'causal_conv1d'), ('flip', r'flip'),
    ('gemm', r'gemm|cutlass|sm90_|ampere_|Kernel2|cublas|nvjet'),
    ('reduce (norm)', r'reduce_kernel|norm'), ('copy / layout', r'copy|transpose|cat|Copy'),
    ('elementwise', r'elementwise|vectorized|unrolled'), ('triton', r'^triton'),
]


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name):
            return fam
    return 'other'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--res', nargs='+', type=int, default=[1024])
    parser.add_argument('--batch', nargs='+', type=int, default=[16])
    parser.add_argument('--mode', choices=['infer', 'train'], default='infer')
    parser.add_argument('--backend', default=None)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--top', type=int, default=12)
    parser.add_argument('--out', default=None)
    args = parser.parse_args()
    from vim_mm import VisionMamba
    results = []
    for i, res in enumerate(args.res):
        batch = args.batch[i] if len(args.batch) > 1 else args.batch[0]
        model = VisionMamba(args.arch, img_size=res, backend=args.backend).cuda()
        model.train(args.mode == 'train')
        x = torch.randn(batch, 3, res, res, device='cuda')

        def step():
            with torch.autocast('cuda', dtype=torch.bfloat16), torch.set_grad_enabled(args.mode == 'train'):
                out = model(x)
            if args.mode == 'train':
                sum(o.float().mean() for o in out).backward()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        kernels = defaultdict(float)
        for evt in prof.key_averages():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                kernels[evt.key] += evt.device_time_total / args.steps / 1000  # ms per step
        total = sum(kernels.values())
        families = defaultdict(float)
        for name, ms in kernels.items():
            families[family(name)] += ms
        row = dict(res=res, batch=batch, mode=args.mode, backend=model.active_backend,
                   gpu_ms_per_step=total, img_per_s_gpu_time=batch / total * 1000,
                   families={k: v for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
                   top_kernels=[(n[:120], ms) for n, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:args.top]])
        results.append(row)
        print(f'== {args.arch} {res} b{batch} {args.mode}: {total:.2f} ms GPU per step '
              f'({row["img_per_s_gpu_time"]:.0f} img/s of kernel time)')
        for fam, ms in row['families'].items():
            print(f'   {fam:22s} {ms:8.2f} ms {100 * ms / total:5.1f}%')
        for name, ms in row['top_kernels']:
            print(f'     {ms:8.2f} ms  {name}')
        del model, x
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(meta=dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                     args=vars(args)), results=results), f, indent=1)


if __name__ == '__main__':
    main()
