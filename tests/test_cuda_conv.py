"""The CUDA C++ conv kernel (``vim_mm/ops/cuda_conv.py``) against its PyTorch twin and the
Triton stream kernel, on a GPU (skipped elsewhere), and its input checks (anywhere)."""
import pytest
import torch

from vim_mm.ops.cuda_conv import bidirectional_conv_cuda, cuda_conv_problem
from vim_mm.ops.triton_conv import bidirectional_conv_torch

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


def inputs(batch, L, E, width, dtype, seed=0, strided=True):
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, L, 2 * E, generator=g).to(dtype)
    x = xz[..., :E] if strided else xz[..., :E].contiguous()
    params = [torch.randn(E, 1, width, generator=g) / 2, torch.randn(E, generator=g) / 4,
              torch.randn(E, width, generator=g) / 2, torch.randn(E, generator=g) / 4]
    return x, params


@gpu
@pytest.mark.parametrize('batch, L, E, width, dtype, options', [
    (2, 37, 64, 4, torch.bfloat16, {}),                       # partial token runs
    (1, 1, 16, 4, torch.bfloat16, {}),                        # L < W
    (3, 70, 384, 4, torch.float16, dict(run=8, block=(48, 2))),
    (2, 5, 40, 2, torch.bfloat16, dict(run=2, block=(16, 4))),  # width 2: zero taps; 5 groups
    (2, 300, 768, 3, torch.bfloat16, dict(run=4, block=(32, 4))),
])
def test_matches_the_twin(batch, L, E, width, dtype, options):
    x, params = inputs(batch, L, E, width, dtype, seed=L + E)
    got = bidirectional_conv_cuda(x.cuda(), *(p.cuda() for p in params), **options)
    # the twin in float64 from the same 16-bit x: the kernel's only rounding is the output's
    want = bidirectional_conv_torch(x.double(), *(p.double() for p in params))
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == dtype and a.is_contiguous()
        torch.testing.assert_close(a.cpu().double(), b.to(dtype).double(), rtol=1e-2,
                                   atol=1e-2)
        # at most one 16-bit rounding step off the correctly rounded result
        ulp = b.abs().clamp_min(1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
        assert ((a.cpu().double() - b).abs() <= ulp).all()


@gpu
def test_matches_the_triton_kernel():
    from vim_mm.ops.triton_conv import bidirectional_conv
    x, params = inputs(4, 513, 384, 4, torch.bfloat16, seed=3)
    params = [p.cuda() for p in params]
    got = bidirectional_conv_cuda(x.cuda(), *params)
    want = bidirectional_conv(x.cuda(), *params)
    for a, b in zip(got, want):
        diff = (a.float() - b.float()).abs()
        # the same fp32 sums, possibly in another order: equal or one bf16 step apart
        assert (diff <= b.float().abs() * 2 ** -7 + 1e-6).all()
        assert (diff == 0).float().mean() > 0.95


def test_problems_are_named():
    x = torch.zeros(1, 4, 16, dtype=torch.bfloat16)
    assert 'CUDA' in cuda_conv_problem(x, 4)
    with pytest.raises(ValueError, match='triton_conv.bidirectional_conv instead'):
        bidirectional_conv_cuda(x, *inputs(1, 4, 16, 4, torch.bfloat16)[1])


@gpu
def test_problems_on_the_gpu():
    x = torch.zeros(1, 4, 32, dtype=torch.bfloat16, device='cuda')
    assert cuda_conv_problem(x, 4) is None
    assert 'bf16/fp16' in cuda_conv_problem(x.float(), 4)
    assert 'multiple of 8' in cuda_conv_problem(x[..., :12], 4)
    assert 'widths <= 4' in cuda_conv_problem(x, 5)
    assert 'aligned' in cuda_conv_problem(x[..., 4:28], 4)  # rows start 8 bytes in
    with pytest.raises(ValueError, match='E=32'):
        bidirectional_conv_cuda(x, torch.zeros(16, 4, device='cuda'), torch.zeros(32),
                                torch.zeros(32, 4), torch.zeros(32))
