"""Recorded graphs (``VisionMamba(cuda_graph=...)``) for inference and training, on the CPU.

Stand-in captures keep what CUDA graphs do. Inference: the function runs once on a static
input and every replay recomputes into the SAME output tensors. Training: like
``torch.cuda.make_graphed_callables``, an autograd function whose forward overwrites one set of
saved activations and static outputs, and whose backward writes static gradient buffers and
hands them out as aliases. So the tests see the hazards of the real thing (outputs and saved
activations overwritten by the next replay, gradients aliasing graph memory, parameters read by
address) while the cache, signature, fallback and re-recording logic run for real.
"""
import copy
import pickle
import warnings
from unittest import mock

import pytest
import torch

from vim_mm.models import VisionMamba
from vim_mm.models.cuda_graph import GraphCache


class FakeGraphs:
    """``capture`` for GraphCache: counts recordings; replay writes into the static outputs."""

    def __init__(self):
        self.recorded = 0

    def __call__(self, fn, static_input):
        self.recorded += 1
        outputs = fn(static_input)

        def replay():
            for out, new in zip(outputs, fn(static_input)):
                out.copy_(new)
        return replay, outputs


class FakeTrainingGraphs:
    """``capture_training`` for GraphCache, shaped like make_graphed_callables' result."""

    def __init__(self):
        self.recorded = self.forwards = self.backwards = 0

    def __call__(self, module, static_input):
        self.recorded += 1
        params = tuple(p for p in module.parameters() if p.requires_grad)
        static = {}
        fake = self

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, *ps):
                fake.forwards += 1
                static_input.copy_(x)
                with torch.enable_grad():
                    static['saved'] = module(static_input)  # one set of saved activations
                if 'out' not in static:
                    static['out'] = tuple(torch.empty_like(o) for o in static['saved'])
                for out, new in zip(static['out'], static['saved']):
                    out.copy_(new.detach())
                return tuple(o.detach() for o in static['out'])

            @staticmethod
            def backward(ctx, *grads):
                fake.backwards += 1
                new = torch.autograd.grad(static['saved'], params, grads, retain_graph=True)
                if 'grads' not in static:
                    static['grads'] = tuple(torch.empty_like(g) for g in new)
                for g, n in zip(static['grads'], new):
                    g.copy_(n)
                return (None, *(g.detach() for g in static['grads']))
        return lambda x: Graphed.apply(x, *params)


def graphed_model(monkeypatch, max_graphs=True, training=False):
    torch.manual_seed(0)
    model = VisionMamba('demo', out_indices=(1, 3), cuda_graph=max_graphs).train(training)
    fake, fake_training = FakeGraphs(), FakeTrainingGraphs()
    model._graphs.capture = fake
    model._graphs.capture_training = fake_training
    # the CPU stands in for CUDA: same eligibility rules otherwise
    monkeypatch.setattr(VisionMamba, '_graph_device', staticmethod(lambda x: True))
    return (model, fake, fake_training) if training else (model, fake)


def loss_of(outputs):
    return sum((o * o).mean() for o in outputs)


def test_replays_match_eager_and_callers_own_their_outputs(monkeypatch):
    model, fake = graphed_model(monkeypatch)
    x1, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager1, eager2 = model._forward(x1), model._forward(x2)
        out1 = model(x1)
        out2 = model(x2)  # same shape: a replay, which overwrites the graph's own outputs
    assert fake.recorded == 1
    for a, b in zip(out1, eager1):
        assert torch.equal(a, b)  # still x1's features: the caller got a copy
    for a, b in zip(out2, eager2):
        assert torch.equal(a, b)
    assert not torch.equal(out1[0], out2[0])


def test_one_graph_per_shape_then_eager_with_a_warning(monkeypatch):
    model, fake = graphed_model(monkeypatch, max_graphs=2)
    with torch.no_grad():
        for size in (64, 64, 96, 64, 96):
            model(torch.randn(1, 3, size, size))
        assert fake.recorded == 2
        with pytest.warns(UserWarning, match='2 input shapes recorded'):
            out = model(x := torch.randn(1, 3, 128, 128))
        assert fake.recorded == 2 and out[0].shape == (1, 64, 8, 8)
        assert torch.equal(out[0], model._forward(x)[0])
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # warned once only
            model(torch.randn(1, 3, 128, 128))
        model(torch.randn(2, 3, 64, 64))  # the batch size is part of the shape too
    assert fake.recorded == 2


