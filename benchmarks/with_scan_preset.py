"""Run tools/benchmark.py with a preset of the CUDA C++ inference scan changed (GPU).

For end-to-end numbers of a scan config before it becomes a preset: the fields in
$FEW_CHANGES (JSON) replace few_blocks' (the preset auto_config picks at 1024 and 1248 px
batch 16), $MANY_CHANGES many_blocks'; the arguments are tools/benchmark.py's. E.g. the
nineteenth session's pipelined walk, at c4b1ee7 (results/h200_infer_bf16_v47_pipe_r*_graph.json):

    FEW_CHANGES='{"tile_l": 16, "pipelined": true, "min_blocks": 3}' \\
        python benchmarks/with_scan_preset.py --models vim-t@triton --res 1024 1248 \\
        --batch 16 16 --mode infer --dtype bf16 --cuda-graph --out X.json
"""
import dataclasses
import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vim_mm.ops import cuda_scan  # noqa: E402


def main():
    for name, var in (('few_blocks', 'FEW_CHANGES'), ('many_blocks', 'MANY_CHANGES')):
        changes = json.loads(os.environ.get(var, '{}'))
        preset = cuda_scan.PRESETS[name]
        cuda_scan.PRESETS[name] = dataclasses.replace(
            preset, config=dataclasses.replace(preset.config, **changes))
        print(name, cuda_scan.PRESETS[name].config, file=sys.stderr)
    cuda_scan.auto_config.cache_clear()
    sys.argv = [str(ROOT / 'tools' / 'benchmark.py')] + sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')


if __name__ == '__main__':
    main()
