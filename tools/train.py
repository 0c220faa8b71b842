"""Train a vim_mm config (segmentation, detection or classification) with mmengine's Runner.

    python tools/train.py configs/seg/upernet_vim_s.py [--work-dir D] [--resume [CKPT]] [--amp]
    bash tools/dist_train.sh CONFIG NUM_GPUS [args]   # multi-GPU (torchrun), --launcher pytorch
"""
import argparse
import os.path as osp

from _common import (add_runner_args, apply_runner_args, build_runner, check_checkpoints,
                     check_data, die, load_config, parse_runner_args)


def parse_args():
    parser = argparse.ArgumentParser(description='Train a vim_mm model')
    parser.add_argument('config', help='config file')
    parser.add_argument('--work-dir', help='where logs and checkpoints go '
                        '(default: ./work_dirs/<config name>)')
    parser.add_argument('--resume', nargs='?', const='auto', default=None, metavar='CKPT',
                        help='resume training: from CKPT, or without a value from the latest '
                        'checkpoint in the work dir')
    parser.add_argument('--amp', action='store_true', help='mixed precision (AmpOptimWrapper)')
    add_runner_args(parser, 'train_cfg.max_iters=1000')
    return parse_runner_args(parser)


def main():
    args = parse_args()
    cfg = load_config(args.config, args.cfg_options)
    apply_runner_args(cfg, args)
    if args.amp:
        wrapper = cfg.optim_wrapper.get('type', 'OptimWrapper')
        if wrapper not in ('OptimWrapper', 'AmpOptimWrapper'):
            die(f'--amp: optim_wrapper type is {wrapper}; set AmpOptimWrapper in the config instead')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if not osp.isfile(args.resume):
            die(f'--resume checkpoint {args.resume!r} does not exist')
        cfg.resume, cfg.load_from = True, args.resume
    check_data(cfg, ('train_dataloader', 'val_dataloader'))
    if not cfg.get('resume'):
        check_checkpoints(cfg)

    runner = build_runner(cfg)
    runner.train()


if __name__ == '__main__':
    main()
