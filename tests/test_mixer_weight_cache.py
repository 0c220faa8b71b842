"""BiMambaMixer's cache of the weights its CUDA C++-scan inference branch derives, on the CPU.

``_inference_weights`` equals the uncached expressions exactly, is rebuilt (in place where the
parameters keep their storages) after any parameter update, stays out of the state dict and
out of copies. The branch itself needs CUDA, so the forward tests take it on the CPU
(``forward_triton`` called directly) with the scan replaced by a stand-in (its PyTorch twin) and
compare with the branch as it was written before the cache: bit-identical outputs, and the scan
gets the cached tensors (``cuda_scan.kernel_direction``) without copies.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from vim_mm.models.mixer import BiMambaMixer
from vim_mm.ops import cuda_conv_xproj, cuda_scan, triton_conv

CPU = torch.device('cpu')


def make_mixer(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    mixer = BiMambaMixer(16, d_state=4, backend='triton')  # dt_rank 1: x_proj rows 9 -> 16
    with torch.no_grad():  # every parameter away from its init, so that every term matters
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer.to(dtype)


def uncached(mixer, dtype):
    """The expressions the branch evaluated at every call before the cache."""
    width = mixer.dt_rank + 2 * mixer.d_state
    dirs = mixer.direction_params(''), mixer.direction_params('_b')
    return dict(in_proj=mixer.in_proj.weight.to(dtype),
                x_proj=[F.pad(p['x_proj_w'], (0, 0, 0, -width % 8)).to(dtype) for p in dirs],
                out_proj=mixer.out_proj.weight.repeat(1, 2).to(dtype),
                fwd=[*cuda_scan._direction(dirs[0]),
                     *cuda_scan.kernel_weights(dirs[0]).values()],
                bwd=[*cuda_scan._direction(dirs[1]),
                     *cuda_scan.kernel_weights(dirs[1]).values()])


def assert_matches(weights, mixer, dtype):
    want = uncached(mixer, dtype)
    for got, ref in [(weights.in_proj, want['in_proj']), (weights.out_proj, want['out_proj']),
                     *zip(weights.x_proj, want['x_proj'])]:
        assert got.dtype == dtype and not got.requires_grad and torch.equal(got, ref)
    assert weights.x_proj[0].shape == (16, mixer.d_inner)
    for got, ref in [(weights.fwd, want['fwd']), (weights.bwd, want['bwd'])]:
        assert list(got) == ['dt_proj_w', 'dt_bias', 'A', 'D', *cuda_scan.KERNEL_KEYS]
        for (key, t), r in zip(got.items(), ref):
            assert t.dtype == (torch.float16 if key == 'kernel_w' else torch.float32)
            assert t.is_contiguous() and not t.requires_grad
            assert torch.equal(t, r)


@pytest.mark.parametrize('param_dtype,dtype', [(torch.float32, torch.float32),
                                               (torch.float32, torch.bfloat16),
                                               (torch.bfloat16, torch.bfloat16)])
def test_cached_weights_equal_the_uncached_expressions(param_dtype, dtype):
    mixer = make_mixer(param_dtype)
    assert_matches(mixer._inference_weights(CPU, dtype), mixer, dtype)


def test_repeated_calls_return_the_same_tensors():
    mixer = make_mixer()
    first = mixer._inference_weights(CPU, torch.bfloat16)
    tensors = first.tensors()
    again = mixer._inference_weights(CPU, torch.bfloat16)
    assert again is first and all(a is b for a, b in zip(again.tensors(), tensors))
    other = mixer._inference_weights(CPU, torch.float32)  # its own entry, the first one kept
    assert other is not first and mixer._inference_weights(CPU, torch.bfloat16) is first
    assert set(mixer._weight_cache.entries) == {(CPU, torch.bfloat16), (CPU, torch.float32)}


def update_add(mixer):
    with torch.no_grad():
        mixer.x_proj.weight.add_(1)
        mixer.A_b_log.add_(0.5)  # the cached A_b = -exp(A_b_log) must follow


def update_optimizer(mixer):
    opt = torch.optim.SGD(mixer.parameters(), lr=0.1)
    sum((p * p.detach().sin()).sum() for p in mixer.parameters()).backward()
    opt.step()


def update_load_state_dict(mixer):
    mixer.load_state_dict(make_mixer(seed=1).state_dict())


@pytest.mark.parametrize('update', [update_add, update_optimizer, update_load_state_dict])
def test_in_place_updates_refresh_the_cache_in_place(update):
    """Same storages, new versions: re-derived into the same tensors (a recorded CUDA graph
    reads them by address)."""
    mixer = make_mixer()
    before = mixer._inference_weights(CPU, torch.bfloat16)
    old_values = [t.clone() for t in before.tensors()]
    pointers = [t.data_ptr() for t in before.tensors()]
    update(mixer)
    after = mixer._inference_weights(CPU, torch.bfloat16)
    assert after is before and [t.data_ptr() for t in after.tensors()] == pointers
    assert_matches(after, mixer, torch.bfloat16)
    assert not torch.equal(after.x_proj[0], old_values[1])
    if update is not update_add:
        assert not torch.equal(after.in_proj, old_values[0])
        assert not torch.equal(after.out_proj, old_values[3])


def test_refresh_without_a_forward():
    """What a caller replaying a CUDA graph would do after updating the parameters in place."""
    mixer = make_mixer()
    cached = mixer._inference_weights(CPU, torch.bfloat16)
    a_f32 = mixer._inference_weights(CPU, torch.float32)
    update_load_state_dict(mixer)
    mixer.refresh_inference_weights()
    versions = [p._version for p in mixer.parameters()]
    for dtype, weights in ((torch.bfloat16, cached), (torch.float32, a_f32)):
        assert mixer._weight_cache.entries[(CPU, dtype)] == (versions, weights)
        assert_matches(weights, mixer, dtype)


@pytest.mark.parametrize('move', [lambda m: m.to(torch.float64), lambda m: m.half().float(),
                                  lambda m: m.bfloat16()])
def test_moved_parameters_rebuild_the_cache(move):
    """.to() / .half() re-allocate: everything is derived anew (the old storages are kept until
    then, so a new one cannot come back at an old address with stale values)."""
    mixer = make_mixer()
    mixer._inference_weights(CPU, torch.bfloat16)
    mixer._inference_weights(CPU, torch.float32)
    old = mixer._weight_cache.entries[(CPU, torch.bfloat16)][1]
    move(mixer)
    new = mixer._inference_weights(CPU, torch.bfloat16)
    assert new is not old and list(mixer._weight_cache.entries) == [(CPU, torch.bfloat16)]
    assert_matches(new, mixer, torch.bfloat16)


def test_refresh_reports_reallocation_and_counts_a_new_generation():
    """``refresh_inference_weights`` returns whether the cache had to be re-allocated (what a
    caller replaying CUDA graphs must then drop); only dropping tensors that were handed out
    counts, and each such drop advances the cache's ``generation``."""
    mixer = make_mixer()
    assert mixer.refresh_inference_weights() is False and mixer._weight_cache.generation == 0
    weights = mixer._inference_weights(CPU, torch.bfloat16)  # first build: nothing dropped
    mixer._inference_weights(CPU, torch.float32)
    assert mixer._weight_cache.generation == 0
    pointers = [t.data_ptr() for t in weights.tensors()]
    update_load_state_dict(mixer)
    assert mixer.refresh_inference_weights() is False  # in place
    assert mixer._weight_cache.entries[(CPU, torch.bfloat16)][1] is weights
    assert [t.data_ptr() for t in weights.tensors()] == pointers
    assert mixer._weight_cache.generation == 0
    mixer.to(torch.float64)
    assert mixer.refresh_inference_weights() is True
    generation = mixer._weight_cache.generation
    assert generation == 1
    assert set(mixer._weight_cache.entries) == {(CPU, torch.bfloat16), (CPU, torch.float32)}
    rebuilt = mixer._weight_cache.entries[(CPU, torch.bfloat16)][1]
    assert rebuilt is not weights
    assert_matches(rebuilt, mixer, torch.bfloat16)
    assert_matches(mixer._weight_cache.entries[(CPU, torch.float32)][1], mixer, torch.float32)
    assert mixer.refresh_inference_weights() is False  # settled
    assert mixer._weight_cache.generation == generation


