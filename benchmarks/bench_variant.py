"""``tools/benchmark.py`` with parts of the library switched by environment variables, for
same-call A/Bs of the end-to-end numbers (tenth session):

    NOCACHE=1  the mixers derive their inference weights on every call (as before
               ``BiMambaMixer._inference_weights`` cached them)
    CONV=stream|tile  ``vim_mm.ops.triton_conv.DEFAULT_IMPL``
    EMBED=plain  patch and position embedding by the PyTorch lines (as before the eleventh
               session's one-kernel embedding, ``VisionMamba._fused_embedding_dtype``)
    FEATMAP=plain  the output's residual add, final norm and transpose by the PyTorch lines
               (as before the eleventh session's kernel, ``VisionMamba._fused_featmap``)

    NOCACHE=1 CONV=tile python benchmarks/bench_variant.py --models vim-t@triton --res 1024 \
        --batch 16 --mode infer --dtype bf16 --cuda-graph --out nocache.json
"""
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from vim_mm import VisionMamba  # noqa: E402
from vim_mm.models.mixer import BiMambaMixer  # noqa: E402
from vim_mm.ops import triton_conv  # noqa: E402

if os.environ.get('NOCACHE') == '1':
    def uncached(self, device, dtype, force=False):
        with torch.no_grad():
            return self._derive_weights(dtype)
    BiMambaMixer._inference_weights = uncached
if os.environ.get('EMBED') == 'plain':
    VisionMamba._fused_embedding_dtype = lambda self, x: None
if os.environ.get('FEATMAP') == 'plain':
    VisionMamba._fused_featmap = lambda self, residual, x, scale: False
if os.environ.get('CONV'):
    triton_conv.DEFAULT_IMPL = os.environ['CONV']
sys.argv = [str(ROOT / 'tools' / 'benchmark.py')] + sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
