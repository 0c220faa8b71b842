"""CUDA graphs, one per input signature ("optional CUDA graphs for fixed shapes").

A Vim forward launches several kernels per block from Python; at test-time batch sizes the host
needs longer to launch them than the GPU needs to run them (1024x1024 batch 1 on an H100: 4.4 ms of
GPU time, 33-43 ms of wall clock; benchmarks/README.md, "Fifth session"). A replay is one
launch. mmdet/mmseg test pipelines feed a fixed size (1024x1024 detection, 512x512 slide
crops), so a handful of graphs covers them.

Training steps are launch-bound too: a Vim-Ti forward + backward at 512x512 batch 16 needs
~48 ms of GPU time and 101-126 ms of wall clock (benchmarks/README.md, "Sixth session"). Training
crops are fixed-size as well (512 segmentation crops, 1024 LSJ detection, 224 classification).

``GraphCache`` records a function the first time it sees an input signature (shape, dtype,
device, autocast state) and replays it afterwards: for inference a plain graph of the forward;
for training (:meth:`GraphCache.train`) a forward graph and a backward graph
(``torch.cuda.make_graphed_callables``), so ``loss.backward()`` replays the backbone's backward.
Graphs read the module's parameters in place: ``load_state_dict`` or an optimizer step (in-place
updates) is seen by the next replay, while moving or re-allocating the parameters (``.to()``,
``.half()``) drops every graph. Tensors derived from the parameters outside the graphs and read
by them by address (the mixers' inference weight cache, ``BiMambaMixer._inference_weights``)
are the caller's to keep current: a replay runs no Python. ``VisionMamba`` refreshes them in
place before every inference replay whose parameters changed version, and drops the graphs
(:meth:`GraphCache.clear`) where they had to be re-allocated instead; ``GraphCache.synced`` is
where a caller keeps what it last synced (copies start without it). Writes through ``p.data``
bump no version counter: ``VisionMamba.eval()`` re-derives the cache regardless. Inference
outputs are cloned, so callers own them; training outputs live in the graph's memory until its
next replay, which waits for the previous backward (a second forward before it runs eagerly).
Beyond ``max_graphs`` signatures the function runs eagerly (with one warning): graphs keep their
memory.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Iterable

import torch

__all__ = ['GraphCache', 'capture_cuda_graph', 'capture_training_graph', 'uncached_autocast']


def uncached_autocast(device_type: str = 'cuda'):
    """The current autocast state of ``device_type`` with its weight cache off, for recording.

    Autocast caches the 16-bit copies of parameters until the outermost autocast context exits;
    a graph recorded with a cached copy reads that copy's memory at every replay, after it was
    freed (garbage weights, or an illegal address once the allocator has returned the memory:
    seen as such at 224 px batch 128, benchmarks/README.md "Eighth session"). Uncached, the
    casts are recorded in the graph and read the parameters at each replay."""
    if not torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False, cache_enabled=False)
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          cache_enabled=False)


def capture_cuda_graph(fn: Callable, *args, warmup: int = 2):
    """Record ``fn(*args)`` (CUDA tensors, fixed shapes) as a CUDA graph on the current device;
    returns (replay, the outputs the replays write into). Under autocast, the casts of
    parameters are recorded too (:func:`uncached_autocast`); a ``fn`` that enters an autocast
    context of its own must make it with ``cache_enabled=False`` (or build it inside ``fn``,
    where it inherits the setting), or the graph reads casts that are freed after recording."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with uncached_autocast():
        with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, autotunes
            for _ in range(warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = fn(*args)
    return graph.replay, outputs


def capture_training_graph(module: torch.nn.Module, static_input: torch.Tensor) -> Callable:
    """Record ``module(static_input)`` and its backward (``torch.cuda.make_graphed_callables``):
    the returned callable replays the forward graph, and autograd replays the backward graph.

    The recording differentiates with respect to stand-in leaves that share the parameters'
    memory, and the replays take the real parameters as inputs: recording never touches the
    parameters' own autograd nodes, where DistributedDataParallel keeps its all-reduce hooks
    (those would launch collectives into the graph), while the replayed backward's gradients
    reach the parameters, and DDP, as usual. Under autocast, casts are recorded inside the
    graphs (autocast's weight cache must be off while recording: a cached cast would be a stale
    copy at the next replay)."""
    names, params = zip(*module.named_parameters())
    stand_ins = tuple(p.detach().requires_grad_(p.requires_grad) for p in params)

    def forward(x, *weights):
        return torch.func.functional_call(module, dict(zip(names, weights)), (x,))
    with uncached_autocast():
        graphed = torch.cuda.make_graphed_callables(forward, (static_input, *stand_ins))
    # the warm-up's eager activations sit in the allocator's cache, which the graphs' private
    # memory pool cannot reuse: give them back instead of holding the step's memory twice
    torch.cuda.empty_cache()
    return lambda x: graphed(x, *params)


class _Forward(torch.nn.Module):
    """What a training graph records: ``fn`` with ``owner``'s parameters."""

    def __init__(self, owner: torch.nn.Module, fn: Callable):
        super().__init__()
        self.owner, self.fn = owner, fn

    def forward(self, x):
        return self.fn(x)


class _TrainingGraph:
    """A recorded forward + backward, and whether a forward still awaits its backward (the
    saved activations live in the graph's memory, so the next replay must wait for it)."""

    def __init__(self, graphed: Callable):
        self.graphed = graphed
        self.pending = None  # weak reference to the autograd node of the last forward

    def busy(self) -> bool:
        return self.pending is not None and self.pending() is not None

    def __call__(self, x):
        outputs = self.graphed(x)
        node = next((o.grad_fn for o in outputs if o.grad_fn is not None), None)
        if node is not None:
            node.register_hook(self._backward_done)
            self.pending = weakref.ref(node)
        return outputs

    def _backward_done(self, grad_inputs, grad_outputs):
        """After the backward replay: the parameter gradients it returns live in the graph's
        memory, and autograd would keep them as ``.grad`` unless copied (the next replay would
        then overwrite an accumulated gradient)."""
        self.pending = None
        return tuple(None if g is None else g.clone() for g in grad_inputs)


def signature(x: torch.Tensor) -> tuple:
    """What a graph is specialised on: the input's shape, dtype and device, and autocast."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    return (tuple(x.shape), x.dtype, x.device, autocast,
            torch.get_autocast_dtype(device_type) if autocast else None)


class GraphCache:
    """Run ``fn(x)`` through recorded graphs, one per :func:`signature` of ``x``.

    Call it as ``cache(fn, x, tensors, max_graphs)`` for inference: ``fn`` returns a tensor or
    a tuple of tensors; ``tensors`` are what the graphs read besides ``x`` (a module's
    parameters and buffers): when any of them is re-allocated, every graph is dropped and
    recorded again; beyond ``max_graphs`` signatures new ones run eagerly. ``capture(fn,
    static_input) -> (replay, static_outputs)`` is :func:`capture_cuda_graph` unless a test
    injects a stand-in. A copy (``deepcopy``, e.g. an EMA model) or a pickle starts empty:
    graphs belong to one set of tensors.

    ``cache.train(module, fn, x, max_graphs)`` is the training twin (``fn`` returns a tuple of
    tensors computed with ``module``'s parameters, which get their gradients as usual);
    ``capture_training(module, static_input) -> callable`` is :func:`capture_training_graph`
    unless injected. A forward whose previous one still awaits its backward runs eagerly (with
    one warning): the graph holds a single set of saved activations; so does an input that
    needs its own gradient (the graphs return none for it).
    """

    def __init__(self, capture: Callable = capture_cuda_graph,
                 capture_training: Callable = capture_training_graph):
        self.capture, self.capture_training = capture, capture_training
        self.graphs: dict = {}
        self.synced = None  # the caller's record of what the graphs' derived inputs match
        self.recorded = None  # the signature last recorded by __call__ (callers may reset it)
        self._storage = None
        self._warned = set()

    def clear(self, keep=None, training: bool = True):
        """Drop every graph but ``keep``'s (a signature), the training ones only if
        ``training``; they are recorded again as their inputs come."""
        for key in [k for k in self.graphs if k != keep and (training or k[0] != 'train')]:
            del self.graphs[key]

    def __deepcopy__(self, memo):
        return GraphCache(self.capture, self.capture_training)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def _warn_once(self, what: str, message: str):
        if what not in self._warned:
            warnings.warn(message)
            self._warned.add(what)

    def _lookup(self, key, x, tensors, max_graphs):
        """The recorded entry for ``key``; None when it must be recorded; False: run eagerly."""
        storage = tuple(t.data_ptr() for t in tensors)
        if storage != self._storage:  # tensors moved: the graphs would read stale memory
            self.graphs.clear()
            self._storage = storage
        entry = self.graphs.get(key)
        if entry is None and len(self.graphs) >= max_graphs:
            self._warn_once('full', f'CUDA graphs: {max_graphs} input shapes recorded already; '
                            f'{tuple(x.shape)} and later new shapes run eagerly (raise '
                            'max_graphs, or feed fixed-size inputs)')
            return False
        return entry

    def train(self, module: torch.nn.Module, fn: Callable, x: torch.Tensor,
              max_graphs: int = 4):
        """``fn(x)`` with gradients, forward and backward through recorded graphs (one per
        input signature and set of trainable parameters: a graph returns gradients for the
        parameters that required them when it was recorded)."""
        if x.requires_grad:  # the graphs return no gradient for the input
            return fn(x)
        params = list(module.parameters())
        key = ('train', *signature(x), tuple(p.requires_grad for p in params))
        entry = self._lookup(key, x, [*params, *module.buffers()], max_graphs)
        if entry is False:
            return fn(x)
        if entry is None:
            graphed = self.capture_training(_Forward(module, fn), x.detach().clone())
            entry = self.graphs[key] = _TrainingGraph(graphed)
        if entry.busy():
            self._warn_once('busy', 'CUDA graphs: a training forward ran before the backward '
                            'of the previous one; it runs eagerly (the graph keeps one set of '
                            'saved activations)')
            return fn(x)
        return entry(x)

    def __call__(self, fn: Callable, x: torch.Tensor, tensors: Iterable[torch.Tensor],
                 max_graphs: int = 4):
        entry = self._lookup(signature(x), x, tensors, max_graphs)
        if entry is False:
            return fn(x)
        if entry is None:
            static_input = x.detach().clone()
            replay, outputs = self.capture(fn, static_input)
            entry = self.graphs[signature(x)] = (static_input, replay, outputs)
            self.recorded = signature(x)
        static_input, replay, outputs = entry
        static_input.copy_(x)
        replay()
        if isinstance(outputs, torch.Tensor):
            return outputs.clone()
        return type(outputs)(o.clone() for o in outputs)