def test_forced_refresh_sees_writes_through_data():
    """``p.data.copy_()`` (mmengine's EMA swaps weights so) bumps no version counter: the
    version-keyed cache cannot see it, a forced refresh re-derives in place."""
    mixer = make_mixer()
    weights = mixer._inference_weights(CPU, torch.bfloat16)
    pointers = [t.data_ptr() for t in weights.tensors()]
    other = make_mixer(seed=1)
    for p, q in zip(mixer.parameters(), other.parameters()):
        p.data.copy_(q.data)
    stale = mixer._inference_weights(CPU, torch.bfloat16)
    assert stale is weights
    assert not torch.equal(stale.in_proj, uncached(mixer, torch.bfloat16)['in_proj'])
    assert mixer.refresh_inference_weights() is False  # versions unchanged: nothing done
    assert not torch.equal(weights.out_proj, uncached(mixer, torch.bfloat16)['out_proj'])
    assert mixer.refresh_inference_weights(force=True) is False
    assert mixer._inference_weights(CPU, torch.bfloat16) is weights
    assert [t.data_ptr() for t in weights.tensors()] == pointers
    assert_matches(weights, mixer, torch.bfloat16)


def test_state_dict_copies_and_pickles_leave_the_cache_out():
    mixer = make_mixer()
    keys = list(mixer.state_dict())
    weights = mixer._inference_weights(CPU, torch.bfloat16)
    assert list(mixer.state_dict()) == keys and not any('cache' in k for k in keys)
    assert len(mixer._weight_cache.entries) == 1
    for clone in (copy.deepcopy(mixer), pickle.loads(pickle.dumps(mixer))):
        assert clone._weight_cache.entries == {} and clone._weight_cache.sources == []
        theirs = clone._inference_weights(CPU, torch.bfloat16)
        assert_matches(theirs, clone, torch.bfloat16)
        assert theirs.in_proj.data_ptr() != weights.in_proj.data_ptr()
        assert torch.equal(theirs.in_proj, weights.in_proj)
        with torch.no_grad():
            clone.in_proj.weight.add_(1)  # the original's cache is not the clone's
        assert_matches(mixer._inference_weights(CPU, torch.bfloat16), mixer, torch.bfloat16)


