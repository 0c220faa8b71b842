#!/usr/bin/env bash
# Install vim_mm's pinned CPU stack into the current Python, idempotently.
#
# Fast on a second run: every step first checks whether what it would install is already there.
# mmcv 2.1.0 (the last release mmdet 3.3 / mmseg 1.2 accept) has no wheel for this torch and its
# setup.py forces -std=c++14/17, which torch >= 2.10 headers reject; we build it once from the
# sdist with C++20 and keep the wheel in a cache keyed by the torch version, so a cached wheel
# built against another torch is never reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${VIM_MM_CACHE:-$HOME/.cache/vim_mm}
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
MM_PINS="mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 ftfy regex"

have() { "$PY" - "$@" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition('==')
    if want and version(name) != want:
        sys.exit(1)
    if not want:
        version(name)
PYEOF
}

log() { echo "[install] $*"; }

if ! have torch==2.14.1 torchvision==0.29.1; then
  log "installing $TORCH_PIN"
  "$PY" -m pip install -q $TORCH_PIN
fi

TORCH_VER=$("$PY" -c 'import torch; print(torch.__version__)')
if ! "$PY" -c 'import mmcv, mmcv.ops; assert mmcv.__version__ == "2.1.0"' 2>/dev/null; then
  WHEEL_DIR="$CACHE/mmcv-2.1.0-torch$TORCH_VER"
  if ! ls "$WHEEL_DIR"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    log "building mmcv 2.1.0 with ops against torch $TORCH_VER (about 11 min on 2 cores, once)"
    "$PY" -m pip install -q "setuptools<70" wheel ninja
    SRC=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: mmcv==2.1.0 -d "$SRC"
    tar xzf "$SRC"/mmcv-2.1.0.tar.gz -C "$SRC"
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$SRC"/mmcv-2.1.0/setup.py
    mkdir -p "$WHEEL_DIR"
    (cd "$SRC"/mmcv-2.1.0 && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} \
      "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" .)
    rm -rf "$SRC"
  fi
  log "installing mmcv from $WHEEL_DIR"
  "$PY" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-2.1.0-*.whl
  "$PY" -m pip install -q addict "numpy" packaging Pillow pyyaml yapf opencv-python
fi

if ! have mmengine==0.10.7 mmdet==3.3.0 mmsegmentation==1.2.2 mmpretrain==1.2.0 ftfy regex pycocotools pytest; then
  log "installing $MM_PINS"
  "$PY" -m pip install -q $MM_PINS pycocotools pytest
fi

# asked from / so the checkout in the current directory does not count as installed
VIM_HOME=$(cd / && "$PY" -c 'import importlib.util as u, os; s = u.find_spec("vim_mm"); print(os.path.dirname(os.path.dirname(s.origin)) if s else "")' 2>/dev/null || true)
if [ "$VIM_HOME" != "$PWD" ]; then
  log "installing vim_mm (editable) from $PWD"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
fi
log "ready: $("$PY" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "mmcv", "mmengine", "mmdet", "mmsegmentation", "mmpretrain")))')"
