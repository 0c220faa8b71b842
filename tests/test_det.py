"""Detection / instance segmentation: configs, SimpleFPN in the det setting, R-CNN losses with a
Vim backbone, the demo shapes dataset, and a train -> test -> demo run through the tools."""
import ast
import glob
import json
import math
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config

import vim_mm  # noqa: F401  (registers VisionMamba, SimpleFPN, LN2d, VimDemoCocoDataset)
from vim_mm.mm.datasets.demo_det import DEMO_CLASSES, generate_demo_shapes

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DET_CONFIGS = sorted(glob.glob(osp.join(REPO, 'configs', 'det', '*.py')))
DEMO_CONFIG = osp.join(REPO, 'configs', 'det',
                       'mask-rcnn_vim-demo_simplefpn_1xb4-600iters_demo-shapes-128.py')
COCO_CASCADE = osp.join(REPO, 'configs', 'det',
                        'cascade-mask-rcnn_vim-t_simplefpn_8xb8-380k_coco-1024.py')
COCO_MASK_RCNN = osp.join(REPO, 'configs', 'det', 'mask-rcnn_vim-t_simplefpn_8xb8-380k_coco-1024.py')
LAYER_DECAY = osp.join(REPO, 'configs', 'det',
                       'cascade-mask-rcnn_vim-t_simplefpn_layer-decay-0.837_8xb8-184k_coco-1024.py')


def build_model(cfg):
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return MODELS.build(cfg.model)


def per_stage(head):
    """Cascade R-CNN keeps one box / mask head per stage in a ModuleList."""
    return list(head) if isinstance(head, torch.nn.ModuleList) else [head]


@pytest.mark.parametrize('path', DET_CONFIGS, ids=osp.basename)
def test_config_builds(path):
    from mmcv.transforms import Compose
    cfg = Config.fromfile(path)
    assert cfg.default_scope == 'mmdet' and 'vim_mm' in cfg.custom_imports.imports
    if 'coco' in osp.basename(path):  # the authors' ImageNet weights of the matching size
        expected = {'tiny': 'vim_t_midclstok_76p1acc.pth', 'small': 'vim_s_midclstok_80p5acc.pth'}
        assert cfg.model.backbone.init_cfg == dict(
            type='Pretrained', checkpoint='checkpoints/' + expected[cfg.model.backbone.arch])
    cfg.model.backbone.init_cfg = None  # the checkpoint files are not part of the checkout
    model = build_model(cfg)

    assert model.neck.stages[0][0].in_channels == model.backbone.embed_dims
    assert model.backbone.out_indices == (model.backbone.num_layers - 1, )
    # batches are padded to the canvas the position embedding is learned for
    pad = cfg.model.data_preprocessor.batch_augments[0]
    assert tuple(pad.size) == model.backbone.img_size
    num_classes = 80 if 'coco' in osp.basename(path) else len(DEMO_CLASSES)
    bbox_heads, mask_heads = per_stage(model.roi_head.bbox_head), per_stage(model.roi_head.mask_head)
    assert all(head.num_classes == num_classes for head in bbox_heads + mask_heads)
    norms = [head.shared_convs[0].norm for head in bbox_heads] + [head.convs[0].norm for head in mask_heads]
    assert all(isinstance(norm, vim_mm.mm.necks.LayerNorm2d) for norm in norms)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        Compose(cfg[loader].dataset.pipeline)


def test_coco_pipelines_jitter_and_pad_to_1024(tmp_path):
    """LSJ crops train images to at most 1024^2; test resizes to fit 1024 and pads to 1024^2."""
    import cv2
    from mmcv.transforms import Compose
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    cfg = Config.fromfile(COCO_CASCADE)
    img_path = str(tmp_path / 'img.jpg')
    cv2.imwrite(img_path, np.full((480, 640, 3), 128, np.uint8))
    poly = [100., 100., 300., 100., 300., 250., 100., 250.]
    sample = dict(img_path=img_path, img_id=0, height=480, width=640, instances=[dict(
        bbox=[100., 100., 300., 250.], bbox_label=3, ignore_flag=0, mask=[poly])])

    test = Compose(cfg.test_dataloader.dataset.pipeline)(dict(sample))
    assert tuple(test['inputs'].shape) == (3, 1024, 1024)
    assert test['data_samples'].ori_shape == (480, 640)
    assert test['data_samples'].scale_factor == pytest.approx((1.6, 1.6))  # long side -> 1024
    # the canvas below the 768-row image is the BGR mean, as the training pad after normalising
    assert (test['inputs'][:, 768:] == torch.tensor([104, 116, 124])[:, None, None]).all()
    assert (test['inputs'][:, :768] == 128).all()

    train = Compose(cfg.train_dataloader.dataset.pipeline)
    torch.manual_seed(0)
    np.random.seed(0)
    sizes = {tuple(train(dict(sample))['inputs'].shape[1:]) for _ in range(6)}
    assert all(h <= 1024 and w <= 1024 for h, w in sizes)
    assert len(sizes) > 1  # the scale is jittered


