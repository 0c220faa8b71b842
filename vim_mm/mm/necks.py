"""Simple feature pyramid for the plain (single-stride) Vim backbone, for mmseg and mmdet.

ViTDet's idea (Li et al. 2022): rebuild strides 4/8/16/32 from stride-16 maps with two deconvs,
one deconv, identity and a max-pool. Given one map (detection) every level is built from it;
given one map per level (segmentation, ``out_indices`` of four blocks) level i uses map i.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule

from .registry import register_everywhere


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map.

    The result is made contiguous again: mmcv's RoIAlign reads its input as raw NCHW memory and
    silently samples garbage from a permuted (channels-last strided) map, which left the RoI
    heads of a SimpleFPN detector unable to learn.
    """

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


def build_norm(norm_cfg: dict | None, channels: int) -> nn.Module:
    """'BN', 'SyncBN', 'GN' (num_groups) or 'LN' / 'LN2d'.

    SyncBN becomes BN in single-process runs like every other SyncBN of the model: mmengine's
    Runner applies ``revert_sync_batchnorm`` when it is not distributed.
    """
    if norm_cfg is None:
        return nn.Identity()
    cfg = dict(norm_cfg)
    kind = cfg.pop('type')
    cfg.pop('requires_grad', None)
    if kind == 'SyncBN':
        return nn.SyncBatchNorm(channels, **cfg)
    if kind == 'BN':
        return nn.BatchNorm2d(channels, **cfg)
    if kind == 'GN':
        return nn.GroupNorm(cfg.pop('num_groups', 32), channels, **cfg)
    if kind in ('LN', 'LN2d'):
        return LayerNorm2d(channels, eps=cfg.pop('eps', 1e-6))
    raise ValueError(f"SimpleFPN norm_cfg type must be BN, SyncBN, GN or LN, got {kind!r}")


class SimpleFPN(BaseModule):
    """Strides 4/8/16/32 (``scale_factors``) from stride-16 map(s), plus max-pooled extra levels.

    Args:
        in_channels: channels of the backbone maps.
        out_channels: None keeps ``in_channels`` on every level (mmseg's UperNet); an int adds a
            1x1 + 3x3 conv per level (ViTDet, 256 for mmdet).
        scale_factors: resampling of each level: 4 and 2 are transposed convs, 1 identity,
            0.5 max-pool.
        num_outs: total outputs; levels beyond the scales are max-pools of the last one.
        norm_cfg: norm after the first deconv and after each conv (BN/SyncBN/GN/LN).
    """

    def __init__(self, in_channels: int, out_channels: int | None = None,
                 scale_factors=(4.0, 2.0, 1.0, 0.5), num_outs: int | None = None,
                 norm_cfg: dict | None = dict(type='LN2d'), init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.num_outs = num_outs or len(self.scale_factors)
        if self.num_outs < len(self.scale_factors):
            raise ValueError(f'num_outs={num_outs} < number of scale_factors {len(scale_factors)}')
        self.stages = nn.ModuleList(self._resample(s, in_channels, norm_cfg)
                                    for s in self.scale_factors)
        self.out_channels = out_channels or in_channels
        if out_channels is None:
            self.convs = nn.ModuleList(nn.Identity() for _ in self.scale_factors)
        else:
            self.convs = nn.ModuleList(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=norm_cfg is None),
                build_norm(norm_cfg, out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm_cfg is None),
                build_norm(norm_cfg, out_channels)) for _ in self.scale_factors)

    @staticmethod
    def _resample(scale: float, channels: int, norm_cfg) -> nn.Module:
        if scale == 4.0:
            return nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2),
                                 build_norm(norm_cfg, channels), nn.GELU(),
                                 nn.ConvTranspose2d(channels, channels, 2, 2))
        if scale == 2.0:
            return nn.ConvTranspose2d(channels, channels, 2, 2)
        if scale == 1.0:
            return nn.Identity()
        if scale == 0.5:
            return nn.MaxPool2d(2, 2)
        raise ValueError(f'SimpleFPN supports scale factors 4, 2, 1, 0.5; got {scale}')

    def forward(self, inputs):
        inputs = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
        if len(inputs) == 1:
            inputs = inputs * len(self.stages)
        if len(inputs) != len(self.stages):
            raise ValueError(f'SimpleFPN got {len(inputs)} maps; expected 1 or one per scale '
                             f'factor ({len(self.stages)}). Check the backbone out_indices.')
        outs = [conv(stage(x)) for x, stage, conv in zip(inputs, self.stages, self.convs)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


register_everywhere('MODELS', SimpleFPN)
