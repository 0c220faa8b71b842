"""Built-in COCO-format instance-segmentation demo: coloured shapes on noisy backgrounds.

``generate_demo_shapes(root)`` writes, deterministically from a seed,

    root/train/000001.png ...                      (``num_train`` images)
    root/val/000001.png ...                        (``num_val`` images)
    root/annotations/instances_{train,val}.json    (COCO polygons, boxes, areas)

with 1-4 non-overlapping discs, squares and triangles per image. Colours are drawn
independently of the class, so a detector has to learn shapes, not colours. Every object is
painted through the very mask its annotation decodes to (pycocotools), so masks are exact.
``VimDemoCocoDataset`` is mmdet's ``CocoDataset`` that generates this data into its
``data_root`` on first use (a marker file says the data is complete).
"""
from __future__ import annotations

import json
import math
import os
import os.path as osp

import numpy as np

DEMO_CLASSES = ('disc', 'square', 'triangle')
DEMO_PALETTE = [(220, 20, 60), (0, 128, 255), (60, 180, 75)]
COLOURS = np.array([(230, 50, 50), (50, 200, 60), (60, 90, 235), (240, 220, 40), (240, 240, 240),
                    (200, 60, 220)], dtype=np.float32)
MARKER = '.vim_demo_det_complete'
VERSION = 2  # bump when the generated data changes, so stale copies are regenerated


def shape_polygon(kind: str, cx: float, cy: float, size: float, angle: float) -> np.ndarray:
    """(K, 2) vertices of a disc (48-gon), square or equilateral triangle of width ~``size``."""
    if kind == 'disc':
        theta = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        radius = size / 2
    elif kind == 'square':
        theta = angle + np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        radius = size / 2 * math.sqrt(2)
    elif kind == 'triangle':
        theta = angle + np.array([0, 2 / 3, 4 / 3]) * math.pi
        radius = size / math.sqrt(3)
    else:
        raise ValueError(f'unknown shape {kind!r}')
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)


def _boxes_overlap(a, b, margin=2.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def render_image(rng: np.random.Generator, size: int):
    """One noisy image (H, W, 3 uint8, RGB) and its instances as (class index, polygon, RLE)."""
    from pycocotools import mask as mask_utils

    background = rng.uniform(20, 120, size=3).astype(np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    instances, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(50):
            label = int(rng.integers(len(DEMO_CLASSES)))
            width = rng.uniform(0.2, 0.42) * size
            cx, cy = rng.uniform(width * 0.72, size - width * 0.72, size=2)
            poly = shape_polygon(DEMO_CLASSES[label], cx, cy, width, rng.uniform(0, math.pi / 2))
            poly = np.round(np.clip(poly, 0, size - 1), 2)  # as stored in the json
            box = (*poly.min(0), *poly.max(0))
            if not any(_boxes_overlap(box, other) for other in boxes):
                break
        else:
            continue
        rle = mask_utils.merge(mask_utils.frPyObjects([poly.ravel().tolist()], size, size))
        mask = mask_utils.decode(rle).astype(bool)
        if mask.sum() < 16:
            continue
        image[mask] = COLOURS[rng.integers(len(COLOURS))]
        boxes.append(box)
        instances.append((label, poly, rle))
    image += rng.normal(0, 12, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), instances


def _write_split(root: str, split: str, num_images: int, size: int, rng) -> None:
    import cv2
    from pycocotools import mask as mask_utils

    os.makedirs(osp.join(root, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image, instances = render_image(rng, size)
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(osp.join(root, split, file_name), image[..., ::-1])
        images.append(dict(id=image_id, file_name=file_name, width=size, height=size))
        for label, poly, rle in instances:
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                segmentation=[poly.ravel().tolist()],
                area=float(mask_utils.area(rle)), bbox=mask_utils.toBbox(rle).tolist(), iscrowd=0))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(DEMO_CLASSES)]
    ann_path = osp.join(root, 'annotations', f'instances_{split}.json')
    os.makedirs(osp.dirname(ann_path), exist_ok=True)
    with open(ann_path + '.tmp', 'w') as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    os.replace(ann_path + '.tmp', ann_path)


def generate_demo_shapes(root: str, num_train: int = 200, num_val: int = 50, size: int = 128,
                         seed: int = 0) -> str:
    """Write the demo dataset under ``root`` (see the module docstring); returns ``root``."""
    rng = np.random.default_rng(seed)
    _write_split(root, 'train', num_train, size, rng)
    _write_split(root, 'val', num_val, size, rng)
    with open(osp.join(root, MARKER), 'w') as f:
        json.dump(dict(version=VERSION, num_train=num_train, num_val=num_val, size=size,
                       seed=seed), f)
    return root


def ensure_demo_shapes(root: str, **kwargs) -> str:
    """Generate the demo data into ``root`` unless this generator version completed it there
    (of any size: a smaller set made with ``generate_demo_shapes`` is used as it is)."""
    marker = osp.join(root, MARKER)
    if osp.isfile(marker):
        with open(marker) as f:
            if json.load(f).get('version') == VERSION:
                return root
    return generate_demo_shapes(root, **kwargs)


try:
    from mmdet.datasets import CocoDataset
except ImportError:  # mmdet not installed: the generator above still works on its own
    CocoDataset = None

if CocoDataset is not None:
    from ..registry import register_everywhere

    class VimDemoCocoDataset(CocoDataset):
        """mmdet ``CocoDataset`` of the demo shapes, generated into ``data_root`` if missing."""

        METAINFO = dict(classes=DEMO_CLASSES, palette=DEMO_PALETTE)

        def __init__(self, *args, data_root: str | None = None, lazy_init: bool = False,
                     **kwargs):
            if not data_root:
                raise ValueError('VimDemoCocoDataset needs data_root: the folder it generates '
                                 'the demo shapes into (e.g. data/demo_shapes/).')
            if not lazy_init:  # lazy: only the metainfo is wanted (e.g. by init_detector)
                ensure_demo_shapes(data_root)
            super().__init__(*args, data_root=data_root, lazy_init=lazy_init, **kwargs)

    register_everywhere('DATASETS', VimDemoCocoDataset, packages=['mmdet'])
