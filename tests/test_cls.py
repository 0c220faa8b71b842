"""ImageNet classification configs (configs/cls) and the CPU demo, trained end to end.

Every config builds its model and pipelines; the long-sequence fine-tune configs load an
authors-format 224 checkpoint with its head; the demo trains through tools/train.py with the full
augmentation stack, and its checkpoint initialises segmentation and detection backbones.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vim_mm  # noqa: F401  (registers VisionMamba, the classifier, the demo dataset)
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from vim_mm.models.layers import resize_pos_grid, split_middle

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / 'configs' / 'cls'
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob('*.py'))
DEMO = 'vim-demo_demo-shapes.py'
FINETUNE = [name for name in CONFIGS if '-s8_' in name]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """The models here are small; on busy shared cores one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_config(name, drop_pretrained=True):
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    if drop_pretrained:  # the checkpoints are not on this machine
        cfg.model.init_cfg = None
        cfg.model.backbone.init_cfg = None
    return cfg


def build_classifier(cfg):
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS.build(cfg.model)


def test_configs_found():
    assert DEMO in CONFIGS and len(FINETUNE) == 2
    assert {'vim-tiny-p16_8xb128-300e_in1k-224.py', 'vim-small-p16_8xb128-300e_in1k-224.py',
            'vim-base-p16_8xb128-300e_in1k-224.py'} <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_model_and_pipelines(name, tmp_path):
    cfg = load_config(name)
    model = build_classifier(cfg).eval()
    model.head.init_weights()
    backbone, head = model.backbone, model.head
    num_classes = cfg.model.head.num_classes
    assert head.fc.in_features == backbone.embed_dims
    assert head.fc.out_features == num_classes == model.data_preprocessor.num_classes
    # the head's init_cfg: trunc-normal std .02, zero bias
    assert torch.all(head.fc.bias == 0)
    assert abs(head.fc.weight.std().item() - .02) < .004
    stride = cfg.model.backbone.stride
    size = cfg.model.backbone.img_size
    grid = (size - 16) // stride + 1
    assert backbone.pos_embed.shape == (1, grid * grid + 1, backbone.embed_dims)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32), mode='tensor')
    assert logits.shape == (2, num_classes) and torch.isfinite(logits).all()

    # the pipelines turn an image file of any size into a (3, img_size, img_size) input
    image = tmp_path / 'image.png'
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (90, 130, 3), np.uint8)).save(image)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        pipeline = Compose(cfg[loader].dataset.pipeline)
        packed = pipeline(dict(img_path=str(image), gt_label=1))
        assert packed['inputs'].shape == (3, size, size), loader
        assert packed['data_samples'].gt_label.tolist() == [1]


def test_demo_keeps_the_imagenet_recipe():
    demo, imagenet = load_config(DEMO), load_config('vim-small-p16_8xb128-300e_in1k-224.py')
    kinds = lambda pipeline: [step['type'] for step in pipeline]  # noqa: E731
    assert kinds(demo.train_dataloader.dataset.pipeline) == kinds(
        imagenet.train_dataloader.dataset.pipeline)
    assert 'RandAugment' in kinds(demo.train_dataloader.dataset.pipeline)
    assert demo.train_dataloader.sampler.type == 'RepeatAugSampler'
    assert (demo.model.data_preprocessor.batch_augments
            == imagenet.model.data_preprocessor.batch_augments)
    assert demo.model.head.loss == imagenet.model.head.loss
    assert [h.type for h in demo.custom_hooks] == ['EMAHook']


