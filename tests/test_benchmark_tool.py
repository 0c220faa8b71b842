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
