"""Residual add + RMSNorm + in_proj in one Triton kernel against its PyTorch twin; on CPU via
Triton's interpreter.

new_residual is an exact float32 add: it must equal the twin's bit for bit. ``out`` is the
16-bit hidden times the weight, accumulated in float32 and rounded to 16 bits, so kernel and twin
may differ by one unit in the last place where their sums round differently (or where a hidden
element rounds differently: the sums of squares are added in another order); the interpreter
also rounds float32 to bf16 by truncation, torch to nearest, so on CPU the bf16 hidden differs
by up to a unit in many elements. The tolerances are that rounding; a wrong index, a missing
chunk or a wrong rstd is off by the size of the values.
"""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_norm_linear as nl  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'
TOL = {torch.float16: 1e-3, torch.bfloat16: 3e-2 if ON_CPU else 1.6e-2}
SMALL = dict(block_m=16, block_n=32, block_k=16, num_warps=2, num_stages=1)


def make_inputs(lead, C, N, dtype, residual=True, norm_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, C, generator=g).to(dtype)
    res = torch.randn(*lead, C, generator=g) * 3 if residual else None
    norm_w = (torch.rand(C, generator=g) + 0.5).to(norm_dtype)
    weight = (torch.randn(N, C, generator=g) / C ** 0.5).to(dtype)
    return x, res, norm_w, weight


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def check(x, res, norm_w, weight, eps=1e-5, **settings):
    out, new_res = nl.add_norm_linear(*on_device(x, res, norm_w), eps, weight.to(DEVICE),
                                      **settings)
    want, want_res = nl.add_norm_linear_torch(x, res, norm_w, eps, weight)
    lead, N, C = x.shape[:-1], weight.shape[0], x.shape[-1]
    assert out.shape == (*lead, N) and out.dtype == x.dtype and out.is_contiguous()
    assert new_res.shape == (*lead, C) and new_res.dtype == torch.float32
    assert new_res.is_contiguous()
    torch.testing.assert_close(new_res.cpu(), want_res, rtol=0, atol=0)
    tol = TOL[x.dtype]
    torch.testing.assert_close(out.cpu().float(), want.float(), rtol=tol, atol=tol)
    # the same against float64 products of the twin's own rounded hidden
    hidden = nl.add_rms_norm_torch(x, res, norm_w, eps)[0]
    exact = hidden.double() @ weight.double().T
    torch.testing.assert_close(out.cpu().double(), exact, rtol=tol, atol=tol)
    return out, new_res


@run_here
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('lead, C, N, residual, settings', [
    # 74 rows: 5 row blocks, the last partial; 3 K chunks (16 + 16 + 8 of C = 40); 3 N tiles
    ((2, 37), 40, 96, True, SMALL),
    ((2, 37), 40, 200, False, SMALL),    # no residual; N = 200: 7 N tiles, the last of 8
    # Vim-Ti's C: 3 K chunks of 64; 4 N tiles, the last of 8
    ((2, 37), 192, 200, True, dict(block_m=32, block_n=64, block_k=64, num_warps=4)),
    ((2, 37), 192, 96, False, {}),       # the defaults: one partial 128 x 128 tile, 3 K chunks
])
def test_kernel_matches_the_twin(dtype, lead, C, N, residual, settings):
    check(*make_inputs(lead, C, N, dtype, residual, seed=C + N), **settings)


@run_here
def test_layouts_and_norm_weight_dtypes():
    """A 2-D x, a strided x and residual (a channel slice of wider rows), a single row, a
    bf16 and a float64 norm weight, another eps."""
    x, res, norm_w, weight = make_inputs((21,), 40, 48, torch.bfloat16, norm_dtype=torch.bfloat16)
    check(x, res, norm_w, weight, **SMALL)
    wide_x, wide_res, _, _ = make_inputs((3, 7), 56, 48, torch.float16, seed=1)
    _, _, norm_w, weight = make_inputs((1,), 40, 48, torch.float16, norm_dtype=torch.float64)
    x, res = wide_x[..., 8:48], wide_res[..., 16:]
    assert not x.is_contiguous() and not res.is_contiguous()
    check(x, res, norm_w, weight, eps=0.5, **SMALL)  # eps matters here
    x, res, norm_w, weight = make_inputs((), 40, 48, torch.float16, seed=2)
    check(x, res, norm_w, weight, **SMALL)  # x (C,): one row


@run_here
def test_no_rows():
    x, res, norm_w, weight = on_device(*make_inputs((0, 5), 40, 48, torch.bfloat16))
    out, new_res = nl.add_norm_linear(x, res, norm_w, 1e-5, weight)
    assert out.shape == (0, 5, 48) and new_res.shape == (0, 5, 40)
    assert out.dtype == torch.bfloat16 and new_res.dtype == torch.float32


@run_here
def test_bad_inputs_are_refused():
    x, res, norm_w, weight = on_device(*make_inputs((2, 3), 40, 48, torch.bfloat16))
    call = nl.add_norm_linear
    with pytest.raises(ValueError, match="residual .* must have x's shape"):
        call(x, res[:, :2], norm_w, 1e-5, weight)
    with pytest.raises(ValueError, match='residual must be float32'):
        call(x, res.double(), norm_w, 1e-5, weight)
    with pytest.raises(ValueError, match=r'norm_weight \(C,\)'):
        call(x, res, norm_w[:32], 1e-5, weight)
    with pytest.raises(ValueError, match=r'weight \(N, C\)'):
        call(x, res, norm_w, 1e-5, weight[:, :32])
    with pytest.raises(ValueError, match="cast the weight to x's dtype"):
        call(x, res, norm_w, 1e-5, weight.half())
    with pytest.raises(ValueError, match='x must be bf16 or fp16'):
        call(x.float(), res, norm_w, 1e-5, weight.float())
    with pytest.raises(ValueError, match='norm_weight must be floating point'):
        call(x, res, norm_w.long(), 1e-5, weight)
    with pytest.raises(ValueError, match='block_k=24 must be a power of two >= 16'):
        call(x, res, norm_w, 1e-5, weight, block_k=24)
    with pytest.raises(ValueError, match='block_m=8 must be a power of two >= 16'):
        call(x, res, norm_w, 1e-5, weight, block_m=8)
    with pytest.raises(ValueError, match='one device'):
        call(x, res, norm_w.to('meta'), 1e-5, weight)
    C = 2 ** 15
    big = x.new_empty(1, C).expand(2 ** 16, C)  # (N, C): 2^31 elements (in shape)
    with pytest.raises(ValueError, match='32 bits'):
        call(x.new_empty(C), None, norm_w.new_empty(C), 1e-5, big)
    with pytest.raises(TypeError):
        call(x, res, norm_w, 1e-5, weight, 64)  # the settings are keyword-only


@pytest.mark.skipif(not ON_CPU, reason='on CUDA the kernel runs')
def test_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(nl, 'INTERPRET', False)
    x, res, norm_w, weight = make_inputs((2, 3), 40, 48, torch.bfloat16)
    with pytest.raises(RuntimeError, match='CUDA'):
        nl.add_norm_linear(x, res, norm_w, 1e-5, weight)


@pytest.mark.skipif(not STALE_TRITON, reason='the tests above ran in this process')
def test_in_fresh_process():
    run_in_fresh_process(__file__)