def test_inference_mode():
    """Built under inference_mode, the cache is made of normal tensors (refreshable outside
    it); parameters made under inference_mode (no version counters) are derived uncached."""
    mixer = make_mixer()
    with torch.inference_mode():
        weights = mixer._inference_weights(CPU, torch.bfloat16)
    assert not weights.out_proj.is_inference()
    update_add(mixer)
    with torch.no_grad():
        assert mixer._inference_weights(CPU, torch.bfloat16) is weights
    assert_matches(weights, mixer, torch.bfloat16)
    with torch.inference_mode():
        frozen = make_mixer()
        first = frozen._inference_weights(CPU, torch.bfloat16)
        assert frozen._inference_weights(CPU, torch.bfloat16) is not first
        assert_matches(first, frozen, torch.bfloat16)
    assert frozen._weight_cache.entries == {}


# ----------------------------------------------------------- the C++-scan branch, on the CPU
class FakeScan:
    """``bidirectional_scan_infer`` on the CPU: checks the launch plan's layout rules, records
    what ``kernel_direction`` hands the kernel, and returns [y, y / 3] (the reference's summed
    directions, in the activations' dtype)."""

    def __init__(self):
        self.calls = []

    def __call__(self, u_f, x_f, u_b, x_b, z, fwd, bwd):
        _, _, args, _ = cuda_scan.launch_plan(u_f, x_f, u_b, x_b, z, fwd, bwd, None, 132)
        self.calls.append((fwd, bwd, args[11:19]))
        y = cuda_scan.bidirectional_scan_infer_reference(u_f, x_f, u_b, x_b, z, fwd, bwd)
        return torch.cat([y, y / 3], dim=-1).to(u_f.dtype)


@pytest.fixture
def fake_scan(monkeypatch):
    fake = FakeScan()
    monkeypatch.setattr(triton_conv, 'bidirectional_conv',  # the twin, stacked as the kernel's
                        lambda *args: torch.stack(triton_conv.bidirectional_conv_torch(*args)))
    monkeypatch.setattr(BiMambaMixer, '_use_cuda_scan', lambda self, u, z: True)
    monkeypatch.setattr(cuda_scan, 'bidirectional_scan_infer', fake)
    return fake


def branch_before_the_cache(mixer, h, scan):
    """The C++-scan branch of forward_triton as it was written before the cache."""
    fwd, bwd = mixer.direction_params(''), mixer.direction_params('_b')
    xz = F.linear(h, mixer.in_proj.weight)
    x, z = xz.chunk(2, dim=-1)
    us = triton_conv.bidirectional_conv_torch(x, fwd['conv_w'], fwd['conv_b'], bwd['conv_w'],
                                              bwd['conv_b'])
    width = mixer.dt_rank + 2 * mixer.d_state
    x_dbls = [F.linear(u, F.pad(p['x_proj_w'], (0, 0, 0, -width % 8)))[..., :width]
              for u, p in zip(us, (fwd, bwd))]
    y = scan(us[0], x_dbls[0], us[1], x_dbls[1], z, fwd, bwd)
    return F.linear(y, mixer.out_proj.weight.repeat(1, 2), mixer.out_proj.bias)


