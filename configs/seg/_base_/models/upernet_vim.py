# UperNet on a plain Vim-Ti backbone (paper Appendix B).
# Vim keeps one stride (16); features are read from the residual stream after blocks
# 6/12/18/24 (out_indices 5/11/17/23, the authors' choice) and the simple feature pyramid
# turns them into strides 4/8/16/32 (two deconvs / one deconv / identity / max-pool).
# final_norm=True: the block-24 map goes through the pretrained final RMSNorm, as in
# classification; it also keeps norm_f in the graph, so DDP needs no find_unused_parameters.
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='VisionMamba',
        arch='tiny',
        img_size=512,
        patch_size=16,
        stride=16,
        out_indices=(5, 11, 17, 23),
        out_type='featmap',
        with_cls_token=False,  # dense maps only; a checkpoint's middle class slot is dropped
        final_norm=True,
        drop_path_rate=0.1,
        # True: replay CUDA graphs of the backbone (512 crops and slide tests are fixed-size):
        # UperNet + Vim-T steps ~1.5x faster on an H100 (benchmarks/README.md, sixth session)
        cuda_graph=False),
    neck=dict(type='SimpleFPN', in_channels=192, out_channels=None,
              scale_factors=(4.0, 2.0, 1.0, 0.5), norm_cfg=norm_cfg),
    decode_head=dict(
        type='UPerHead',
        in_channels=[192, 192, 192, 192],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=192,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(512, 512), stride=(341, 341)))
