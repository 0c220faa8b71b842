"""Small building blocks of Vim: RMSNorm, DropPath, patch embedding, position-grid helpers, RoPE."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm computed in at least float32 (the residual stream is float32), no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class DropPath(nn.Module):
    """Stochastic depth per sample (drops the whole branch output).

    Vim applies it inside the fused residual add (``add_rms_norm``'s ``rowscale``), so the module
    only draws the per-sample factors (``row_scale``) and is never called on a tensor itself.
    """

    def __init__(self, drop_prob: float = 0.):
        super().__init__()
        self.drop_prob = drop_prob

    def row_scale(self, x):
        """None (keep everything) or the per-sample factor 0 or 1/keep, shaped x.shape[:1] + 1s
        over the remaining dims but the last (one factor per token row)."""
        if self.drop_prob == 0. or not self.training:
            return None
        keep = 1 - self.drop_prob
        return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 2), dtype=torch.float32
                           ).bernoulli_(keep).div_(keep)

    def extra_repr(self):
        return f'drop_prob={self.drop_prob}'


def to_2tuple(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f'Expected an int or a pair, got {value!r}')
    return int(value[0]), int(value[1])


class PatchEmbed(nn.Module):
    """Conv patch embedding with kernel ``patch_size`` and ``stride`` (8 = long-sequence models).

    Inputs whose size does not fit the stride are zero-padded at the bottom/right, so any H x W
    >= one patch works.
    """

    def __init__(self, patch_size=16, stride=16, in_channels=3, embed_dims=192):
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.stride = to_2tuple(stride)
        self.proj = nn.Conv2d(in_channels, embed_dims, self.patch_size, self.stride)

    def grid_size(self, hw) -> tuple[int, int]:
        """Token grid for an input of size ``hw`` (after padding)."""
        return tuple(max(math.ceil((s - k) / t), 0) + 1
                     for s, k, t in zip(hw, self.patch_size, self.stride))

    def check(self, x) -> tuple[int, int]:
        """The token grid of images ``x``; a clear error where they are not (B, C, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels:
            raise ValueError(f'VisionMamba expects images of shape (B, {self.proj.in_channels}, H, W), '
                             f'got {tuple(x.shape)}')
        return self.grid_size(x.shape[-2:])

    def forward(self, x):
        grid = self.check(x)
        pad_h, pad_w = ((g - 1) * t + k - s for g, t, k, s in
                        zip(grid, self.stride, self.patch_size, x.shape[-2:]))
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        if self.patch_size == self.stride:
            return self._embed_patches(x, grid), grid
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2), grid

    def _embed_patches(self, x, grid):
        """Non-overlapping patches as one GEMM over flattened patches: the conv's sums (its
        weight flattened in (C, kh, kw) order), minus cuDNN's implicit GEMM for a 16x16
        stride-16 kernel and the transpose to tokens (1.0 + 0.4 ms per 16 images at 1024x1024 on
        an H100, bf16). Under autocast the image is cast before the patch copy (half the
        bytes); F.linear would cast after it."""
        (ph, pw), (gh, gw) = self.patch_size, grid
        b, c = x.shape[:2]
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        patches = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)
        return F.linear(patches.reshape(b, gh * gw, c * ph * pw), weight, self.proj.bias)


def resize_pos_grid(pos: torch.Tensor, src_grid, dst_grid, mode: str = 'bicubic') -> torch.Tensor:
    """Resize a (1, h*w, C) position grid to ``dst_grid`` (float32 interpolation)."""
    src_grid, dst_grid = tuple(src_grid), tuple(dst_grid)
    if src_grid == dst_grid:
        return pos
    if pos.shape[1] != src_grid[0] * src_grid[1]:
        raise ValueError(f'Position grid has {pos.shape[1]} entries, expected {src_grid[0]}x{src_grid[1]}')
    grid = pos.reshape(1, *src_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=dst_grid, mode=mode, align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, dst_grid[0] * dst_grid[1], -1).to(pos.dtype)


def insert_middle(tokens: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Insert ``token`` (B, 1, C) at index M // 2 of ``tokens`` (B, M, C), as Vim does."""
    mid = tokens.shape[1] // 2
    return torch.cat([tokens[:, :mid], token, tokens[:, mid:]], dim=1)


def split_middle(pos: torch.Tensor):
    """Inverse of :func:`insert_middle` for a (1, M + 1, C) tensor: (grid part, middle slot)."""
    mid = (pos.shape[1] - 1) // 2
    return torch.cat([pos[:, :mid], pos[:, mid + 1:]], dim=1), pos[:, mid:mid + 1]


class VisionRotaryEmbedding(nn.Module):
    """2-D axial rotary embedding of the hidden states (EVA style), computed for any grid.

    Half of the channels rotate with the row index, half with the column index; positions are
    measured in units of the pretraining grid so a larger input keeps the same frequencies.
    """

    def __init__(self, dim: int, pretrain_grid, theta: float = 10000.):
        super().__init__()
        if dim % 4:
            raise ValueError(f'RoPE needs embed_dims divisible by 4, got {dim}')
        half = dim // 2
        self.pretrain_grid = to_2tuple(pretrain_grid)
        self.register_buffer('inv_freq', 1. / theta ** (torch.arange(0, half, 2).float() / half),
                             persistent=False)

    def cos_sin(self, grid, device):
        axes = []
        for n, n0 in zip(grid, self.pretrain_grid):
            t = torch.arange(n, device=device, dtype=torch.float32) / n * n0
            f = torch.outer(t, self.inv_freq.to(device)).repeat_interleave(2, dim=-1)
            axes.append(f)
        rows = axes[0][:, None, :].expand(grid[0], grid[1], -1)
        cols = axes[1][None, :, :].expand(grid[0], grid[1], -1)
        freqs = torch.cat([rows, cols], dim=-1).reshape(grid[0] * grid[1], -1)
        return freqs.cos(), freqs.sin()

    @staticmethod
    def rotate(x, cos, sin):
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos + rotated * sin
