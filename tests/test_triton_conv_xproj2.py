"""The two-phase fused conv + SiLU + x_proj kernel (``vim_mm.ops.triton_conv_xproj``) against
its PyTorch twin, on CPU via Triton's interpreter.

Small shapes, so that the interpreter stays quick, that still hit every edge: sequences shorter
than the conv (L = 1, 3) and than a chunk, partial chunks (37, 70), several chunks (halos across
chunk borders), channel counts that are not a multiple of the conv's channel block or of the
dot's K step (40, 72 over 32/64), P = 48, 56, 80 (padded to 64/128 columns in the kernel),
W = 4 and 2, an unroll that does not divide the chunk, x as a token-strided half of in_proj's
(batch, L, 2E) output, bf16/fp16/fp32, batch 1 and 3.

u is checked against the twin computed in float64 on the same (exactly upcast) inputs and
rounded to x's dtype (one rounding of nearly the same value); x_dbl against the float64
product of the kernel's OWN rounded u with p, rounded to x's dtype (what the kernel computes up
to its fp32 summation order), and loosely against the twin's x_dbl.
"""
import pytest
import torch
import torch.nn.functional as F

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_conv_xproj as mod  # noqa: E402
from vim_mm.ops.triton_conv_xproj import conv_xproj, conv_xproj_torch  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'


def make_inputs(batch, L, E, P, width=4, dtype=torch.bfloat16, layout='in_proj', seed=0,
                weight_shape='conv'):
    """x (batch, L, E), both directions' conv taps/biases (fp32, as the mixer passes them) and
    x_proj weights (P, E) in x's dtype. layout 'in_proj': x is the first half of a
    (batch, L, 2E) tensor (token stride 2E); 'contiguous': a plain tensor."""
    g = torch.Generator().manual_seed(seed)
    if layout == 'contiguous':
        x = torch.randn(batch, L, E, generator=g).to(DEVICE, dtype)
    else:
        x = torch.randn(batch, L, 2 * E, generator=g).to(DEVICE, dtype)[..., :E]
    w_f, w_b = (torch.randn(E, 1, width, generator=g) for _ in range(2))
    if weight_shape == 'flat':
        w_f, w_b = w_f[:, 0], w_b[:, 0]
    b_f, b_b = torch.randn(E, generator=g), torch.randn(E, generator=g)
    p_f, p_b = (torch.randn(P, E, generator=g) / E ** 0.5 for _ in range(2))
    return (x, *(t.to(DEVICE) for t in (w_f, b_f, w_b, b_b)),
            *(p.to(DEVICE, dtype) for p in (p_f, p_b)))


def check(outs, x, w_f, b_f, w_b, b_b, p_f, p_b):
    batch, L, E = x.shape
    P = p_f.shape[0]
    assert len(outs) == 4
    for out, shape in zip(outs, ((batch, L, E), (batch, L, E), (batch, L, P), (batch, L, P))):
        assert out.shape == shape and out.dtype == x.dtype and out.is_contiguous()
        assert out.device == x.device
    want = conv_xproj_torch(*(t.double() for t in (x, w_f, b_f, w_b, b_b, p_f, p_b)))
    fp32 = x.dtype == torch.float32
    tight = dict(atol=1e-5, rtol=1e-5) if fp32 else {}  # else the dtype's assert_close default
    for got, exp in zip(outs[:2], want[:2]):  # u: one rounding of the same value
        torch.testing.assert_close(got, exp.to(x.dtype), **tight)
    for got, u, p in zip(outs[2:], outs[:2], (p_f, p_b)):  # x_dbl: the dot of the rounded u
        torch.testing.assert_close(got, F.linear(u.double(), p.double()).to(x.dtype), **tight)
    # and the twin's own x_dbl (u unrounded there): within 16-bit tolerance, fp32 tight
    loose = dict(atol=1e-5, rtol=1e-5) if fp32 else dict(atol=2e-2, rtol=2e-2)
    for got, exp in zip(outs[2:], want[2:]):
        torch.testing.assert_close(got.double(), exp, **loose)


@run_here
@pytest.mark.parametrize('batch,L,E,P,width,dtype,settings', [
    # Vim-Ti's P; 3 partial chunks of 16, E 72 over 32-channel blocks and 32-wide K steps
    (3, 37, 72, 48, 4, torch.bfloat16, dict(chunk_l=16, block_e=32, block_k=32, unroll=4)),
    # Vim-S's P; W = 2; 3 chunks of 32, unroll 3 not dividing them, K steps of 16 over 40
    (1, 70, 40, 56, 2, torch.float16, dict(chunk_l=32, block_e=32, block_k=16, unroll=3)),
    # Vim-B's P (128 columns); L = 1 < W; defaults (block_e 64 = all 40 channels)
    (1, 1, 40, 80, 4, torch.bfloat16, {}),
    # L = 3 < W, W = 2, fp32 (ieee dot); 72 channels over 64, one row per step
    (3, 3, 72, 48, 2, torch.float32, dict(block_e=64, unroll=1)),
    # fp32 over two chunks of 64 with the default steps (70 tokens, 72 channels, P = 80)
    (1, 70, 72, 80, 4, torch.float32, {}),
    # bf16, W = 2, batch 3, P = 56, blocks wider than the 40 channels (shrunk to 64)
    (3, 37, 40, 56, 2, torch.bfloat16, dict(chunk_l=16, block_e=128, block_k=64, unroll=8)),
    # fp16, batch 3, 70 tokens in one chunk of 128, 72 channels over 16 on 2 warps, P = 80
    (3, 70, 72, 80, 4, torch.float16, dict(chunk_l=128, block_e=16, num_warps=2)),
])
def test_kernel_matches_the_twin(batch, L, E, P, width, dtype, settings):
    args = make_inputs(batch, L, E, P, width, dtype, seed=L + E + P + width)
    assert args[0].stride(1) == 2 * E and args[0].stride(2) == 1
    check(conv_xproj(*args, **settings), *args)


