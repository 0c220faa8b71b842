"""The fused bidirectional Triton scan against its PyTorch twin, on CPU via Triton's interpreter.

Tiny shapes and tiles so that every path runs: one chunk, many chunks (with the chunk-carry scan
spanning several tiles), a length that is not a multiple of the tile, a channel count that is
not a multiple of the channel block, N not a power of two, batch 1, a backward split over
channels, and strided B/C/delta views laid out as the Vim mixer produces them.
"""
import os
import subprocess
import sys

import pytest
import torch

# Triton binds its functions (its own standard library included) to the interpreter when they
# are defined, so the flag must be set before triton is first imported in this process.
ON_CPU = not torch.cuda.is_available()
STALE_TRITON = ON_CPU and 'triton' in sys.modules and os.environ.get('TRITON_INTERPRET') != '1'
if ON_CPU:
    os.environ['TRITON_INTERPRET'] = '1'
pytest.importorskip('triton')

import vim_mm.ops.triton_scan as triton_scan  # noqa: E402

run_here = pytest.mark.skipif(STALE_TRITON, reason='triton was imported without the '
                                'interpreter; test_in_fresh_process runs this file instead')

NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'bias')


def make_inputs(batch, E, N, L, layout='plain', seed=0):
    """Random inputs of both directions (original token order) and the shared z."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def direction():
        if layout == 'vim':  # B, C, delta as strided views of x_proj / dt_proj outputs
            x_dbl = randn(batch * L, 2 + 2 * N)
            B = x_dbl[:, 2:2 + N].view(batch, L, N).permute(0, 2, 1)
            C = x_dbl[:, 2 + N:].view(batch, L, N).permute(0, 2, 1)
            delta = randn(E, batch * L, scale=0.5).view(E, batch, L).transpose(0, 1)
        else:
            B, C, delta = randn(batch, N, L), randn(batch, N, L), randn(batch, E, L, scale=0.5)
        if layout == 'grouped':  # mamba-ssm's (batch, groups=1, N, L)
            B, C = B.unsqueeze(1), C.unsqueeze(1)
        A = -(torch.rand(E, N, generator=g) * 2 + 0.1)
        return dict(u=randn(batch, E, L), delta=delta, A=A, B=B, C=C, D=randn(E),
                    bias=randn(E, scale=0.5))

    fwd, bwd = direction(), direction()
    return [fwd[k] for k in NAMES] + [bwd[k] for k in NAMES] + [randn(batch, E, L)]


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def leaves(inputs):
    """Fresh leaf copies with the same strides, so both runs see identical layouts."""
    out = []
    for t in inputs:
        leaf = torch.empty_strided(t.shape, t.stride()).copy_(t) if t.dim() < 4 else \
            t.detach().clone()
        out.append(leaf.requires_grad_())
    return out


@run_here
@pytest.mark.parametrize('batch,E,N,L,cfg,layout', [
    (2, 8, 4, 7, dict(block_l=8), 'grouped'),  # short: one chunk, no carries; B/C 4-D
    (2, 6, 4, 37, dict(block_l=8, block_c=4), 'plain'),  # odd L, E % block_e != 0, 2 carry tiles
    (1, 8, 3, 70, dict(block_l=16, bwd_programs=64), 'plain'),  # batch 1, N=3, split backward
    (2, 5, 4, 23, dict(block_l=8), 'vim'),  # strided B / C / delta
])
def test_matches_torch_reference(batch, E, N, L, cfg, layout):
    config = triton_scan.ScanConfig(block_e=4, bwd_block_e=4, **cfg)
    inputs = make_inputs(batch, E, N, L, layout)
    ours, ref = leaves(inputs), leaves(inputs)
    if layout == 'vim':  # the layouts the test means to cover really are strided
        assert not ours[1].is_contiguous() and ours[3].stride(-1) != 1
    out = triton_scan.bidirectional_selective_scan(*ours, config=config)
    expected = triton_scan.bidirectional_selective_scan_reference(*ref)
    assert out.shape == (batch, E, L) and out.dtype == torch.float32
    assert rel_err(out, expected) < 1e-3
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expected.backward(grad)
    names = [f'{n}_{d}' for d in ('f', 'b') for n in NAMES] + ['z']
    for name, a, r in zip(names, ours, ref):
        assert a.grad.shape == r.grad.shape, name
        assert rel_err(a.grad, r.grad) < 1e-3, name


@run_here
def test_reference_is_vims_flipped_branch():
    """The reference's backward direction is Vim's flip -> scan -> flip, written per token."""
    from vim_mm.ops.torch_ops import selective_scan_torch
    batch, E, N, L = 1, 3, 2, 5
    inputs = make_inputs(batch, E, N, L, seed=3)
    u_f, d_f, A_f, B_f, C_f, D_f, bias_f, u_b, d_b, A_b, B_b, C_b, D_b, bias_b, z = inputs
    dt = torch.nn.functional.softplus(d_b + bias_b[:, None])
    h = torch.zeros(batch, E, N)
    y_b = torch.empty(batch, E, L)
    for t in reversed(range(L)):  # right to left in original order
        h = torch.exp(dt[..., t, None] * A_b) * h + (dt * u_b)[..., t, None] * B_b[:, None, :, t]
        y_b[..., t] = (h * C_b[:, None, :, t]).sum(-1) + D_b * u_b[..., t]
    y_f = selective_scan_torch(u_f, d_f, A_f, B_f, C_f, D_f, None, bias_f, True)
    expected = (y_f + y_b) / 2 * torch.nn.functional.silu(z)
    out = triton_scan.bidirectional_selective_scan_reference(*inputs)
    assert rel_err(out, expected) < 1e-5


@pytest.mark.skipif(not STALE_TRITON, reason='this process already runs the tests directly')
def test_in_fresh_process():
    """Another test module imported triton first: run this file where the interpreter is on."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                             __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
