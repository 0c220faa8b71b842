"""Patch + position embedding in one Triton kernel against its PyTorch twin (float64), and the
backbone taking it exactly where it applies; on CPU via Triton's interpreter.

The tokens are rounded to the 16-bit dtype before the position is added (as F.linear returns
them), so kernel and twin may differ by one unit in the last place of a token where their sums
round differently: the tolerances are that rounding (the interpreter also rounds to bf16 by
truncation, torch to nearest). A wrong index is off by the size of the values.
"""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_patch_embed as pe  # noqa: E402
from vim_mm import VisionMamba  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'
TOL = {torch.float16: 5e-4, torch.bfloat16: 2e-2 if ON_CPU else 4e-3}


def make_inputs(batch, cin, h, w, n, patch, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    gh, gw = -(-h // patch), -(-w // patch)
    image = torch.randn(batch, cin, h, w, generator=g)
    weight = torch.randn(n, cin, patch, patch, generator=g) / (cin * patch * patch) ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    pos = torch.randn(1, gh * gw, n, generator=g)
    return image, weight, b, pos


@run_here
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('batch, cin, h, w, n, patch, options', [
    (2, 3, 64, 48, 40, 16, {}),                      # N not a multiple of the N block
    (1, 3, 70, 33, 24, 16, {}),                      # padded at the bottom and the right
    (2, 3, 16, 16 * 70, 64, 16, dict(block_m=64)),   # 70 patches in a row: M blocks cross it
    (5, 3, 40, 48, 40, 16, {}),                      # one M block over 5 images of 3 x 3 patches
    (3, 2, 32, 40, 192, 8, dict(rows=8)),           # 8x8 patches, three N blocks, 8 rows per K step
    (1, 3, 48, 48, 32, 16, dict(bias=False)),
    (2, 3, 32, 64, 96, 16, dict(block_m=16, block_n=32, rows=2, num_warps=2)),
    (2, 3, 48, 32, 256, 16, {}),                     # the wide-N defaults (block_n 128, 2 rows)
    (2, 3, 48, 80, 40, 16, dict(cls=True)),          # a class token in the middle (15 -> 16 rows)
    (3, 3, 40, 48, 24, 16, dict(cls=True, block_m=16)),  # 9 patches: the token after it shifts
])
def test_kernel_matches_the_twin(dtype, batch, cin, h, w, n, patch, options):
    options = dict(options)
    bias, cls = options.pop('bias', True), options.pop('cls', False)
    image, weight, b, pos = make_inputs(batch, cin, h, w, n, patch, seed=h + w + n, bias=bias)
    cls_token = torch.randn(1, 1, n) if cls else None
    if cls:
        pos = torch.cat([pos, torch.randn(1, 1, n)], dim=1)  # one more row
    got = pe.patch_embed_with_position(*(t if t is None else t.to(DEVICE)
                                         for t in (image, weight, b, pos)), patch, dtype,
                                       cls_token=None if cls_token is None else cls_token.to(DEVICE),
                                       **options)
    want = pe.patch_embed_with_position_torch(image.double(), weight.double(),
                                              None if b is None else b.double(), pos.double(),
                                              patch, dtype,
                                              None if cls_token is None else cls_token.double())
    assert got.dtype == torch.float32 and got.shape == want.shape
    err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
    assert err < TOL[dtype], err


@run_here
def test_mismatched_weights_and_position_are_refused():
    image, weight, b, pos = make_inputs(1, 3, 32, 32, 16, 16)
    args = [t.to(DEVICE) for t in (image, weight, b, pos)]
    with pytest.raises(ValueError, match='does not match'):
        pe.patch_embed_with_position(args[0], args[1][:, :2], args[2], args[3], 16, torch.float16)
    with pytest.raises(ValueError, match='pos'):
        pe.patch_embed_with_position(*args[:3], args[3][:, :3], 16, torch.float16)
    with pytest.raises(ValueError, match='bf16 or fp16'):
        pe.patch_embed_with_position(*args, 16, torch.float32)
    with pytest.raises(ValueError, match='rows=3 must divide'):
        pe.patch_embed_with_position(*args, 16, torch.float16, rows=3)
    with pytest.raises(TypeError, match='block_k'):
        pe.patch_embed_with_position(*args, 16, torch.float16, block_k=32)


def test_batches_past_32_bit_offsets_are_named():
    """The kernel addresses in 32 bits: the backbone falls back where the image or its tokens
    have 2^31 elements or more (shapes only: meta tensors)."""
    assert pe.offsets_fit(torch.empty(16, 3, 1024, 1024, device='meta'), 16, 192)
    assert not pe.offsets_fit(torch.empty(64, 3, 4096, 4096, device='meta'), 16, 192)
    assert not pe.offsets_fit(torch.empty(1, 3, 8192, 8192, device='meta'), 4, 2048)  # tokens


def embedded(model, image, dtype, calls):
    with torch.no_grad(), torch.autocast(DEVICE, dtype=dtype):
        return model._embed(image.to(DEVICE))[0], len(calls)


@run_here
@pytest.mark.parametrize('dtype, cls', [(torch.float16, False), (torch.bfloat16, False),
                                        (torch.bfloat16, True)])
def test_backbone_embeds_in_one_kernel_where_it_applies(monkeypatch, dtype, cls):
    """The Triton path at inference under a 16-bit autocast takes the kernel, with the same stream
    as the unfused lines (one resized position grid, a padded image, with or without a class
    token); anywhere else it does not."""
    calls = []
    kernel = pe.patch_embed_with_position
    monkeypatch.setattr(pe, 'patch_embed_with_position',
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch.manual_seed(0)
    model = VisionMamba('demo', img_size=64, backend='triton', with_cls_token=cls).to(DEVICE).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
        if cls:
            model.cls_token.normal_()
    image = torch.randn(2, 3, 70, 90)  # 5 x 6 patches, padded; grid differs from 4 x 4
    fused, n = embedded(model, image, dtype, calls)
    assert n == 1
    monkeypatch.setattr(model, '_fused_embedding_dtype', lambda x: None)
    plain, n = embedded(model, image, dtype, calls)
    assert n == 1 and fused.dtype == plain.dtype == torch.float32
    err = ((fused - plain).abs().max() / plain.abs().max()).item()
    assert err < TOL[dtype], err
    monkeypatch.undo()

    def fused_dtype(m, grad=False, autocast=dtype):
        with torch.set_grad_enabled(grad), torch.autocast(DEVICE, dtype=autocast,
                                                          enabled=autocast is not None):
            return m._fused_embedding_dtype(image.to(DEVICE))
    assert fused_dtype(model) == dtype
    assert fused_dtype(model, grad=True) is None          # training: autograd through PyTorch
    assert fused_dtype(model, autocast=None) is None      # float32: the F.linear precision
    torch_path = VisionMamba('demo', img_size=64, backend='torch').to(DEVICE).eval()
    assert fused_dtype(torch_path) is None


@pytest.mark.skipif(not STALE_TRITON, reason='the tests above ran in this process')
def test_in_fresh_process():
    run_in_fresh_process(__file__)