@pytest.mark.parametrize('hw', [(128, 128), (96, 160)])
def test_simplefpn_det_levels(hw):
    """One stride-16 Vim map -> 5 levels of 256 channels at strides 4, 8, 16, 32, 64."""
    from vim_mm.mm.necks import SimpleFPN
    backbone = vim_mm.VisionMamba(arch='demo', img_size=128, out_indices=(3, ))
    neck = SimpleFPN(in_channels=64, out_channels=256, num_outs=5, norm_cfg=dict(type='LN2d'))
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, *hw))
        outs = neck(feats)
    assert len(feats) == 1 and tuple(feats[0].shape) == (2, 64, hw[0] // 16, hw[1] // 16)
    assert [tuple(o.shape) for o in outs] == [
        (2, 256, math.ceil(hw[0] / s), math.ceil(hw[1] / s)) for s in (4, 8, 16, 32, 64)]


def test_rcnn_roi_features_match_torchvision():
    """mmcv's RoIAlign reads raw NCHW memory: the neck must hand it contiguous maps (a permuted
    LayerNorm2d output once fed the RoI heads scrambled features). torchvision's RoIAlign
    honours strides and is the reference."""
    from mmcv.ops import roi_align as mmcv_roi_align
    from torchvision.ops import roi_align as tv_roi_align

    from vim_mm.mm.necks import SimpleFPN
    torch.manual_seed(0)
    neck = SimpleFPN(in_channels=16, out_channels=8, num_outs=5, norm_cfg=dict(type='LN2d'))
    with torch.no_grad():
        outs = neck(torch.randn(2, 16, 6, 10))
    rois = torch.tensor([[0, 3.0, 2.0, 30.0, 20.0], [1, 10.0, 5.5, 37.0, 23.0]])
    for level, stride in zip(outs, (4, 8, 16, 32)):
        ours = mmcv_roi_align(level, rois, (7, 7), 1 / stride, 0, 'avg', True)
        torch.testing.assert_close(ours, tv_roi_align(level, rois, (7, 7), 1 / stride, 0, True))


def tiny_rcnn_cfg(path, channels=32):
    """The COCO config with the demo Vim, thin heads, 3 classes and few RoIs, for a CPU forward."""
    cfg = Config.fromfile(path)
    model = cfg.model
    model.backbone.update(arch='demo', img_size=(96, 160), out_indices=(3, ), init_cfg=None)
    model.neck.update(in_channels=64, out_channels=channels)
    model.data_preprocessor.batch_augments = None
    model.rpn_head.update(in_channels=channels, feat_channels=channels)
    model.roi_head.bbox_roi_extractor.out_channels = channels
    model.roi_head.mask_roi_extractor.out_channels = channels
    heads = model.roi_head.bbox_head
    for head in heads if isinstance(heads, list) else [heads]:
        head.update(num_classes=3, in_channels=channels, conv_out_channels=channels,
                    fc_out_channels=channels)
    model.roi_head.mask_head.update(num_classes=3, in_channels=channels,
                                    conv_out_channels=channels)
    model.train_cfg.rpn_proposal.max_per_img = 64
    stages = model.train_cfg.rcnn
    for stage in stages if isinstance(stages, list) else [stages]:
        stage.sampler.num = 32
    return cfg


@pytest.mark.parametrize('path,stage_prefixes', [
    (COCO_CASCADE, ('s0.', 's1.', 's2.')),
    (COCO_MASK_RCNN, ('', )),
], ids=['cascade', 'mask-rcnn'])
def test_rcnn_loss_on_non_square_input(path, stage_prefixes):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build_model(tiny_rcnn_cfg(path))
    packed = demo_mm_inputs(batch_size=2, image_shapes=[(3, 96, 160)] * 2, num_items=[2, 3],
                            num_classes=3, with_mask=True)
    data = model.data_preprocessor(packed, True)
    assert tuple(data['inputs'].shape) == (2, 3, 96, 160)
    losses = model(**data, mode='loss')

    expected = {'loss_rpn_cls', 'loss_rpn_bbox'} | {
        p + k for p in stage_prefixes for k in ('loss_cls', 'acc', 'loss_bbox', 'loss_mask')}
    assert set(losses) == expected
    total = 0
    for name, value in losses.items():
        values = value if isinstance(value, list) else [value]
        assert all(torch.isfinite(v).all() for v in values), name
        if 'loss' in name:
            total = total + sum(v.sum() for v in values)
    total.backward()
    grad = model.backbone.patch_embed.proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_layer_decay_schedule_groups():
    """The authors' schedule: block i gets lr 1e-4 * 0.837^(24 - i), heads 1e-4, no wd on 1-D."""
    from mmengine.optim import build_optim_wrapper
    cfg = Config.fromfile(LAYER_DECAY)
    assert cfg.train_cfg.max_iters == 184375
    cfg.model.backbone.init_cfg = None
    model = build_model(cfg)
    optim_cfg = cfg.optim_wrapper.copy()
    optim_cfg.type = 'OptimWrapper'  # AmpOptimWrapper needs a GPU
    optim_cfg.pop('dtype')
    groups = build_optim_wrapper(model, optim_cfg).optimizer.param_groups
    lr_of = {}
    for group in groups:
        for param in group['params']:
            lr_of[id(param)] = (group['lr'], group['weight_decay'])
    named = dict(model.named_parameters())
    assert lr_of[id(named['backbone.layers.0.mixer.in_proj.weight'])] == pytest.approx(
        (1e-4 * 0.837 ** 24, 0.1))
    assert lr_of[id(named['backbone.pos_embed'])] == pytest.approx((1e-4 * 0.837 ** 25, 0.0))
    assert lr_of[id(named['backbone.layers.23.mixer.A_log'])][1] == 0.0
    assert lr_of[id(named['roi_head.mask_head.2.conv_logits.weight'])] == pytest.approx((1e-4, 0.1))


def test_demo_shapes_dataset(tmp_path):
    from mmdet.datasets import CocoDataset
    from mmdet.registry import DATASETS
    from mmengine.registry import init_default_scope
    from pycocotools import mask as mask_utils
    import cv2

    root_a, root_b = str(tmp_path / 'a'), str(tmp_path / 'b')
    generate_demo_shapes(root_a, num_train=6, num_val=3)
    generate_demo_shapes(root_b, num_train=6, num_val=3)
    with open(osp.join(root_a, 'annotations', 'instances_train.json')) as f:
        coco = json.load(f)
    with open(osp.join(root_b, 'annotations', 'instances_train.json')) as f:
        assert json.load(f) == coco  # deterministic
    assert [c['name'] for c in coco['categories']] == list(DEMO_CLASSES)
    per_image = np.bincount([a['image_id'] for a in coco['annotations']], minlength=7)[1:]
    assert len(coco['images']) == 6 and per_image.min() >= 1 and per_image.max() <= 4
    for ann in coco['annotations']:
        mask = mask_utils.decode(mask_utils.frPyObjects(ann['segmentation'], 128, 128)).max(-1)
        assert mask.sum() == pytest.approx(ann['area'])
        image = cv2.imread(osp.join(root_a, 'train', f'{ann["image_id"]:06d}.png'))
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128
        # the object is painted exactly where its mask is: flat colour + noise inside
        assert image[mask > 0].std(0).max() < 20

    init_default_scope('mmdet')
    root = str(tmp_path / 'first_use')
    dataset = DATASETS.build(dict(
        type='VimDemoCocoDataset', data_root=root, ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'), test_mode=True, pipeline=[]))
    assert isinstance(dataset, CocoDataset) and len(dataset) == 50
    assert dataset.metainfo['classes'] == DEMO_CLASSES
    assert osp.isfile(osp.join(root, 'train', '000200.png'))


def run_tool(*args, timeout=300):
    # the repo first, and what the caller's PYTHONPATH holds (a GPU machine's site dir); 2 threads
    # thrash a busy 2-core box
    path = os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=path)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_train_test_demo_tools(tmp_path):
    import cv2
    data = str(tmp_path / 'shapes') + '/'
    generate_demo_shapes(data, num_train=16, num_val=8)
    work = str(tmp_path / 'work')
    options = [
        f'train_dataloader.dataset.data_root={data}', f'val_dataloader.dataset.data_root={data}',
        f'test_dataloader.dataset.data_root={data}',
        f'val_evaluator.ann_file={data}annotations/instances_val.json',
        f'test_evaluator.ann_file={data}annotations/instances_val.json',
        'train_dataloader.batch_size=4', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False', 'val_dataloader.num_workers=0',
        'val_dataloader.persistent_workers=False', 'test_dataloader.num_workers=0',
        'test_dataloader.persistent_workers=False',
        'train_cfg.max_iters=3', 'train_cfg.val_interval=1000',  # evaluated by test.py below
        'default_hooks.checkpoint.interval=3',
        'model.test_cfg.rcnn.score_thr=0.0',  # an untrained model still predicts something
    ]
    run_tool('tools/train.py', DEMO_CONFIG, '--work-dir', work, '--cfg-options', *options)
    ckpt = osp.join(work, 'iter_3.pth')
    assert osp.isfile(ckpt)

    out = run_tool('tools/test.py', DEMO_CONFIG, ckpt, '--work-dir', work,
                   '--cfg-options', *options)
    metrics = ast.literal_eval(out.strip().splitlines()[-1])
    for key in ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP', 'coco/segm_mAP_50'):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics)

    img = osp.join(data, 'val', '000001.png')
    png = str(tmp_path / 'drawn.png')
    run_tool('tools/demo_det.py', img, DEMO_CONFIG, ckpt, '--out', png, '--score-thr', '0.0')
    drawn, original = cv2.imread(png), cv2.imread(img)
    assert drawn is not None and drawn.shape == original.shape
    changed = np.abs(drawn.astype(int) - original.astype(int)).max(-1) > 0

    from mmdet.apis import inference_detector, init_detector
    model = init_detector(DEMO_CONFIG, ckpt, device='cpu')
    boxes = inference_detector(model, img).pred_instances.bboxes
    assert len(boxes) > 0
    inside = np.zeros_like(changed)
    for x1, y1, x2, y2 in boxes.round().int().tolist():
        inside[max(y1, 0):y2 + 1, max(x1, 0):x2 + 1] = True
    # boxes and translucent masks are drawn over the instances (labels may stick out a little)
    outside = changed[~inside].mean() if (~inside).any() else 0.0
    assert changed[inside].mean() > max(0.1, outside)


def test_demo_detector_heads_fit_one_batch(tmp_path):
    """The RoI heads must learn: 40 AdamW steps on one batch of four demo images take the mask
    loss well below its start and the box classifier above the background share. (A neck that
    handed RoIAlign a permuted map once kept loss_mask near ln 2 here.)"""
    from mmengine.dataset import pseudo_collate
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS, MODELS
    init_default_scope('mmdet')
    data = str(tmp_path / 'shapes') + '/'
    generate_demo_shapes(data, num_train=4, num_val=1)
    cfg = Config.fromfile(DEMO_CONFIG)
    cfg.train_dataloader.dataset.data_root = data
    torch.manual_seed(0)
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = pseudo_collate([dataset[i] for i in range(4)])
    model = MODELS.build(cfg.model)
    model.init_weights()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.05)
    history = []
    for _ in range(40):
        losses = model(**model.data_preprocessor(batch, True), mode='loss')
        loss, log_vars = model.parse_losses(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v) for k, v in log_vars.items()})
    first, last = history[0], history[-5:]
    mask_loss = np.mean([h['loss_mask'] for h in last])
    assert mask_loss < 0.5 * first['loss_mask'] and mask_loss < 0.45, (first, last)
    assert np.mean([h['loss_cls'] for h in last]) < 0.6 * first['loss_cls'], (first, last)
