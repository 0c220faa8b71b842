"""Convert an original Vim release checkpoint into a backbone checkpoint for a given setting.

    python tools/convert_vim_checkpoint.py vim_t_midclstok_76p1acc.pth vim-t_dense_512.pth \
        --arch tiny --img-size 512            # dense (no class token), 32x32 position grid
    python tools/convert_vim_checkpoint.py vim_t_midclstok_76p1acc.pth vim-t_s8.pth \
        --arch tiny --stride 8 --with-cls-token   # long-sequence classifier backbone

The output holds ``state_dict`` (backbone parameter names, no prefix) and ``meta`` (source file and
what was adapted); any config loads it with ``init_cfg=dict(type='Pretrained', checkpoint=OUT)``.
Loading the original file directly works too; converting once skips the work at every start and
shows what changes.
"""
import argparse
import logging
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from vim_mm.models import VisionMamba, load_pretrained  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help="the authors' .pth (or any Vim checkpoint)")
    parser.add_argument('dst', help='output file')
    parser.add_argument('--arch', default='tiny', help='tiny | small | base')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], help='H [W]')
    parser.add_argument('--patch-size', type=int, default=16)
    parser.add_argument('--stride', type=int, default=16)
    parser.add_argument('--with-cls-token', action='store_true', help='keep the middle class token')
    parser.add_argument('--prefix', default=None, help="key prefix in the source, e.g. 'backbone.'")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if osp.abspath(args.src) == osp.abspath(args.dst):
        parser.error('dst must differ from src')
    img_size = args.img_size[0] if len(args.img_size) == 1 else tuple(args.img_size[:2])
    model = VisionMamba(args.arch, img_size=img_size, patch_size=args.patch_size,
                        stride=args.stride, with_cls_token=args.with_cls_token)
    report = load_pretrained(model, args.src, prefix=args.prefix)
    if report['missing']:
        sys.exit(f'error: {len(report["missing"])} backbone tensors missing from {args.src}: '
                 f'{report["missing"][:5]}; not writing a partial checkpoint')
    meta = dict(source=osp.basename(args.src), arch=args.arch, img_size=img_size,
                patch_size=args.patch_size, stride=args.stride,
                with_cls_token=args.with_cls_token, notes=report['notes'])
    torch.save(dict(state_dict=model.state_dict(), meta=meta), args.dst)
    print(f'wrote {args.dst}: {len(model.state_dict())} tensors; ' + '; '.join(report['notes']))


if __name__ == '__main__':
    main()
