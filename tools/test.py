"""Evaluate a checkpoint of a vim_mm config (mIoU, box/mask AP or top-1/top-5).

    python tools/test.py CONFIG CHECKPOINT [--show-dir DIR] [--work-dir D]
    bash tools/dist_test.sh CONFIG CHECKPOINT NUM_GPUS [args]

CHECKPOINT may be one of ours or, for classification configs, an original Vim release file.
"""
import argparse
import os.path as osp

from _common import (add_runner_args, apply_runner_args, build_runner, check_data, die,
                     load_config, parse_runner_args, setup_visualization)


def parse_args():
    parser = argparse.ArgumentParser(description='Test (evaluate) a vim_mm model')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where the evaluation log and metrics go')
    parser.add_argument('--show-dir', help='write visualised predictions to this directory')
    add_runner_args(parser, 'test_dataloader.batch_size=2')
    return parse_runner_args(parser)


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    if not osp.isfile(args.checkpoint):
        die(f'checkpoint {args.checkpoint!r} does not exist')
    apply_runner_args(cfg, args)
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

    runner = build_runner(cfg)
    metrics = runner.test()
    print({k: round(float(v), 4) if hasattr(v, '__float__') else v for k, v in metrics.items()})


if __name__ == '__main__':
    main()
