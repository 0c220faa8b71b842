"""A tiny ImageNet-style classification set (shapes and textures) for CPU demos and tests.

Four classes that stay distinguishable under the full DeiT augmentation (rotations and shears
of RandAugment keep horizontal and vertical stripes apart, Invert keeps a disc a disc), with
random sizes (32-64 px), positions, stripe periods and shades. Each class also draws its
foreground from its own quarter of the hue circle on a greyish background: telling stripes apart
regardless of phase and colour takes a randomly initialised model far more than the minute the
demo has, while the colour cue gets learned within it. Written in the ImageFolder layout
``<root>/{train,val}/<class>/*.png`` that mmpretrain's ``CustomDataset`` (and ``ImageNet``) read.
"""
from __future__ import annotations

import colorsys
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from mmpretrain.datasets import CustomDataset
from mmpretrain.registry import DATASETS
from PIL import Image

CLASSES = ('checker', 'disc', 'hstripes', 'vstripes')  # sorted: the folder scan's order
SPLITS = {'train': 10, 'val': 5}  # images per class


def draw_sample(name: str, rng: np.random.RandomState) -> np.ndarray:
    """One RGB image (uint8, H x W x 3) of class ``name``."""
    size = int(rng.randint(32, 65))
    hue = (CLASSES.index(name) + rng.uniform(-0.35, 0.35)) / len(CLASSES) % 1
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1), rng.uniform(0.6, 1))
    shade = rng.uniform(0.05, 0.35) if rng.rand() < 0.5 else rng.uniform(0.75, 1)
    bg = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0, 0.25), shade)
    yy, xx = np.mgrid[:size, :size]
    half_period = rng.uniform(0.06, 0.12) * size
    rows = ((yy + rng.uniform(0, 2 * half_period)) // half_period).astype(int) % 2 == 0
    cols = ((xx + rng.uniform(0, 2 * half_period)) // half_period).astype(int) % 2 == 0
    if name == 'hstripes':
        mask = rows
    elif name == 'vstripes':
        mask = cols
    elif name == 'checker':
        mask = rows ^ cols
    elif name == 'disc':
        radius = rng.uniform(0.2, 0.35) * size
        cy, cx = rng.uniform(radius, size - radius, 2)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    else:
        raise ValueError(f'Unknown demo class {name!r}; classes: {CLASSES}')
    image = np.where(mask[..., None], np.array(fg) * 255, np.array(bg) * 255).astype(np.int16)
    image += rng.randint(-12, 13, image.shape)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8)


def generate_demo_shapes(root, seed: int = 0) -> Path:
    """Write the demo set under ``root`` unless both splits are there; returns ``root``.

    Deterministic for a given ``seed``. Written into a temporary folder first and moved in,
    so concurrent processes (several ranks, dataloader workers) never see a half-written split.
    """
    root = Path(root)
    if all((root / split).is_dir() for split in SPLITS):
        return root
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.generating-', dir=root))
    try:
        for offset, (split, per_class) in enumerate(SPLITS.items()):
            rng = np.random.RandomState(seed + offset)
            for name in CLASSES:
                folder = staging / split / name
                folder.mkdir(parents=True)
                for index in range(per_class):
                    Image.fromarray(draw_sample(name, rng)).save(folder / f'{name}_{index:03d}.png')
            if not (root / split).exists():
                try:
                    os.rename(staging / split, root / split)
                except OSError:  # another process moved its copy in first
                    pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


@DATASETS.register_module(force=True)
class VimDemoImageDataset(CustomDataset):
    """The demo shapes split ``split`` ('train' / 'val'), generated into ``data_root`` if missing.

    Everything else (pipeline, ...) as mmpretrain's ``CustomDataset``.
    """

    METAINFO = dict(classes=CLASSES)

    def __init__(self, data_root: str, split: str = 'train', **kwargs):
        if split not in SPLITS:
            raise ValueError(f'VimDemoImageDataset split must be one of {tuple(SPLITS)}, '
                             f'got {split!r}')
        generate_demo_shapes(data_root)
        super().__init__(data_root=data_root, data_prefix=split, **kwargs)
