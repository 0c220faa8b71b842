"""Short GPU training runs of the real seg / det / cls configs (AMP, CUDA kernels).

    python benchmarks/gpu_dense_train.py --out results.json [--parts seg det cls]

seg: UperNet + Vim-T at 512x512, batch 8, 200 iterations on the built-in demo shapes (upscaled
     by the ADE20K pipeline), eager and with the backbone's cuda_graph, next to UperNet with
     mmseg's DeiT-T-sized VisionTransformer.
det: Cascade Mask R-CNN + Vim-T at 1024x1024 (LSJ pipeline on the demo shapes), batch 2,
     with and without with_cp, and with cuda_graph; then inference time per image.
cls: Vim-Ti ImageNet-recipe train steps at 224 (batch 128, Mixup/CutMix, label smoothing),
     eager and with cuda_graph, next to mmpretrain DeiT-Ti with the same head and recipe, on
     synthetic images; projects the 300-epoch ImageNet-1k GPU-hours on 8 such GPUs.
Iteration time = median of mmengine's logged per-iteration time after warm-up; peak memory =
torch.cuda.max_memory_allocated over the run; reserved_gb_end = the allocator's reserved memory
after the run (CUDA graphs keep theirs in private pools, which count as reserved only).
"""
import argparse
import copy
import glob
import json
import os
import os.path as osp
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

import vim_mm  # noqa: E402,F401

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SMOKE = os.environ.get('DENSE_SMOKE') == '1'  # CPU dry run of the whole flow: 2 tiny iterations
CUDA = torch.cuda.is_available()


def cfg_of(rel):
    return Config.fromfile(osp.join(ROOT, rel))


def run_training(cfg, iters, log_interval=10):
    work = tempfile.mkdtemp()
    name = osp.basename(work)
    cfg.work_dir = work
    cfg.experiment_name = name  # two runners in one process must not share a log dir
    cfg.visualizer.name = name
    if SMOKE:
        iters, log_interval = 2, 1
        cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=10 ** 9)
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 9)
    cfg.default_hooks.logger = dict(type='LoggerHook', interval=log_interval)
    cfg.default_hooks.pop('visualization', None)
    cfg.param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20)]
    if CUDA:
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    else:
        cfg.optim_wrapper.type = 'OptimWrapper'
        cfg.optim_wrapper.pop('loss_scale', None)
        cfg.optim_wrapper.pop('dtype', None)
    cfg.launcher = 'none'
    if CUDA:  # reserved_gb_end should see this run's memory, not earlier runs' caches
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    runner = Runner.from_cfg(cfg)
    start = time.time()
    runner.train()
    wall = time.time() - start
    reserved = torch.cuda.memory_reserved() / 2**30 if CUDA else None
    scalars, = glob.glob(osp.join(work, '**', 'scalars.json'), recursive=True)
    logs = [json.loads(line) for line in open(scalars) if '"loss"' in line]
    times = [r['time'] for r in logs[2:]] or [r['time'] for r in logs]
    # mmengine resets the CUDA peak at every log line and logs it (MB) as 'memory'
    return runner, dict(iter_time_s=statistics.median(times), wall_s=wall,
                        peak_mem_gb=max(r.get('memory', 0) for r in logs) / 1024,
                        reserved_gb_end=reserved,
                        loss_first=logs[0]['loss'], loss_last=logs[-1]['loss'],
                        loss_curve=[(r['iter'], round(r['loss'], 4)) for r in logs])


def seg_part(iters):
    demo = cfg_of('configs/seg/upernet_vim_demo.py')
    results = {}
    for name in ('upernet_vim-t', 'upernet_vim-t+graph', 'upernet_deit-t'):
        cfg = cfg_of('configs/seg/upernet_vim-t_4xb4-160k_ade20k-512x512.py')
        pipeline = [dict(type='LoadAnnotations') if t['type'] == 'LoadAnnotations' else t
                    for t in cfg.train_pipeline]
        cfg.train_dataloader = copy.deepcopy(demo.train_dataloader)
        cfg.train_dataloader.dataset.pipeline = pipeline
        cfg.train_dataloader.update(batch_size=8, num_workers=8, persistent_workers=True)
        for head in ('decode_head', 'auxiliary_head'):
            cfg.model[head].num_classes = demo.num_classes
        cfg.model.backbone.init_cfg = None
        cfg.model.backbone.cuda_graph = name.endswith('+graph') and CUDA
        if name == 'upernet_deit-t':
            cfg.model.backbone = dict(type='mmseg.VisionTransformer', img_size=(512, 512),
                                      patch_size=16, embed_dims=192, num_layers=12, num_heads=3,
                                      mlp_ratio=4, out_indices=(2, 5, 8, 11), qkv_bias=True,
                                      drop_path_rate=0.1, with_cls_token=True, final_norm=True,
                                      interpolate_mode='bicubic')
        _, row = run_training(cfg, iters)
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != 'loss_curve'}, flush=True)
    return results


def shrink_canvas(cfg, size):
    """The 1024 LSJ det config at ``size`` x ``size`` (pipelines, batch pad, position grid)."""
    canvas = (size, size)
    cfg.model.backbone.img_size = canvas
    cfg.model.data_preprocessor.batch_augments[0].size = canvas
    for t in cfg.train_pipeline + cfg.test_pipeline:
        for key in ('scale', 'crop_size', 'size'):
            if key in t:
                t[key] = canvas


