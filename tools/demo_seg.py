"""Segment one image with a trained UperNet-Vim checkpoint and save the coloured overlay.

    python tools/demo_seg.py IMG CONFIG CKPT --out result.png [--device cpu] [--opacity 0.5]

e.g. after ``python tools/train.py configs/seg/upernet_vim_demo.py``:
    python tools/demo_seg.py data/vim_demo_seg/images/validation/demo_validation_00000.jpg \
        configs/seg/upernet_vim_demo.py work_dirs/upernet_vim_demo/iter_1500.pth --out demo.png
"""
import argparse

from _common import die, require_files


def parse_args():
    parser = argparse.ArgumentParser(description='UperNet-Vim single-image inference')
    parser.add_argument('img', help='input image')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='where to write the overlay (PNG/JPG)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='opacity of the painted classes, in (0, 1]')
    return parser.parse_args()


def main():
    args = parse_args()
    require_files(image=args.img, config=args.config, checkpoint=args.checkpoint)
    if not 0 < args.opacity <= 1:
        die(f'--opacity must be in (0, 1], got {args.opacity}')

    import mmcv
    from mmengine.config import Config
    from mmseg.apis import inference_model, init_model
    from mmseg.visualization import SegLocalVisualizer

    cfg = Config.fromfile(args.config)  # imports vim_mm (custom_imports)
    backbone = cfg.model.get('backbone', {})
    if backbone.get('init_cfg'):  # the checkpoint has every weight; ImageNet ones may be absent
        backbone['init_cfg'] = None
    model = init_model(cfg, args.checkpoint, device=args.device)
    result = inference_model(model, args.img)

    visualizer = SegLocalVisualizer.get_instance('vim_demo_seg', alpha=args.opacity)
    visualizer.dataset_meta = model.dataset_meta
    image = mmcv.imread(args.img, channel_order='rgb')
    visualizer.add_datasample('prediction', image, result, draw_gt=False, show=False,
                              out_file=args.out)
    classes = model.dataset_meta['classes']
    labels = result.pred_sem_seg.data.unique().tolist()
    print(f'{args.out}: {", ".join(classes[i] for i in labels)}')


if __name__ == '__main__':
    main()
