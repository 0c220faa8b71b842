"""out_proj + residual add + RMSNorm in one Triton kernel against its PyTorch twin, on CPU via
Triton's interpreter.

Tolerances: the kernel accumulates the GEMM in fp32 in its own order and rounds ``out`` to the
16-bit dtype once, so ``out`` may differ from the exactly rounded product by one ulp of the
16-bit dtype where the fp32 sum lands next to a rounding boundary. So ``new_res`` is checked
element by element against ``residual + round(exact out)`` to within one 16-bit ulp of ``out``
(plus fp32 rounding of the add), and ``normed`` to within one 16-bit rounding of the norm of
the kernel's own ``new_res``; against the twin (its own GEMM, CPU order) within two of each.
"""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_out_norm as on  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'
EPS = 1e-5


def ulp(x, dtype):
    """One ulp of ``dtype`` at |x| (float64; subnormals: the smallest normal's ulp)."""
    tiny, eps = torch.finfo(dtype).tiny, torch.finfo(dtype).eps
    return eps * torch.exp2(torch.floor(torch.log2(x.double().abs().clamp_min(tiny))))


def make_inputs(lead, K, N, dtype, bias, residual, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # y as the first half of a (..., 2K) tensor: token stride 2K
        y = torch.randn(*lead, 2 * K, generator=g).to(dtype)[..., :K]
    else:
        y = torch.randn(*lead, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    res = torch.randn(*lead, N, generator=g) * 2 if residual else None
    nw = torch.rand(N, generator=g) + 0.5
    return y, w, b, res, nw


def to_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@run_here
@pytest.mark.parametrize('lead, K, N, dtype, bias, residual, options', [
    ((2, 37), 64, 48, torch.bfloat16, True, True, {}),  # tiles 32 + 16, one partial row block
    ((2, 37), 96, 64, torch.float16, False, True, dict(block_k=64)),  # K tail masked
    ((1, 37), 64, 96, torch.bfloat16, True, False, dict(block_m=32)),  # 64 + 32, no residual
    ((2, 37), 64, 192, torch.bfloat16, True, True, dict(block_m=32)),  # Vim-Ti N: 128 + 64
    ((2, 37), 64, 192, torch.float16, True, True, dict(split_n=False)),  # 192 padded to 256
    ((19,), 40, 20, torch.bfloat16, False, False, dict(block_k=32)),  # 2-d y, N 20 -> 32
    ((2, 21), 48, 96, torch.float16, True, True, dict(strided=True, block_k=16)),
    ((1, 37), 32, 384, torch.bfloat16, True, True, dict(block_m=16, block_k=16)),  # 256 + 128
    ((1, 9), 16, 8, torch.float16, True, True, dict(block_m=16)),  # N 8 -> one 16-wide tile
])
def test_kernel_matches_the_twin(lead, K, N, dtype, bias, residual, options):
    options = dict(options)
    y, w, b, res, nw = make_inputs(lead, K, N, dtype, bias, residual, seed=K + N,
                                   strided=options.pop('strided', False))
    got_normed, got_res = on.linear_add_rms_norm(*to_device(y, w, b, res, nw), EPS, **options)
    assert got_normed.shape == got_res.shape == (*lead, N)
    assert got_normed.dtype == dtype and got_res.dtype == torch.float32
    assert got_normed.is_contiguous() and got_res.is_contiguous()
    got_normed, got_res = got_normed.cpu().double(), got_res.cpu().double()

    # new_res: residual + the exactly rounded out, to within one ulp of out
    exact = y.double() @ w.double().T + (0 if b is None else b.double())
    out = exact.to(dtype).float()
    want_res = (out if res is None else res + out).double()  # the add in fp32, as the twin's
    out = out.double()
    bound = ulp(out, dtype) + 2 ** -23 * want_res.abs()
    assert ((got_res - want_res).abs() <= bound).all()
    assert (got_res != want_res).double().mean() < 0.01  # one-ulp flips are rare

    # normed: one rounding of the norm of the kernel's own new_res
    inv_rms = torch.rsqrt(got_res.pow(2).mean(-1, keepdim=True) + EPS)
    own = got_res * inv_rms * nw.double()
    assert ((got_normed - own).abs() <= ulp(own, dtype) + 1e-6 * own.abs()).all()

    # against the twin (in the 16-bit dtype: its own GEMM order and rounding; y contiguous, as
    # the CPU's 16-bit linear of a token-strided y is hundreds of ulps off)
    twin_normed, twin_res = on.linear_add_rms_norm_torch(y.contiguous(), w, b, res, nw, EPS)
    assert ((got_res - twin_res.double()).abs() <= 2 * bound).all()
    bound_normed = 2 * ulp(twin_normed, dtype) + 2 * ulp(out, dtype) * inv_rms * nw.double()
    assert ((got_normed - twin_normed.double()).abs() <= bound_normed).all()


@run_here
def test_bad_inputs_are_refused(monkeypatch):
    y, w, b, res, nw = to_device(*make_inputs((1, 5), 32, 16, torch.bfloat16, True, True, 0))
    with pytest.raises(ValueError, match='bfloat16/float16'):
        on.linear_add_rms_norm(y.float(), w.float(), b, res, nw, EPS)
    with pytest.raises(ValueError, match=r'must be \(N, 32\)'):
        on.linear_add_rms_norm(y, w[:, :16], b, res, nw, EPS)  # K mismatch
    with pytest.raises(ValueError, match=r'must be \(N, 32\)'):
        on.linear_add_rms_norm(y, w.half(), b, res, nw, EPS)  # weight dtype
    big = torch.zeros(on.MAX_N + 1, 32, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match='at most 512'):
        on.linear_add_rms_norm(y, big, None, None, torch.ones(on.MAX_N + 1), EPS)
    with pytest.raises(ValueError, match='residual'):
        on.linear_add_rms_norm(y, w, b, res[:, :4], nw, EPS)
    with pytest.raises(ValueError, match='residual'):
        on.linear_add_rms_norm(y, w, b, res.double(), nw, EPS)
    with pytest.raises(ValueError, match='bias'):
        on.linear_add_rms_norm(y, w, b[:8], res, nw, EPS)
    with pytest.raises(ValueError, match='norm_weight'):
        on.linear_add_rms_norm(y, w, b, res, nw[:8], EPS)
    with pytest.raises(ValueError, match='powers of two'):
        on.linear_add_rms_norm(y, w, b, res, nw, EPS, block_m=48)
    if ON_CPU:  # a CPU tensor without the interpreter
        monkeypatch.setattr(on, 'INTERPRET', False)
        with pytest.raises(RuntimeError, match='CUDA'):
            on.linear_add_rms_norm(y, w, b, res, nw, EPS)


def test_tiles_and_configs():
    assert on.n_tiles(192) == (128, 64) and on.n_tiles(384) == (256, 128)
    assert on.n_tiles(192, split_n=False) == (256, 0) and on.n_tiles(256) == (256, 0)
    assert on.n_tiles(100) == (128, 0)  # a split would pad as much
    for N in (192, 384):
        configs = on.sweep_configs(N)
        assert {**on.default_config(N), 'split_n': True} in configs
        assert {c['split_n'] for c in configs} == {True, False}
        assert all(c['block_m'] in (64, 128) and c['block_k'] in (32, 64, 128) for c in configs)
    assert {c['split_n'] for c in on.sweep_configs(256)} == {True}  # nothing to split


@pytest.mark.skipif(not STALE_TRITON, reason='the tests above ran in this process')
def test_in_fresh_process():
    run_in_fresh_process(__file__)
