"""One Vim-Ti inference case in a fresh process, for chasing a CUDA fault (run it under
CUDA_LAUNCH_BLOCKING=1 or compute-sanitizer): the triton path, the inference scan of
$VIM_MM_INFER_SCAN, eager or through the backbone's cuda_graph; prints max |graph - eager|.

    python benchmarks/gpu_graph_case.py --batch 128 --res 224 [--graph] [--cls]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm import VisionMamba  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument('--batch', type=int, default=128)
parser.add_argument('--res', type=int, default=224)
parser.add_argument('--graph', action='store_true')
parser.add_argument('--backend', default='triton')
parser.add_argument('--calls', type=int, default=3)
args = parser.parse_args()
torch.manual_seed(0)
model = VisionMamba('tiny', img_size=args.res, backend=args.backend,
                    cuda_graph=args.graph).cuda().eval()
x = torch.randn(args.batch, 3, args.res, args.res, device='cuda')
with torch.no_grad(), torch.autocast('cuda', torch.bfloat16):
    outs = [model(x) for _ in range(args.calls)]
    eager = model._forward(x)
torch.cuda.synchronize()
diff = max((a.float() - b.float()).abs().max().item() for o in outs for a, b in zip(o, eager))
print(json.dumps(dict(vars(args), max_abs_diff=diff,
                      cls=model.with_cls_token, finite=all(bool(torch.isfinite(o).all())
                                                           for o in eager))))
