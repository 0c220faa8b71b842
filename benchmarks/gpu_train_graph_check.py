"""GPU check of ``cuda_graph`` in training: graphed forward + backward equal the eager step.

For each mixer path (mamba-ssm kernels, fused Triton scan) and autocast bf16 / fp32 (and fp32
with activation checkpointing, ``with_cp``): a Vim-Ti with ``cuda_graph=True`` in train mode
runs two forward + backward steps on different batches WITHOUT zeroing the gradients (a
recording, then a replay; the gradients accumulate), next to a copy run eagerly. Features and every accumulated gradient are compared (max |diff| / max |eager|
per tensor; the backward kernels add with atomics, so not bit for bit): fp32 within 1e-4, bf16
within 1e-2. Then a step that forwards twice before one backward (the second forward must run
eagerly) and a short AdamW fit with stochastic depth, graphed, graphed + with_cp and eager,
whose losses must fall alike.

    python benchmarks/gpu_train_graph_check.py --out results/h100_train_graph_check.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm import VisionMamba  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def loss_of(feats):
    return sum(f.float().pow(2).mean() for f in feats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out')
    args = parser.parse_args()
    report, ok = dict(device=torch.cuda.get_device_name(), parity=[], misc=[]), True
    for backend in ('cuda', 'triton'):
        for dtype, with_cp in ((torch.bfloat16, False), (torch.float32, False),
                               (torch.float32, True)):
            torch.manual_seed(0)
            model = VisionMamba('tiny', img_size=224, out_indices=(5, 11, 17, 23), backend=backend,
                                with_cp=with_cp, cuda_graph=True).cuda().train()
            eager = copy.deepcopy(model)  # starts without graphs
            eager.cuda_graph = eager.with_cp = False
            auto = torch.autocast('cuda', dtype, enabled=dtype != torch.float32)
            feat_err = 0.0
            for _ in range(2):
                x = torch.randn(2, 3, 384, 384, device='cuda')
                with auto:
                    out_g, out_e = model(x), eager(x)
                feat_err = max(feat_err, *(rel(a, b) for a, b in zip(out_g, out_e)))
                loss_of(out_g).backward()
                loss_of(out_e).backward()
            grad_err = {n: rel(p.grad, q.grad) for (n, p), q in
                        zip(model.named_parameters(), eager.parameters())}
            worst = max(grad_err, key=grad_err.get)
            tol = 1e-2 if dtype != torch.float32 else 1e-4
            row = dict(backend=backend, dtype=str(dtype), with_cp=with_cp, shape=[2, 3, 384, 384],
                       steps=2,
                       feature_rel_err=feat_err, grad_rel_err_max=grad_err[worst], worst=worst,
                       graphs=len(model._graphs.graphs), tol=tol)
            row['pass'] = feat_err <= tol and grad_err[worst] <= tol and row['graphs'] == 1
            ok &= row['pass']
            report['parity'].append(row)
            print(json.dumps(row), flush=True)

        # two forwards before one backward: the second runs eagerly, both gradients right
        torch.manual_seed(0)
        model = VisionMamba('tiny', img_size=224, out_indices=(11, 23), backend=backend,
                            cuda_graph=True).cuda().train()
        eager = copy.deepcopy(model)
        eager.cuda_graph = False
        x1, x2 = (torch.randn(2, 3, 256, 256, device='cuda') for _ in range(2))
        model(x1)  # record
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            loss = loss_of(model(x1)) + loss_of(model(x2))
        loss.backward()
        (loss_of(eager(x1)) + loss_of(eager(x2))).backward()
        err = max(rel(p.grad, q.grad) for p, q in zip(model.parameters(), eager.parameters()))
        row = dict(backend=backend, check='two forwards, one backward', grad_rel_err_max=err,
                   warned=any('before the backward' in str(w.message) for w in caught))
        row['pass'] = err <= 1e-4 and row['warned']
        ok &= row['pass']
        report['misc'].append(row)
        print(json.dumps(row), flush=True)

        # a short AdamW fit with drop path (random numbers inside the graph), graphed and eager
        # from the same start: both losses must fall alike
        row = dict(backend=backend, check='AdamW fit, drop path 0.1, bf16, 40 steps')
        for key in ('graphed', 'graphed+cp', 'eager'):
            torch.manual_seed(0)
            model = VisionMamba('tiny', img_size=256, out_indices=(23,), backend=backend,
                                drop_path_rate=0.1, with_cp=key == 'graphed+cp',
                                cuda_graph=key != 'eager').cuda().train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            x = torch.randn(4, 3, 256, 256, device='cuda')
            target = torch.randn(4, 192, 16, 16, device='cuda')
            losses = []
            for _ in range(40):
                with torch.autocast('cuda', torch.bfloat16):
                    out, = model(x)
                loss = (out.float() - target).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            row[key] = dict(loss_first=losses[0], loss_last=losses[-1],
                            graphs=len(model._graphs.graphs))
        e = row['eager']
        row['pass'] = all(g['graphs'] == 1 and g['loss_last'] < 0.7 * g['loss_first'] and
                          g['loss_last'] < 1.5 * e['loss_last']
                          for g in (row['graphed'], row['graphed+cp']))
        ok &= row['pass']
        report['misc'].append(row)
        print(json.dumps(row), flush=True)
    report['all_pass'] = ok
    print('PASS' if ok else 'FAIL', flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == '__main__':
    main()
