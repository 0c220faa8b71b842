"""The fused conv + x_proj kernel's host side: its source compiles (NVRTC, no GPU needed) for
Vim-Ti and Vim-S within the shared memory that MIN_BLOCKS blocks per SM allow, the stacked conv
weights and the PyTorch twin follow the conv's definition, the choice and the refusals. On a GPU
the mixer's fused branch is checked against the pair it replaces.

The kernel's logic runs on the CPU in tests/test_cuda_conv_xproj_emulated.py; its speed is in
benchmarks/README.md (``benchmarks/gpu_layer_ops.py --ops conv_xproj``)."""
import pytest
import torch
import torch.nn.functional as F
from _cuda_host import nvrtc

from vim_mm.ops import cuda_conv_xproj as cx
from vim_mm.ops.triton_conv import bidirectional_conv_torch

SM_SHARED_BYTES = 228 * 1024  # sm_90: per SM, 1 KB of it reserved per block
RESERVED_SMEM = 1024


@pytest.mark.parametrize('E, P', [(384, 48), (768, 56)])  # Vim-Ti, Vim-S (x_proj rows padded)
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('tile', [cx.WIDE, cx.NARROW], ids=['wide', 'narrow'])
def test_kernel_compiles_for_vim_within_the_blocks_per_sm(E, P, dtype, tile):
    source = cx.source_defines(E, P, dtype, tile) + cx.kernel_text(cx.SOURCE)
    cubin, _ = nvrtc()(source, 'vim_conv_xproj', '90')
    assert b'vim_conv_xproj' in cubin
    assert tile.min_blocks * (cx.smem_bytes(E, P, tile) + RESERVED_SMEM) <= SM_SHARED_BYTES


def test_the_wide_tile_where_its_grid_fills_every_sm_twice(monkeypatch):
    monkeypatch.setattr(cx, 'TILE', None)
    assert cx.tile_for(16, 4097, 132) == cx.WIDE       # 1024 px b16: 1040 blocks
    assert cx.tile_for(128, 197, 132) == cx.WIDE       # 224 px b128: 512
    assert cx.tile_for(1, 4097, 132) == cx.NARROW      # 1024 px b1: 65 blocks of 64 tokens
    assert cx.tile_for(2, 8193, 132) == cx.NARROW      # 258 < 264
    assert cx.tile_for(2, 8193, 128) == cx.WIDE
    monkeypatch.setattr(cx, 'TILE', cx.NARROW)         # the benchmarks' override
    assert cx.tile_for(16, 4097, 132) == cx.NARROW


def test_choice_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(cx.ENV_VAR, raising=False)
    assert cx.conv_xproj_choice() == 'fused'
    monkeypatch.setenv(cx.ENV_VAR, 'Pair')
    assert cx.conv_xproj_choice() == 'pair'
    monkeypatch.setenv(cx.ENV_VAR, 'both')
    with pytest.raises(ValueError, match=cx.ENV_VAR):
        cx.conv_xproj_choice()


@pytest.mark.parametrize('width', [4, 3, 2])
def test_stacked_weights_are_halved_and_the_twin_is_the_conv_then_x_proj(width):
    g = torch.Generator().manual_seed(width)
    E, P = 16, 8
    w_f, w_b = (torch.randn(E, 1, width, generator=g) for _ in range(2))
    b_f, b_b = (torch.randn(E, generator=g) for _ in range(2))
    taps, bias = cx.stack_conv_weights(w_f, b_f, w_b, b_b)
    assert taps.shape == (2, E, cx.WIDTH) and bias.shape == (2, E)
    assert taps.dtype == bias.dtype == torch.float32
    # leading zero taps for narrower convs, every value halved (exactly: a power of two)
    assert torch.equal(taps[:, :, :cx.WIDTH - width], torch.zeros(2, E, cx.WIDTH - width))
    assert torch.equal(2 * taps[0, :, cx.WIDTH - width:], w_f[:, 0])
    assert torch.equal(2 * bias, torch.stack([b_f, b_b]))
    x = torch.randn(2, 9, E, generator=g)
    x_proj = torch.randn(2, P, E, generator=g)
    u, xd = cx.conv_xproj_reference(x, taps, bias, x_proj)
    want = bidirectional_conv_torch(x, w_f, b_f, w_b, b_b)
    for d in range(2):
        torch.testing.assert_close(u[d], want[d])
        torch.testing.assert_close(xd[d], F.linear(want[d], x_proj[d]))


def test_wider_convs_are_kept_and_refused():
    E = cx.CHANNELS  # what the kernel would take but for the width
    w = torch.randn(E, 1, 5)
    taps, bias = cx.stack_conv_weights(w, torch.zeros(E), w, torch.zeros(E))
    assert taps.shape[-1] == 5  # not cut to the kernel's width
    x = torch.randn(1, 4, E, dtype=torch.bfloat16)
    x_proj = torch.zeros(2, 8, E, dtype=x.dtype)
    if torch.cuda.is_available():
        x, taps, bias, x_proj = x.cuda(), taps.cuda(), bias.cuda(), x_proj.cuda()
        assert cx.conv_xproj_applies(x, taps[..., 1:], x_proj) is None
        reason = 'width'
    else:
        reason = 'needs CUDA tensors'
    with pytest.raises(ValueError, match=reason):
        cx.conv_xproj(x, taps, bias, x_proj)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('arch, res', [('tiny', 224), ('small', 128)])
def test_mixer_fused_branch_matches_the_pair(arch, res, monkeypatch):
    """The model with the fused kernel (default) against the Triton conv + bmm pair, both with
    the CUDA C++ scan: the same u up to the order of x_proj's sums."""
    from vim_mm import VisionMamba
    monkeypatch.setenv('VIM_MM_INFER_SCAN', 'cuda')
    torch.manual_seed(0)
    model = VisionMamba(arch, img_size=res, backend='triton', out_indices=(3, 7, 11)).cuda().eval()
    image = torch.randn(2, 3, res, res, device='cuda')
    calls = []
    original = cx.conv_xproj
    monkeypatch.setattr(cx, 'conv_xproj', lambda *a: calls.append(1) or original(*a))
    outs = {}
    for choice in ('pair', 'fused'):
        monkeypatch.setenv(cx.ENV_VAR, choice)
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
            outs[choice] = [o.float() for o in model(image)]
    assert len(calls) == len(model.layers)  # once per layer, in the fused run only
    for got, want in zip(outs['fused'], outs['pair']):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
