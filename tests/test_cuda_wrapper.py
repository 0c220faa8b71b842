"""The CUDA path's wrapper logic (BiMambaInnerFn) on CPU, with the kernels replaced by fakes.

mamba-ssm's selective_scan_cuda and causal-conv1d's functions are swapped for PyTorch
stand-ins with the same signatures and in-place behaviour (their gradients by autograd), so
everything around them -- channel-first GEMMs, the flips, the padding to the scan chunk, the
merge, out_proj and the hand-written backward -- is checked against the PyTorch mixer path in
float64. The kernels themselves are checked against that path on a GPU (benchmarks/gpu_parity.py).
"""
import pytest
import torch

from vim_mm.models.mixer import BiMambaMixer
from vim_mm.ops import causal_conv1d_torch, cuda_ops, linear_channel_first, selective_scan_torch


class FakeSelectiveScanCuda:
    @staticmethod
    def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        out = selective_scan_torch(u, delta, A, B, C, D, None, delta_bias, delta_softplus)
        out_z = selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return out, torch.empty(0), out_z

    @staticmethod
    def bwd(u, delta, A, B, C, D, z, delta_bias, dout, scan_state, out, dz, delta_softplus,
            recompute_out_z):
        inputs = [t.detach().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
        with torch.enable_grad():
            out_z = selective_scan_torch(*inputs, delta_softplus)
        du, ddelta, dA, dB, dC, dD, dz_, ddelta_bias = torch.autograd.grad(out_z, inputs, dout)
        dz.copy_(dz_)  # the kernel writes dz into the given buffer
        return du, ddelta, dA, dB, dC, dD, ddelta_bias, dz, out_z.detach()


def fake_conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
    assert x.stride(-1) == 1 and weight.dim() == 2
    return causal_conv1d_torch(x, weight, bias, 'silu' if silu else None)


def fake_conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx,
                  return_dinitial_states, silu):
    inputs = [t.detach().requires_grad_() for t in (x, weight, bias)]
    with torch.enable_grad():
        out = causal_conv1d_torch(*inputs, 'silu' if silu else None)
    gx, gw, gb = torch.autograd.grad(out, inputs, dout)
    dx.copy_(gx)  # written in place, like the kernel
    return dx, gw, gb, None


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(cuda_ops, 'selective_scan_cuda', FakeSelectiveScanCuda, raising=False)
    monkeypatch.setattr(cuda_ops, 'causal_conv1d_fwd_function', fake_conv_fwd, raising=False)
    monkeypatch.setattr(cuda_ops, 'causal_conv1d_bwd_function', fake_conv_bwd, raising=False)


@pytest.mark.parametrize('length,pad_to', [(13, 13), (13, 20), (1, 8)])
def test_bimamba_inner_fn_matches_torch_path(fake_kernels, monkeypatch, length, pad_to):
    """Outputs and every gradient equal the PyTorch mixer path, with and without padding."""
    monkeypatch.setattr(cuda_ops, 'padded_length', lambda L: pad_to)
    torch.manual_seed(0)
    mixer = BiMambaMixer(d_model=8, d_state=4).double()
    with torch.no_grad():  # D, dt, A away from their init so every term matters
        for p in (mixer.D, mixer.D_b, mixer.A_log, mixer.A_b_log, mixer.conv1d.bias):
            p.add_(0.3 * torch.randn_like(p))
        for p in (mixer.D, mixer.D_b, mixer.dt_proj.bias, mixer.dt_proj_b.bias):
            p.copy_(p.float())  # the wrapper hands these to the kernel in float32
    hidden = torch.randn(2, length, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, length, 8, dtype=torch.float64)

    def run(path):
        mixer.zero_grad()
        hidden.grad = None
        xz = linear_channel_first(mixer.in_proj.weight, hidden.transpose(1, 2))
        fwd, bwd = mixer.direction_params(''), mixer.direction_params('_b')
        if path == 'cuda':
            out = cuda_ops.bimamba_inner_cuda(xz, fwd, bwd, mixer.out_proj.weight, mixer.out_proj.bias)
        else:
            out = mixer.forward_torch(xz, fwd, bwd)
        out.backward(grad_out)
        return out.detach(), hidden.grad.clone(), {n: p.grad.clone() for n, p in mixer.named_parameters()}

    out_ref, dh_ref, grads_ref = run('torch')
    out, dh, grads = run('cuda')
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-9, atol=1e-10)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        # the kernels take D and the dt bias in float32 and return their gradients in float32
        fp32 = name in ('D', 'D_b', 'dt_proj.bias', 'dt_proj_b.bias')
        tol = dict(rtol=1e-6, atol=1e-8) if fp32 else dict(rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(grads[name], grads_ref[name], **tol, msg=name)


@pytest.mark.parametrize('length,expected', [
    (197, 197), (1024, 1024), (1025, 1025), (4096, 4096), (4097, 4097), (6084, 6144),
    (6085, 6144), (16384, 16384), (16000, 16384), (1000, 1024), (130, 130)])
def test_padded_length(length, expected):
    """Pad to mamba-ssm's scan chunk (128..1024 by length, 2048 above) only when cheap."""
    assert cuda_ops.padded_length(length) == expected
