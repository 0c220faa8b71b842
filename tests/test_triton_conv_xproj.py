"""The fused conv + x_proj Triton kernel (inference path with the CUDA C++ scan) against its
PyTorch twin, on CPU via Triton's interpreter: token tails, L < 4, batch > 1, x a strided slice
of in_proj's output, channel counts not a multiple of the chunk, the demo / Vim-Ti / Vim-S
x_proj widths (20, 44, 56), fp32 / bf16 / fp16; and the mixer's wiring of it."""
import os
import subprocess
import sys

import pytest
import torch

# Triton binds its functions (its own standard library included) to the interpreter when they
# are defined, so the flag must be set before triton is first imported in this process (another
# test module may have set it after importing triton: look at what triton's functions are)
ON_CPU = not torch.cuda.is_available()
if ON_CPU:
    os.environ['TRITON_INTERPRET'] = '1'
pytest.importorskip('triton')
from triton.language import standard as _tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

STALE_TRITON = ON_CPU and not isinstance(_tl_standard.zeros, InterpretedFunction)

from vim_mm.ops.triton_conv import (bidirectional_conv_xproj,  # noqa: E402
                                    bidirectional_conv_xproj_torch)

run_here = pytest.mark.skipif(STALE_TRITON, reason='triton was imported without the '
                              'interpreter; test_in_fresh_process runs this file instead')
DEVICE = 'cpu' if ON_CPU else 'cuda'


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_inputs(batch, L, E, width, dtype, seed=0):
    """x as in_proj's output slice (row stride 2E); fp32 parameters, as the model's."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, L, 2 * E, generator=g).to(dtype)[..., :E]
    conv = [torch.randn(E, 1, 4, generator=g) * 0.5 for _ in range(2)]
    bias = [torch.randn(E, generator=g) * 0.5 for _ in range(2)]
    xproj = [torch.randn(width, E, generator=g) / E ** 0.5 for _ in range(2)]
    return [t.to(DEVICE) for t in (x, conv[0], bias[0], conv[1], bias[1], *xproj)]


def check_layout(outs, batch, L, E, width):
    u_f, u_b, x_f, x_b = outs
    P = -(-width // 8) * 8
    assert u_f.shape == u_b.shape == (batch, L, E) and u_f.is_contiguous() and u_b.is_contiguous()
    for x_dbl in (x_f, x_b):  # views [..., :width] of (batch, L, P): 16-byte aligned rows
        assert x_dbl.shape == (batch, L, width) and x_dbl.stride() == (L * P, P, 1)
        assert x_dbl.data_ptr() % 16 == 0 and (P * x_dbl.element_size()) % 16 == 0
        assert x_dbl.untyped_storage().nbytes() >= batch * L * P * x_dbl.element_size()


CASES = [  # batch, L, E, width, block_l, block_e (None: the default config)
    (2, 37, 24, 20, 16, 16),    # demo width; L and E not multiples of the tiles
    (1, 3, 16, 44, 16, 16),     # Vim-Ti width, L < 4
    (3, 70, 40, 56, 32, 32),    # Vim-S width, batch 3, E masked in its second chunk
    (2, 130, 48, 44, None, None),  # the default tiles (64 tokens, 64 channels: E masked)
]


@run_here
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('batch,L,E,width,block_l,block_e', CASES)
def test_matches_twin(dtype, batch, L, E, width, block_l, block_e):
    inputs = make_inputs(batch, L, E, width, dtype)
    config = {} if block_l is None else dict(block_l=block_l, block_e=block_e)
    outs = bidirectional_conv_xproj(*inputs, **config)
    twin = bidirectional_conv_xproj_torch(*inputs)
    check_layout(outs, batch, L, E, width)
    check_layout(twin, batch, L, E, width)
    assert all(o.dtype == dtype for o in outs)
    errs = [rel_err(o, t) for o, t in zip(outs, twin)]
    if dtype == torch.float32:
        assert max(errs) < 1e-5, errs
        return
    # bf16: the twin rounds the conv weights to bf16 (the kernel keeps them fp32, as
    # bidirectional_conv does), and the interpreter truncates fp32 -> bf16 instead of rounding
    assert max(errs[:2]) < 1e-2 and max(errs[2:]) < 2e-2, errs
    for u, x_dbl, w in zip(outs[:2], outs[2:], inputs[5:]):  # the GEMM alone: one rounding
        exact = u.float() @ w.to(dtype).float().t()
        assert rel_err(x_dbl, exact) < 1e-2
        assert (x_dbl.float() - exact).abs().max() <= 2 ** -6 * exact.abs().max()


@run_here
def test_fp16_and_contiguous_x_and_zero_padding():
    """fp16, x contiguous (not a slice), and the padding columns width..P written as zeros."""
    batch, L, E, width = 2, 19, 32, 20
    x, *params = make_inputs(batch, L, E, width, torch.float16, seed=1)
    x = x.contiguous()
    outs = bidirectional_conv_xproj(x, *params, block_l=16, block_e=16)
    twin = bidirectional_conv_xproj_torch(x, *params)
    check_layout(outs, batch, L, E, width)
    errs = [rel_err(o, t) for o, t in zip(outs, twin)]
    assert max(errs) < 5e-3, errs
    for x_dbl in outs[2:]:
        assert (x_dbl._base[..., width:] == 0).all()


@run_here
@pytest.mark.parametrize('fuse', [True, False])
def test_mixer_cuda_scan_branch(monkeypatch, fuse):
    """The mixer's CUDA-C++-scan branch (forced here, the scan replaced by its PyTorch twin)
    feeds the scan u and x_proj's outputs equal to the Triton-scan branch's, from the fused
    kernel where ``fuse_conv_xproj`` is set, else from the conv kernel and two GEMMs."""
    from vim_mm.models.mixer import BiMambaMixer
    from vim_mm.ops import cuda_scan, triton_conv
    torch.manual_seed(0)
    mixer = BiMambaMixer(16, d_state=4, expand=2, backend='triton').to(DEVICE)
    h = torch.randn(2, 13, 16, device=DEVICE)
    with torch.no_grad():
        expected = mixer(h)  # the Triton-scan branch (fp32 on CPU)
    calls, original = [], triton_conv.bidirectional_conv_xproj

    def fused(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    def scan(*args):
        y = cuda_scan.bidirectional_scan_infer_reference(*args)  # halves summed: [y, 0]
        return torch.cat([y, torch.zeros_like(y)], -1).to(args[0].dtype)

    monkeypatch.setattr(BiMambaMixer, '_use_cuda_scan', lambda self, u, z: True)
    monkeypatch.setattr(BiMambaMixer, 'fuse_conv_xproj', fuse)
    monkeypatch.setattr(triton_conv, 'bidirectional_conv_xproj', fused)
    monkeypatch.setattr(cuda_scan, 'bidirectional_scan_infer', scan)
    with torch.no_grad():
        out = mixer(h)
    assert calls == ([(2, 13, 32)] if fuse else [])
    assert rel_err(out, expected) < 1e-5


@pytest.mark.skipif(not STALE_TRITON, reason='this process already runs the tests directly')
def test_in_fresh_process():
    """Another test module imported triton first: run this file where the interpreter is on."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                             __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
