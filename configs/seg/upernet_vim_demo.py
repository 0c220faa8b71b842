# UperNet + the CPU-sized Vim preset ('demo': D=64, 4 blocks) on the built-in generated shapes
# dataset (vim_mm/mm/datasets/demo_seg.py, written to data/vim_demo_seg on first use).
# Runs on a 2-core CPU in about 6 minutes (tools/run_demo.sh: train, test, overlays):
#   python tools/train.py configs/seg/upernet_vim_demo.py
#   python tools/test.py configs/seg/upernet_vim_demo.py work_dirs/upernet_vim_demo/iter_1500.pth \
#       --show-dir vis
# Same model graph as the ADE20K configs (SimpleFPN over four Vim blocks, UPerHead, FCN
# auxiliary head), only smaller: 64x64 images (a 4x4 token grid), plain BN, fp32.
_base_ = [
    '_base_/models/upernet_vim.py',
    '_base_/schedules/schedule_160k.py',
    '_base_/default_runtime.py',
]

num_classes = 6  # background + 5 shapes
norm_cfg = dict(type='BN', requires_grad=True)
crop_size = (64, 64)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(arch='demo', img_size=64, out_indices=(0, 1, 2, 3),
                  drop_path_rate=0.0),
    neck=dict(in_channels=64, norm_cfg=norm_cfg),
    decode_head=dict(in_channels=[64, 64, 64, 64], channels=64, num_classes=num_classes,
                     norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=64, channels=32, num_classes=num_classes, norm_cfg=norm_cfg),
    test_cfg=dict(_delete_=True, mode='whole'))

# ----------------------------------------------------------------------------- data
dataset_type = 'VimDemoSegDataset'
data_root = 'data/vim_demo_seg'
demo_data = dict(num_train=240, num_val=60, img_size=64, seed=0)  # generator settings
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.9),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=crop_size, keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=16,  # costs little more than 8 on a CPU: these tensors are tiny
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/training', seg_map_path='annotations/training'),
        pipeline=train_pipeline,
        **demo_data))
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=test_pipeline,
        **demo_data))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

# ----------------------------------------------------------------------------- schedule
max_iters = 1500  # about 5.5 min at 0.22 s/iter on 2 idle cores
# the paper's AdamW schedule (_base_/schedules/schedule_160k.py) with a short warm-up, a higher
# lr and 1500 iterations
optim_wrapper = dict(optimizer=dict(lr=2e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=50, end=max_iters),
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=2))
env_cfg = dict(dist_cfg=dict(backend='gloo'))
randomness = dict(seed=0)
