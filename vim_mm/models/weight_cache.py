"""What the mixer's inference path derives from its parameters, and the cache that keeps it.

``BiMambaMixer._inference_weights`` fills it; ``VisionMamba`` reads every mixer's
:attr:`WeightCache.generation` before each inference CUDA-graph replay (a graph reads these
tensors by address, so they are refilled in place, and re-allocated only when the parameters
move).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ['InferenceWeights', 'WeightCache']


@dataclass
class InferenceWeights:
    """What the CUDA C++-scan branch derives from the parameters, for one compute dtype:
    ``in_proj``'s weight, ``x_proj``'s of both directions stacked (2, rows, E) (rows padded to
    a multiple of 8: one batched GEMM) and
    ``out_proj``'s repeated ``(1, 2)`` in that dtype; per direction ``dt_proj_w``, ``dt_bias``,
    ``A = -exp(A_log)`` and ``D`` in float32, contiguous, and the forms the C++ scan computes
    with (``cuda_scan.kernel_weights``: ``kernel_w``, ``kernel_bias``, ``kernel_D``); both convs'
    taps (2, E, 4) and biases (2, E) in float32 (as the fused conv + x_proj kernel takes them).
    """
    in_proj: torch.Tensor
    x_proj: torch.Tensor
    out_proj: torch.Tensor
    fwd: dict
    bwd: dict
    conv_taps: torch.Tensor
    conv_bias: torch.Tensor

    def tensors(self) -> list:
        return [self.in_proj, self.x_proj, self.out_proj, *self.fwd.values(), *self.bwd.values(),
                self.conv_taps, self.conv_bias]


class WeightCache:
    """(device, dtype) -> (parameter versions, :class:`InferenceWeights`) for one set of
    parameter storages (``sources``, kept alive so that an address seen again is the same
    storage). Copies (deepcopy, pickle) start empty: the tensors belong to one module.

    ``generation`` counts the times tensors that were handed out were dropped for new ones
    (the parameters moved): a CUDA graph recorded with the old ones would read freed memory."""

    def __init__(self):
        self.sources, self.entries, self.generation = [], {}, 0

    def drop(self):
        """Forget every entry (re-allocation, not refill): a new ``generation`` if any
        tensors had been handed out."""
        if self.entries:
            self.generation += 1
        self.entries.clear()

    def __deepcopy__(self, memo):
        return WeightCache()

    def __reduce__(self):
        return WeightCache, ()
