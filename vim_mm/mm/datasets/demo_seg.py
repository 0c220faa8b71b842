"""A small, procedurally generated segmentation dataset in ADE20K's folder layout.

It lets the UperNet-Vim pipeline train, resume, test and visualise end to end on a CPU with
nothing downloaded. Each image shows one to three shapes (disc, square, triangle, ring, cross)
on a textured background. A shape's class sets its outline and its texture family (flat,
checkerboard, stripes, dots, speckle), while the colours, sizes, angles and texture
frequencies change from one instance to the next. So colour alone does not separate the
classes, and the masks have to follow the outlines.

Label convention: unlike ADE20K (0 = "other", removed with ``reduce_zero_label``), the PNG maps
store the class index directly and class 0 is a real ``background`` class, so the model must
also find the shapes; 255 would be ignored but is not used. Hence ``reduce_zero_label=False``.

Layout under ``root``: ``images/{training,validation}/*.jpg`` and
``annotations/{training,validation}/*.png``, plus a marker file with the generator version and
settings; the data are regenerated whenever the marker does not match. Every image draws from
its own seeded generator, so the first ``n`` images are the same whatever the dataset size.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from mmengine.dist import barrier, is_main_process
from mmseg.datasets import BaseSegDataset
from mmseg.registry import DATASETS
from PIL import Image

GENERATOR_VERSION = 1
MARKER = '.vim_demo_seg.json'
SPLITS = {'training': (0, 'num_train'), 'validation': (1, 'num_val')}
CLASSES = ('background', 'disc', 'square', 'triangle', 'ring', 'cross')
PALETTE = [[0, 0, 0], [220, 20, 60], [0, 160, 255], [255, 200, 0], [0, 200, 80],
           [170, 60, 255]]


# ------------------------------------------------------------------------------ drawing
def _rotated(yy, xx, cy, cx, angle):
    """Coordinates relative to (cy, cx), rotated by ``angle``."""
    dy, dx = yy - cy, xx - cx
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def _shape_mask(name, yy, xx, cy, cx, radius, angle):
    u, v = _rotated(yy, xx, cy, cx, angle)
    dist = np.hypot(u, v)
    if name == 'disc':
        return dist <= radius
    if name == 'square':
        half = radius * 0.8
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if name == 'triangle':  # equilateral, circumradius ``radius``: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            theta = angle + np.pi / 2 + 2 * np.pi * k / 3
            inside &= (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta) <= radius / 2
        return inside
    if name == 'ring':
        return (dist <= radius) & (dist >= radius * 0.55)
    if name == 'cross':
        arm = radius * 0.32
        return (((np.abs(u) <= radius) & (np.abs(v) <= arm))
                | ((np.abs(v) <= radius) & (np.abs(u) <= arm)))
    raise ValueError(name)


def _texture(name, rng, yy, xx):
    """A field in [0, 1] that mixes an instance's two colours; its family depends on the class."""
    period = rng.uniform(3.0, 5.0)
    if name == 'disc':  # flat colour with a soft shading gradient
        return np.clip(0.15 + 0.2 * (yy - yy.mean()) / yy.shape[0], 0, 1)
    if name == 'square':  # checkerboard
        return ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)
    if name == 'triangle':  # stripes at a random angle
        theta = rng.uniform(0, np.pi)
        return (np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period) > 0
                ).astype(np.float32)
    if name == 'ring':  # dots
        return ((np.sin(2 * np.pi * xx / period) > 0.3) & (np.sin(2 * np.pi * yy / period) > 0.3)
                ).astype(np.float32)
    if name == 'cross':  # coarse speckle
        cells = rng.random((yy.shape[0] // 2 + 1, yy.shape[1] // 2 + 1))
        return (np.kron(cells, np.ones((2, 2)))[:yy.shape[0], :yy.shape[1]] > 0.5
                ).astype(np.float32)
    raise ValueError(name)


def _background(rng, size):
    """Smooth low-frequency noise between two muted colours, plus pixel noise."""
    coarse = rng.random((5, 5)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    colours = rng.uniform(40, 170, size=(2, 3)) * rng.uniform(0.6, 1.0)
    image = colours[0] + field[..., None] * (colours[1] - colours[0])
    return image + rng.normal(0, 6, size=(size, size, 1))


def render_sample(rng: np.random.Generator, size: int = 64):
    """One (image HxWx3 uint8 RGB, label HxW uint8) pair."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = _background(rng, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, len(CLASSES)))
        name = CLASSES[cls]
        radius = rng.uniform(0.16, 0.3) * size
        cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, size=2)
        mask = _shape_mask(name, yy, xx, cy, cx, radius, rng.uniform(0, 2 * np.pi))
        colours = rng.uniform(0, 255, size=(2, 3))
        colours[:, rng.integers(0, 3)] = rng.uniform(200, 255, size=2)  # saturated objects
        mix = _texture(name, rng, yy, xx)[..., None]
        image = np.where(mask[..., None], colours[0] + mix * (colours[1] - colours[0]), image)
        label[mask] = cls
    image = image + rng.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


# ------------------------------------------------------------------------------ files
def _settings(num_train, num_val, img_size, seed):
    return dict(generator_version=GENERATOR_VERSION, num_train=int(num_train),
                num_val=int(num_val), img_size=int(img_size), seed=int(seed))


def generate_demo_seg_dataset(root, num_train: int = 240, num_val: int = 60,
                              img_size: int = 64, seed: int = 0, force: bool = False) -> Path:
    """Write the dataset under ``root`` unless its marker already matches these settings."""
    root = Path(root)
    settings = _settings(num_train, num_val, img_size, seed)
    marker = root / MARKER
    if not force and marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    marker.unlink(missing_ok=True)
    for split, (split_id, count_key) in SPLITS.items():
        img_dir, ann_dir = root / 'images' / split, root / 'annotations' / split
        for folder in (img_dir, ann_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        for index in range(settings[count_key]):
            image, label = render_sample(np.random.default_rng([seed, split_id, index]), img_size)
            stem = f'demo_{split}_{index:05d}'
            Image.fromarray(image).save(img_dir / f'{stem}.jpg', quality=92)
            Image.fromarray(label).save(ann_dir / f'{stem}.png')
    marker.write_text(json.dumps(settings))
    return root


def _class_counts(folder: Path, num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, np.int64)
    for path in sorted(folder.glob('*.png')):
        label = np.asarray(Image.open(path))
        counts += np.bincount(label[label < num_classes].ravel(), minlength=num_classes)
    return counts


def constant_baseline_miou(root) -> tuple[float, str]:
    """mIoU on the validation split of predicting the training set's most frequent class everywhere.

    Computed like mmseg's IoUMetric: per-class IoU over the whole split, classes absent from it
    (union 0) left out of the mean. Returns (mIoU in %, the class predicted).
    """
    root = Path(root)
    num_classes = len(CLASSES)
    majority = int(np.argmax(_class_counts(root / 'annotations' / 'training', num_classes)))
    val = _class_counts(root / 'annotations' / 'validation', num_classes).astype(np.float64)
    intersect = np.zeros(num_classes)
    intersect[majority] = val[majority]
    union = val.copy()
    union[majority] = val.sum()
    present = union > 0
    return float(np.mean(intersect[present] / union[present]) * 100), CLASSES[majority]


# ------------------------------------------------------------------------------ dataset
@DATASETS.register_module(force=True)
class VimDemoSegDataset(BaseSegDataset):
    """The generated shapes dataset; writes itself into ``data_root`` on first use.

    ``num_train``, ``num_val``, ``img_size`` and ``seed`` are the generator's settings (the
    same values must be given to the train and the val dataset of one config, since both share
    ``data_root``). In distributed runs the main process generates and the others wait.
    """

    METAINFO = dict(classes=CLASSES, palette=PALETTE)

    def __init__(self, data_root, num_train: int = 240, num_val: int = 60, img_size: int = 64,
                 seed: int = 0, img_suffix='.jpg', seg_map_suffix='.png',
                 reduce_zero_label=False, **kwargs):
        if is_main_process():
            generate_demo_seg_dataset(data_root, num_train, num_val, img_size, seed)
        barrier()
        super().__init__(data_root=data_root, img_suffix=img_suffix,
                         seg_map_suffix=seg_map_suffix, reduce_zero_label=reduce_zero_label,
                         **kwargs)


if __name__ == '__main__':
    import argparse
    parser = argparse.ArgumentParser(description='Generate the Vim demo segmentation dataset.')
    parser.add_argument('root', nargs='?', default='data/vim_demo_seg')
    parser.add_argument('--num-train', type=int, default=240)
    parser.add_argument('--num-val', type=int, default=60)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    out = generate_demo_seg_dataset(args.root, args.num_train, args.num_val, args.img_size,
                                    args.seed)
    miou, cls = constant_baseline_miou(out)
    print(f'{out}: constant "{cls}" prediction gives mIoU {miou:.2f} on the validation split')
