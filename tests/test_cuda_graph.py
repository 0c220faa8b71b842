"""Inference through recorded graphs (``VisionMamba(cuda_graph=...)``), on the CPU.

A stand-in ``capture`` keeps what a CUDA graph does: it runs the function once on a static
input and, on every replay, recomputes into the SAME output tensors. So the tests see the
hazards of the real thing (outputs overwritten by the next replay, graphs reading parameters by
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


def graphed_model(monkeypatch, max_graphs=True):
    torch.manual_seed(0)
    model = VisionMamba('demo', out_indices=(1, 3), cuda_graph=max_graphs).eval()
    fake = FakeGraphs()
    model._graphs.capture = fake
    # the CPU stands in for CUDA: same eligibility rule otherwise (eval, no gradients)
    monkeypatch.setattr(VisionMamba, '_graphable', lambda self, x: bool(self.cuda_graph) and
                        not self.training and not torch.is_grad_enabled())
    return model, fake


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


def test_training_and_gradients_run_eagerly(monkeypatch):
    model, fake = graphed_model(monkeypatch)
    x = torch.randn(1, 3, 64, 64)
    out = model(x)  # gradients enabled
    assert out[0].requires_grad
    with torch.no_grad():
        model.train()
        model(x)
    assert fake.recorded == 0


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
