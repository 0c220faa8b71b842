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
