"""Split the batch over CUDA streams inside one graph: do the halves overlap usefully?
(fifteenth session; not part of any path of the model).

The scan is latency-bound and leaves most of an SM's bandwidth idle, the GEMMs, conv and norm
are bandwidth-bound: with the batch cut into ``n`` parts, each part's forward on its own stream
(one CUDA graph over all of them), one part's scan could run beside another part's GEMMs.
Times the whole Vim backbone's inference step (bf16 autocast, as ``tools/benchmark.py
--cuda-graph``) for 1, 2 and 4 streams:

    python benchmarks/gpu_stream_split.py --out results/h200_stream_split_v1.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vim_mm import VisionMamba  # noqa: E402
from vim_mm.models.cuda_graph import capture_cuda_graph  # noqa: E402
from tools.benchmark import VIM, timed  # noqa: E402

CASES = [('vim-t', 1024, 16), ('vim-t', 1248, 16), ('vim-t', 2048, 4), ('vim-s', 1024, 16)]


def split_step(model, images, n: int):
    """The step: the batch in ``n`` equal parts, part i's forward on stream i, joined."""
    part = images.shape[0] // n
    streams = [torch.cuda.Stream() for _ in range(n)]
    autocast = torch.autocast('cuda', dtype=torch.bfloat16, cache_enabled=False)

    def step():
        with torch.no_grad(), autocast:
            if n == 1:
                return model(images)
            here = torch.cuda.current_stream()
            outs = []
            for i, stream in enumerate(streams):
                stream.wait_stream(here)
                with torch.cuda.stream(stream):
                    outs.append(model(images[i * part:(i + 1) * part]))
            for stream in streams:
                here.wait_stream(stream)
            return outs
    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    rows = []
    for arch, res, batch in CASES:
        model = VisionMamba(VIM[arch], img_size=res, backend='triton').cuda().eval()
        images = torch.randn(batch, 3, res, res, device='cuda')
        for n in (1, 2, 4):
            if batch % n:
                continue
            replay, _ = capture_cuda_graph(split_step(model, images, n))
            repeats = [timed(replay, images.device, 10, 20) for _ in range(3)]
            seconds = statistics.median(repeats)
            rows.append(dict(model=arch, res=res, batch=batch, streams=n, seconds=seconds,
                             img_per_s=batch / seconds, repeats=repeats))
            print(rows[-1], flush=True)
            del replay
        del model
        torch.cuda.empty_cache()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  command=' '.join(sys.argv), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
