"""Several GPUs: ``cuda_graph`` training under DistributedDataParallel still averages gradients.

    torchrun --nproc_per_node 2 benchmarks/gpu_ddp_graph_check.py --out results/ddp_graph.json

Every rank builds the same Vim-Ti (same seed) twice, eager and with ``cuda_graph=True``, both
wrapped in DDP, and feeds them its own batch (seeded by rank), bf16 autocast, for a few SGD
steps. After each backward the gradients must be identical on all ranks (DDP's all-reduce ran:
the backward graph's parameter gradients pass through autograd's accumulation, where DDP's
hooks sit) and equal to the eager model's within bf16 tolerance; after the steps the weights
must still agree across ranks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm import VisionMamba  # noqa: E402


def flat_grads(model):
    return torch.cat([p.grad.float().flatten() for p in model.parameters()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out')
    parser.add_argument('--steps', type=int, default=4)
    parser.add_argument('--res', type=int, default=512)
    args = parser.parse_args()
    dist.init_process_group('nccl')
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', rank)))
    models = {}
    for name, graphed in (('eager', False), ('graph', True)):
        torch.manual_seed(0)
        model = VisionMamba('tiny', img_size=args.res, out_indices=(11, 23), drop_path_rate=0.0,
                            cuda_graph=graphed).cuda().train()
        models[name] = (DDP(model, device_ids=[torch.cuda.current_device()]),
                        torch.optim.SGD(model.parameters(), lr=0.1))
    rows, ok = [], True
    for step in range(args.steps):
        gen = torch.Generator(device='cuda').manual_seed(1000 * step + rank)
        x = torch.randn(4, 3, args.res, args.res, device='cuda', generator=gen)
        grads = {}
        for name, (ddp, opt) in models.items():
            opt.zero_grad(set_to_none=True)
            with torch.autocast('cuda', torch.bfloat16):
                out = ddp(x)
            sum(o.float().pow(2).mean() for o in out).backward()
            grads[name] = flat_grads(ddp.module)
            opt.step()
        row = dict(step=step)
        for name, g in grads.items():
            gathered = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(gathered, g)
            row[f'{name}_rank_spread'] = max((a - gathered[0]).abs().max().item() for a in gathered)
        row['graph_vs_eager_rel'] = ((grads['graph'] - grads['eager']).abs().max()
                                     / grads['eager'].abs().max()).item()
        row['graphs'] = len(models['graph'][0].module._graphs.graphs)
        row['pass'] = row['graph_rank_spread'] == 0.0 and row['graph_vs_eager_rel'] < 1e-2
        ok &= row['pass']
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    weights = torch.cat([p.detach().float().flatten() for p in models['graph'][0].parameters()])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    spread = max((w - gathered[0]).abs().max().item() for w in gathered)
    ok &= spread == 0.0
    if rank == 0:
        report = dict(device=torch.cuda.get_device_name(), world_size=world, res=args.res,
                      batch_per_gpu=4, steps=rows, final_weight_rank_spread=spread, all_pass=ok)
        print('final weight spread across ranks', spread, 'PASS' if ok else 'FAIL', flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
