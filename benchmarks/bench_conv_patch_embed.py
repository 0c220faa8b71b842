"""tools/benchmark.py with the backbone's patch embedding forced back to the conv: the "before"
side of the patch-embedding A/B (benchmarks/README.md, "Sixth session").

    python benchmarks/bench_conv_patch_embed.py <tools/benchmark.py arguments>
"""
import os.path as osp
import runpy
import sys

import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
from vim_mm.models.layers import PatchEmbed  # noqa: E402


def conv_forward(self, x):
    """PatchEmbed.forward as it was: pad, cuDNN conv, flatten and transpose to tokens."""
    grid = self.grid_size(x.shape[-2:])
    pad_h, pad_w = ((g - 1) * t + k - s for g, t, k, s in
                    zip(grid, self.stride, self.patch_size, x.shape[-2:]))
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return self.proj(x).flatten(2).transpose(1, 2), grid


if __name__ == '__main__':
    PatchEmbed.forward = conv_forward
    sys.argv = [osp.join(ROOT, 'tools', 'benchmark.py')] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