def test_weight_decay_exemptions():
    cfg = load_config('vim-tiny-p16_8xb128-300e_in1k-224.py')
    model = build_classifier(cfg)
    cfg.optim_wrapper.type = 'OptimWrapper'  # AMP needs a GPU; the parameter groups do not
    optimizer = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    decay_of = {id(p): group['weight_decay']
                for group in optimizer.param_groups for p in group['params']}
    params = dict(model.named_parameters())
    assert len(decay_of) == len(params)
    exempt = ('backbone.pos_embed', 'backbone.cls_token', 'backbone.layers.3.mixer.A_log',
              'backbone.layers.3.mixer.A_b_log', 'backbone.layers.3.mixer.D',
              'backbone.layers.3.norm.weight', 'backbone.norm_f.weight', 'head.fc.bias',
              'backbone.layers.3.mixer.dt_proj.bias')
    for name in exempt:
        assert decay_of[id(params[name])] == 0, name
    for name in ('backbone.layers.3.mixer.in_proj.weight', 'backbone.patch_embed.proj.weight',
                 'head.fc.weight'):
        assert decay_of[id(params[name])] == 0.1, name  # Vim-Ti: the authors' wd 0.1
    assert all(group['lr'] == 1e-3 for group in optimizer.param_groups)


@pytest.mark.parametrize('name', FINETUNE)
def test_finetune_configs_start_from_the_224_model(name):
    cfg = load_config(name, drop_pretrained=False)
    pretrain = load_config(name.replace('-s8_', '_').replace('30e', '300e'))
    assert cfg.model.backbone.stride == 8 and pretrain.model.backbone.stride == 16
    assert cfg.model.backbone.arch == pretrain.model.backbone.arch
    assert cfg.model.init_cfg == cfg.model.backbone.init_cfg  # whole model, then head included
    assert cfg.model.init_cfg.checkpoint.endswith(f'vim_{cfg.model.backbone.arch[0]}_midclstok_'
                                                  f'{"76p1" if "tiny" in name else "80p5"}acc.pth')
    optimizer = cfg.optim_wrapper.optimizer
    assert optimizer.lr == 1e-5 and optimizer.weight_decay == 1e-8
    assert cfg.param_scheduler == [] and cfg.train_cfg.max_epochs == 30


def test_finetune_loads_224_checkpoint_with_head(tmp_path):
    """Vim-Ti stride 8 starts from the stride-16 / 224 model: resized grid, head kept."""
    name = 'vim-tiny-p16-s8_8xb128-30e_in1k-224.py'
    cfg = load_config(name, drop_pretrained=False)
    source_cfg = load_config(name)
    source_cfg.model.backbone.stride = 16
    source = build_classifier(source_cfg)
    # the authors' layout: plain names, 'head.weight', everything under 'model'
    weights = {k.replace('backbone.', '', 1).replace('head.fc.', 'head.'): v
               for k, v in source.state_dict().items()}
    path = tmp_path / 'vim_midclstok.pth'
    torch.save(dict(model=weights, epoch=299), path)
    assert cfg.model.init_cfg.checkpoint == cfg.model.backbone.init_cfg.checkpoint
    cfg.model.init_cfg.checkpoint = cfg.model.backbone.init_cfg.checkpoint = str(path)

    model = build_classifier(cfg)
    model.init_weights()
    torch.testing.assert_close(model.head.fc.weight, weights['head.weight'], rtol=0, atol=0)
    torch.testing.assert_close(model.head.fc.bias, weights['head.bias'], rtol=0, atol=0)
    for key in ('layers.5.mixer.in_proj.weight', 'layers.23.mixer.A_b_log', 'cls_token',
                'patch_embed.proj.weight', 'norm_f.weight'):
        torch.testing.assert_close(model.backbone.state_dict()[key], weights[key], rtol=0, atol=0)
    assert model.backbone.grid_size == (27, 27)
    grid, cls_slot = split_middle(model.backbone.pos_embed.detach())
    source_grid, source_slot = split_middle(weights['pos_embed'])
    torch.testing.assert_close(cls_slot, source_slot, rtol=0, atol=0)
    torch.testing.assert_close(grid, resize_pos_grid(source_grid, (14, 14), (27, 27)))


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """Train the demo through tools/train.py (full recipe, shortened) once for the tests below."""
    root = tmp_path_factory.mktemp('demo_cls')
    work_dir, data_root = root / 'work', root / 'shapes'
    epochs = 20
    command = [
        sys.executable, str(ROOT / 'tools' / 'train.py'), str(CONFIG_DIR / DEMO),
        '--work-dir', str(work_dir), '--cfg-options',
        f'train_dataloader.dataset.data_root={data_root}',
        f'val_dataloader.dataset.data_root={data_root}',
        f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={epochs}',
        f'default_hooks.checkpoint.interval={epochs}', 'default_hooks.logger.interval=1']
    # one thread: the model is tiny, and busy cores make multi-threaded spin-waits very slow
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    scalars = sorted(work_dir.glob('*/vis_data/scalars.json'))
    assert len(scalars) == 1
    records = [json.loads(line) for line in scalars[0].read_text().splitlines()]
    return dict(work_dir=work_dir, data_root=data_root, epochs=epochs, records=records)


