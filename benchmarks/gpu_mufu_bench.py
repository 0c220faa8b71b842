"""Measure the GPU's special-function (MUFU) and FMA throughput: the ceilings of the Vim scan.

Every (token, channel, state, direction) of the scan needs one exp; this times ex2.approx
(and lg2 / rcp, and FFMA for comparison) in 8 independent chains per thread, at full occupancy
and with one warp per SM sub-partition (4 warps per SM), and prints operations per second and
per clock per SM (clock read from nvidia-smi's max SM clock).

    python benchmarks/gpu_mufu_bench.py [--out mufu.json]
"""
import argparse
import json
import subprocess

import torch

SRC = r'''
#define OP(x) OPCODE
extern "C" __global__ void bench(float* out, int iters) {
  float a[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) a[k] = (threadIdx.x + k) * 1e-4f;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int k = 0; k < 8; ++k) a[k] = OP(a[k]);
  }
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) s += a[k];
  if (s == 12345.f) out[0] = s;
}
'''
OPS = {
    'ex2': 'ex2f_(x)', 'lg2': 'lg2f_(x)', 'rcp': 'rcpf_(x)', 'ffma': 'fmaf(x, 0.999f, 1e-4f)',
}
HELPERS = r'''
__device__ __forceinline__ float ex2f_(float x) { float y; asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(-x)); return y; }
__device__ __forceinline__ float lg2f_(float x) { float y; asm volatile("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x + 1.5f)); return y; }
__device__ __forceinline__ float rcpf_(float x) { float y; asm volatile("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x + 1.5f)); return y; }
'''


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out')
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    mhz = float(subprocess.run(['nvidia-smi', '--query-gpu=clocks.max.sm', '--format=csv,noheader,nounits'],
                               capture_output=True, text=True).stdout.split()[0])
    out = torch.zeros(1, device='cuda')
    rows = []
    for name, op in OPS.items():
        kernel = torch.cuda._compile_kernel(HELPERS + SRC.replace('OPCODE', op), 'bench')
        for label, blocks, threads in (('full', sms * 8, 256), ('1 warp/SMSP', sms, 128),
                                       ('2 warps/SMSP', sms, 256)):
            iters = 4096
            kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), args=[out, iters])
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                kernel(grid=(blocks, 1, 1), block=(threads, 1, 1), args=[out, iters])
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000 / 5
            ops = blocks * threads * iters * 8
            rows.append(dict(op=name, occupancy=label, ops_per_s=ops / seconds,
                             per_clock_per_sm=ops / seconds / (mhz * 1e6) / sms))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), sm_count=sms, max_sm_mhz=mhz,
                           rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
