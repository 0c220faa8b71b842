#!/bin/bash
bash .device-wheels/install.sh > /tmp/inst.log 2>&1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
nvidia-smi -L | tee $OUT/gpus.txt
python -c "from vim_mm.mm.datasets.demo_seg import generate_demo_seg_dataset as g; g('data/vim_demo_seg')"
O="train_cfg.max_iters=300 train_cfg.val_interval=300 default_hooks.checkpoint.interval=300 default_hooks.logger.interval=50 model.neck.norm_cfg.type=SyncBN"
C=configs/seg/upernet_vim_demo.py
timeout 150 bash tools/dist_train.sh $C 2 --work-dir /tmp/w2 --cfg-options $O > $OUT/dist_train.log 2>&1; echo train rc=$?
grep -E "Iter\(train\) \[(50|300)/|mIoU:|SyncBatchNorm|world_size|NCCL" $OUT/dist_train.log | cut -c1-260 | head -12
timeout 60 bash tools/dist_test.sh $C /tmp/w2/iter_300.pth 2 --work-dir /tmp/w2t > $OUT/dist_test.log 2>&1; echo test rc=$?
grep -E "mIoU" $OUT/dist_test.log | tail -2 | cut -c1-260
timeout 90 python tools/train.py $C --work-dir /tmp/w1 --cfg-options $O > $OUT/train_1gpu.log 2>&1; echo train1 rc=$?
grep -E "Iter\(train\) \[(50|300)/|mIoU:" $OUT/train_1gpu.log | cut -c1-260
