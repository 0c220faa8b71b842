"""The backbone takes the twelfth session's fused kernels exactly where they apply, and its
features equal those of the unfused kernels: the block's add + RMSNorm + in_proj
(``triton_norm_linear``) and both directions' conv + x_proj (``triton_conv_xproj``). On CPU
via Triton's interpreter (the mixer then runs the Triton scan; on a GPU the C++ scan)."""
import pytest
import torch

# before triton is imported: decides whether its interpreter is on in this process
from _triton_interpreter import ON_CPU, STALE_TRITON, run_here, run_in_fresh_process

pytest.importorskip('triton')

import vim_mm.ops.triton_conv_xproj as cx  # noqa: E402
import vim_mm.ops.triton_norm_linear as nl  # noqa: E402
from vim_mm import VisionMamba  # noqa: E402
from vim_mm.models.mixer import BiMambaMixer  # noqa: E402

DEVICE = 'cpu' if ON_CPU else 'cuda'


def count_calls(monkeypatch, module, name, calls):
    kernel = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(name) or kernel(*a, **k))


def run(model, image, grad=False, dtype=torch.bfloat16):
    with torch.set_grad_enabled(grad), torch.autocast(DEVICE, dtype=dtype):
        return model(image.to(DEVICE))


@run_here
def test_backbone_takes_both_kernels_at_inference(monkeypatch):
    """Every block but the first (whose input is the float32 embedding, not a mixer's 16-bit
    output) fuses its add + norm into in_proj; every mixer fuses conv + x_proj. The features
    equal the unfused kernels' within bf16 rounding (the dots sum in another order)."""
    calls = []
    count_calls(monkeypatch, nl, 'add_norm_linear', calls)
    count_calls(monkeypatch, cx, 'conv_xproj', calls)
    torch.manual_seed(0)
    model = VisionMamba(dict(embed_dims=32, num_layers=3, d_state=4), img_size=32,
                        backend='triton', out_indices=(1, 2)).to(DEVICE).eval()
    image = torch.randn(2, 3, 32, 48)
    fused = run(model, image)
    assert sorted(calls) == ['add_norm_linear'] * 2 + ['conv_xproj'] * 3
    calls.clear()
    monkeypatch.setattr(BiMambaMixer, 'fuses_add_norm', lambda self, x, residual: False)
    monkeypatch.setattr(BiMambaMixer, '_fuses_conv_x_proj', lambda self, x: False)
    plain = run(model, image)
    assert calls == []
    for a, b in zip(fused, plain):
        assert a.shape == b.shape == (2, 32, 2, 3)
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)
        assert (a - b).abs().mean() < 3e-3 * b.abs().mean()


@run_here
def test_neither_kernel_where_it_does_not_apply(monkeypatch):
    """Grad mode (training), float32 inference (no 16-bit activations) and the PyTorch path run
    the unfused lines."""
    calls = []
    count_calls(monkeypatch, nl, 'add_norm_linear', calls)
    count_calls(monkeypatch, cx, 'conv_xproj', calls)
    torch.manual_seed(0)
    arch = dict(embed_dims=16, num_layers=2, d_state=4)
    image = torch.randn(1, 3, 32, 32)
    model = VisionMamba(arch, img_size=32, backend='triton').to(DEVICE).eval()
    run(model, image, grad=True)
    with torch.no_grad():
        model(image.to(DEVICE))  # no autocast: float32 activations
    run(VisionMamba(arch, img_size=32, backend='torch').to(DEVICE).eval(), image)
    assert calls == []
    mixer = model.layers[1].mixer
    x = torch.zeros(1, 4, 16, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert mixer.fuses_add_norm(x, torch.zeros(1, 4, 16, device=DEVICE))
        assert mixer.fuses_add_norm(x, None)
        assert not mixer.fuses_add_norm(x, torch.zeros(1, 4, 16, device=DEVICE).double())
        assert not mixer.fuses_add_norm(x.float(), None)
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.float16):
        assert not mixer.fuses_add_norm(x, None)  # in_proj would compute in fp16
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert not mixer.fuses_add_norm(x, None)  # grad mode


@pytest.mark.skipif(not STALE_TRITON, reason='the tests above ran in this process')
def test_in_fresh_process():
    run_in_fresh_process(__file__)
