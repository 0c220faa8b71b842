"""tools/benchmark.py on CPU: rows for every model x mode, JSON and PNG written, re-plot works."""
import json
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(*args):
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_benchmark_tool_cpu(tmp_path):
    out, png = str(tmp_path / 'bench.json'), str(tmp_path / 'bench.png')
    run('--models', 'vim-t', 'vim-t+cp', 'deit-t', 'deit-t-plain', '--res', '32', '48',
        '--batch', '2', '1', '--mode', 'infer', 'train', '--device', 'cpu', '--warmup', '0',
        '--repeats', '1', '--out', out, '--plot', png)
    with open(out) as f:
        result = json.load(f)
    rows = result['results']
    assert result['meta']['dtype'] == 'fp32'  # the CPU default
    assert {(r['model'], r['res'], r['mode']) for r in rows} == {
        (m, res, mode) for m in ('vim-t', 'vim-t+cp', 'deit-t', 'deit-t-plain') for res in (32, 48)
        for mode in ('infer', 'train')}
    for row in rows:
        assert row['img_per_s'] > 0 and row['seconds'] > 0
        assert row['batch'] == (2 if row['res'] == 32 else 1)
        assert row.get('backend') == ('torch' if row['model'].startswith('vim') else None)
    assert osp.getsize(png) > 0
    replot = str(tmp_path / 'replot.png')
    run('--from-json', out, '--plot', replot)
    assert osp.getsize(replot) > 0
    # every Vim row over the DeiT rows of its size at its mode, resolution and batch
    speed = {(r['model'], r['res'], r['mode']): r['img_per_s'] for r in rows}
    assert {(r['model'], r['baseline'], r['res'], r['mode']) for r in result['ratios']} == {
        (m, d, res, mode) for m in ('vim-t', 'vim-t+cp') for d in ('deit-t', 'deit-t-plain')
        for res in (32, 48) for mode in ('infer', 'train')}
    for r in result['ratios']:
        want = speed[r['model'], r['res'], r['mode']] / speed[r['baseline'], r['res'], r['mode']]
        assert abs(r['ratio'] - want) <= 1e-9 * want


def test_ratios_from_several_runs(tmp_path):
    """--from-json --out: the ratios of rows from separate files (the mamba-ssm path run
    alone), to the DeiT of the same size and to the mamba-ssm path, never across sizes or
    shapes, and not for rows without a number."""
    def row(model, res, batch, speed=None):
        r = dict(model=model, res=res, batch=batch, mode='infer')
        r.update(dict(img_per_s=speed) if speed else dict(result='OOM'))
        return r
    a, b = str(tmp_path / 'a.json'), str(tmp_path / 'b.json')
    with open(a, 'w') as f:
        json.dump(dict(results=[row('vim-t@triton', 1248, 16, 689.5), row('deit-t', 1248, 16, 635.1),
                                row('vim-s@triton', 1248, 16, 300.0), row('deit-t', 2048, 4, 124.4)]), f)
    with open(b, 'w') as f:
        json.dump(dict(results=[row('vim-t@cuda', 1248, 16, 254.0), row('deit-s', 1248, 16)]), f)
    out = str(tmp_path / 'ratios.json')
    printed = run('--from-json', a, b, '--out', out)
    with open(out) as f:
        got = json.load(f)
    assert got['sources'] == [a, b] and '--from-json' in got['command']
    pairs = {(r['model'], r['baseline']): r['ratio'] for r in got['ratios']}
    assert pairs.keys() == {('vim-t@triton', 'deit-t'), ('vim-t@triton', 'vim-t@cuda'),
                            ('vim-t@cuda', 'deit-t')}
    assert abs(pairs['vim-t@triton', 'vim-t@cuda'] - 689.5 / 254.0) < 1e-12
    assert abs(pairs['vim-t@cuda', 'deit-t'] - 254.0 / 635.1) < 1e-12
    assert '2.715x vim-t@cuda' in printed


def test_unknown_model_option_is_refused():
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'), '--models',
                           'vim-t+fast', '--res', '32', '--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0 and "the suffixes are +cp, +graph, +cscan, +tscan" in proc.stderr


def test_cscan_needs_the_triton_path_and_rows_record_its_failure(tmp_path):
    """+cscan asks for the CUDA C++ inference scan of the triton path; on the CPU that path
    cannot run, and the row records the error instead of a number."""
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'benchmark.py'), '--models',
                           'vim-t+cscan', '--res', '32', '--device', 'cpu'],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode != 0 and 'vim-t@triton+cscan' in proc.stderr
    out = str(tmp_path / 'bench.json')
    run('--models', 'vim-t@triton+cscan', '--res', '32', '--mode', 'infer', '--device', 'cpu',
        '--warmup', '0', '--repeats', '1', '--out', out)
    with open(out) as f:
        row, = json.load(f)['results']
    # refused by the triton path (no CUDA) or, under TRITON_INTERPRET, by the C++ scan's check
    assert row['result'] == 'error' and 'triton' in row['error'].lower()