def det_cfg(demo, with_cp, cuda_graph=False):
    """The COCO Cascade Mask R-CNN Vim-T config on the demo shapes (batch 2, 1024 LSJ)."""
    cfg = cfg_of('configs/det/cascade-mask-rcnn_vim-t_simplefpn_8xb8-380k_coco-1024.py')
    cfg.train_dataloader = copy.deepcopy(demo.train_dataloader)
    cfg.train_dataloader.dataset.pipeline = cfg.train_pipeline
    cfg.train_dataloader.update(batch_size=2, num_workers=4, persistent_workers=True)
    cfg.model.backbone.init_cfg = None
    cfg.model.backbone.with_cp = with_cp
    cfg.model.backbone.cuda_graph = cuda_graph and CUDA
    if SMOKE:  # 1024x1024 does not fit a CPU's memory through the PyTorch scan
        shrink_canvas(cfg, 256)
    for head in cfg.model.roi_head.bbox_head:
        head.num_classes = demo.num_classes
    cfg.model.roi_head.mask_head.num_classes = demo.num_classes
    return cfg


def det_part(iters):
    demo = cfg_of('configs/det/mask-rcnn_vim-demo_simplefpn_1xb4-600iters_demo-shapes-128.py')
    # a throw-away run warms the process up (Triton autotuning of the fused norm, cuDNN):
    # without it the first timed run came out ~2x too slow (0.70 instead of 0.35 s/iter)
    run_training(det_cfg(demo, False), min(iters, 10), log_interval=5)
    results = {}
    for with_cp, graph in ((False, False), (True, False), (False, True)):
        cfg = det_cfg(demo, with_cp, graph)
        runner, row = run_training(cfg, iters, log_interval=5)
        results[f'cascade_vim-t_1024_b2_with_cp={with_cp}' + ('+graph' if graph else '')] = row
        print('det with_cp', with_cp, 'graph', graph,
              {k: v for k, v in row.items() if k != 'loss_curve'}, flush=True)
    # inference: one 1024x1024 image at a time through the test pipeline
    test_cfg = copy.deepcopy(demo.val_dataloader)
    test_cfg.dataset.pipeline = cfg.test_pipeline
    test_cfg.update(batch_size=1, num_workers=0 if SMOKE else 2, persistent_workers=False)
    loader = Runner.build_dataloader(test_cfg)
    model = runner.model.eval()
    times = []
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16, enabled=CUDA):
        for i, batch in enumerate(loader):
            sync()
            t0 = time.perf_counter()
            model.test_step(batch)
            sync()
            times.append(time.perf_counter() - t0)
            if i == (1 if SMOKE else 24):
                break
    results['inference_s_per_image_1024'] = statistics.median(times[min(5, len(times) - 1):])
    print('det inference s/img', results['inference_s_per_image_1024'], flush=True)
    return results


def cls_part(iters):
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.structures import DataSample
    results = {}
    device = 'cuda' if CUDA else 'cpu'
    batch = 2 if SMOKE else 128
    iters = 3 if SMOKE else iters
    for name in ('vim-ti', 'vim-ti+graph', 'deit-ti'):
        cfg = cfg_of('configs/cls/vim-tiny-p16_8xb128-300e_in1k-224.py')
        if name == 'deit-ti':
            cfg.model.backbone = dict(type='VisionTransformer', arch='deit-tiny', img_size=224,
                                      patch_size=16, out_type='cls_token', drop_path_rate=0.1)
        cfg.model.backbone.pop('init_cfg', None)
        if name == 'vim-ti+graph' and CUDA:
            cfg.model.backbone.cuda_graph = True
        with DefaultScope.overwrite_default_scope('mmpretrain'):
            model = MODELS.build(cfg.model).to(device).train()
            optim_cfg = copy.deepcopy(cfg.optim_wrapper)
            optim_cfg.type = 'AmpOptimWrapper' if CUDA else 'OptimWrapper'
            wrapper = build_optim_wrapper(model, optim_cfg)
        data = dict(inputs=[torch.randint(0, 255, (3, 224, 224), dtype=torch.uint8)
                            for _ in range(batch)],
                    data_samples=[DataSample().set_gt_label(i % 1000) for i in range(batch)])
        sync = torch.cuda.synchronize if CUDA else (lambda: None)
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(iters):
            sync()
            t0 = time.perf_counter()
            model.train_step(data, wrapper)
            sync()
            times.append(time.perf_counter() - t0)
        step = statistics.median(times[min(5, len(times) - 1):])
        ips = batch / step
        hours = 300 * 1_281_167 / (ips * 8) / 3600
        results[name] = dict(img_per_s=ips,
                             peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if CUDA else None,
                             reserved_gb_end=torch.cuda.memory_reserved() / 2 ** 30 if CUDA else None,
                             projected_300ep_wall_h_8gpu=hours, projected_gpu_hours=hours * 8)
        print(name, results[name], flush=True)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--parts', nargs='+', default=['seg', 'det', 'cls'])
    parser.add_argument('--seg-iters', type=int, default=200)
    parser.add_argument('--det-iters', type=int, default=30)
    parser.add_argument('--cls-iters', type=int, default=30)
    parser.add_argument('--out')
    args = parser.parse_args()
    out = dict(device=torch.cuda.get_device_name() if CUDA else 'cpu', torch=torch.__version__,
               command=' '.join(sys.argv))
    for part in args.parts:
        try:
            out[part] = dict(seg=seg_part, det=det_part, cls=cls_part)[part](
                getattr(args, f'{part}_iters'))
        except Exception as exc:  # keep the other parts' numbers
            import traceback
            traceback.print_exc()
            out[part] = dict(error=repr(exc))
        if args.out:
            with open(args.out, 'w') as f:
                json.dump(out, f, indent=1)


if __name__ == '__main__':
    main()