def test_demo_training_lowers_the_loss(demo_run):
    losses = [r['loss'] for r in demo_run['records'] if 'loss' in r]
    assert len(losses) >= 50
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert math.isfinite(last)
    # at the start the prediction is uniform over 4 classes: cross-entropy ~ ln 4
    assert abs(first - math.log(4)) < 0.15
    assert last < first - 0.1


def test_demo_evaluates_top1(demo_run):
    top1 = [r['accuracy/top1'] for r in demo_run['records'] if 'accuracy/top1' in r]
    assert len(top1) == 1
    assert 0 <= top1[0] <= 100
    assert top1[0] >= 50  # chance is 25 %
    # the data was generated where the config pointed, in the ImageFolder layout
    assert len(list((demo_run['data_root'] / 'val').glob('*/*.png'))) == 20


def test_demo_checkpoint_initialises_seg_and_det_backbones(demo_run):
    ckpt_path = demo_run['work_dir'] / f'epoch_{demo_run["epochs"]}.pth'
    checkpoint = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    assert 'meta' in checkpoint and checkpoint['meta']['epoch'] == demo_run['epochs']
    state = checkpoint['state_dict']
    assert {'head.fc.weight', 'head.fc.bias'} <= set(state)
    saved = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    assert 'layers.3.mixer.A_b_log' in saved and saved['pos_embed'].shape == (1, 17, 64)
    saved_grid, _ = split_middle(saved['pos_embed'])
    pretrained = dict(type='Pretrained', checkpoint=str(ckpt_path))

    from mmseg.registry import MODELS as SEG_MODELS
    from mmseg.utils import register_all_modules as register_seg
    register_seg(init_default_scope=False)
    init_default_scope('mmseg')
    segmentor = SEG_MODELS.build(dict(
        type='EncoderDecoder',
        backbone=dict(type='VisionMamba', arch='demo', img_size=64, out_indices=(1, 3),
                      out_type='featmap', with_cls_token=False, init_cfg=pretrained),
        decode_head=dict(type='FCNHead', in_channels=64, in_index=1, channels=16, num_convs=1,
                         num_classes=3, norm_cfg=dict(type='BN'),
                         loss_decode=dict(type='CrossEntropyLoss'))))
    segmentor.init_weights()
    seg_state = segmentor.backbone.state_dict()
    assert 'cls_token' not in seg_state
    for key, value in seg_state.items():
        expected = saved_grid if key == 'pos_embed' else saved[key]  # class slot taken out
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)
    with torch.no_grad():
        assert segmentor(torch.randn(1, 3, 64, 64), mode='tensor').shape == (1, 3, 4, 4)

    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.utils import register_all_modules as register_det
    register_det(init_default_scope=False)
    init_default_scope('mmdet')
    backbone = DET_MODELS.build(dict(type='VisionMamba', arch='demo', img_size=128,
                                     out_type='featmap', init_cfg=pretrained))
    backbone.init_weights()
    det_state = backbone.state_dict()
    assert det_state['pos_embed'].shape == (1, 64, 64)  # 4x4 grid resized to 8x8
    torch.testing.assert_close(det_state['pos_embed'], resize_pos_grid(saved_grid, (4, 4), (8, 8)))
    for key, value in det_state.items():
        if key != 'pos_embed':
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)
