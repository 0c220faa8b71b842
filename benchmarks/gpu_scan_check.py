"""Check and time the fused bidirectional Triton scan on a GPU (Vim-Ti shapes: E=384, N=16).

(a) correctness of the output and of every gradient against the PyTorch twin
    (``bidirectional_selective_scan_reference``, fp32): fp32 inputs must agree to 1e-3,
    bf16 inputs to 1e-2 (max |error| / max |reference|);
(b) time per call (median of ``triton.testing.do_bench``) of the Triton op and of the path the
    authors take: two calls of mamba-ssm's ``selective_scan_fn`` with explicit flips, forward
    and forward + backward, and the memory bandwidth each achieves, counting
    forward:  inputs read once + output written once,
    fwd+bwd:  the forward's bytes + inputs and d(out) read once + every gradient written once;
(c) everything goes to the JSON file named by --out.

Run: python benchmarks/gpu_scan_check.py --out scan.json [--sweep] [--shapes 16x6084 ...]
       [--configs '{"step_l": 2}' ...] [--sweep-shapes 16x6084 128x197]
mamba-ssm is optional (its columns are then null); --sweep also times a few tile configs
(``SWEEP``), --configs the given ones (ScanConfig fields as JSON), on --sweep-shapes (bf16).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm.ops import triton_scan  # noqa: E402
from vim_mm.ops.triton_scan import (ScanConfig, bidirectional_selective_scan,  # noqa: E402
                                    bidirectional_selective_scan_reference)

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    MAMBA_ERROR = None
except Exception as exc:  # not installed, or built for another torch
    selective_scan_fn, MAMBA_ERROR = None, repr(exc)

DEVICE, E, N = 'cuda', 384, 16
SHAPES = [(128, 197), (16, 4096), (16, 6084), (4, 16384), (1, 1000)]
NAMES = [f'{n}_{d}' for d in ('f', 'b') for n in ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')]
NAMES.append('z')
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
SWEEP = [ScanConfig(step_l=2), ScanConfig(step_l=8),
         ScanConfig(block_e=64, bwd_block_e=64, num_warps=2, bwd_num_warps=2),
         ScanConfig(bwd_programs=512), ScanConfig(bwd_programs=2048)]


def make_inputs(batch, L, dtype, seed=0, layout='channel'):
    """Vim-like inputs of both directions (original token order) and z, on the GPU.

    Activations (u, delta, B, C, z) in ``dtype``; A, D, delta_bias in fp32 as in the model, with
    Mamba's initialisation (A = -(1..N), dt = softplus(bias) log-uniform in [1e-3, 1e-1]).
    layout 'channel': (batch, X, L) contiguous, mamba-ssm's layout; 'token': the same values
    stored (batch, L, X) as Linear layers produce them (z a slice of a (batch, L, 2E) tensor);
    'token_f32bc': the same with B and C in fp32 (what the Triton mixer passes)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0, dt=dtype, is_z=False):
        x = (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(dt)
        if layout.startswith('token') and len(shape) == 3:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
            if is_z:  # the second half of in_proj's (batch, L, 2E) output
                xz = torch.empty(batch, L, 2 * E, device=DEVICE, dtype=dt)
                xz[..., E:] = x.transpose(1, 2)
                x = xz[..., E:].transpose(1, 2)
        return x

    def direction():
        dt = torch.exp(torch.rand(E, device=DEVICE, generator=g)
                       * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        A = -torch.arange(1, N + 1, device=DEVICE, dtype=torch.float32).repeat(E, 1)
        A = A * (0.5 + torch.rand(E, N, device=DEVICE, generator=g))
        bc = torch.float32 if layout == 'token_f32bc' else dtype
        return [randn(batch, E, L), randn(batch, E, L, scale=0.5), A, randn(batch, N, L, dt=bc),
                randn(batch, N, L, dt=bc), randn(E, dt=torch.float32),
                dt + torch.log(-torch.expm1(-dt))]

    return direction() + direction() + [randn(batch, E, L, is_z=True)]


def leaves(inputs):
    """Leaf copies with the same strides (clone would densify the z slice)."""
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
            .copy_(t).requires_grad_() for t in inputs]


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def mamba_bidirectional(u_f, delta_f, A_f, B_f, C_f, D_f, bias_f,
                        u_b, delta_b, A_b, B_b, C_b, D_b, bias_b, z):
    """The authors' way: scan x and reversed x with two kernel calls, flip back, average."""
    out_f = selective_scan_fn(u_f, delta_f, A_f, B_f, C_f, D_f, z, bias_f, delta_softplus=True)
    out_b = selective_scan_fn(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1),
                              D_b, z.flip(-1), bias_b, delta_softplus=True)
    return (out_f + out_b.flip(-1)) / 2


def check(batch, L, dtype, layout='channel'):
    """Errors of the output and of every gradient vs the fp32 PyTorch twin."""
    inputs = make_inputs(batch, L, dtype, layout=layout)
    ours = leaves(inputs)
    ref = leaves([t.float().contiguous() for t in inputs])
    out = bidirectional_selective_scan(*ours)
    expected = bidirectional_selective_scan_reference(*ref)
    grad = torch.randn(out.shape, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    out.backward(grad.to(dtype))
    expected.backward(grad)
    errors = {'out': rel_err(out, expected)}
    errors.update({name: rel_err(a.grad, r.grad) for name, a, r in zip(NAMES, ours, ref)})
    del ours, ref, out, expected
    return errors


def bench(fn, grad_to_none=None):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode='median')


