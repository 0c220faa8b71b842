"""VisionMamba against the float64 Algorithm-1 reference, and its input/config handling."""
import pytest
import torch

from _reference import authors_state_dict, vim_forward
from vim_mm import VisionMamba
from vim_mm.models.layers import insert_middle, resize_pos_grid, split_middle

TINY = dict(embed_dims=32, num_layers=2, d_state=4)


def model_from(sd, **kwargs):
    model = VisionMamba(arch=TINY, img_size=48, **kwargs).double().eval()
    model.load_state_dict({k: v for k, v in sd.items() if k in model.state_dict()}, strict=True)
    return model


def test_classification_forward_matches_reference():
    sd = authors_state_dict(grid=3, num_classes=0)
    model = model_from(sd, with_cls_token=True, out_type='cls_token')
    image = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    out = model(image)[0]
    for b in range(2):
        torch.testing.assert_close(out[b], vim_forward(sd, image[b]), rtol=1e-9, atol=1e-9)


def test_dense_multi_level_forward_matches_reference():
    sd = authors_state_dict(grid=3, num_classes=0, with_cls_token=False)
    model = model_from(sd, out_indices=(0, 1))
    image = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    outs = model(image)
    refs = vim_forward(sd, image[0], with_cls_token=False, out_layers=(0, 1))
    assert [o.shape for o in outs] == [(1, 32, 3, 3)] * 2
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out[0].flatten(1).t(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('hw,grid', [((64, 96), (4, 6)), ((50, 37), (4, 3)), ((16, 16), (1, 1)),
                                     ((33, 128), (3, 8))])
def test_any_input_size(hw, grid):
    model = VisionMamba('demo', img_size=64, out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, *hw))
    assert [tuple(o.shape) for o in outs] == [(1, 64, *grid)] * 2
    assert all(torch.isfinite(o).all() for o in outs)


def test_padding_equals_explicit_zero_padding():
    model = VisionMamba('demo', img_size=64).eval()
    image = torch.randn(1, 3, 50, 37)
    padded = torch.nn.functional.pad(image, (0, 48 - 37, 0, 64 - 50))
    torch.testing.assert_close(model(image)[0], model(padded)[0])


def test_stride_8_long_sequence_model_grid():
    model = VisionMamba('demo', img_size=224, stride=8, with_cls_token=True).eval()
    assert model.pos_embed.shape[1] == 27 * 27 + 1  # 730 as in the authors' release
    assert model(torch.randn(1, 3, 64, 80))[0].shape == (1, 64, 7, 9)


def test_pos_embed_helpers_round_trip():
    pos = torch.randn(1, 10, 4)
    grid, slot = split_middle(pos)
    torch.testing.assert_close(insert_middle(grid, slot), pos)
    torch.testing.assert_close(slot, pos[:, 4:5])
    same = torch.randn(1, 12, 4)
    assert resize_pos_grid(same, (3, 4), (3, 4)) is same
    # a linear field survives 14x14 -> 20x20 -> 14x14 (interior: bicubic reproduces it)
    ii, jj = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing='ij')
    field = torch.stack([ii, jj, ii + jj], -1).reshape(1, 196, 3)
    back = resize_pos_grid(resize_pos_grid(field, (14, 14), (20, 20)), (20, 20), (14, 14))
    inner = (back - field).reshape(14, 14, 3)[3:-3, 3:-3]
    assert inner.abs().max() < 1e-2


def test_with_cp_matches_plain():
    """Also with stochastic depth: the draws are not part of what is recomputed."""
    torch.manual_seed(0)
    model = VisionMamba('demo', img_size=32, out_indices=(1, 3), drop_path_rate=0.5)
    image = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    outs = model(image)
    loss = sum(o.square().mean() for o in outs)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.with_cp = True
    torch.manual_seed(1)
    outs_cp = model(image)
    grads_cp = torch.autograd.grad(sum(o.square().mean() for o in outs_cp), list(model.parameters()))
    for a, b in zip(outs, outs_cp):
        torch.testing.assert_close(a, b)
    for a, b in zip(grads, grads_cp):
        torch.testing.assert_close(a, b)


def test_drop_path_only_in_training():
    torch.manual_seed(0)
    model = VisionMamba('demo', img_size=32, drop_path_rate=0.5)
    rates = [layer.drop_path.drop_prob for layer in model.layers]
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    image = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(image)[0], model(image)[0])
    model.train()
    assert not torch.allclose(model(image)[0], model(image)[0])


