# CPU demo (about 30 s of CPU time; a minute on 2 busy cores): the full ImageNet recipe of the
# Vim configs, unchanged in kind (RandAugment, random erasing, repeated augmentation,
# Mixup/CutMix, label smoothing, AdamW with warmup + cosine, EMA), on the 'demo' Vim (D=64,
# 4 layers) at 64 px and a generated 4-class shapes set (vim_mm/mm/datasets/demo_cls.py, written
# to data_root on first use). Reaches 100 % top-1 on its 20 validation images.
#   python tools/train.py configs/cls/vim-demo_demo-shapes.py
_base_ = [
    './_base_/models/vim_tiny.py',
    './_base_/datasets/imagenet_bs128_vim_224.py',
    './_base_/schedules/imagenet_bs1024_adamw_vim.py',
    './_base_/default_runtime.py',
]

img_size = 64
num_classes = 4
data_root = 'data/vim_demo_shapes'

model = dict(
    data_preprocessor=dict(num_classes=num_classes),
    backbone=dict(arch='demo', img_size=img_size, drop_path_rate=0.1),
    head=dict(num_classes=num_classes, in_channels=64),
)

# the base pipelines at 64 px (test: resize the short side to 64 / 0.875, centre crop 64)
train_pipeline = [
    dict(t, scale=img_size) if t['type'] == 'RandomResizedCrop' else t
    for t in _base_.train_pipeline
]
test_pipeline = [
    dict(t, scale=round(img_size / 0.875)) if t['type'] == 'ResizeEdge' else
    dict(t, crop_size=img_size) if t['type'] == 'CenterCrop' else t
    for t in _base_.test_pipeline
]
loader = dict(batch_size=8, num_workers=0, persistent_workers=False, pin_memory=False)
train_dataloader = dict(
    **loader,
    dataset=dict(type='VimDemoImageDataset', data_root=data_root, split='train',
                 pipeline=train_pipeline))
val_dataloader = dict(
    **loader,
    dataset=dict(type='VimDemoImageDataset', data_root=data_root, split='val',
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1,))  # top-5 of 4 classes is always right
test_evaluator = val_evaluator

# 40 images, 5 steps per epoch. lr 1e-3 as is (not scaled down to the batch of 8: the tiny
# model trains well with it); no AMP on CPU.
max_epochs = 30
optim_wrapper = dict(type='OptimWrapper')
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, begin=0, end=2,
         convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=2),
]
train_cfg = dict(max_epochs=max_epochs, val_interval=5)
# an EMA horizon of ~30 steps instead of 25k: the run is 150 steps long
custom_hooks = [dict(type='EMAHook', momentum=0.03, priority='ABOVE_NORMAL')]
default_hooks = dict(
    logger=dict(interval=5),
    checkpoint=dict(interval=5),
)
randomness = dict(seed=0)
