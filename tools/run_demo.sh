#!/usr/bin/env bash
# The main job on a laptop CPU: UperNet + Vim (demo preset) on the built-in generated
# segmentation set (made on first use in data/vim_demo_seg): train, evaluate mIoU, draw overlays.
# Idempotent: a second run resumes from the work dir (instant when training had finished), and
# an interrupted run continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
CONFIG=configs/seg/upernet_vim_demo.py
WORK=${WORK_DIR:-work_dirs/upernet_vim_demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
python3 tools/train.py "$CONFIG" --work-dir "$WORK" --resume "$@"
CKPT=$(cat "$WORK/last_checkpoint")
python3 tools/test.py "$CONFIG" "$CKPT" --work-dir "$WORK/test" --show-dir "$WORK/show"
IMG=$(ls data/vim_demo_seg/images/validation/* | head -n 1)
python3 tools/demo_seg.py "$IMG" "$CONFIG" "$CKPT" --out "$WORK/demo_overlay.png"
echo "checkpoint: $CKPT"
echo "overlays:   $WORK/show/ and $WORK/demo_overlay.png"
