"""Detect and segment the instances of one image with a vim_mm detection config + checkpoint.

    python tools/demo_det.py IMG CONFIG CKPT --out result.png [--device cpu] [--score-thr 0.3]

Draws the predicted boxes, masks, class names and scores (mmdet's DetLocalVisualizer) over the
image and writes it to --out.
"""
import argparse

from _common import require_files  # also puts the checkout on sys.path


def parse_args():
    parser = argparse.ArgumentParser(description='Instance segmentation demo for one image')
    parser.add_argument('img', help='image file')
    parser.add_argument('config', help='detection config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--out', required=True, help='where to write the drawn image (PNG)')
    parser.add_argument('--device', default='cpu', help="'cpu', 'cuda' or 'cuda:0'")
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw only instances scoring at least this')
    return parser.parse_args()


def main():
    args = parse_args()
    require_files(image=args.img, config=args.config, checkpoint=args.checkpoint)

    import mmcv
    import vim_mm  # noqa: F401  (registers VisionMamba, SimpleFPN, LN2d, the demo datasets)
    from mmdet.apis import inference_detector, init_detector
    from mmdet.registry import VISUALIZERS

    model = init_detector(args.config, args.checkpoint, device=args.device)
    result = inference_detector(model, args.img)

    visualizer = VISUALIZERS.build(dict(model.cfg.visualizer, name='demo_det'))
    visualizer.dataset_meta = model.dataset_meta
    image = mmcv.imread(args.img, channel_order='rgb')
    visualizer.add_datasample('result', image, data_sample=result, draw_gt=False, show=False,
                              pred_score_thr=args.score_thr, out_file=args.out)
    kept = (result.pred_instances.scores >= args.score_thr).sum().item()
    print(f'{kept} instances with score >= {args.score_thr} drawn into {args.out}')


if __name__ == '__main__':
    main()
