"""Throughput and peak memory of Vim vs DeiT backbones across resolutions (the paper's Fig. 1/3/4).

    python tools/benchmark.py --models vim-t deit-t deit-t-plain --res 224 512 1024 1248 2048 \
        --batch 128 32 16 16 4 --mode infer train --dtype bf16 --out benchmarks/results/h100.json

Models: vim-t / vim-s (ours; ``--backend`` or a suffix such as ``vim-t@triton`` picks the mixer
path: auto, cuda = mamba-ssm kernels, triton = fused scan, torch; ``+cp`` turns on the
backbone's activation checkpointing (with_cp); a ``+graph`` suffix, e.g.
``vim-t@triton+graph``, turns on the backbone's ``cuda_graph`` option, what tools/test.py and
tools/train.py users get (forward graphs for --mode infer, forward + backward graphs for train),
while ``--cuda-graph`` records the whole timed inference step; the triton path's inference
scan follows $VIM_MM_INFER_SCAN (default: the CUDA C++ scan where it applies), and ``+cscan`` /
``+tscan`` force the CUDA C++ / the Triton scan for the row), deit-t /
deit-s (mmpretrain VisionTransformer, fused SDPA attention) and deit-t-plain / deit-s-plain (the same with plain
matmul-softmax attention, as in the paper's comparison). ``--neck`` adds the SimpleFPN neck.
Timing: warm-up, then CUDA events around each step (host clock on CPU), median of repeats;
an out-of-memory is recorded as "OOM". Writes JSON (and a PNG plot with --plot) with the
throughput ratios of every Vim row to the DeiT rows of its size and to the mamba-ssm path
(``vim-t@cuda``, the stand-in for the authors' kernels) at the same mode, resolution and batch;
``--from-json A.json B.json --out R.json`` records them for rows from several runs.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import os.path as osp
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

VIM = {'vim-t': 'tiny', 'vim-s': 'small', 'vim-b': 'base'}
DEIT = {'deit-t': 'deit-tiny', 'deit-s': 'deit-small', 'deit-b': 'deit-base'}

SCANS = {'cscan': 'cuda', 'tscan': 'triton'}  # suffix: VIM_MM_INFER_SCAN for the row
SUFFIXES = ('cp', 'graph', *SCANS)


def parse_name(name: str):
    """vim-t@triton+cp+graph -> ('vim-t', 'triton', ['cp', 'graph']): the model, its forced
    mixer path ('' if none) and its options (deit-t-plain -> 'deit-t')."""
    model_name, *options = name.split('+')
    base, _, forced = model_name.replace('-plain', '').partition('@')
    return base, forced, options


def build(name: str, res: int, backend: str | None, neck: bool):
    # vim-t@triton+cp+graph: mixer path, the backbone's with_cp and cuda_graph options
    base, forced, options = parse_name(name)
    if set(options) - set(SUFFIXES):
        raise SystemExit(f'unknown option in {name!r}: the suffixes are '
                         + ', '.join('+' + k for k in SUFFIXES))
    backend = forced or backend
    for scan in set(options) & set(SCANS):
        if backend != 'triton':
            raise SystemExit(f'{name!r}: +{scan} picks the inference scan of the triton path; '
                             f'use {base}@triton+{scan}')
    if base in VIM:
        from vim_mm import VisionMamba
        model = VisionMamba(VIM[base], img_size=res, backend=backend,
                            with_cp='cp' in options, cuda_graph='graph' in options)
        dims = model.embed_dims
    elif base in DEIT:
        from mmpretrain.models import VisionTransformer
        model = VisionTransformer(arch=DEIT[base], img_size=res, patch_size=16,
                                  out_type='featmap', with_cls_token=True)
        dims = model.embed_dims
        if name.endswith('-plain'):
            from mmpretrain.models.utils.attention import scaled_dot_product_attention_pyimpl
            for module in model.modules():
                if hasattr(module, 'scaled_dot_product_attention'):
                    module.scaled_dot_product_attention = scaled_dot_product_attention_pyimpl
    else:
        raise SystemExit(f'unknown model {name!r}; choose from {sorted(VIM) + sorted(DEIT)} (+ -plain for DeiT)')
    if neck:
        from vim_mm.mm.necks import SimpleFPN
        model = torch.nn.Sequential(model, SimpleFPN(dims, 256, num_outs=5, norm_cfg=dict(type='LN2d')))
    return model


def capture_cuda_graph(step):
    """Record ``step`` (fixed shapes) once as a CUDA graph; the returned step replays it."""
    from vim_mm.models.cuda_graph import capture_cuda_graph as capture
    replay, _ = capture(step)
    return replay


def timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name, res, batch, mode, dtype, device, args):
    """One row; ``+cscan`` / ``+tscan`` run it with VIM_MM_INFER_SCAN=cuda / triton."""
    from vim_mm.ops.cuda_scan import infer_scan_choice
    forced = [SCANS[k] for k in name.split('+')[1:] if k in SCANS]
    saved = os.environ.get('VIM_MM_INFER_SCAN')
    if forced:
        os.environ['VIM_MM_INFER_SCAN'] = forced[-1]
    scan = infer_scan_choice()
    try:
        row = _measure(name, res, batch, mode, dtype, device, args)
    finally:
        if saved is None:
            os.environ.pop('VIM_MM_INFER_SCAN', None)
        else:
            os.environ['VIM_MM_INFER_SCAN'] = saved
    if row.get('backend') == 'triton':
        row['infer_scan'] = scan
    return row


def _measure(name, res, batch, mode, dtype, device, args):
    model = build(name, res, args.backend, args.neck).to(device)
    images = torch.randn(batch, 3, res, res, device=device)
    graphed = args.cuda_graph and mode == 'infer' and device.type == 'cuda'
    # a graph recorded with autocast's weight cache on reads cached casts that the cache frees
    # when the step's autocast exits (illegal address at 224 px b128 on an H200, ninth session)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32,
                              cache_enabled=not graphed)
    if mode == 'infer':
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(images)
        if graphed:
            step = capture_cuda_graph(step)
    else:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with autocast:
                out = model(images)
            loss = sum(o.float().mean() for o in (out if isinstance(out, (tuple, list)) else [out]))
            loss.backward()
            for p in params:
                p.grad = None
    step()  # compiles kernels and records graphs: the memory peaks are the steady state's
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        gc.collect()  # earlier rows' models and their graphs' memory pools
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, args.warmup, args.repeats)
    row = dict(model=name, res=res, batch=batch, mode=mode, seconds=seconds,
               img_per_s=batch / seconds,
               cuda_graph=graphed)
    if device.type == 'cuda':
        row['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
        # graphs keep their memory in private pools, which count as reserved, not allocated
        row['peak_reserved_gb'] = torch.cuda.max_memory_reserved(device) / 2**30
    if name.split('+')[0].partition('@')[0] in VIM:
        row['backend'] = ran_backend(model[0] if args.neck else model, mode)
    return row


def ran_backend(vim, mode: str) -> str:
    """The mixer path the timed steps took: resolved in their grad mode and, for inference
    through the backbone's graphs, in their graphed context (vim_mm.ops.backend)."""
    from vim_mm.ops import graphed_inference
    if mode == 'train':
        return vim.active_backend
    with torch.no_grad(), (graphed_inference() if vim.cuda_graph else contextlib.nullcontext()):
        return vim.active_backend


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    modes = sorted({r['mode'] for r in rows})
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for name in dict.fromkeys(r['model'] for r in rows):
            pts = [r for r in rows if r['model'] == name and r['mode'] == mode and 'img_per_s' in r]
            if not pts:
                continue
            axes[i][0].plot([r['res'] for r in pts], [r['img_per_s'] for r in pts], 'o-', label=name)
            if 'peak_mem_gb' in pts[0]:
                axes[i][1].plot([r['res'] for r in pts], [r['peak_mem_gb'] for r in pts], 'o-', label=name)
        axes[i][0].set(title=f'{mode}: throughput', xlabel='resolution', ylabel='img/s', yscale='log')
        axes[i][1].set(title=f'{mode}: peak memory', xlabel='resolution', ylabel='GB')
        axes[i][0].legend()
        axes[i][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ratios(rows) -> list[dict]:
    """img/s of every Vim row over each baseline measured at its mode, resolution and batch:
    DeiT models of the same size (deit-t for vim-t, plain attention too) and, for rows other
    than the mamba-ssm path itself, that path (``vim-x@cuda``)."""
    timed = [r for r in rows if 'img_per_s' in r]
    out = []
    for row in timed:
        model = parse_name(row['model'])[0]
        if model not in VIM:
            continue
        for base in timed:
            same = all(base[k] == row[k] for k in ('mode', 'res', 'batch'))
            baseline = parse_name(base['model'])[0]
            deit = baseline in DEIT and baseline[-1] == model[-1]  # deit-t for vim-t
            authors = base['model'] == model + '@cuda' != row['model']
            if same and (deit or authors):
                out.append(dict(mode=row['mode'], res=row['res'], batch=row['batch'],
                                model=row['model'], baseline=base['model'],
                                ratio=row['img_per_s'] / base['img_per_s']))
    return out


def print_ratios(found):
    for r in found:
        print(f"{r['mode']:5s} {r['model']:14s} {r['res']:5d} b{r['batch']:<4d} "
              f"{r['ratio']:.3f}x {r['baseline']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vim-t', 'deit-t', 'deit-t-plain'])
    parser.add_argument('--res', nargs='+', type=int, default=[224, 512, 1024])
    parser.add_argument('--batch', nargs='+', type=int, default=[16],
                        help='one batch size, or one per resolution')
    parser.add_argument('--mode', nargs='+', choices=['infer', 'train'], default=['infer'])
    parser.add_argument('--dtype', choices=['bf16', 'fp16', 'fp32'], default=None,
                        help='autocast dtype (default: bf16 on CUDA, fp32 on CPU, where bf16 is slower)')
    parser.add_argument('--backend', default=None, help='Vim mixer path: auto, cuda, torch')
    parser.add_argument('--neck', action='store_true', help='backbone + SimpleFPN neck')
    parser.add_argument('--cuda-graph', action='store_true',
                        help='inference: capture one step as a CUDA graph and time its replays')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='JSON file for the results')
    parser.add_argument('--plot', help='PNG file for the plot')
    parser.add_argument('--from-json', nargs='+', metavar='JSON',
                        help='measure nothing: plot the rows of these result files into --plot '
                             'and/or write their ratios to --out')
    args = parser.parse_args()
    if args.from_json:
        if not (args.plot or args.out):
            parser.error('--from-json needs --plot PNG and/or --out JSON')
        rows = []
        for path in args.from_json:
            with open(path) as f:
                rows += json.load(f)['results']
        found = ratios(rows)
        print_ratios(found)
        if args.plot:
            plot(rows, args.plot)
        if args.out:
            with open(args.out, 'w') as f:
                json.dump(dict(command=' '.join(sys.argv), sources=args.from_json,
                               ratios=found), f, indent=1)
        return
    if len(args.batch) not in (1, len(args.res)):
        parser.error('--batch takes one value or one per --res')
    batches = args.batch * len(args.res) if len(args.batch) == 1 else args.batch
    device = torch.device(args.device)
    args.dtype = args.dtype or ('bf16' if device.type == 'cuda' else 'fp32')
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32)[args.dtype]
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
    import vim_mm  # noqa: F401  (registers; logs the mixer path)

    rows = []
    for mode in args.mode:
        for res, batch in zip(args.res, batches):
            for name in args.models:
                try:
                    row = measure(name, res, batch, mode, dtype, device, args)
                except torch.OutOfMemoryError:
                    row = dict(model=name, res=res, batch=batch, mode=mode, result='OOM')
                except RuntimeError as exc:  # e.g. a CUDA graph capture that fails: record it
                    row = dict(model=name, res=res, batch=batch, mode=mode, result='error',
                               error=str(exc).splitlines()[0][:300])
                rows.append(row)
                shown = (f"{row['img_per_s']:9.1f} img/s" if 'img_per_s' in row
                         else f"   {row['result']} {row.get('error', '')}")
                mem = f"  {row['peak_mem_gb']:6.2f} GB" if 'peak_mem_gb' in row else ''
                print(f'{mode:5s} {name:14s} {res:5d} b{batch:<4d} {shown}{mem}', flush=True)
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu',
                torch=torch.__version__, dtype=args.dtype, command=' '.join(sys.argv),
                threads=torch.get_num_threads())
    found = ratios(rows)
    print_ratios(found)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(meta=meta, results=rows, ratios=found), f, indent=1)
    if args.plot:
        plot(rows, args.plot)


if __name__ == '__main__':
    main()
