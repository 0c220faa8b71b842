"""Check and time the CUDA C++ inference scan (vim_mm/ops/cuda_scan.py) on a GPU.

(a) correctness against the PyTorch twin in fp32 (``bidirectional_scan_infer_reference``
    with dt_proj applied in fp32), bf16 and fp16 inputs, Vim-Ti/S/demo widths, short, long and
    odd lengths, batch 1 to 128, with auto_config's plans (the default), forced chunkings and
    each preset on shapes the other one would get; the output is poisoned with NaN first, so an
    unwritten element fails; error = max |ours - ref| / max |ref| (tolerance 1e-2);
(b) GPU time per call (``triton.testing.do_bench`` of CUDA-graph replays, median) on Vim-Ti
    shapes of: this kernel; the fused Triton scan + the two dt_proj GEMMs it needs; two mamba-ssm
    ``selective_scan_fn`` + flips + dt_proj GEMMs (the authors' kernels); with the exp rate each
    achieves (B * L * E * N * 2 exps per call) and the bytes it must move at least. (The
    seventh session's JSONs were made before this: their times are do_bench of the eager ops,
    host overhead included, and this kernel's also include summing its two output halves in
    fp32, three elementwise passes over (B, L, E) that the model leaves to out_proj.)
(c) --sweep: both presets in one pass at the batch-filled Vim-Ti shapes, and chunk counts up to
    and past one wave at batch 1-8 (what auto_config's time model is fitted and tested on,
    tests/test_cuda_scan.py);
(d) --model: Vim-Ti features under autocast (bf16 and fp16) with the CUDA C++ scan and with the
    Triton scan, each against the fp32 PyTorch path (relative error of the features).

    python benchmarks/gpu_infer_scan.py --out infer_scan.json [--sweep] [--model]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm.ops import cuda_scan  # noqa: E402
from vim_mm.ops.cuda_scan import (PRESETS, InferScanConfig, auto_config,  # noqa: E402
                                  bidirectional_scan_infer,
                                  bidirectional_scan_infer_reference, fitted, kernel_weights,
                                  launch_plan)
from vim_mm.models.cuda_graph import capture_cuda_graph  # noqa: E402
from vim_mm.ops.triton_scan import bidirectional_selective_scan  # noqa: E402

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
except Exception:  # optional
    selective_scan_fn = None

# (batch, L, E, N, R): Vim-Ti at 224 / 512 / 1024 / 1248 / 2048 px, odd and tiny cases,
# Vim-S and the demo model's widths
CHECKS = [(128, 197, 384, 16, 12), (32, 1025, 384, 16, 12), (16, 4097, 384, 16, 12),
          (16, 6085, 384, 16, 12), (4, 16385, 384, 16, 12), (1, 1000, 384, 16, 12),
          (3, 77, 384, 16, 12), (2, 333, 768, 16, 24), (5, 130, 128, 8, 4), (1, 5, 384, 16, 12),
          (1, 4097, 384, 16, 12), (1, 16385, 384, 16, 12)]
FORCED = [((4, 16385, 384, 16, 12), 7), ((16, 4097, 384, 16, 12), 3), ((2, 333, 768, 16, 24), 4),
          ((1, 1000, 384, 16, 12), 1), ((3, 77, 384, 16, 12), 2)]
TIMED = [(128, 197), (32, 1025), (16, 4097), (16, 6085), (4, 16385), (8, 4097), (2, 4097),
         (1, 4097), (1, 16385)]
FEW = dataclasses.asdict(PRESETS['few_blocks'].config)
MANY = dataclasses.asdict(PRESETS['many_blocks'].config)
# options checked too (the default config runs every case above)
# (the default, auto_config's preset per shape, runs every case above; here the other preset too)
OPTION_CHECKS = [((16, 4097, 384, 16, 12), MANY), ((128, 197, 384, 16, 12), FEW),
                 ((4, 16385, 384, 16, 12), dict(FEW, n_chunks=11)),
                 ((3, 77, 384, 16, 12), dict(FEW, stages=3)),
                 ((1, 4097, 384, 16, 12), dict(FEW, n_chunks=16)),
                 ((2, 333, 768, 16, 24), dict(MANY, n_chunks=3))]


def make_inputs(batch, L, E, N, R, dtype, seed=0):
    """Vim-like activations (token-major, z a slice of in_proj's output) and fp32 parameters
    with Mamba's initialisation (A = -(1..N) jittered, dt = softplus(bias) in [1e-3, 1e-1])."""
    g = torch.Generator(device='cuda').manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, device='cuda', generator=g) * scale

    z = randn(batch, L, 2 * E).to(dtype)[..., E:]
    us, xs, dirs = [], [], []
    for _ in range(2):
        us.append(torch.nn.functional.silu(randn(batch, L, E)).to(dtype))
        xs.append(randn(batch, L, R + 2 * N).to(dtype))  # [dt | B | C]
        dt = torch.exp(torch.rand(E, device='cuda', generator=g) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))
        A = -torch.arange(1, N + 1, device='cuda', dtype=torch.float32).repeat(E, 1)
        dirs.append(dict(dt_proj_w=(torch.rand(E, R, device='cuda', generator=g) * 2 - 1) * R ** -0.5,
                         dt_bias=dt + torch.log(-torch.expm1(-dt)),
                         A=A * (0.5 + torch.rand(E, N, device='cuda', generator=g)),
                         D=randn(E)))
    for p in dirs:  # the kernel's forms, derived once as the mixer caches them (not per call)
        p.update(kernel_weights(p))
    return us, xs, z, dirs


