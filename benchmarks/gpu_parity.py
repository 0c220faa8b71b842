"""CUDA-kernel path vs PyTorch path of VisionMamba: forward and every gradient (fp32, no TF32).

    python benchmarks/gpu_parity.py --out parity.json [--backend triton]

Same weights and inputs through backend='cuda' (mamba-ssm selective scan + causal-conv1d inside
BiMambaInnerFn) and backend='torch' (the chunked-scan twin); reports the relative error
||cuda - torch|| / ||torch|| of the features and of each parameter's and the input's gradient,
and of the features computed under no_grad (the Triton path then takes its inference kernels).
``--backend triton`` checks the fused Triton path the same way.
"""
import argparse
import json
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from vim_mm import VisionMamba  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run_case(arch, res, batch, with_cls, seed=0, backend='cuda'):
    torch.manual_seed(seed)
    kwargs = dict(arch=arch, img_size=res, with_cls_token=with_cls, out_indices=(5, 11, 17, 23),
                  out_type='featmap')
    fast = VisionMamba(backend=backend, **kwargs).cuda()
    ref = VisionMamba(backend='torch', **kwargs).cuda()
    ref.load_state_dict(fast.state_dict())
    image = torch.randn(batch, 3, res, res, device='cuda')
    out = {}
    for name, model in (('cuda', fast), ('torch', ref)):
        x = image.clone().requires_grad_()
        feats = model(x)
        weights = [torch.randn_like(f) for f in feats] if name == 'cuda' else weights
        loss = sum((f * w).sum() for f, w in zip(feats, weights))
        loss.backward()
        out[name] = dict(feats=[f.detach() for f in feats], input_grad=x.grad,
                         grads={n: p.grad for n, p in model.named_parameters()})
    with torch.no_grad():
        feats_ng = fast(image)
    errs = {'features': max(rel(a, b) for a, b in zip(out['cuda']['feats'], out['torch']['feats'])),
            'features_no_grad': max(rel(a, b) for a, b in zip(feats_ng, out['torch']['feats'])),
            'input_grad': rel(out['cuda']['input_grad'], out['torch']['input_grad'])}
    grad_errs = {n: rel(out['cuda']['grads'][n], g) for n, g in out['torch']['grads'].items()}
    worst = max(grad_errs, key=grad_errs.get)
    errs.update(max_param_grad=grad_errs[worst], worst_param=worst,
                median_param_grad=sorted(grad_errs.values())[len(grad_errs) // 2])
    from vim_mm.ops.cuda_ops import padded_length
    tokens = (res // 16) ** 2 + with_cls
    return dict(backend=backend, arch=arch, res=res, batch=batch, with_cls_token=with_cls,
                tokens=tokens, kernel_length=padded_length(tokens), **errs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out')
    parser.add_argument('--backend', default='cuda', choices=['cuda', 'triton'])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for arch, res, batch, cls in (('tiny', 224, 4, True), ('tiny', 224, 2, False),
                                  ('tiny', 1024, 1, False), ('tiny', 736, 1, True),
                                  ('tiny', 1248, 1, False)):  # 6084 tokens: padded to 6144
        row = run_case(arch, res, batch, cls, backend=args.backend)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    ok = all(max(r['features'], r['features_no_grad'], r['input_grad'], r['max_param_grad']) < 1e-3
             for r in rows)
    print('PARITY', 'PASS' if ok else 'FAIL', '(threshold 1e-3, fp32)')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           results=rows, passed=ok), f, indent=1)


if __name__ == '__main__':
    main()
