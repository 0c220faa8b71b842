# CPU demo: Mask R-CNN + the 4-layer 'demo' Vim on the built-in shapes dataset (discs, squares,
# triangles; generated into data/demo_shapes/ on first use). Same architecture and pipeline as
# the COCO configs (SimpleFPN, LN heads, LSJ crop + fixed-size batch pad), scaled down to
# 128x128 images and 64 channels:
#   OMP_NUM_THREADS=1 python tools/train.py \
#       configs/det/mask-rcnn_vim-demo_simplefpn_1xb4-600iters_demo-shapes-128.py
# Measured on the 2-core CPU: 7 min 11 s of training (0.5 s/iter), then box AP 0.566 / mask AP
# 0.580 (AP50 0.747) on the 50 validation images; raise max_iters (the PolyLR end follows it)
# for more.
_base_ = [
    './_base_/models/mask_rcnn_vim_simplefpn.py',
    './_base_/datasets/coco_instance_lsj_1024.py',
    './_base_/default_runtime.py',
]

image_size = (128, 128)
channels = 64
num_classes = 3

model = dict(
    data_preprocessor=dict(
        batch_augments=[dict(type='BatchFixedSizePad', size=image_size, pad_mask=True)]),
    backbone=dict(arch='demo', img_size=image_size, out_indices=(3, ), drop_path_rate=0.0),
    neck=dict(in_channels=64, out_channels=channels),
    rpn_head=dict(
        in_channels=channels,
        feat_channels=channels,
        # objects are 25-75 px: anchors of 16..256 px on strides 4..64
        anchor_generator=dict(scales=[4])),
    # RoI heads: same layout (4conv1fc box head, FCN mask head, LN), thinner and fewer RoIs;
    # on a CPU they cost more than the backbone
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=channels),
        bbox_head=dict(in_channels=channels, conv_out_channels=32, fc_out_channels=256,
                       num_classes=num_classes),
        mask_roi_extractor=dict(out_channels=channels),
        mask_head=dict(num_convs=2, in_channels=channels, conv_out_channels=32,
                       num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=1000, max_per_img=300),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

dataset_type = 'VimDemoCocoDataset'
data_root = 'data/demo_shapes/'
# the COCO LSJ pipelines at 128 px, with milder jitter and no test-time pad
train_pipeline = [
    dict(t, scale=image_size, ratio_range=(0.75, 1.25)) if t['type'] == 'RandomResize' else
    dict(t, crop_size=image_size) if t['type'] == 'RandomCrop' else t
    for t in _base_.train_pipeline
]
test_pipeline = [
    dict(t, scale=image_size) if t['type'] == 'Resize' else t
    for t in _base_.test_pipeline if t['type'] != 'Pad'
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=1,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val.json')
test_evaluator = val_evaluator

max_iters = 600
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='VimLayerDecayOptimWrapperConstructor',
    paramwise_cfg=dict(layer_decay_rate=1.0),
    optimizer=dict(type='AdamW', lr=3e-4, betas=(0.9, 0.999), weight_decay=0.05))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=50, end=max_iters),
]
default_hooks = dict(
    logger=dict(interval=20),
    checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
randomness = dict(seed=0)