def reference(us, xs, z, dirs):
    """(batch, L, E) fp32: the merged, gated output of both directions."""
    return bidirectional_scan_infer_reference(us[0], xs[0], us[1], xs[1], z, dirs[0], dirs[1])


def ours(us, xs, z, dirs, cfg=None, poison=False):
    if poison:  # the kernel allocates its output; poison the allocator's next block instead
        torch.empty(us[0].shape[0], us[0].shape[1], 2 * us[0].shape[2], dtype=us[0].dtype,
                    device='cuda').fill_(float('nan'))
    return bidirectional_scan_infer(us[0], xs[0], us[1], xs[1], z, dirs[0], dirs[1], cfg)


def merged(out):
    """(batch, L, 2E) halves -> their sum (batch, L, E) in fp32, what out_proj over [W, W] sees."""
    E = out.shape[-1] // 2
    return out[..., :E].float() + out[..., E:].float()


def check(shape, dtype, cfg=None, seed=0):
    batch, L, E, N, R = shape
    us, xs, z, dirs = make_inputs(batch, L, E, N, R, dtype, seed)
    ref = reference(us, xs, z, dirs)
    out = ours(us, xs, z, dirs, cfg, poison=True)
    y = merged(out)
    err = ((y - ref).abs().max() / ref.abs().max()).item()
    plan = launch_plan(us[0], xs[0], us[1], xs[1], z, dirs[0], dirs[1], cfg,  # as launched
                       torch.cuda.get_device_properties(0).multi_processor_count)
    return dict(shape=list(shape), dtype=str(dtype).split('.')[-1], n_chunks=plan[2][-2],
                launched=launched(plan[0]),
                rel_err=err, finite=bool(torch.isfinite(out).all()),
                ok=bool(torch.isfinite(out).all()) and err < 1e-2)


def launched(cfg):
    """The fields of a fitted config that shape the launch."""
    return {k: getattr(cfg, k) for k in ('channels', 'split', 'tile_l', 'stages', 'prep_by_row',
                                         'min_blocks', 'dynamic_smem')}


def triton_args(us, xs, z, dirs):
    """The same problem in the Triton op's arguments (dt_proj done outside, as its mixer does)."""
    args = []
    for u, x, p in zip(us, xs, dirs):
        R, N = p['dt_proj_w'].shape[1], p['A'].shape[1]
        delta = torch.nn.functional.linear(x[..., :R], p['dt_proj_w'].to(x.dtype))
        args += [u.transpose(1, 2), delta.transpose(1, 2), p['A'], x[..., R:R + N].transpose(1, 2),
                 x[..., R + N:].transpose(1, 2), p['D'], p['dt_bias']]
    return args + [z.transpose(1, 2)]


