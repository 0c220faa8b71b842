"""Two-process (gloo) training of the segmentation demo: ranks stay identical, and the checkpoint
resumes in a single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
CONFIG = 'configs/seg/upernet_vim_demo.py'


def common_options(data_root, iters):
    return ['--cfg-options', f'train_cfg.max_iters={iters}', f'train_cfg.val_interval={iters}',
            f'default_hooks.checkpoint.interval={iters}', 'default_hooks.logger.interval=1',
            f'train_dataloader.dataset.data_root={data_root}',
            f'val_dataloader.dataset.data_root={data_root}',
            f'test_dataloader.dataset.data_root={data_root}',
            'train_dataloader.dataset.num_train=16', 'train_dataloader.dataset.num_val=4',
            'val_dataloader.dataset.num_train=16', 'val_dataloader.dataset.num_val=4',
            'test_dataloader.dataset.num_train=16', 'test_dataloader.dataset.num_val=4',
            'train_dataloader.batch_size=2', 'env_cfg.dist_cfg.backend=gloo']


def write_config(tmp_path):
    """The demo config plus a hook that saves each rank's weights after training."""
    path = tmp_path / 'demo_dist.py'
    path.write_text(f"_base_ = ['{ROOT / CONFIG}']\n"
                    "custom_imports = dict(imports=['vim_mm', 'dist_weights_hook'], "
                    "allow_failed_imports=False)\n"
                    "custom_hooks = [dict(type='DumpRankWeightsHook')]\n")
    return str(path)


def run(cmd, cwd):
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / 'tests'), os.environ.get('PYTHONPATH'))
                           if p)  # the caller's entries kept (a GPU machine's site dir)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1',
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_process_gloo_training_then_single_process_resume(tmp_path):
    data_root = tmp_path / 'data'
    work = tmp_path / 'dist'
    config = write_config(tmp_path)
    run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
         f'--master_port={29500 + os.getpid() % 1000}', str(ROOT / 'tools/train.py'), config,
         '--launcher', 'pytorch', '--work-dir', str(work)] + common_options(data_root, 3),
        cwd=ROOT)
    rank0 = torch.load(work / 'rank0_weights.pth', weights_only=True)
    rank1 = torch.load(work / 'rank1_weights.pth', weights_only=True)
    assert rank0.keys() == rank1.keys()
    start = torch.load(work / 'iter_3.pth', weights_only=False)['state_dict']
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    # the rank-0 checkpoint holds exactly the weights both ranks ended with
    mixer_keys = [k for k in rank0 if 'mixer.in_proj' in k]
    assert mixer_keys and all(torch.equal(rank0[k], start[k]) for k in mixer_keys)

    # resume the distributed checkpoint in one process and continue to iteration 5
    run([sys.executable, str(ROOT / 'tools/train.py'), config, '--work-dir', str(work),
         '--resume', str(work / 'iter_3.pth')] + common_options(data_root, 5), cwd=ROOT)
    logs = [json.loads(line) for path in work.glob('*/vis_data/scalars.json')
            for line in path.open() if '"loss"' in line]
    iters = sorted(r['iter'] for r in logs)
    assert 4 in iters and 5 in iters
    assert (work / 'iter_5.pth').exists()