def test_mixed_modes_run_eagerly(monkeypatch):
    """Eval mode with gradients, train mode without: neither graph applies."""
    model, fake, fake_training = graphed_model(monkeypatch, training=True)
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    out = model(x)  # gradients enabled
    assert out[0].requires_grad
    with torch.no_grad():
        model.train()
        model(x)
    assert fake.recorded == 0 and fake_training.recorded == 0


def test_training_graph_gradients_match_eager_and_accumulate(monkeypatch):
    """Two steps without zeroing the gradients: the sum, as eagerly (the backward's gradient
    buffers are reused by the next replay, so the cache hands autograd copies)."""
    model, _, fake = graphed_model(monkeypatch, training=True)
    reference = copy.deepcopy(model)
    x1, x2 = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    for x in (x1, x2):
        out = model(x)
        assert torch.allclose(out[1], reference._forward(x)[1], atol=1e-6)
        loss_of(out).backward()
        loss_of(reference._forward(x)).backward()
    assert fake.recorded == 1 and fake.forwards == 2 and fake.backwards == 2
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_an_input_that_needs_its_gradient_runs_eagerly(monkeypatch):
    model, _, fake = graphed_model(monkeypatch, training=True)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    loss_of(model(x)).backward()
    assert fake.recorded == 0 and x.grad is not None and x.grad.abs().sum() > 0


def test_freezing_parameters_records_again(monkeypatch):
    """A graph returns gradients for the parameters that were trainable when it was recorded."""
    model, _, fake = graphed_model(monkeypatch, training=True)
    x = torch.randn(1, 3, 64, 64)
    loss_of(model(x)).backward()
    model.patch_embed.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    loss_of(model(x)).backward()
    assert fake.recorded == 2
    assert model.patch_embed.proj.weight.grad is None
    assert model.layers[0].mixer.in_proj.weight.grad is not None
    model.patch_embed.requires_grad_(True)  # back to the first graph, which has its gradients
    loss_of(model(x)).backward()
    assert fake.recorded == 2 and model.patch_embed.proj.weight.grad is not None


def test_a_forward_before_the_previous_backward_runs_eagerly(monkeypatch):
    model, fake_infer, fake = graphed_model(monkeypatch, training=True)
    reference = copy.deepcopy(model)
    x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    out1 = model(x1)
    with pytest.warns(UserWarning, match='before the backward of the previous one'):
        out2 = model(x2)  # a replay would overwrite out1's saved activations
    assert fake.forwards == 1
    (loss_of(out1) + loss_of(out2)).backward()
    (loss_of(reference._forward(x1)) + loss_of(reference._forward(x2))).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    model(x1)  # backward done: replays again
    assert fake.forwards == 2
    model(x2)  # ... and outputs dropped without a backward free it as well
    assert fake.forwards == 3 and fake.recorded == 1
    # inference and training graphs share max_graphs (True: 4)
    with torch.no_grad():
        model.eval()
        for size in (64, 96, 128):
            model(torch.randn(1, 3, size, size))
        with pytest.warns(UserWarning, match='4 input shapes recorded'):
            model(torch.randn(1, 3, 160, 160))
    assert fake_infer.recorded == 3


