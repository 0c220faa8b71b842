"""Inference through CUDA graphs, one per input signature ("optional CUDA graphs for fixed shapes").

A Vim forward launches several kernels per block from Python; at test-time batch sizes the host
needs longer to launch them than the GPU needs to run them (1024x1024 batch 1 on an H100: 4.4 ms of
GPU time, 33-43 ms of wall clock; benchmarks/README.md, "Fifth session"). A replay is one
launch. mmdet/mmseg test pipelines feed a fixed size (1024x1024 detection, 512x512 slide
crops), so a handful of graphs covers them.

``GraphCache`` records a function the first time it sees an input signature (shape, dtype,
device, autocast state) and replays it afterwards. Graphs read the module's parameters in place:
``load_state_dict`` (a copy into the same storage) is seen by the next replay, while moving or
re-allocating the parameters (``.to()``, ``.half()``) drops every graph. Outputs are cloned, so
callers own them. Beyond ``max_graphs`` signatures the function runs eagerly (with one warning):
graphs keep their memory.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch

__all__ = ['GraphCache', 'capture_cuda_graph']


def capture_cuda_graph(fn: Callable, *args, warmup: int = 2):
    """Record ``fn(*args)`` (CUDA tensors, fixed shapes) as a CUDA graph on the current device;
    returns (replay, the outputs the replays write into)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles and autotunes here
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*args)
    return graph.replay, outputs


def signature(x: torch.Tensor) -> tuple:
    """What a graph is specialised on: the input's shape, dtype and device, and autocast."""
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    return (tuple(x.shape), x.dtype, x.device, autocast,
            torch.get_autocast_dtype(device_type) if autocast else None)


class GraphCache:
    """Run ``fn(x)`` through recorded graphs, one per :func:`signature` of ``x``.

    Call it as ``cache(fn, x, tensors, max_graphs)``: ``fn`` returns a tensor or a tuple of
    tensors; ``tensors`` are what the graphs read besides ``x`` (a module's parameters and
    buffers): when any of them is re-allocated, every graph is dropped and recorded again;
    beyond ``max_graphs`` signatures new ones run eagerly. ``capture(fn, static_input) ->
    (replay, static_outputs)`` is :func:`capture_cuda_graph` unless a test injects a stand-in.
    A copy (``deepcopy``, e.g. an EMA model) or a pickle starts empty: graphs belong to one set
    of tensors.
    """

    def __init__(self, capture: Callable = capture_cuda_graph):
        self.capture = capture
        self.graphs: dict = {}
        self._storage = None
        self._warned = False

    def __deepcopy__(self, memo):
        return GraphCache(self.capture)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def __call__(self, fn: Callable, x: torch.Tensor, tensors: Iterable[torch.Tensor],
                 max_graphs: int = 4):
        storage = tuple(t.data_ptr() for t in tensors)
        if storage != self._storage:  # tensors moved: the graphs would read stale memory
            self.graphs.clear()
            self._storage = storage
        key = signature(x)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= max_graphs:
                if not self._warned:
                    warnings.warn(f'CUDA graphs: {max_graphs} input shapes recorded '
                                  f'already; {tuple(x.shape)} and later new shapes run eagerly '
                                  '(raise max_graphs, or feed fixed-size inputs)')
                    self._warned = True
                return fn(x)
            static_input = x.detach().clone()
            replay, outputs = self.capture(fn, static_input)
            entry = self.graphs[key] = (static_input, replay, outputs)
        static_input, replay, outputs = entry
        static_input.copy_(x)
        replay()
        if isinstance(outputs, torch.Tensor):
            return outputs.clone()
        return type(outputs)(o.clone() for o in outputs)