@run_here
def test_layouts_and_weight_shapes():
    """A contiguous x with (E, W) taps; a channel-strided x (an (L, E) transpose) is copied
    first, as bidirectional_conv does."""
    args = make_inputs(2, 19, 40, 48, dtype=torch.bfloat16, layout='contiguous',
                       weight_shape='flat', seed=1)
    check(conv_xproj(*args, chunk_l=16), *args)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 19, generator=g).to(DEVICE, torch.bfloat16).transpose(1, 2)
    assert x.stride(2) != 1
    args = (x, *args[1:])
    check(conv_xproj(*args, chunk_l=16, num_warps=2), *args)


@run_here
def test_the_16_bit_twin_agrees_loosely():
    """The twin itself in bf16 (conv, SiLU and x_proj in bf16, as the mixer runs them) rounds
    the taps and the conv output before the SiLU: a few bf16 ulps from the kernel."""
    x, *params = make_inputs(2, 37, 72, 48, seed=3)
    params = [t.to(x.dtype) for t in params]  # the twin rounds the taps to x's dtype anyway
    got = conv_xproj(x, *params, chunk_l=16, block_e=32)
    want = conv_xproj_torch(x, *params)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16
        scale = b.float().abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), atol=0.02 * scale, rtol=0.03)


@run_here
def test_empty_inputs():
    outs = conv_xproj(*make_inputs(2, 0, 8, 48))
    assert [tuple(o.shape) for o in outs] == [(2, 0, 8), (2, 0, 8), (2, 0, 48), (2, 0, 48)]
    outs = conv_xproj(*make_inputs(1, 5, 0, 48))  # no channels: x_dbl of nothing is zero
    assert [tuple(o.shape) for o in outs] == [(1, 5, 0), (1, 5, 0), (1, 5, 48), (1, 5, 48)]
    assert not outs[2].any() and not outs[3].any()


@run_here
def test_bad_inputs_are_refused():
    x, w_f, b_f, w_b, b_b, p_f, p_b = make_inputs(1, 6, 16, 48)
    fn = conv_xproj
    with pytest.raises(ValueError, match=r'x must be \(batch, L, E\)'):
        fn(x[0], w_f, b_f, w_b, b_b, p_f, p_b)
    with pytest.raises(ValueError, match='bf16, fp16 or fp32'):
        fn(x.double(), w_f, b_f, w_b, b_b, p_f.double(), p_b.double())
    with pytest.raises(ValueError, match='w_f'):
        fn(x, w_f[:8], b_f, w_b, b_b, p_f, p_b)
    with pytest.raises(ValueError, match='w_b'):
        fn(x, w_f, b_f, w_b[..., :2], b_b, p_f, p_b)  # a width other than w_f's
    wide = torch.zeros(16, 1, 5, device=DEVICE)
    with pytest.raises(ValueError, match='widths 1 to 4, got 5'):
        fn(x, wide, b_f, wide, b_b, p_f, p_b)
    with pytest.raises(ValueError, match='b_b'):
        fn(x, w_f, b_f, w_b, b_b[:15], p_f, p_b)
    with pytest.raises(ValueError, match=r'should both be \(P, 16\)'):
        fn(x, w_f, b_f, w_b, b_b, p_f[:, :8], p_b[:, :8])  # not x's E
    with pytest.raises(ValueError, match=r'should both be \(P, 16\)'):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b[:40])  # different P
    with pytest.raises(ValueError, match=r'should both be \(P, 16\)'):
        fn(x, w_f, b_f, w_b, b_b, p_f[0], p_b[0])  # not 2-d
    with pytest.raises(ValueError, match="x's dtype"):
        fn(x, w_f, b_f, w_b, b_b, p_f.float(), p_b)
    with pytest.raises(ValueError, match="x's dtype"):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b.half())
    with pytest.raises(ValueError, match='chunk_l must be a power of 2 >= 16'):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b, chunk_l=8)
    with pytest.raises(ValueError, match='block_k must be a power of 2 >= 16'):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b, block_k=24)
    with pytest.raises(ValueError, match='block_e must be a power of 2'):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b, block_e=48)
    with pytest.raises(ValueError, match='unroll'):
        fn(x, w_f, b_f, w_b, b_b, p_f, p_b, unroll=0)


@run_here
def test_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.setattr(mod, 'INTERPRET', False)
    args = [t.cpu() for t in make_inputs(1, 6, 16, 48)]
    with pytest.raises(RuntimeError, match='CUDA tensor'):
        conv_xproj(*args)


@pytest.mark.skipif(not STALE_TRITON, reason='this process already runs the tests directly')
def test_in_fresh_process():
    """Another test module imported triton first: run this file where the interpreter is on."""
    run_in_fresh_process(__file__)