def test_fused_block_loop_is_the_residual_formula_with_drop_path():
    """The blocks run as (out, stream, scale) with each add moved into the next norm; in
    training with stochastic depth this must still be stream + drop(mixer(norm(stream)))
    per block, every returned level included (same random draws, same order)."""
    torch.manual_seed(0)
    model = VisionMamba('demo', img_size=32, drop_path_rate=0.6, out_indices=(1, 3),
                        out_type='raw').double().train()
    image = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    outs = model(image)
    torch.manual_seed(1)
    tokens, _ = model.patch_embed(image)
    stream = tokens + model.pos_embed
    expected = []
    for index, layer in enumerate(model.layers):
        out = layer.mixer(layer.norm(stream))
        scale = layer.drop_path.row_scale(out)
        stream = stream + (out if scale is None else out * scale[..., None])
        if index in (1, 3):
            expected.append(model.norm_f(stream) if index == 3 else stream)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(outs[-1], model.eval()(image)[-1])  # something was dropped


def test_rope_changes_features_and_handles_cls_and_odd_grids():
    torch.manual_seed(0)
    plain = VisionMamba('demo', img_size=32, with_cls_token=True, out_type='cls_token').eval()
    rope = VisionMamba('demo', img_size=32, with_cls_token=True, out_type='cls_token',
                       use_rope=True).eval()
    rope.load_state_dict(plain.state_dict())
    image = torch.randn(1, 3, 48, 32)
    assert not torch.allclose(plain(image)[0], rope(image)[0])
    assert torch.isfinite(rope(image)[0]).all()


def test_layer_depth_and_no_weight_decay():
    model = VisionMamba('demo')
    assert model.get_layer_depth('backbone.pos_embed', 'backbone.') == (0, 6)
    assert model.get_layer_depth('backbone.patch_embed.proj.weight', 'backbone.') == (0, 6)
    assert model.get_layer_depth('backbone.layers.2.mixer.A_log', 'backbone.') == (3, 6)
    assert model.get_layer_depth('backbone.norm_f.weight', 'backbone.') == (5, 6)
    assert model.get_layer_depth('decode_head.conv_seg.weight', 'backbone.') == (5, 6)
    names = model.no_weight_decay()
    assert {'pos_embed', 'layers.0.mixer.A_log', 'layers.0.mixer.A_b_log', 'layers.3.mixer.D',
            'layers.3.mixer.D_b'} <= names
    assert 'layers.0.mixer.in_proj.weight' not in names


@pytest.mark.parametrize('kwargs,match', [
    (dict(arch='huge'), 'Unknown Vim arch'),
    (dict(arch=dict(embed_dims=8)), 'embed_dims and num_layers'),
    (dict(arch=dict(embed_dims=8, num_layers=2, heads=3)), 'Unknown Vim arch keys'),
    (dict(out_indices=4), 'out of range'),
    (dict(out_type='cls_token'), 'with_cls_token'),
    (dict(out_type='pooled'), 'out_type'),
    (dict(init_cfg=dict(type='Kaiming')), 'Pretrained'),
    (dict(init_cfg=dict(type='Pretrained')), 'checkpoint'),
    (dict(init_cfg=dict(type='Pretrained', checkpoint='x.pth', strict=True)), 'unknown keys'),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionMamba(**{'arch': 'demo', **kwargs})


def test_bad_input_shape_raises():
    model = VisionMamba('demo')
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'):
        model(torch.randn(3, 32, 32))


@pytest.mark.parametrize('stride', [16, 8])
def test_patch_embed_is_the_padded_conv(stride):
    """Non-overlapping patches run as one GEMM over flattened patches (stride 8: the conv);
    either way the tokens are the conv of the zero-padded image, for sizes that need padding
    too, and under autocast they come out in its dtype."""
    from vim_mm.models.layers import PatchEmbed
    torch.manual_seed(0)
    embed = PatchEmbed(16, stride, 3, 24).double()
    for hw in ((64, 64), (50, 83), (16, 16)):
        image = torch.randn(2, 3, *hw, dtype=torch.float64)
        tokens, grid = embed(image)
        pad = [(g - 1) * stride + 16 - s for g, s in zip(grid, hw)]
        want = embed.proj(torch.nn.functional.pad(image, (0, pad[1], 0, pad[0])))
        assert tokens.shape == (2, grid[0] * grid[1], 24)
        torch.testing.assert_close(tokens, want.flatten(2).transpose(1, 2), rtol=1e-12, atol=1e-12)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        tokens, _ = embed.float()(torch.randn(1, 3, 32, 32))
    assert tokens.dtype == torch.bfloat16
