"""The output feature map (residual add + final RMSNorm + transpose) in one Triton kernel against
its PyTorch twin, and the backbone taking it exactly where it applies; on CPU via Triton's
interpreter. Everything is float32 after the add, so the tolerances are float32 rounding."""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_featmap as fm  # noqa: E402
from vim_mm import VisionMamba  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'


@run_here
@pytest.mark.parametrize('batch, grid, C, dtype, norm, options', [
    (2, (5, 7), 40, torch.bfloat16, True, {}),      # 35 tokens: a partial token block; C < 64
    (1, (8, 8), 192, torch.float16, True, {}),      # Vim-Ti width (padded to 256)
    (3, (4, 6), 24, torch.float32, False, {}),      # an intermediate output: no norm
    (2, (9, 9), 384, torch.bfloat16, True, dict(block_t=16, num_warps=8)),
    (2, (5, 7), 40, torch.bfloat16, True, dict(cls_token=True)),   # row 17 of 36 left out
    (1, (4, 4), 24, torch.float32, False, dict(cls_token=True, block_t=8)),
])
def test_kernel_matches_the_twin(batch, grid, C, dtype, norm, options):
    g = torch.Generator().manual_seed(C + grid[0])
    L = grid[0] * grid[1] + int(options.get('cls_token', False))
    residual = torch.randn(batch, L, C, generator=g) * 3
    x = torch.randn(batch, L, C, generator=g).to(dtype)
    weight = torch.rand(C, generator=g) + 0.5 if norm else None
    got = fm.add_norm_to_featmap(residual.to(DEVICE), x.to(DEVICE),
                                 None if weight is None else weight.to(DEVICE), 1e-5, grid,
                                 **options)
    want = fm.add_norm_to_featmap_torch(residual.double(), x.double(),
                                        None if weight is None else weight.double(), 1e-5, grid,
                                        options.get('cls_token', False))
    assert got.shape == (batch, C, *grid) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-5)


@run_here
def test_mismatched_inputs_are_refused():
    r = torch.zeros(1, 12, 8, device=DEVICE)
    with pytest.raises(ValueError, match='must match'):
        fm.add_norm_to_featmap(r, r[:, :6], None, 1e-5, (3, 4))
    with pytest.raises(ValueError, match='grid'):
        fm.add_norm_to_featmap(r, r, None, 1e-5, (3, 5))
    with pytest.raises(ValueError, match='float32 residual'):
        fm.add_norm_to_featmap(r.half(), r.half(), None, 1e-5, (3, 4))
    big = torch.empty(2 ** 12, 2 ** 12, 2 ** 8, device='meta')  # 2^32 elements
    with pytest.raises(ValueError, match='32 bits'):
        fm.add_norm_to_featmap(big, big, None, 1e-5, (2 ** 6, 2 ** 6))


def features(model, image, calls, autocast=torch.bfloat16):
    with torch.no_grad(), torch.autocast(DEVICE, dtype=autocast):
        outs = model(image.to(DEVICE))
    return outs, len(calls)


@run_here
@pytest.mark.parametrize('cls', [False, True])
def test_backbone_outputs_through_the_kernel_where_it_applies(monkeypatch, cls):
    """Feature maps on the Triton path at inference come from the kernel (every output index,
    the normed last one too; a class token left out) and equal the PyTorch lines'; in grad mode,
    for class-token outputs or on the PyTorch path they do not."""
    calls = []
    kernel = fm.add_norm_to_featmap
    monkeypatch.setattr(fm, 'add_norm_to_featmap',
                        lambda *a, **k: calls.append(a[2] is not None) or kernel(*a, **k))
    torch.manual_seed(0)
    arch = dict(embed_dims=32, num_layers=2, d_state=4)
    model = VisionMamba(arch, img_size=32, backend='triton', out_indices=(0, 1),
                        with_cls_token=cls).to(DEVICE)
    model.eval()
    with torch.no_grad():
        model.norm_f.weight.uniform_(0.5, 1.5)
    image = torch.randn(2, 3, 32, 48)
    fused, n = features(model, image, calls)
    assert n == 2 and calls == [False, True]  # two layers: index 1 is the normed last
    monkeypatch.setattr(model, '_fused_featmap', lambda residual, x, scale: False)
    plain, n = features(model, image, calls)
    assert n == 2
    for a, b in zip(fused, plain):
        assert a.shape == b.shape == (2, model.embed_dims, 2, 3)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    stream = torch.zeros(2, 6, model.embed_dims, device=DEVICE)
    with torch.no_grad():
        assert model._fused_featmap(stream, stream, None)
        assert not model._fused_featmap(stream, stream, torch.ones(2, device=DEVICE))  # drop path
        assert not model._fused_featmap(stream.double(), stream, None)  # a float64 stream
        big = torch.empty(2 ** 12, 2 ** 12, 2 ** 8, device='meta')  # past 32-bit offsets
        assert not model._fused_featmap(big, big, None)
    assert not model._fused_featmap(stream, stream, None)  # grad mode
    with torch.no_grad():
        for other in (VisionMamba('demo', backend='triton', with_cls_token=True,
                                  out_type='cls_token'),
                      VisionMamba('demo', backend='torch')):
            assert not other.to(DEVICE)._fused_featmap(stream, stream, None)


@pytest.mark.skipif(not STALE_TRITON, reason='the tests above ran in this process')
def test_in_fresh_process():
    run_in_fresh_process(__file__)
