"""The many-rows residual add + RMSNorm kernel against the PyTorch lines (Triton's interpreter
on CPU, the compiled kernel where CUDA is available)."""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

from vim_mm.ops.norm import add_rms_norm_torch  # noqa: E402
from vim_mm.ops.triton_add_norm import add_rms_norm_rows  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'


@run_here
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('shape,block_m', [((2, 37, 48), 16), ((5, 24), 4), ((3, 1, 20), 8)])
@pytest.mark.parametrize('with_residual', [True, False])
def test_matches_torch(dtype, shape, block_m, with_residual):
    """Rows not a multiple of block_m, widths not a power of two, the first block (no residual
    yet): the stream exactly as PyTorch adds it, normed within one rounding of x's dtype."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(DEVICE, dtype)
    residual = torch.randn(shape, generator=g).to(DEVICE) if with_residual else None
    weight = (torch.rand(shape[-1], generator=g) + 0.5).to(DEVICE)
    normed, new_res = add_rms_norm_rows(x, residual, weight, 1e-5, block_m=block_m)
    want_normed, want_res = add_rms_norm_torch(x, residual, weight, 1e-5)
    assert normed.dtype == dtype and new_res.dtype == torch.float32
    assert torch.equal(new_res, want_res)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(normed, want_normed, **tol)


@run_here
@pytest.mark.parametrize('out_dtype', [torch.bfloat16, torch.float16])
def test_first_block_writes_the_linear_dtype_and_keeps_the_stream(out_dtype):
    """The first block (float32 stream, no residual) under a 16-bit autocast: normed in that
    dtype, bit for bit what casting the float32 result gives (in_proj's autocast cast; on the
    GPU, whose conversion rounds to nearest: Triton's interpreter truncates, so there within
    one rounding), and the stream itself returned as the new residual (no copy, as the
    PyTorch lines alias it)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 29, 48, generator=g) * 3).to(DEVICE)
    weight = (torch.rand(48, generator=g) + 0.5).to(DEVICE)
    normed, new_res = add_rms_norm_rows(x, None, weight, 1e-5, out_dtype=out_dtype, block_m=8)
    want, _ = add_rms_norm_rows(x, None, weight, 1e-5, block_m=8)
    assert normed.dtype == out_dtype and want.dtype == torch.float32
    if DEVICE == 'cuda':
        assert torch.equal(normed, want.to(out_dtype))
    else:
        torch.testing.assert_close(normed, want.to(out_dtype))
    assert new_res is x
    ref_normed, ref_res = add_rms_norm_torch(x, None, weight, 1e-5)
    assert ref_res is x  # what the PyTorch lines return too
    torch.testing.assert_close(normed, ref_normed.to(out_dtype))


@run_here
def test_bad_inputs():
    x = torch.randn(2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match='residual'):
        add_rms_norm_rows(x, torch.randn(2, 3, 8, device=DEVICE).half(),
                          torch.ones(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match='weight'):
        add_rms_norm_rows(x, None, torch.ones(7, device=DEVICE), 1e-5)


@pytest.mark.skipif(not STALE_TRITON, reason='this process already runs the tests directly')
def test_in_fresh_process():
    """Another test module imported triton first: run this file where the interpreter is on."""
    run_in_fresh_process(__file__)