def test_reallocated_parameters_are_recorded_again(monkeypatch):
    """load_state_dict copies in place (the graph sees it); .to() / .double() re-allocate."""
    model, fake = graphed_model(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    other = VisionMamba('demo', out_indices=(1, 3)).state_dict()
    with torch.no_grad():
        model(x)
        model.load_state_dict(other)
        loaded = model(x)
        assert fake.recorded == 1
        assert torch.equal(loaded[1], model._forward(x)[1])
        model.double()
        out = model(x.double())
    assert fake.recorded == 2 and out[1].dtype == torch.float64


def test_switched_on_after_construction(monkeypatch):
    """``cuda_graph`` is read at call time (an int: how many shapes to record)."""
    model, fake = graphed_model(monkeypatch, max_graphs=False)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        assert fake.recorded == 0
        model.cuda_graph = 1
        model(torch.randn(1, 3, 64, 64))
        with pytest.warns(UserWarning, match='1 input shapes recorded'):
            model(torch.randn(1, 3, 96, 96))
    assert fake.recorded == 1


def test_copies_start_without_graphs(monkeypatch):
    model, fake = graphed_model(monkeypatch)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(model._graphs.graphs) == 1
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone._graphs.graphs == {}


def test_off_by_default_and_cache_signature_includes_autocast():
    assert not VisionMamba('demo').cuda_graph
    fake = FakeGraphs()
    cache = GraphCache(capture=fake)
    weight = torch.randn(4, 4)

    def fn(x):
        return (x @ weight,)
    x = torch.randn(2, 4)
    cache(fn, x, [weight])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = cache(fn, x, [weight])
    assert fake.recorded == 2 and out[0].dtype == torch.bfloat16


def fake_make_graphed_callables(fn, sample_args):
    """``torch.cuda.make_graphed_callables`` for a plain function, on the CPU: records by running
    fn and differentiating w.r.t. the sample leaves (as the real one's warm-up and capture do),
    then replays on the SAME static inputs (user args copied in unless they share memory)."""
    static = tuple(sample_args)
    wanted = [a for a in static if a.requires_grad]
    torch.autograd.grad(fn(*static), wanted, allow_unused=True,
                        grad_outputs=[torch.ones_like(o) for o in fn(*static)])
    saved = {}

    class Graphed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            for s, new in zip(static, inputs):
                if s.data_ptr() != new.data_ptr():
                    s.copy_(new)
            with torch.enable_grad():
                saved['out'] = fn(*static)
            return tuple(o.detach() for o in saved['out'])

        @staticmethod
        def backward(ctx, *grads):
            got = iter(torch.autograd.grad(saved['out'], wanted, grads, allow_unused=True))
            return tuple(next(got) if s.requires_grad else None for s in static)
    return lambda *args: Graphed.apply(*args)


def test_training_capture_records_on_stand_ins_and_replays_into_the_parameters(monkeypatch):
    """capture_training_graph itself (the real one, around a stand-in make_graphed_callables):
    recording differentiates w.r.t. stand-in leaves, so hooks on the parameters (where DDP
    all-reduces) stay silent until the real backward, which fills ``.grad`` as eagerly."""
    monkeypatch.setattr(torch.cuda, 'make_graphed_callables', fake_make_graphed_callables)
    monkeypatch.setattr(VisionMamba, '_graph_device', staticmethod(lambda x: True))
    torch.manual_seed(0)
    model = VisionMamba('demo', out_indices=(1, 3), cuda_graph=True).train()
    reference = copy.deepcopy(model)
    fired, seen = [], []
    for p in model.parameters():
        p.register_hook(lambda g: seen.append(g))  # runs for autograd.grad w.r.t. p too
        p.register_post_accumulate_grad_hook(lambda p: fired.append(p))
    x = torch.randn(2, 3, 64, 64)
    out = model(x)  # records, then replays
    assert len(model._graphs.graphs) == 1 and fired == [] and seen == []
    loss_of(out).backward()
    loss_of(reference._forward(x)).backward()
    assert len(fired) == len(seen) == len(list(model.parameters()))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_graphed_inference_is_marked_for_the_backend_choice(monkeypatch):
    """Inside the backbone's inference graphs (warm-up and recording) the mixers see
    graphed_inference, where ``auto`` may take the triton path; eager forwards and training
    graphs do not (vim_mm.ops.backend)."""
    from vim_mm.ops import backend
    seen = []
    real = backend.resolve_backend

    def spy(choice, device_type, needs_grad=True):
        seen.append(backend._graphed.get())
        return real(choice, device_type, needs_grad)
    monkeypatch.setattr('vim_mm.models.mixer.resolve_backend', spy)
    model, fake = graphed_model(monkeypatch)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert fake.recorded == 1 and seen and all(seen)
        seen.clear()
        model._forward(x)  # eager
    assert seen and not any(seen)
    seen.clear()
    model.train()
    model(x)  # a training graph
    assert seen and not any(seen)


def test_recording_turns_the_autocast_weight_cache_off():
    """A graph recorded with autocast's cached 16-bit weights would read freed memory at its
    replays (the cache empties when the outer autocast exits): recording runs uncached, in the
    same autocast state."""
    from vim_mm.models.cuda_graph import uncached_autocast
    weight = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(2, 4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        with uncached_autocast('cpu'):
            assert torch.is_autocast_enabled('cpu') and not torch.is_autocast_cache_enabled()
            assert torch.get_autocast_dtype('cpu') == torch.bfloat16
            assert torch.nn.functional.linear(x, weight).dtype == torch.bfloat16
        assert torch.is_autocast_cache_enabled()  # restored for the caller
    with uncached_autocast('cpu'):
        assert not torch.is_autocast_enabled('cpu')  # no autocast stays no autocast
        assert torch.nn.functional.linear(x, weight).dtype == torch.float32


# ------------------------------------------ the mixers' inference weight caches and replays
class AddressGraphs(FakeGraphs):
    """``capture`` whose replays read the mixers' cached inference weights as a CUDA graph
    does: the very tensors handed out while recording (by address: no Python refreshes them at
    a replay), the parameters as they are now. Each replay notes how many of those cached
    tensors were stale (differ from the parameters' current derivation) or freed (no longer
    the mixer's cache: re-allocated since)."""

    def __init__(self):
        super().__init__()
        self.replays = self.stale = self.freed = 0

    def __call__(self, fn, static_input):
        from vim_mm.models.mixer import BiMambaMixer
        self.recorded += 1
        real, read = BiMambaMixer._inference_weights, {}

        def recording(mixer, device, dtype, force=False):
            read[mixer, device, dtype] = weights = real(mixer, device, dtype, force)
            return weights

        def by_address(mixer, device, dtype, force=False):
            return read[mixer, device, dtype]  # KeyError: a tensor the graph never recorded
        with mock.patch.object(BiMambaMixer, '_inference_weights', recording):
            outputs = fn(static_input)

        def replay():
            self.replays += 1
            with torch.no_grad():
                for (mixer, device, dtype), weights in read.items():
                    entry = mixer._weight_cache.entries.get((device, dtype))
                    self.freed += entry is None or entry[1] is not weights
                    fresh = mixer._derive_weights(dtype)
                    self.stale += sum(not torch.equal(a, b)
                                      for a, b in zip(weights.tensors(), fresh.tensors()))
            with mock.patch.object(BiMambaMixer, '_inference_weights', by_address):
                for out, new in zip(outputs, fn(static_input)):
                    out.copy_(new)
        return replay, outputs


@pytest.fixture
def cpp_branch(monkeypatch):
    """The backbone's mixers take the C++-scan branch of ``forward_triton`` for no-grad
    calls on the CPU (the branch that reads the cache), with PyTorch stand-ins for the conv
    and the scan; calls that need gradients take the PyTorch path."""
    from vim_mm.models.mixer import BiMambaMixer
    from vim_mm.ops import cuda_scan, triton_conv

    def scan(u_f, x_f, u_b, x_b, z, fwd, bwd):
        y = cuda_scan.bidirectional_scan_infer_reference(u_f, x_f, u_b, x_b, z, fwd, bwd)
        return torch.cat([y, y / 3], dim=-1).to(u_f.dtype)
    monkeypatch.setattr('vim_mm.models.mixer.resolve_backend',
                        lambda backend, device_type, needs_grad=True:
                        'torch' if needs_grad else 'triton')
    monkeypatch.setattr(triton_conv, 'bidirectional_conv',  # the twin, stacked as the kernel's
                        lambda *args: torch.stack(triton_conv.bidirectional_conv_torch(*args)))
    monkeypatch.setattr(BiMambaMixer, '_use_cuda_scan', lambda self, u, z: True)
    monkeypatch.setattr(cuda_scan, 'bidirectional_scan_infer', scan)


def address_graphed_model(monkeypatch):
    model, _ = graphed_model(monkeypatch)
    model._graphs.capture = fake = AddressGraphs()
    return model, fake


def cached_weights(model):
    """{mixer: its one cached InferenceWeights} (these tests use one compute dtype)."""
    caches = {}
    for mixer in model._mixers():
        (entry,) = mixer._weight_cache.entries.values()
        caches[mixer] = entry[1]
    return caches


def assert_current(model, caches):
    """The mixers still hold ``caches`` (same objects, same storages) and they equal the
    parameters' current derivation."""
    now = cached_weights(model)
    assert now.keys() == caches.keys()
    with torch.no_grad():
        for mixer, (weights, pointers) in caches.items():
            assert now[mixer] is weights
            assert [t.data_ptr() for t in weights.tensors()] == pointers
            fresh = mixer._derive_weights(weights.in_proj.dtype)
            for a, b in zip(weights.tensors(), fresh.tensors()):
                assert torch.equal(a, b)


def with_pointers(caches):
    return {m: (w, [t.data_ptr() for t in w.tensors()]) for m, w in caches.items()}


def update_add(model):
    with torch.no_grad():
        for mixer in model._mixers():
            mixer.x_proj.weight.add_(1)
            mixer.A_b_log.add_(0.5)


def update_optimizer_step(model):
    """An eager step in eval mode (no train()/eval() call that could refresh on its own)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_of(model._forward(torch.randn(2, 3, 32, 32))).backward()
    opt.step()


def update_load_state_dict(model):
    torch.manual_seed(1)
    model.load_state_dict(VisionMamba('demo', out_indices=(1, 3)).state_dict())


@pytest.mark.parametrize('update', [update_add, update_optimizer_step, update_load_state_dict])
def test_replays_read_weight_caches_refreshed_in_place(cpp_branch, monkeypatch, update):
    """Inference graphs recorded, the parameters updated in place, replayed: the caches the
    graph reads were refilled before the replay (same tensors, current values)."""
    model, fake = address_graphed_model(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        first = model(x)  # records: the caches are filled
    caches = with_pointers(cached_weights(model))
    update(model)
    with torch.no_grad():
        out = model(x)
        eager = model._forward(x)
    # GraphCache replays right after recording too: the second replay is the one that counts
    assert fake.recorded == 1 and fake.replays == 2 and fake.stale == fake.freed == 0
    assert_current(model, caches)
    for a, b, c in zip(out, eager, first):
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_without_the_check_replays_read_stale_caches(cpp_branch, monkeypatch):
    """The stand-in shows the hazard: skip the pre-replay check and the replay reads caches
    of the old weights."""
    model, fake = address_graphed_model(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        monkeypatch.setattr(VisionMamba, '_sync_inference_weights',
                            lambda self, tensors: (0, self._cache_generations()))
        update_add(model)
        out = model(x)
        eager = model._forward(x)
    assert fake.replays == 2 and fake.stale > 0 and not torch.equal(out[1], eager[1])


def test_unchanged_parameters_refresh_nothing(cpp_branch, monkeypatch):
    """No version change, no refresh call; a change outside the mixers: checked, nothing
    refilled (refills are in-place copies: they bump the cached tensors' versions)."""
    from vim_mm.models.mixer import BiMambaMixer
    model, fake = address_graphed_model(monkeypatch)  # (eval() itself refreshes: before the spy)
    refreshed = []
    real_refresh = BiMambaMixer.refresh_inference_weights
    monkeypatch.setattr(BiMambaMixer, 'refresh_inference_weights', lambda self, force=False:
                        refreshed.append(self) or real_refresh(self, force))
    x = torch.randn(2, 3, 32, 32)

    def cache_versions():
        return {m: [t._version for t in w.tensors()] for m, w in cached_weights(model).items()}
    with torch.no_grad():
        model(x)  # the first dispatch syncs (nothing cached yet), then records
        assert len(refreshed) == 4 and fake.recorded == 1
        refreshed.clear()
        for _ in range(3):
            model(x)
        assert fake.replays == 4 and refreshed == []
        versions = cache_versions()
        model.pos_embed.add_(1)  # a version bump outside the mixers
        model(x)
        assert len(refreshed) == 4 and cache_versions() == versions
        refreshed.clear()
        model(x)
        assert refreshed == []
        changed = model.layers[2].mixer
        changed.A_log.add_(1)  # one mixer's parameter: that mixer alone refills
        model(x)
        assert len(refreshed) == 4
        now = cache_versions()
        assert all(now[m] == versions[m] for m in now if m is not changed)
        assert now[changed] != versions[changed]
    assert fake.replays == 7 and fake.stale == fake.freed == 0 and fake.recorded == 1


@pytest.mark.parametrize('move', ['double', 'half-float'])
def test_moved_parameters_rebuild_the_caches_and_drop_the_graphs(cpp_branch, monkeypatch, move):
    """.double(): a new signature; .half().float(): the same one, new storages. Either way
    the old graph is gone and the new one reads re-allocated caches."""
    model, fake = address_graphed_model(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        old = cached_weights(model)
        if move == 'double':
            model.double()
            x = x.double()
        else:
            model.half().float()
        model(x)  # records anew (and replays)
        out = model(x)  # replays
        eager = model._forward(x)
    from vim_mm.models.cuda_graph import signature
    assert list(model._graphs.graphs) == [signature(x)] and fake.recorded == 2
    new = cached_weights(model)
    assert all(new[m] is not old[m] and new[m].in_proj.dtype == x.dtype for m in new)
    assert all(m._weight_cache.generation > 0 for m in new)
    assert fake.replays == 3 and fake.stale == fake.freed == 0
    assert out[1].dtype == x.dtype and torch.equal(out[1], eager[1])


@pytest.mark.parametrize('eager_after', [False, True])
def test_a_cache_reallocated_behind_the_graphs_back_drops_them(cpp_branch, monkeypatch,
                                                               eager_after):
    """A parameter moved, an eager forward (its mixer re-allocates its cache), the parameter
    back at the address the graph was recorded with (and, ``eager_after``, another eager
    forward: the mixer's cache re-allocated again, for that address): GraphCache sees no move,
    yet the graph would read a freed cache. The pre-replay check drops it (the mixer has to
    re-allocate for the restored address, or its cache's generation changed since the last
    dispatch)."""
    model, fake = address_graphed_model(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    weight = model.layers[1].mixer.x_proj.weight
    original = weight.data
    with torch.no_grad():
        model(x)
        weight.data = original.clone()
        model._forward(x)
        weight.data = original
        if eager_after:
            model._forward(x)
        out = model(x)
        eager = model._forward(x)
    assert fake.recorded == 2 and fake.replays == 2 and fake.stale == fake.freed == 0
    assert torch.equal(out[1], eager[1])
    with torch.no_grad():
        model(x)
    assert fake.recorded == 2 and fake.replays == 3 and fake.stale == fake.freed == 0


@pytest.mark.parametrize('how', ['eval', 'refresh_inference_weights'])
def test_writes_through_data_reach_the_replays_after_eval(cpp_branch, monkeypatch, how):
    """mmengine's EMAHook swaps the averaged weights in with ``p.data.copy_`` (no version
    bump), then the loop calls ``model.eval()``: that re-derives the caches in place."""
    model, fake = address_graphed_model(monkeypatch)
    torch.manual_seed(1)
    ema = VisionMamba('demo', out_indices=(1, 3))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
    caches = with_pointers(cached_weights(model))
    for p, q in zip(model.parameters(), ema.parameters()):  # EMAHook._swap_ema_parameters
        tmp = q.data.clone()
        q.data.copy_(p.data)
        p.data.copy_(tmp)
    if how == 'eval':
        model.train()  # as mmengine's loops: back from training, EMA swapped in, then eval()
        model.eval()
    else:
        model.refresh_inference_weights()
    with torch.no_grad():
        out = model(x)
        eager = model._forward(x)
    assert fake.recorded == 1 and fake.replays == 2 and fake.stale == fake.freed == 0
    assert_current(model, caches)
    assert all(torch.equal(a, b) for a, b in zip(out, eager))


def test_training_graphs_never_read_the_weight_caches(cpp_branch, monkeypatch):
    """Frozen blocks in a training step need no gradient, yet in grad mode their mixers
    re-derive from the parameters: the training graphs read no cache, and the inference
    graphs' checks leave the training graphs alone."""
    from vim_mm.models.mixer import BiMambaMixer
    reads = []
    real = BiMambaMixer._inference_weights
    monkeypatch.setattr(BiMambaMixer, '_inference_weights',
                        lambda self, *a, **k: reads.append(self) or real(self, *a, **k))
    model, fake_infer, fake = graphed_model(monkeypatch, training=True)
    model.requires_grad_(False)  # blocks 0 and 1 need no gradient ...
    model.layers[1].mixer.out_proj.requires_grad_(True)  # ... but for block 1's out_proj
    model.norm_f.requires_grad_(True)
    x = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        loss_of(model(x)).backward()
    assert fake.recorded == 1 and fake.forwards == fake.backwards == 2
    assert reads == [] and all(m._weight_cache.entries == {} for m in model._mixers())
    model.eval()
    with torch.no_grad():
        model(x)
        update_add(model)
        model(x)  # refreshes the caches in place: the training graph stays
    assert reads and len(model._graphs.graphs) == 2 and fake.recorded == 1
