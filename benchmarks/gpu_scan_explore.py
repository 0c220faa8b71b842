"""Time the CUDA C++ inference scan's presets and their neighbours (GPU; since the tenth session).

The presets of ``vim_mm/ops/cuda_scan.py`` with one or two fields changed each, at the
batch-filled Vim-Ti shapes (CUDA-graph replays, as ``gpu_infer_scan.py`` times them). The
built-in lists change the presets as they are now (few_blocks: 32 channels and
``min_blocks=5`` since the thirteenth session; each JSON records its launched configs):

    python benchmarks/gpu_scan_explore.py   # writes $OUT/h200_infer_scan_v11_explore.json
    python benchmarks/gpu_scan_explore.py --only dynamic_smem --shapes 16x4097 16x6085

Any list of changes (``--variants``, JSON; a change applies to few_blocks unless it has
``"base": "many"``), e.g. the thirteenth session's neighbours of 32 channels
(results/h200_infer_scan_v15_explore.json, _v16_explore.json; the full lists are in their
``command``):

    python benchmarks/gpu_scan_explore.py --shapes 16x4097 16x6085 32x1025 128x197 \
        --variants '[{"channels": 32}, {"channels": 32, "dynamic_smem": true}]'

(results/h200_infer_scan_ws_explore.json timed the warp-specialised kernel of commits 807ab2d to
8eef957, since removed: ``--only specialized`` at 8eef957.)
"""
import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpu_infer_scan as g  # noqa: E402
from vim_mm.ops.cuda_scan import PRESETS, InferScanConfig, fitted  # noqa: E402

FEW = dataclasses.asdict(PRESETS['few_blocks'].config)
MANY = dataclasses.asdict(PRESETS['many_blocks'].config)
FEW_VARIANTS = [dict(), dict(channels=16, min_blocks=1), dict(min_blocks=1), dict(tile_l=16),
                dict(tile_l=64), dict(stages=3), dict(split=2), dict(split=8), dict(channels=64),
                dict(poly_final=1), dict(tile_l=16, min_blocks=6), dict(tile_l=16, min_blocks=8),
                dict(channels=64, dynamic_smem=True), dict(tile_l=64, dynamic_smem=True)]
MANY_VARIANTS = [dict(), dict(split=4), dict(channels=32), dict(tile_l=32, stages=2),
                 dict(channels=32, split=4, tile_l=32, stages=2), dict(min_blocks=3),
                 dict(poly_final=1), dict(tile_l=8, stages=3),
                 dict(tile_l=32, stages=2, dynamic_smem=True),
                 dict(tile_l=32, stages=3, dynamic_smem=True),
                 dict(channels=128, dynamic_smem=True)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--out', default=str(Path(os.environ.get('OUT', '.'))
                                             / 'h200_infer_scan_v11_explore.json'))
    parser.add_argument('--only', help='time only the variants with this field (and the presets)')
    parser.add_argument('--variants', type=json.loads,
                        help='JSON list of changes to time instead of the built-in lists, each '
                             'on the few_blocks preset unless it has "base": "many"')
    parser.add_argument('--shapes', nargs='+', default=['16x4097', '32x1025', '128x197'],
                        help='BxL shapes (Vim-Ti: 16x4097 at 1024 px b16, 16x6085 at 1248)')
    args = parser.parse_args()
    rows = []
    for batch, L in (map(int, shape.split('x')) for shape in args.shapes):
        for base, name, variants in ((FEW, 'few', FEW_VARIANTS), (MANY, 'many', MANY_VARIANTS)):
            if args.variants is not None:  # the preset itself, then the given changes
                variants = [dict()] + [{k: v for k, v in c.items() if k != 'base'}
                                       for c in args.variants if c.get('base', 'few') == name]
            for change in variants:
                if args.only and change and args.only not in change:
                    continue
                option = dict(base, **change)
                try:
                    ms = g.timings(batch, L, cfg=InferScanConfig(**option),
                                   only_ours=True)['cuda_cpp_ms']
                except Exception as e:  # a config that cannot compile or fit
                    ms = repr(e)[:200]
                # what runs: fitted() shrinks configs past 48 KB of static shared memory, or the
                # dynamic limit (the timed inputs' x_dbl rows are unpadded: 8-byte pieces)
                launched = fitted(InferScanConfig(**dict(option, x_piece=8)), 16, 12)
                rows.append(dict(base=name, change=change, option=option, batch=batch, L=L,
                                 ms=ms, launched=g.launched(launched)))
                print(batch, L, name, change, ms, flush=True)
                Path(args.out).write_text(json.dumps(dict(  # after every row: partial runs keep
                    command=' '.join(['python benchmarks/gpu_scan_explore.py'] + sys.argv[1:]),
                    rows=rows), indent=1))


if __name__ == '__main__':
    main()
