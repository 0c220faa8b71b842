"""Shared by the tools: arguments and runner set-up of train.py / test.py, config loading and
the checks that fail early."""
from __future__ import annotations

import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

# How to lay out each standard dataset, for the missing-data error.
DATA_LAYOUTS = {
    'ADE20KDataset': 'data/ade/ADEChallengeData2016/{images,annotations}/{training,validation}/ '
                     '(unzip ADEChallengeData2016.zip into data/ade/)',
    'CocoDataset': 'data/coco/{train2017,val2017}/*.jpg and data/coco/annotations/'
                   'instances_{train,val}2017.json',
    'ImageNet': 'data/imagenet/{train,val}/<class>/*.JPEG (or meta/{train,val}.txt lists)',
}


def die(message: str):
    sys.stderr.write(f'error: {message}\n')
    sys.exit(2)


def require_files(**paths):
    """Fail with one clear line for the first argument whose file does not exist."""
    for what, path in paths.items():
        if not osp.isfile(path):
            die(f'{what} {path!r} does not exist')


def load_config(path: str, cfg_options=None):
    from mmengine.config import Config
    if not osp.isfile(path):
        here = osp.dirname(path) or '.'
        near = sorted(f for f in os.listdir(here) if f.endswith('.py')) if osp.isdir(here) else []
        die(f'config {path!r} not found.' + (f' Configs in {here}: {", ".join(near)}' if near else ''))
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def iter_dataset_cfgs(cfg):
    """(loader name, dataset cfg) for every dataloader, unwrapping dataset wrappers."""
    for name in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = cfg.get(name)
        if not loader:
            continue
        stack = [loader.get('dataset')]
        while stack:
            ds = stack.pop()
            if ds is None:
                continue
            if isinstance(ds, (list, tuple)):
                stack.extend(ds)
            elif 'dataset' in ds:
                stack.append(ds['dataset'])
            elif 'datasets' in ds:
                stack.extend(ds['datasets'])
            else:
                yield name, ds


def check_data(cfg, loaders=('train_dataloader', 'val_dataloader', 'test_dataloader')):
    """Fail with the expected layout when a dataset's data_root is missing.

    Built-in demo datasets (type VimDemo*) generate themselves and are skipped.
    """
    for name, ds in iter_dataset_cfgs(cfg):
        if name not in loaders:
            continue
        kind = str(ds.get('type', ''))
        root = ds.get('data_root')
        if kind.startswith('VimDemo') or not root:
            continue
        if not osp.isdir(root):
            layout = DATA_LAYOUTS.get(kind.split('.')[-1], 'see the dataset docs of mmseg/mmdet/mmpretrain')
            die(f'{name}: data_root {root!r} of {kind} does not exist (cwd: {os.getcwd()}).\n'
                f'  Expected layout: {layout}\n'
                f'  Put the data there, symlink it, or override it: '
                f'--cfg-options {name}.dataset.data_root=/path/to/data')


def check_checkpoints(cfg):
    """Fail early (before building anything) on a pretrained checkpoint that does not exist."""
    def walk(node, path):
        if isinstance(node, dict):
            if node.get('type') == 'Pretrained' and node.get('checkpoint'):
                ckpt = node['checkpoint']
                if '://' not in str(ckpt) and not osp.isfile(ckpt):
                    die(f'{path}.checkpoint = {ckpt!r} does not exist. Download the authors\' '
                        f'ImageNet weights into checkpoints/ (see README), or train from scratch '
                        f'with --cfg-options {path}=None')
            for key, value in node.items():
                walk(value, f'{path}.{key}')
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f'{path}[{i}]')
    walk(cfg.get('model', {}), 'model')


def setup_visualization(cfg, show_dir: str):
    """Ask the scope's visualization hook to draw every test sample into ``show_dir``."""
    hook = cfg.default_hooks.get('visualization')
    if hook is None:
        die('--show-dir needs a visualization hook in default_hooks')
    scope = cfg.get('default_scope', '')
    hook['draw'] = True
    if scope == 'mmdet':
        hook['test_out_dir'] = show_dir
    elif scope == 'mmseg':
        hook['interval'] = 1
        hook['show'] = False
        cfg.visualizer['save_dir'] = show_dir
        hook.pop('show_dir', None)
    elif scope == 'mmpretrain':
        hook.pop('draw', None)
        hook['enable'] = True
        hook['out_dir'] = show_dir
    else:
        die(f'--show-dir: unknown default_scope {scope!r}')


def add_runner_args(parser, cfg_example: str):
    """--cfg-options, --launcher and --local_rank, as every OpenMMLab train/test script has."""
    from mmengine.config import DictAction
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help=f'override config keys, e.g. {cfg_example}')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_runner_args(parser):
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def apply_runner_args(cfg, args):
    """Launcher and work dir (default ./work_dirs/<config name>, as mmdet/mmseg do)."""
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])


def build_runner(cfg):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    from vim_mm.mm.distributed import prepare_cpu_distributed
    prepare_cpu_distributed(cfg)  # multi-process on CPU (gloo); no-op with CUDA
    return Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
