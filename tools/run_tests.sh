#!/usr/bin/env bash
# Install what is missing (idempotent, fast when already there), then run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
export VIM_MM_BACKEND=${VIM_MM_BACKEND:-auto} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec python3 -m pytest -q -p no:cacheprovider tests "$@"
