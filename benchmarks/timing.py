"""What the GPU micro-benchmarks here share: the median time of CUDA-graph replays of a call."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vim_mm.models.cuda_graph import capture_cuda_graph  # noqa: E402


def graph_median_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """``fn()`` (fixed shapes) recorded once as a CUDA graph; the median ms of its replays
    (``triton.testing.do_bench``), so Python launches do not count."""
    from triton.testing import do_bench
    return do_bench(capture_cuda_graph(fn)[0], warmup=warmup, rep=rep, return_mode='median')