def io_bytes(inputs, with_backward):
    """Bytes that must cross memory: see the module docstring."""
    big = [t for t in inputs if t.dim() == 3]
    params = [t for t in inputs if t.dim() < 3]
    inp = sum(t.numel() * t.element_size() for t in inputs)
    out = big[0].numel() * big[0].element_size()
    if not with_backward:
        return inp + out
    grads = sum(t.numel() * t.element_size() for t in big) + sum(
        t.numel() * 4 for t in params)
    return (inp + out) + (inp + out) + grads  # forward; backward reads inputs and d(out)


def timings(batch, L, dtype, config=None, layouts=('channel',), fwd_only=False):
    """ms per call and GB/s of the Triton op (on each layout) and of mamba-ssm (its own
    channel layout), forward and forward+backward."""
    ops = {f'triton_{layout}' if layout != 'channel' else 'triton':
           (layout, lambda *a: bidirectional_selective_scan(*a, config=config))
           for layout in layouts}
    if selective_scan_fn is not None and config is None:
        ops['mamba_ssm_x2_flips'] = ('channel', mamba_bidirectional)
    result = {}
    for name, (layout, op) in ops.items():
        inputs = make_inputs(batch, L, dtype, layout=layout)
        with torch.no_grad():
            fwd_ms = bench(lambda: op(*inputs))
        result[name] = dict(fwd_ms=fwd_ms, fwd_gbps=io_bytes(inputs, False) / fwd_ms / 1e6)
        if fwd_only:
            continue
        tensors = leaves(inputs)
        grad = torch.randn(batch, E, L, device=DEVICE, dtype=dtype)

        def step():
            op(*tensors).backward(grad)
        fb_ms = bench(step, grad_to_none=tensors)
        result[name].update(fwd_bwd_ms=fb_ms, fwd_bwd_gbps=io_bytes(inputs, True) / fb_ms / 1e6)
        del tensors
    ref = result.get('mamba_ssm_x2_flips')
    for name in (n for n in list(result) if ref and n.startswith('triton')):
        suffix = name[len('triton'):]
        result['speedup_fwd' + suffix] = ref['fwd_ms'] / result[name]['fwd_ms']
        if not fwd_only:
            result['speedup_fwd_bwd' + suffix] = ref['fwd_bwd_ms'] / result[name]['fwd_bwd_ms']
    return result


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # record and go on with the next shape
        traceback.print_exc()
        return {'error': repr(exc)}
    finally:
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True, help='JSON file to write')
    parser.add_argument('--shapes', nargs='*', default=None,
                        help='BATCHxL list (default: the Vim-Ti set)')
    parser.add_argument('--sweep', action='store_true', help='also time a few tile configs')
    parser.add_argument('--configs', nargs='*', default=[],
                        help='ScanConfig fields as JSON, each timed like the --sweep ones')
    parser.add_argument('--sweep-shapes', nargs='*', default=['16x6084', '128x197'],
                        help='BATCHxL list the sweep / --configs run on (bf16)')
    parser.add_argument('--no-check', action='store_true', help='timings only')
    parser.add_argument('--fwd-only', action='store_true', help='time the forward only')
    parser.add_argument('--layouts', nargs='+', default=['channel', 'token'],
                        choices=['channel', 'token', 'token_f32bc'],
                        help='input layouts of the Triton op (see make_inputs)')
    args = parser.parse_args()
    if not (torch.cuda.is_available() and triton_scan.TRITON_SCAN_AVAILABLE):
        sys.exit('needs a CUDA GPU and triton')
    import triton
    shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes] if args.shapes \
        else SHAPES
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, python=platform.python_version(),
                  mamba_ssm=MAMBA_ERROR or 'available', E=E, N=N,
                  default_config=vars(triton_scan.DEFAULT_CONFIG),
                  tolerance={str(k): v for k, v in TOLERANCE.items()}, shapes={})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = True
    for batch, L in shapes:
        entry = report['shapes'][f'B{batch}_L{L}'] = {}
        for dtype in (torch.float32, torch.bfloat16):
            key = str(dtype).replace('torch.', '')
            t0 = time.time()
            if not args.no_check:
                for layout in args.layouts:
                    errors = guarded(check, batch, L, dtype, layout)
                    passed = 'error' not in errors and max(errors.values()) < TOLERANCE[dtype]
                    ok &= passed
                    tag = key if layout == 'channel' else f'{key}_{layout}'
                    entry[f'{tag}_errors'] = errors
                    entry[f'{tag}_pass'] = passed
            entry[f'{key}_timing'] = guarded(timings, batch, L, dtype, layouts=args.layouts,
                                             fwd_only=args.fwd_only)
            print(f'B={batch} L={L} {key}: pass={entry.get(f"{key}_pass")} '
                  f'max_err={max(entry.get(f"{key}_errors", {0: 0}).values(), default=0):.2e} '
                  f'timing={json.dumps(entry[f"{key}_timing"])} ({time.time() - t0:.0f}s)',
                  flush=True)
            out.write_text(json.dumps(report, indent=1))  # partial results survive a timeout
    configs = (SWEEP if args.sweep else []) + [ScanConfig(**json.loads(c)) for c in args.configs]
    for batch, L in (tuple(int(v) for v in s.split('x')) for s in args.sweep_shapes):
        if not configs:
            break
        sweep = report[f'sweep_bf16_B{batch}_L{L}'] = {}
        for cfg in configs:
            t0 = time.time()
            sweep[json.dumps(vars(cfg))] = res = guarded(timings, batch, L, torch.bfloat16, cfg,
                                                          args.layouts, args.fwd_only)
            print(f'sweep B={batch} L={L}', json.dumps(vars(cfg)), json.dumps(res),
                  f'({time.time() - t0:.0f}s)', flush=True)
            out.write_text(json.dumps(report, indent=1))
    report['all_pass'] = ok
    out.write_text(json.dumps(report, indent=1))
    print('all_pass', ok, '->', args.out)


if __name__ == '__main__':
    main()
