#!/bin/bash
bash .device-wheels/install.sh > /tmp/inst.log 2>&1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
python -c "from vim_mm.mm.datasets.demo_det import ensure_demo_shapes as g; g('data/demo_shapes/')"
C=configs/det/cascade-mask-rcnn_vim-t_simplefpn_8xb8-380k_coco-1024.py
O="train_dataloader.dataset.type=VimDemoCocoDataset train_dataloader.dataset.data_root=data/demo_shapes/ train_dataloader.dataset.ann_file=annotations/instances_train.json train_dataloader.dataset.data_prefix.img=train/ train_dataloader.batch_size=2 train_dataloader.num_workers=2 model.backbone.init_cfg=None train_cfg.max_iters=40 train_cfg.val_interval=1000 default_hooks.logger.interval=10 default_hooks.checkpoint.interval=1000 val_dataloader.dataset.type=VimDemoCocoDataset val_dataloader.dataset.data_root=data/demo_shapes/ val_dataloader.dataset.ann_file=annotations/instances_val.json val_dataloader.dataset.data_prefix.img=val/ val_evaluator.ann_file=data/demo_shapes/annotations/instances_val.json"
timeout 100 bash tools/dist_train.sh $C 2 --work-dir /tmp/d2 --cfg-options $O > $OUT/det_dist_train.log 2>&1; echo dist rc=$?
grep -E "Iter\(train\) \[(10|20|30|40)/" $OUT/det_dist_train.log | sed 's/.*Iter/Iter/' | cut -c1-120
timeout 80 python tools/train.py $C --work-dir /tmp/d1 --cfg-options $O > $OUT/det_train_1gpu.log 2>&1; echo one rc=$?
grep -E "Iter\(train\) \[(10|20|30|40)/" $OUT/det_train_1gpu.log | sed 's/.*Iter/Iter/' | cut -c1-120