class other_source:
    """Within the block, the CUDA C++ scan compiles ``path`` instead of the tree's kernel source
    (a same-call A/B: the GPU's speed varies between calls by more than many changes gain).
    Keeps the kernels it compiled (``compiled``) for graphs recorded inside the block."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        if 'const unsigned *W_f' not in self.path.read_text():
            raise ValueError(
                f'{self.path}: a scan source from before v22 (f74be32) takes fp32 dt_proj weights '
                'and unscaled bias and D, not the arguments launch_plan passes now; time it with '
                "its own tree's gpu_infer_scan.py (--only-ours) in the same call instead")
        self.saved = cuda_scan.SOURCE, dict(cuda_scan._kernels)
        cuda_scan.SOURCE = self.path
        cuda_scan._kernels.clear()

    def __exit__(self, *exc):
        self.compiled = dict(cuda_scan._kernels)
        cuda_scan.SOURCE = self.saved[0]
        cuda_scan._kernels.clear()
        cuda_scan._kernels.update(self.saved[1])


def timings(batch, L, E=384, N=16, R=12, dtype=torch.bfloat16, cfg=None,
            only_ours=False, ab_source=None):
    from triton.testing import do_bench
    us, xs, z, dirs = make_inputs(batch, L, E, N, R, dtype)
    row = dict(batch=batch, L=L)
    if cfg is None:  # the plan auto_config makes for this shape
        plan = auto_config(batch, E, L, torch.cuda.get_device_properties(0).multi_processor_count)
        row['plan'] = dict(launched(fitted(plan, N, R)), n_chunks=plan.n_chunks)

    def triton_path():
        bidirectional_selective_scan(*triton_args(us, xs, z, dirs))

    def mamba_path():
        for d, (u, x, p) in enumerate(zip(us, xs, dirs)):
            flip = (lambda t: t.flip(-1)) if d else (lambda t: t)
            delta = torch.nn.functional.linear(x[..., :R], p['dt_proj_w'].to(x.dtype))
            selective_scan_fn(flip(u.transpose(1, 2).contiguous()),
                              flip(delta.transpose(1, 2).contiguous()), p['A'],
                              flip(x[..., R:R + N].transpose(1, 2).contiguous()),
                              flip(x[..., R + N:].transpose(1, 2).contiguous()), p['D'],
                              flip(z.transpose(1, 2).contiguous()), p['dt_bias'], True)

    with torch.no_grad():
        fns = dict(cuda_cpp=lambda: ours(us, xs, z, dirs, cfg))
        sources = [ab_source] if isinstance(ab_source, (str, Path)) else list(ab_source or ())
        for i, path in enumerate(sources):
            ab = other_source(path)
            with ab:  # compiled and recorded now, replayed below (the lambda keeps ab's kernels)
                replay = capture_cuda_graph(lambda: ours(us, xs, z, dirs, cfg))[0]
            fns['cuda_cpp_ab' + (str(i + 1) if i else '')] = (
                lambda ab=ab, replay=replay: (ab, replay()))
        if not only_ours:
            fns['triton'] = triton_path
        if selective_scan_fn is not None and not only_ours:
            fns['mamba_ssm_x2'] = mamba_path
        exps = batch * L * E * N * 2
        # least bytes: u, x_dbl of both directions, z read once, the (L, 2E) output written once
        nbytes = (2 * (batch * L * E + batch * L * (R + 2 * N)) + batch * L * E
                  + batch * L * 2 * E) * 2
        for name, fn in fns.items():
            # replays of a CUDA graph of the op: GPU time only (do_bench records its start event
            # before the Python of the op runs, so host overhead would count otherwise)
            graph = fn if name.startswith('cuda_cpp_ab') else capture_cuda_graph(fn)[0]
            ms = do_bench(graph, warmup=25, rep=200, return_mode='median')
            row[name + '_ms'] = ms
            row[name + '_gexp_s'] = exps / ms / 1e6
            row[name + '_GBps'] = nbytes / ms / 1e6
    return row


def model_check(res, batch, dtype, with_cls=False):
    from vim_mm import VisionMamba
    torch.manual_seed(0)
    fast = VisionMamba('tiny', img_size=res, backend='triton', with_cls_token=with_cls,
                       out_indices=(5, 11, 17, 23)).cuda().eval()
    ref = VisionMamba('tiny', img_size=res, backend='torch', with_cls_token=with_cls,
                      out_indices=(5, 11, 17, 23)).cuda().eval()
    ref.load_state_dict(fast.state_dict())
    image = torch.randn(batch, 3, res, res, device='cuda')
    row = dict(res=res, batch=batch, dtype=str(dtype).split('.')[-1], with_cls_token=with_cls)
    with torch.no_grad():
        want = ref(image)
        for scan in ('cuda', 'triton'):
            os.environ['VIM_MM_INFER_SCAN'] = scan
            with torch.autocast('cuda', dtype=dtype):
                got = fast(image)
            row[f'rel_err_{scan}'] = max(
                ((a.double() - b.double()).norm() / b.double().norm()).item()
                for a, b in zip(got, want))
    os.environ.pop('VIM_MM_INFER_SCAN')
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out')
    parser.add_argument('--sweep', action='store_true')
    parser.add_argument('--model', action='store_true')
    parser.add_argument('--no-check', action='store_true')
    parser.add_argument('--once', help='BxL: run the kernel once on Vim-Ti inputs (for ncu)')
    parser.add_argument('--config', default='{}', help='InferScanConfig fields as JSON (--once)')
    parser.add_argument('--ab', nargs='*', default=(),
                        help='other bimamba_scan_fwd.cu sources, timed in the same call '
                             '(columns cuda_cpp_ab_ms, cuda_cpp_ab2_ms, ...); v22 (f74be32) or '
                             'later: older ones take other direction arguments and are refused')
    parser.add_argument('--only-ours', action='store_true',
                        help='time the CUDA C++ scan(s) only (no Triton / mamba-ssm columns)')
    args = parser.parse_args()
    if args.once:
        batch, L = map(int, args.once.split('x'))
        us, xs, z, dirs = make_inputs(batch, L, 384, 16, 12, torch.bfloat16)
        ours(us, xs, z, dirs, InferScanConfig(**json.loads(args.config)))
        torch.cuda.synchronize()
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  python=platform.python_version(),
                  presets={k: dataclasses.asdict(v) for k, v in PRESETS.items()},
                  command=' '.join(sys.argv))
    if not args.no_check:
        rows = []
        for dtype in (torch.bfloat16, torch.float16):
            for shape in CHECKS:
                rows.append(check(shape, dtype))
                print(json.dumps(rows[-1]), flush=True)
        for shape, n in FORCED:
            rows.append(check(shape, torch.bfloat16, InferScanConfig(n_chunks=n), seed=1))
            print(json.dumps(rows[-1]), flush=True)
        for shape, opt in OPTION_CHECKS:
            rows.append(dict(check(shape, torch.bfloat16, InferScanConfig(**opt), seed=2),
                             option=opt))
            print(json.dumps(rows[-1]), flush=True)
        result['checks'] = rows
        result['passed'] = all(r['ok'] for r in rows)
        print('CHECK', 'PASS' if result['passed'] else 'FAIL', flush=True)
        torch.cuda.empty_cache()
    result['timings'] = []
    for batch, L in TIMED:
        result['timings'].append(timings(batch, L, ab_source=args.ab, only_ours=args.only_ours))
        print(json.dumps(result['timings'][-1]), flush=True)
    if args.sweep:
        sweep = []
        # around auto_config's plans (the model's fitted range and past it)
        # each preset in one pass at the batch-filled shapes; chunk counts up to and past one
        # wave (what auto_config may choose) at batch 1-8
        # (few_blocks has 32 channels since the thirteenth session: 24 blocks per chunk at batch 1
        # and 384 channels, 660 in a wave of 5 per SM, so up to 27 chunks; the v15 sweep, of 4
        # per SM, timed few=(2, 3, 4, 5, 8) at batch 1 and (1, 2, 3, 4) at batch 2)
        grid = {(128, 197): dict(many=(1,), few=(1,)), (32, 1025): dict(many=(1,), few=(1,)),
                (16, 4097): dict(many=(1,), few=(1, 2)), (16, 6085): dict(many=(1,), few=(1,)),
                (1, 4097): dict(many=(8, 11, 16, 22, 33, 44), few=(4, 8, 16, 22, 27)),
                (2, 4097): dict(many=(4, 8, 11, 16, 22), few=(2, 4, 8, 11)),
                (8, 4097): dict(many=(1, 2, 4, 5), few=(1, 2)),
                (1, 16385): dict(many=(11, 16, 22, 33, 44), few=(8, 16, 22, 27)),
                (4, 16385): dict(many=(4, 8, 11, 16), few=(1, 2, 4, 5))}
        for (batch, L), plans in grid.items():
            for name, counts in plans.items():
                for n in counts:
                    opt = dict(MANY if name == 'many' else FEW, n_chunks=n)
                    row = timings(batch, L, cfg=InferScanConfig(**opt), only_ours=True)
                    sweep.append(dict(option=opt, batch=batch, L=L, ms=row['cuda_cpp_ms']))
                    print(json.dumps(sweep[-1]), flush=True)
        result['sweep'] = sweep
    if args.model:
        result['model'] = []
        for res, batch, cls in ((224, 4, True), (512, 2, False), (1024, 1, False)):
            for dtype in (torch.bfloat16, torch.float16):
                result['model'].append(model_check(res, batch, dtype, cls))
                print(json.dumps(result['model'][-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print('\n| B x L | cuda C++ ms | --ab source ms | triton ms | mamba-ssm x2 ms | C++ Gexp/s |')
    for r in result['timings']:
        print(f"| {r['batch']}x{r['L']} | {r['cuda_cpp_ms']:.3f} | "
              f"{r.get('cuda_cpp_ab_ms', float('nan')):.3f} | {r.get('triton_ms', float('nan')):.3f} | "
              f"{r.get('mamba_ssm_x2_ms', float('nan')):.3f} | {r['cuda_cpp_gexp_s']:.0f} |")


if __name__ == '__main__':
    main()
