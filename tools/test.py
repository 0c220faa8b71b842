"""Evaluate a checkpoint of a vim_mm config (mIoU, box/mask AP or top-1/top-5).

    python tools/test.py CONFIG CHECKPOINT [--show-dir DIR] [--work-dir D]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [args]

CHECKPOINT may be one of ours or, for classification configs, an original Vim release file.
"""
import argparse
import os
import os.path as osp

from _common import check_data, die, load_config, setup_visualization


def parse_args():
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description='Test (evaluate) a vim_mm model')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation log and metrics go')
    parser.add_argument('--show-dir', help='write visualised predictions to this directory')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config keys, e.g. test_dataloader.batch_size=2')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    return args


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    if not osp.isfile(args.checkpoint):
        die(f'checkpoint {args.checkpoint!r} does not exist')
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or osp.join(
        './work_dirs', osp.splitext(osp.basename(args.config))[0])
    cfg.load_from = args.checkpoint
    # the checkpoint provides every weight: skip the backbone's ImageNet init (may be absent)
    backbone = cfg.model.get('backbone', {})
    if isinstance(backbone, dict) and backbone.get('init_cfg'):
        backbone['init_cfg'] = None
    # EMA is a training-time hook: our checkpoints already hold the averaged weights under
    # 'state_dict', and on other files (the authors') mmpretrain's EMAHook raises KeyError
    cfg.custom_hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') != 'EMAHook']
    if args.show_dir:
        setup_visualization(cfg, args.show_dir)
    check_data(cfg, ('test_dataloader',))

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    from vim_mm.mm.distributed import prepare_cpu_distributed
    prepare_cpu_distributed(cfg)  # multi-process on CPU (gloo); no-op with CUDA
    runner = (Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg))
    metrics = runner.test()
    print({k: round(float(v), 4) if hasattr(v, '__float__') else v for k, v in metrics.items()})


if __name__ == '__main__':
    main()
