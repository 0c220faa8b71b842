# Vim-Ti (D=192, 24 layers) ImageNet classifier: the middle class token after the final norm
# feeds a linear head. Recipe pieces of the authors (DeiT's): label smoothing 0.1 and, per batch,
# one of Mixup (alpha 0.8) or CutMix (alpha 1.0) with equal probability.
model = dict(
    type='VimImageClassifier',
    data_preprocessor=dict(
        num_classes=1000,
        # ImageNet RGB mean/std in 0-255; images are loaded BGR
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        to_rgb=True,
        batch_augments=dict(augments=[dict(type='Mixup', alpha=0.8),
                                      dict(type='CutMix', alpha=1.0)]),
    ),
    backbone=dict(
        type='VisionMamba',
        arch='tiny',
        img_size=224,
        patch_size=16,
        stride=16,
        with_cls_token=True,
        out_type='cls_token',
        final_norm=True,
        # authors' pt-vim-t.sh: --drop-path 0.0
        drop_path_rate=0.0,
    ),
    neck=None,
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=192,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        # the authors' (timm) head init: trunc-normal std .02, zero bias
        init_cfg=dict(type='TruncNormal', layer='Linear', std=.02, bias=0.),
    ),
)
