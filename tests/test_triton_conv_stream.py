"""The streaming bidirectional conv kernel (``impl='stream'``) against the PyTorch twin and the
tile kernel, on CPU via Triton's interpreter.

Small shapes so that every path runs quickly: a sequence shorter than one chunk (L = 1, 3), a
length that is not a multiple of the chunk (37, 197, 1025), several chunks (halos crossing chunk
borders), a channel count that is not a multiple of the channel block (40 over 32, 12 over 8),
x as a token-strided half of in_proj's (batch, L, 2E) output, fp32/bf16/fp16 activations,
weights (E, 1, W) or (E, W), narrower filters, and a few block/warp/pipeline settings.
"""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_conv as triton_conv  # noqa: E402
from vim_mm.ops.triton_conv import bidirectional_conv, bidirectional_conv_torch  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'


def make_inputs(batch, L, E, width=4, dtype=torch.float32, layout='in_proj', seed=0,
                weight_shape='conv'):
    """x (batch, L, E) and both directions' taps/biases; layout 'in_proj' takes x as the first
    half of a (batch, L, 2E) tensor (token stride 2E), 'z' the second half, 'contiguous' a
    plain tensor."""
    g = torch.Generator().manual_seed(seed)
    if layout == 'contiguous':
        x = torch.randn(batch, L, E, generator=g).to(DEVICE, dtype)
    else:  # moved before slicing: .to() of a strided view makes it contiguous on a GPU
        xz = torch.randn(batch, L, 2 * E, generator=g).to(DEVICE, dtype)
        x = xz[..., :E] if layout == 'in_proj' else xz[..., E:]
    w_f, w_b = torch.randn(E, 1, width, generator=g), torch.randn(E, 1, width, generator=g)
    if weight_shape == 'flat':
        w_f, w_b = w_f[:, 0], w_b[:, 0]
    b_f, b_b = torch.randn(E, generator=g), torch.randn(E, generator=g)
    return [x] + [t.to(DEVICE, dtype) for t in (w_f, b_f, w_b, b_b)]


def reference(x, w_f, b_f, w_b, b_b):
    """The twin in fp32 on the (exactly upcast) inputs, rounded to x's dtype."""
    outs = bidirectional_conv_torch(x.float(), w_f.float(), b_f.float(), w_b.float(), b_b.float())
    return [o.to(x.dtype) for o in outs]


def check(outs, expected, x):
    for out, exp in zip(outs, expected):
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        if x.dtype == torch.float32:
            torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)
        else:  # one rounding of the same fp32 value; assert_close's bf16/fp16 tolerances
            torch.testing.assert_close(out, exp)


@run_here
@pytest.mark.parametrize('batch,L,E,block_e,chunk_l', [
    (2, 1, 40, 32, 8),     # one token, E not a multiple of the channel block
    (1, 3, 8, 8, 16),      # L shorter than the chunk and than the window
    (2, 37, 40, 32, 16),   # several chunks, L not a multiple of the chunk, ragged channels
    (1, 197, 12, 8, 64),   # Vim-like odd length, 4 chunks
    (1, 1025, 4, 4, 512),  # a long odd sequence, the last chunk one token long
])
def test_stream_matches_twin_and_tile(batch, L, E, block_e, chunk_l):
    """fp32, x a token-strided half of in_proj's output: the stream kernel against the twin,
    and against the tile kernel (same summation order: equal within fp32 rounding)."""
    x, *params = make_inputs(batch, L, E)
    assert x.stride(1) == 2 * E
    outs = bidirectional_conv(x, *params, block_e=block_e, impl='stream', chunk_l=chunk_l)
    check(outs, reference(x, *params), x)
    tile = bidirectional_conv(x, *params, block_l=8, block_e=block_e, impl='tile')
    for out, t in zip(outs, tile):
        torch.testing.assert_close(out, t, atol=1e-6, rtol=1e-6)


@run_here
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('L', [3, 45])
def test_stream_half_precision(dtype, L):
    """16-bit activations and weights: outputs in x's dtype from fp32 accumulation."""
    x, *params = make_inputs(2, L, 40, dtype=dtype, seed=1)
    outs = bidirectional_conv(x, *params, block_e=16, impl='stream', chunk_l=16)
    check(outs, reference(x, *params), x)


@run_here
@pytest.mark.parametrize('layout,weight_shape', [('contiguous', 'flat'), ('z', 'conv'),
                                                 ('in_proj', 'flat')])
def test_stream_layouts_and_weight_shapes(layout, weight_shape):
    """Contiguous x, x as the second half of a (batch, L, 2E) tensor, and (E, W) weights."""
    x, *params = make_inputs(2, 19, 12, layout=layout, weight_shape=weight_shape, seed=2)
    outs = bidirectional_conv(x, *params, block_e=8, impl='stream', chunk_l=8)
    check(outs, reference(x, *params), x)


