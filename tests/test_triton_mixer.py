"""The mixer's fused-Triton path equals its PyTorch path: compiled on a CUDA machine, through the
Triton interpreter on CPU (in a subprocess, since TRITON_INTERPRET is read at import)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip('triton')

CODE = r'''
import torch
from vim_mm.models.mixer import BiMambaMixer
torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = False  # both paths' GEMMs in full fp32 on a GPU
device = 'cuda' if torch.cuda.is_available() else 'cpu'
ref = BiMambaMixer(16, d_state=4, expand=2, backend='torch').to(device)
fast = BiMambaMixer(16, d_state=4, expand=2, backend='triton').to(device)
fast.load_state_dict(ref.state_dict())
h = torch.randn(2, 13, 16, device=device)
outs, grads = [], []
for m in (ref, fast):
    x = h.clone().requires_grad_()
    y = m(x)
    y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float32, device=device)).view_as(y))
    outs.append(y.detach())
    grads.append([x.grad] + [p.grad for p in m.parameters()])
rel = lambda a, b: ((a - b).norm() / b.norm()).item()
err = max([rel(outs[1], outs[0])] + [rel(a, b) for a, b in zip(grads[1], grads[0])])
with torch.no_grad():  # inference: the fused Triton conv of both directions
    err_ng = rel(fast(h), ref(h))
print('MAXREL', err, err_ng)
assert err < 1e-4 and err_ng < 1e-5, (err, err_ng)
import os  # the opt-in CUDA C++ inference scan refuses what it cannot run, never falls back
os.environ['VIM_MM_INFER_SCAN'] = 'cuda'  # (only the interpreter runs Triton on CPU tensors)
if os.environ.get('TRITON_INTERPRET') == '1':
    try:
        with torch.no_grad():
            fast.cpu()(h.cpu())
        raise SystemExit('VIM_MM_INFER_SCAN=cuda ran on CPU tensors')
    except RuntimeError as exc:
        assert 'VIM_MM_INFER_SCAN=cuda' in str(exc) and 'CUDA tensors' in str(exc), exc
    print('REFUSED')
'''


def test_triton_mixer_matches_torch_mixer():
    # the interpreter of the H200 machine (Triton 3.6) raises inside the scan kernel ('only
    # 0-dimensional arrays can be converted'), 3.8's does not: a GPU runs the kernels compiled
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env['TRITON_INTERPRET'] = '1'
    proc = subprocess.run([sys.executable, '-c', CODE], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parents[1], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'MAXREL' in proc.stdout
    assert 'REFUSED' in proc.stdout or torch.cuda.is_available()
