"""The PyTorch twin of the kernels against sequential float64 math, gradients by gradcheck."""
import pytest
import torch
import torch.nn.functional as F

from _reference import ssm_scan
from vim_mm.ops import (causal_conv1d_torch, linear_recurrence, resolve_backend,
                        selective_scan_torch)
from vim_mm.models.mixer import BiMambaMixer


def sequential_recurrence(a, b):
    h, out = torch.zeros_like(b[0]), []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out)


@pytest.mark.parametrize('length,chunk', [(1, None), (2, None), (7, None), (64, None),
                                          (197, None), (50, 1), (50, 7), (50, 64)])
def test_linear_recurrence_matches_loop(length, chunk):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 2, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(length, 2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_recurrence(a, b, chunk=chunk), sequential_recurrence(a, b),
                               rtol=1e-12, atol=1e-12)


def random_scan_inputs(batch=2, dim=3, length=11, n=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(u=torch.randn(batch, dim, length, generator=g, dtype=dtype),
                delta=torch.randn(batch, dim, length, generator=g, dtype=dtype) * 0.5,
                A=-torch.rand(dim, n, generator=g, dtype=dtype) * 3 - 0.1,
                B=torch.randn(batch, n, length, generator=g, dtype=dtype),
                C=torch.randn(batch, n, length, generator=g, dtype=dtype),
                D=torch.randn(dim, generator=g, dtype=dtype),
                z=torch.randn(batch, dim, length, generator=g, dtype=dtype),
                delta_bias=torch.randn(dim, generator=g, dtype=dtype) * 0.5)


@pytest.mark.parametrize('length', [1, 5, 17, 64])
def test_selective_scan_matches_sequential_float64(length):
    x = random_scan_inputs(length=length, seed=length)
    out = selective_scan_torch(**x, delta_softplus=True)
    assert out.dtype == torch.float64
    delta = F.softplus(x['delta'] + x['delta_bias'][:, None])
    for b in range(x['u'].shape[0]):
        y = ssm_scan(x['u'][b].t(), delta[b].t(), x['A'], x['B'][b].t(), x['C'][b].t(), x['D'])
        ref = y.t() * F.silu(x['z'][b])
        torch.testing.assert_close(out[b], ref, rtol=1e-10, atol=1e-10)


def test_selective_scan_kernel_layout_and_optional_args():
    x = random_scan_inputs(length=9)
    four_d = selective_scan_torch(x['u'], x['delta'], x['A'], x['B'][:, None], x['C'][:, None])
    three_d = selective_scan_torch(x['u'], x['delta'], x['A'], x['B'], x['C'])
    torch.testing.assert_close(four_d, three_d)
    # without D, z and softplus the output is the bare scan
    y = ssm_scan(x['u'][0].t(), x['delta'][0].t(), x['A'], x['B'][0].t(), x['C'][0].t(),
                 torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(three_d[0], y.t())


def test_selective_scan_gradcheck():
    x = random_scan_inputs(batch=1, dim=2, length=6, n=3)
    names = list(x)
    inputs = tuple(x[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(
        lambda *args: selective_scan_torch(**dict(zip(names, args)), delta_softplus=True), inputs)


def test_causal_conv1d_matches_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, generator=g, dtype=torch.float64)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    out = causal_conv1d_torch(x, w, bias, activation=None)
    xp = F.pad(x, (3, 0))
    ref = torch.stack([(xp[..., t:t + 4] * w).sum(-1) for t in range(9)], -1) + bias[:, None]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(causal_conv1d_torch(x, w[:, None], bias), F.silu(ref))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_long_sequence_is_finite_and_close(dtype):
    x = random_scan_inputs(batch=1, dim=8, length=4096, n=16, dtype=torch.float32, seed=1)
    ref = selective_scan_torch(**x, delta_softplus=True)
    half = {k: (v.to(dtype) if k in ('u', 'delta', 'B', 'C', 'z') else v) for k, v in x.items()}
    out = selective_scan_torch(**half, delta_softplus=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2


def test_mixer_gradcheck_float64():
    torch.manual_seed(0)
    mixer = BiMambaMixer(8, d_state=3, expand=2).double()
    h = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixer, (h,))
    # parameters get gradients in both directions
    mixer(h).sum().backward()
    for name in ('A_log', 'A_b_log', 'D', 'D_b', 'conv1d_b.weight', 'dt_proj_b.bias'):
        assert mixer.get_parameter(name).grad.abs().sum() > 0, name


def test_backend_selection(monkeypatch):
    monkeypatch.delenv('VIM_MM_BACKEND', raising=False)
    assert resolve_backend(None, 'cpu') == 'torch'
    assert resolve_backend('auto', 'cpu') == 'torch'
    monkeypatch.setenv('VIM_MM_BACKEND', 'torch')
    assert resolve_backend(None, 'cuda') == 'torch'  # the env var forces the path
    monkeypatch.setenv('VIM_MM_BACKEND', 'fast')
    with pytest.raises(ValueError, match='Unknown Vim backend'):
        resolve_backend(None, 'cpu')
    with pytest.raises(RuntimeError, match='cuda'):
        resolve_backend('cuda', 'cpu')


@pytest.mark.parametrize('mamba_ssm, triton', [(True, True), (True, False), (False, True),
                                               (False, False)])
def test_auto_backend_takes_the_fastest_path_per_mode(monkeypatch, mamba_ssm, triton):
    """auto on CUDA tensors: mamba-ssm for training and eager inference, the triton path (CUDA
    C++ scan) for inference recorded in CUDA graphs; each falls back to the other, then to
    PyTorch; CPU tensors always PyTorch; an explicit choice is kept in every mode."""
    from vim_mm.ops import backend, graphed_inference, triton_scan
    monkeypatch.delenv('VIM_MM_BACKEND', raising=False)
    monkeypatch.setattr(backend, 'CUDA_KERNELS_AVAILABLE', mamba_ssm)
    monkeypatch.setattr(triton_scan, 'TRITON_SCAN_AVAILABLE', triton)
    plain = 'cuda' if mamba_ssm else 'triton' if triton else 'torch'
    assert resolve_backend(None, 'cuda', needs_grad=True) == plain
    assert resolve_backend(None, 'cuda', needs_grad=False) == plain
    with graphed_inference():
        assert resolve_backend(None, 'cuda', needs_grad=False) == ('triton' if triton else plain)
        assert resolve_backend(None, 'cuda', needs_grad=True) == plain  # graphed training
        assert resolve_backend(None, 'cpu', needs_grad=False) == 'torch'
        if triton:
            assert resolve_backend('triton', 'cuda', needs_grad=True) == 'triton'
    assert resolve_backend(None, 'cuda', needs_grad=False) == plain  # the context is left
    assert resolve_backend('auto', 'cpu', False) == 'torch'