@pytest.mark.parametrize('mode', ['autocast', 'bf16 model'])
def test_cpp_scan_branch_is_bit_identical_and_copies_nothing(fake_scan, mode):
    mixer = make_mixer(torch.bfloat16 if mode == 'bf16 model' else torch.float32)
    h = torch.randn(2, 13, 16, dtype=torch.bfloat16 if mode == 'bf16 model' else torch.float32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=mode == 'autocast'):
        want = branch_before_the_cache(mixer, h, FakeScan())
        outs = [mixer.forward_triton(h) for _ in range(2)]
        update_add(mixer)
        want_updated = branch_before_the_cache(mixer, h, FakeScan())
        updated = mixer.forward_triton(h)
    assert outs[0].dtype == torch.bfloat16
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)
    assert torch.equal(updated, want_updated) and not torch.equal(updated, want)
    cached = mixer._weight_cache.entries[(CPU, torch.bfloat16)][1]
    for fwd, bwd, direction_args in fake_scan.calls:
        assert fwd is cached.fwd and bwd is cached.bwd
        # kernel_direction hands the cached kernel forms (and A) on: no copy kernels
        assert [t.data_ptr() for t in direction_args] == [
            d[key].data_ptr() for d in (cached.fwd, cached.bwd)
            for key in ('kernel_w', 'kernel_bias', 'A', 'kernel_D')]


def test_cpp_scan_branch_takes_the_fused_conv_xproj_where_it_applies(fake_scan, monkeypatch):
    """The branch hands the fused kernel x (in_proj's strided half) and the cached halved conv
    weights, and reads its (u, x_proj output) as it read the pair's; 'pair' skips it. The
    kernel is its fp32 twin here (rounded like the kernel's 16-bit outputs)."""
    calls = []

    def fused(x, taps, bias, x_proj):
        calls.append((x.stride(), taps.dtype))
        return [t.to(x.dtype) for t in cuda_conv_xproj.conv_xproj_reference(x, taps, bias,
                                                                             x_proj)]
    monkeypatch.setattr(cuda_conv_xproj, 'conv_xproj_applies', lambda *args: None)
    monkeypatch.setattr(cuda_conv_xproj, 'conv_xproj', fused)
    mixer = make_mixer()
    h = torch.randn(2, 13, 16)
    outs = {}
    for choice in ('pair', 'fused'):
        monkeypatch.setenv(cuda_conv_xproj.ENV_VAR, choice)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            outs[choice] = mixer.forward_triton(h).float()
    E = mixer.d_inner
    assert calls == [((13 * 2 * E, 2 * E, 1), torch.float32)]  # once, in the fused run
    torch.testing.assert_close(outs['fused'], outs['pair'], atol=2e-2, rtol=2e-2)


def test_no_cache_when_gradients_are_needed(fake_scan):
    """Only out_proj trainable: the branch still runs (the scan reads nothing that needs a
    gradient), uncached, and out_proj's gradient flows through [W, W] as before."""
    mixer = make_mixer()
    for name, p in mixer.named_parameters():
        p.requires_grad_(name.startswith('out_proj'))
    h = torch.randn(2, 13, 16)
    grad = torch.randn(2, 13, 16)
    grads = []
    for run in (mixer.forward_triton, lambda h: branch_before_the_cache(mixer, h, FakeScan())):
        mixer.zero_grad()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = run(h)
        out.float().backward(grad)
        grads.append((out.detach(), mixer.out_proj.weight.grad.clone()))
    assert len(fake_scan.calls) == 1 and mixer._weight_cache.entries == {}
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert grads[0][1].abs().sum() > 0


def test_no_cache_in_grad_mode_even_where_nothing_needs_a_gradient(fake_scan):
    """A frozen mixer in grad mode (a frozen block inside a training step, or its CUDA graph)
    re-derives its weights from the parameters and leaves the cache alone: only no-grad
    inference reads it, so training graphs never replay stale cached tensors."""
    mixer = make_mixer().requires_grad_(False)
    h = torch.randn(2, 13, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = mixer.forward_triton(h)
        assert len(fake_scan.calls) == 1 and mixer._weight_cache.entries == {}
        with torch.no_grad():
            cached = mixer.forward_triton(h)
    assert set(mixer._weight_cache.entries) == {(CPU, torch.bfloat16)}
    assert torch.equal(out, cached)