@run_here
def test_stream_channel_strided_x_is_made_contiguous():
    """A channel stride other than 1 (an (L, E) transpose) is copied first, as for 'tile'."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 10, 9, generator=g).to(DEVICE).transpose(1, 2)  # channel stride 9
    _, *params = make_inputs(2, 9, 10, seed=3)
    outs = bidirectional_conv(x, *params, block_e=8, impl='stream', chunk_l=4)
    check(outs, reference(x, *params), x)


@run_here
@pytest.mark.parametrize('block_e,chunk_l,num_warps,unroll', [
    (64, 8, 2, 1), (16, 32, 1, 8), (128, 4, 4, 3), (8, 4, 1, 8)])
def test_stream_block_settings(block_e, chunk_l, num_warps, unroll):
    """The sweepable knobs: a channel block larger than E, tiny chunks, warps, and tokens per
    loop step (1; 8 dividing the chunk; 3 not dividing it; 8 longer than the chunk)."""
    x, *params = make_inputs(2, 29, 40, seed=4)
    outs = bidirectional_conv(x, *params, block_e=block_e, impl='stream', chunk_l=chunk_l,
                              num_warps=num_warps, unroll=unroll)
    check(outs, reference(x, *params), x)


@run_here
@pytest.mark.parametrize('width', [2, 3])
def test_stream_narrower_filters(width):
    """W < 4 runs the W = 4 window with leading zero taps."""
    x, *params = make_inputs(1, 21, 12, width=width, seed=5)
    outs = bidirectional_conv(x, *params, block_e=8, impl='stream', chunk_l=8)
    check(outs, reference(x, *params), x)


@run_here
def test_impl_selection(monkeypatch):
    """impl=None reads DEFAULT_IMPL at call time; W > 4 refuses 'stream' and defaults to 'tile'."""
    assert triton_conv.DEFAULT_IMPL in ('tile', 'stream')
    x, *params = make_inputs(1, 6, 8, seed=6)
    monkeypatch.setattr(triton_conv, 'DEFAULT_IMPL', 'bogus')
    with pytest.raises(ValueError, match='impl'):
        bidirectional_conv(x, *params)
    monkeypatch.setattr(triton_conv, 'DEFAULT_IMPL', 'stream')
    check(bidirectional_conv(x, *params, block_e=8, chunk_l=4), reference(x, *params), x)
    x5, *params5 = make_inputs(1, 6, 8, width=5, seed=6)
    with pytest.raises(ValueError, match='stream'):
        bidirectional_conv(x5, *params5, impl='stream')
    check(bidirectional_conv(x5, *params5, block_l=4), reference(x5, *params5), x5)
    # 16-bit x with W > 4: the default SiLU follows the tile kernel it falls back to (exact)
    x5h = x5.to(torch.bfloat16)
    check(bidirectional_conv(x5h, *params5, block_l=4), reference(x5h, *params5), x5h)


@run_here
@pytest.mark.parametrize('silu', ['exp', 'tanh'])
def test_stream_approximate_silu(silu):
    """The MUFU SiLUs in bf16: within assert_close's bf16 tolerances of the twin, element by
    element, for pre-activations from about -9 to 8 (27 forward ones below -6, where
    1 + tanh(x / 2) cancels) on the GPU; the interpreter computes them exactly."""
    x, *params = make_inputs(2, 45, 40, dtype=torch.bfloat16, seed=7)
    outs = bidirectional_conv(x, *params, block_e=16, impl='stream', chunk_l=16, silu=silu)
    expected = reference(x, *params)
    assert min(e.float().min().item() for e in expected) < -0.2  # the negative tail is tested
    check(outs, expected, x)


@run_here
def test_outputs_are_one_stacked_tensor():
    """(u_f, u_b) as the halves of one (2, batch, L, E) tensor (one batched x_proj GEMM)."""
    x, *params = make_inputs(2, 9, 8, seed=8)
    u = bidirectional_conv(x, *params, block_e=8, impl='stream', chunk_l=4)
    assert u.shape == (2, 2, 9, 8) and u.is_contiguous()
    check(u, reference(x, *params), x)
    with pytest.raises(ValueError, match='silu'):
        bidirectional_conv(x, *params, silu='fast')
    with pytest.raises(ValueError, match='stream'):
        bidirectional_conv(x, *params, impl='tile', silu='tanh')


@run_here
def test_stream_empty_sequence():
    x, *params = make_inputs(2, 0, 8)
    u_f, u_b = bidirectional_conv(x, *params, impl='stream')
    assert u_f.shape == u_b.shape == (2, 0, 8)


@run_here
def test_mixer_inference_with_stream_default(monkeypatch):
    """The Triton mixer's no-grad path with DEFAULT_IMPL flipped to 'stream' (what the flip
    after GPU timing will do) still equals the PyTorch mixer."""
    from vim_mm.models.mixer import BiMambaMixer
    torch.manual_seed(0)
    ref = BiMambaMixer(16, d_state=4, expand=2, backend='torch').to(DEVICE)
    fast = BiMambaMixer(16, d_state=4, expand=2, backend='triton').to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    h = torch.randn(2, 13, 16, device=DEVICE)
    monkeypatch.setattr(triton_conv, 'DEFAULT_IMPL', 'stream')
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)  # the PyTorch conv in fp32
    with torch.no_grad():
        torch.testing.assert_close(fast(h), ref(h), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not STALE_TRITON, reason='this process already runs the tests directly')
def test_in_fresh_process():
    """Another test module imported triton first: run this file where the interpreter is on."""
    run_in_fresh_process(__file__)
