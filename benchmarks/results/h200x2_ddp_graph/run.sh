#!/bin/bash
# 2x H200: cuda_graph training under DDP (gradient check), then the seg demo through
# tools/dist_train.sh with and without model.backbone.cuda_graph=True (300 iterations each).
bash .device-wheels/install.sh > /tmp/inst.log 2>&1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
nvidia-smi -L | tee $OUT/gpus.txt
timeout 200 torchrun --nproc_per_node 2 benchmarks/gpu_ddp_graph_check.py --out $OUT/ddp_graph_check.json \
    > $OUT/ddp_graph_check.log 2>&1; echo check rc=$?
grep -E '^\{|PASS|FAIL|Error' $OUT/ddp_graph_check.log | cut -c1-300
timeout 200 python benchmarks/gpu_train_graph_check.py --out $OUT/h200_train_graph_check.json > $OUT/train_graph_check.log 2>&1
echo single-GPU check rc=$?; grep -E 'PASS|FAIL|Error' $OUT/train_graph_check.log | tail -3
python -c "from vim_mm.mm.datasets.demo_seg import generate_demo_seg_dataset as g; g('data/vim_demo_seg')"
O="train_cfg.max_iters=300 train_cfg.val_interval=300 default_hooks.checkpoint.interval=300 default_hooks.logger.interval=50 model.neck.norm_cfg.type=SyncBN"
C=configs/seg/upernet_vim_demo.py
for G in False True; do
  timeout 150 bash tools/dist_train.sh $C 2 --work-dir /tmp/w$G --cfg-options $O model.backbone.cuda_graph=$G \
      > $OUT/dist_train_graph_$G.log 2>&1; echo train cuda_graph=$G rc=$?
  grep -E "Iter\(train\) \[(50|150|300)/|mIoU:" $OUT/dist_train_graph_$G.log | sed 's/.*Iter/Iter/' | cut -c1-200
done
