# Runtime shared by the Vim segmentation configs (mmseg 1.x conventions, iteration-based).
default_scope = 'mmseg'
custom_imports = dict(imports=['vim_mm'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=False,  # slide inference and multi-scale training vary the input shape
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    # interval = the 160k schedule's val_interval; shorter schedules override it.
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
