"""The OpenMMLab layer: registration, the authors' checkpoints through mmengine/mmpretrain APIs,
checkpoint loading under torch>=2.6, and init order inside mmengine models."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _reference import authors_state_dict, save_authors_checkpoint, vim_forward
import vim_mm
from vim_mm import VisionMamba

ROOT = Path(__file__).parents[1]
CLS_TINY = ROOT / 'configs/cls/vim-tiny-p16_8xb128-300e_in1k-224.py'
TINY = dict(embed_dims=32, num_layers=2, d_state=4)


def test_same_class_registered_in_every_library():
    import mmdet.registry
    import mmpretrain.registry
    import mmseg.registry
    from vim_mm.mm.necks import SimpleFPN
    from vim_mm.mm.optim import VimLayerDecayOptimWrapperConstructor
    for lib in (mmseg, mmdet, mmpretrain):
        assert lib.registry.MODELS.get('VisionMamba') is VisionMamba
        assert lib.registry.MODELS.get('SimpleFPN') is SimpleFPN
        assert (lib.registry.OPTIM_WRAPPER_CONSTRUCTORS.get('VimLayerDecayOptimWrapperConstructor')
                is VimLayerDecayOptimWrapperConstructor)
    built = mmseg.registry.MODELS.build(dict(type='VisionMamba', arch='demo'))
    assert type(built) is VisionMamba


def test_core_model_imports_without_openmmlab():
    """With every OpenMMLab package unimportable, vim_mm still imports and runs."""
    code = ('import sys\n'
            'for name in ("mmengine", "mmcv", "mmdet", "mmseg", "mmpretrain"):\n'
            '    sys.modules[name] = None  # import raises, find_spec says absent\n'
            'import torch, vim_mm\n'
            'assert not any(m.startswith("vim_mm.mm") for m in sys.modules)\n'
            'print(vim_mm.VisionMamba("demo")(torch.randn(1, 3, 32, 32))[0].shape)\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert 'torch.Size([1, 64, 2, 2])' in proc.stdout


def test_get_model_with_authors_checkpoint_returns_their_logits(tmp_path):
    from mmpretrain.apis import get_model
    sd = authors_state_dict(grid=3, num_classes=10)
    path = tmp_path / 'vim_t_midclstok_76p1acc.pth'
    save_authors_checkpoint(path, sd)
    model = get_model(str(CLS_TINY), pretrained=str(path),
                      backbone=dict(arch=dict(TINY, _delete_=True), img_size=48),
                      head=dict(num_classes=10, in_channels=32))
    model = model.double().eval()
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        logits = model(images, mode='tensor')
    for b in range(2):
        torch.testing.assert_close(logits[b], vim_forward(sd, images[b]), rtol=1e-9, atol=1e-9)


def test_mmengine_loader_reads_pickled_checkpoints_under_new_torch(tmp_path):
    from mmengine.config import ConfigDict
    from mmengine.runner import load_checkpoint
    model = VisionMamba('demo', img_size=32)
    path = tmp_path / 'iter_10.pth'
    torch.save({'meta': {'cfg': ConfigDict(a=1), 'seed': np.int64(3), 'hist': np.zeros(3)},
                'state_dict': {'backbone.' + k: v * 0 + 1 for k, v in model.state_dict().items()},
                'message_hub': {'log_scalars': {}}}, path)
    target = torch.nn.Module()
    target.backbone = VisionMamba('demo', img_size=32)
    ckpt = load_checkpoint(target, str(path), map_location='cpu')
    assert ckpt['meta']['seed'] == 3
    assert torch.all(target.backbone.norm_f.weight == 1)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_checkpoint(target, str(tmp_path / 'missing.pth'))


def test_parent_init_weights_loads_and_never_undoes(tmp_path):
    """mmengine BaseModule.init_weights of a parent calls the backbone once, with the parent's
    own initialisers first; a later call must keep the loaded weights."""
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules
    register_all_modules()
    sd = authors_state_dict(embed_dims=64, depth=4, d_state=8, grid=3, num_classes=0)
    path = tmp_path / 'authors.pth'
    save_authors_checkpoint(path, sd)
    model = MODELS.build(dict(
        type='EncoderDecoder',
        backbone=dict(type='VisionMamba', arch='demo', img_size=48, out_indices=(3,),
                      init_cfg=dict(type='Pretrained', checkpoint=str(path))),
        decode_head=dict(type='FCNHead', in_channels=64, channels=16, num_convs=1,
                         num_classes=3, norm_cfg=dict(type='BN'),
                         loss_decode=dict(type='CrossEntropyLoss'),
                         init_cfg=dict(type='Normal', layer='Conv2d', std=0.01))))
    model.init_weights()
    weight = model.backbone.layers[2].mixer.x_proj_b.weight
    torch.testing.assert_close(weight.data, sd['layers.2.mixer.x_proj_b.weight'])
    torch.nn.init.zeros_(model.decode_head.conv_seg.weight)
    model.init_weights()  # e.g. the runner calling it again
    torch.testing.assert_close(weight.data, sd['layers.2.mixer.x_proj_b.weight'])


def test_missing_pretrained_file_fails_at_init():
    model = VisionMamba('demo', init_cfg=dict(type='Pretrained', checkpoint='nope/vim.pth'))
    with pytest.raises(FileNotFoundError, match='init_cfg.checkpoint'):
        model.init_weights()


def test_tools_test_evaluates_an_authors_checkpoint(tmp_path):
    """`tools/test.py <cls config> <their .pth>` needs nothing else (demo-sized weights)."""
    sd = authors_state_dict(embed_dims=64, depth=4, d_state=8, grid=4, num_classes=4)
    path = tmp_path / 'vim_demo_authors_format.pth'
    save_authors_checkpoint(path, sd)
    data_root = tmp_path / 'shapes'
    proc = subprocess.run(
        [sys.executable, 'tools/test.py', 'configs/cls/vim-demo_demo-shapes.py', str(path),
         '--work-dir', str(tmp_path / 'work'), '--cfg-options',
         f'test_dataloader.dataset.data_root={data_root}',
         f'val_dataloader.dataset.data_root={data_root}',
         f'train_dataloader.dataset.data_root={data_root}'],
        capture_output=True, text=True, cwd=ROOT, env={**__import__('os').environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "'accuracy/top1'" in proc.stdout
    log = proc.stdout + proc.stderr
    assert 'unexpected key' not in log and 'missing keys in source state_dict' not in log
