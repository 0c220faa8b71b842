"""Semantic segmentation: configs, UperNet-Vim model, SimpleFPN, demo dataset, train/resume/test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmseg.registry import DATASETS, MODELS
from mmseg.structures import SegDataSample
from PIL import Image

import vim_mm  # noqa: F401  (registrations)
from vim_mm.mm.datasets.demo_seg import (CLASSES, constant_baseline_miou,
                                         generate_demo_seg_dataset)
from vim_mm.mm.necks import SimpleFPN

REPO = Path(__file__).resolve().parents[1]
SEG_CONFIGS = sorted((REPO / 'configs' / 'seg').glob('*.py'))
DEMO_CONFIG = REPO / 'configs' / 'seg' / 'upernet_vim_demo.py'
TINY_CONFIG = REPO / 'configs' / 'seg' / 'upernet_vim-t_4xb4-160k_ade20k-512x512.py'


def load_config(path) -> Config:
    """The config with the ImageNet checkpoint (absent in tests) dropped from the backbone."""
    cfg = Config.fromfile(str(path))
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmseg')
    return cfg


def build_model(cfg):
    return revert_sync_batchnorm(MODELS.build(cfg.model)).eval()


def write_sample(folder: Path, pipeline, size=(48, 80)):
    """A random image + label map, as the dataset would hand it to ``pipeline``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / 'x.jpg')
    Image.fromarray(rng.integers(0, 6, size, dtype=np.uint8)).save(folder / 'x.png')
    load = next(t for t in pipeline if t['type'] == 'LoadAnnotations')
    return dict(img_path=str(folder / 'x.jpg'), seg_map_path=str(folder / 'x.png'),
                reduce_zero_label=bool(load.get('reduce_zero_label')), seg_fields=[])


# ----------------------------------------------------------------------------- configs
def test_all_seg_configs_are_collected():
    names = {p.name for p in SEG_CONFIGS}
    assert {'upernet_vim_t.py', 'upernet_vim_s.py', 'upernet_vim_demo.py',
            'upernet_vim-t_4xb4-160k_ade20k-512x512.py',
            'upernet_vim-s_4xb4-160k_ade20k-512x512.py'} <= names


@pytest.mark.parametrize('path', SEG_CONFIGS, ids=lambda p: p.stem)
def test_config_builds_model_and_pipelines(path, tmp_path):
    from mmcv.transforms import Compose
    cfg = load_config(path)
    model = MODELS.build(cfg.model)
    dims = model.backbone.embed_dims
    assert len(model.backbone.out_indices) == 4
    assert model.decode_head.in_channels == [dims] * 4
    assert model.auxiliary_head.in_channels == dims
    assert model.decode_head.num_classes == model.auxiliary_head.num_classes

    sample = write_sample(tmp_path, cfg.train_dataloader.dataset.pipeline)
    crop = cfg.model.data_preprocessor.size
    packed = Compose(cfg.train_dataloader.dataset.pipeline)(dict(sample))
    assert packed['inputs'].shape[0] == 3
    assert packed['inputs'].shape[1:] == packed['data_samples'].gt_sem_seg.data.shape[1:]
    assert all(s <= c for s, c in zip(packed['inputs'].shape[1:], crop))
    for loader in ('val_dataloader', 'test_dataloader'):
        packed = Compose(cfg[loader].dataset.pipeline)(dict(sample))
        # images are rescaled (keep ratio) to fit the test scale; labels stay at full size
        assert packed['data_samples'].gt_sem_seg.data.shape[1:] == (48, 80)
        assert max(packed['inputs'].shape[1:]) <= max(cfg.test_pipeline[1]['scale'])


def test_paper_and_author_settings():
    tiny = Config.fromfile(str(TINY_CONFIG))
    assert tiny.optim_wrapper.type == 'AmpOptimWrapper'
    assert tiny.optim_wrapper.optimizer.lr == 6e-5
    assert tiny.optim_wrapper.optimizer.weight_decay == 0.01
    assert tiny.train_cfg.max_iters == 160000 and tiny.train_dataloader.batch_size == 4
    assert tiny.param_scheduler[0].end == 1500 and tiny.param_scheduler[1].end == 160000
    assert tiny.model.backbone.out_indices == (5, 11, 17, 23)
    small = Config.fromfile(str(REPO / 'configs/seg/upernet_vim-s_4xb4-60k-ld0.95_ade20k-512x512.py'))
    assert small.model.backbone.arch == 'small' and small.model.neck.in_channels == 384
    assert small.optim_wrapper.optimizer.lr == 2e-4
    assert small.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.95
    assert small.train_cfg.max_iters == 60000 and small.param_scheduler[1].end == 60000
    assert small.default_hooks.checkpoint.interval == 6000


# ----------------------------------------------------------------------------- model
def test_upernet_forward_non_square():
    cfg = load_config(TINY_CONFIG)
    model = build_model(cfg)
    h, w = 72, 104  # not multiples of the patch size, not square
    x = torch.randn(1, 3, h, w)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))
    with torch.no_grad():
        logits = model(x, mode='tensor')
        result = model.predict(x, [SegDataSample(metainfo=meta)])[0]
    # Vim pads to 80x112 (5x7 tokens); UPerHead predicts at stride 4
    assert logits.shape == (1, 150, 20, 28)
    assert result.seg_logits.data.shape == (150, h, w)
    assert result.pred_sem_seg.data.shape == (1, h, w)
    assert torch.equal(result.pred_sem_seg.data[0], result.seg_logits.data.argmax(0))


@pytest.mark.parametrize('hw', [(8, 8), (5, 7)])
def test_simple_fpn_shapes(hw):
    h, w = hw
    maps = [torch.randn(2, 32, h, w) for _ in range(4)]
    outs = SimpleFPN(32, norm_cfg=dict(type='BN'))(maps)
    assert [o.shape for o in outs] == [(2, 32, 4 * h, 4 * w), (2, 32, 2 * h, 2 * w),
                                       (2, 32, h, w), (2, 32, h // 2, w // 2)]
    # level i is built from map i
    assert torch.equal(outs[2], maps[2])
    assert torch.equal(outs[3], torch.nn.functional.max_pool2d(maps[3], 2))

    outs = SimpleFPN(32, out_channels=16, num_outs=5)(maps[:1])
    sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]
    sizes.append(tuple((s - 1) // 2 + 1 for s in sizes[-1]))  # stride-2 max-pool of the last
    assert [tuple(o.shape) for o in outs] == [(2, 16) + s for s in sizes]


def test_layer_decay_param_groups():
    cfg = load_config(TINY_CONFIG)
    model = MODELS.build(cfg.model)
    base_lr = 6e-5
    optim_cfg = dict(type='OptimWrapper',
                     optimizer=dict(type='AdamW', lr=base_lr, weight_decay=0.01),
                     constructor='VimLayerDecayOptimWrapperConstructor',
                     paramwise_cfg=dict(layer_decay_rate=0.9))
    groups = build_optim_wrapper(model, optim_cfg).optimizer.param_groups
    group_of = {id(p): g for g in groups for p in g['params']}
    params = dict(model.named_parameters())
    assert len(group_of) == len(params)

    def lr(name):
        return group_of[id(params[name])]['lr']

    def wd(name):
        return group_of[id(params[name])]['weight_decay']

    num = 24 + 2  # embeddings, 24 blocks, final norm + neck + heads
    assert lr('backbone.patch_embed.proj.weight') == pytest.approx(base_lr * 0.9 ** (num - 1))
    assert lr('backbone.pos_embed') == min(g['lr'] for g in groups)
    for i in (0, 11, 23):
        assert lr(f'backbone.layers.{i}.mixer.in_proj.weight') == pytest.approx(
            base_lr * 0.9 ** (num - 2 - i))
    for name in ('backbone.norm_f.weight', 'decode_head.conv_seg.weight',
                 'neck.stages.0.0.weight', 'auxiliary_head.conv_seg.weight'):
        assert lr(name) == pytest.approx(base_lr)
    for name in ('backbone.pos_embed', 'backbone.layers.3.mixer.A_log',
                 'backbone.layers.3.mixer.A_b_log', 'backbone.layers.3.mixer.D',
                 'backbone.layers.3.mixer.D_b', 'backbone.layers.3.norm.weight',
                 'backbone.norm_f.weight', 'decode_head.conv_seg.bias'):
        assert wd(name) == 0.0, name
    for name in ('backbone.patch_embed.proj.weight', 'backbone.layers.3.mixer.in_proj.weight',
                 'decode_head.fpn_bottleneck.conv.weight'):
        assert wd(name) == 0.01, name


# ----------------------------------------------------------------------------- demo data
def test_demo_generator_is_deterministic(tmp_path):
    kw = dict(num_train=5, num_val=2, img_size=32)
    a = generate_demo_seg_dataset(tmp_path / 'a', **kw)
    b = generate_demo_seg_dataset(tmp_path / 'b', **kw)
    files = sorted(p.relative_to(a) for p in a.rglob('*') if p.is_file())
    assert len(files) == 2 * (5 + 2) + 1  # jpg + png per image, marker
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    other = generate_demo_seg_dataset(tmp_path / 'c', **kw, seed=1)
    first = 'annotations/training/demo_training_00000.png'
    assert (other / first).read_bytes() != (a / first).read_bytes()
    # every image draws from its own generator: a smaller set is a prefix of a larger one
    small = generate_demo_seg_dataset(tmp_path / 'd', num_train=2, num_val=1, img_size=32)
    assert (small / first).read_bytes() == (a / first).read_bytes()
    for path in (a / 'annotations/training').glob('*.png'):
        label = np.asarray(Image.open(path))
        assert label.shape == (32, 32)
        assert set(np.unique(label)) <= set(range(len(CLASSES)))
        assert (label == 0).any() and (label > 0).any()  # background and at least one shape


def test_demo_dataset_loads_and_regenerates(tmp_path):
    init_default_scope('mmseg')
    cfg = Config.fromfile(str(DEMO_CONFIG))
    ds_cfg = cfg.val_dataloader.dataset
    ds_cfg.update(data_root=str(tmp_path), num_train=3, num_val=2, img_size=32)
    dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == 2
    assert dataset.metainfo['classes'] == CLASSES
    item = dataset[1]
    label = np.asarray(Image.open(tmp_path / 'annotations/validation/demo_validation_00001.png'))
    assert torch.equal(item['data_samples'].gt_sem_seg.data[0], torch.from_numpy(label.copy()).long())
    assert item['inputs'].shape == (3, 64, 64)  # test pipeline rescales to the 64x64 scale
    # other settings -> regenerated in place
    ds_cfg.update(num_val=4, img_size=24)
    dataset = DATASETS.build(ds_cfg)
    assert len(dataset) == 4
    assert Image.open(tmp_path / 'images/training/demo_training_00000.jpg').size == (24, 24)


def test_constant_baseline_miou(tmp_path):
    for split, label in (('training', np.array([[0, 0, 0, 3]])),
                         ('validation', np.array([[0] * 12 + [2] * 4]))):
        folder = tmp_path / 'annotations' / split
        folder.mkdir(parents=True)
        Image.fromarray(label.astype(np.uint8)).save(folder / 'a.png')
    # predicting background everywhere: IoU 12/16 for it, 0 for class 2, absent classes skipped
    miou, cls = constant_baseline_miou(tmp_path)
    assert cls == 'background'
    assert miou == pytest.approx(100 * (12 / 16 + 0) / 2)


# ----------------------------------------------------------------------------- end to end
def run_tool(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def read_scalars(work_dir: Path):
    """The json logs of every run in ``work_dir``, oldest first."""
    runs = sorted(p for p in work_dir.glob('*/vis_data/scalars.json'))
    return [[json.loads(line) for line in p.read_text().splitlines()] for p in runs]


def test_demo_train_resume_test(tmp_path):
    work = tmp_path / 'work'
    data = dict(data_root=str(tmp_path / 'data'), num_train=16, num_val=4)
    options = ['default_hooks.logger.interval=1', 'param_scheduler.0.end=2',
               'train_dataloader.batch_size=4']
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options += [f'{loader}.dataset.{k}={v}' for k, v in data.items()]
    train = ['tools/train.py', DEMO_CONFIG, '--work-dir', work, '--cfg-options', *options]

    run_tool(*train, 'train_cfg.max_iters=6')
    assert (work / 'iter_6.pth').is_file()
    run_tool(*train, 'train_cfg.max_iters=10', '--resume')
    assert (work / 'iter_10.pth').is_file()

    first, second = read_scalars(work)
    steps = [r['step'] for r in second if 'loss' in r]
    assert steps == [7, 8, 9, 10]  # the resumed run continues the iteration count
    losses = [r['loss'] for run in (first, second) for r in run if 'loss' in r]
    assert np.mean(losses[-2:]) < np.mean(losses[:2])
    val_miou = [r['mIoU'] for r in second if 'mIoU' in r][-1]

    show = tmp_path / 'show'
    out = run_tool('tools/test.py', DEMO_CONFIG, work / 'iter_10.pth', '--work-dir',
                   tmp_path / 'test', '--show-dir', show, '--cfg-options', *options)
    metrics = json.loads(next((tmp_path / 'test').glob('*/*.json')).read_text())
    test_miou = metrics['mIoU']
    assert f'mIoU: {test_miou:.4f}' in out
    assert 0 < test_miou <= 100
    assert test_miou == pytest.approx(val_miou, abs=0.01)  # same weights, same images
    assert len(list(show.rglob('*.png'))) == 4  # one drawing per validation image
