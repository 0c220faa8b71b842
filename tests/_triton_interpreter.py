"""Triton's interpreter for the CPU tests of our Triton kernels.

Triton binds its functions (its own standard library included) to the interpreter when they
are defined, so ``TRITON_INTERPRET=1`` must be set before triton is first imported in the
process. Whether it was is decided ONCE, at the first import of this module (every test module
that needs the interpreter imports it before triton): the environment variable that this sets
must not make a later test module believe the interpreter was on from the start. Where triton
was already imported without it, ``run_here`` skips a module's tests and
``run_in_fresh_process`` runs the module again in a new process where the interpreter is on.
"""
import os
import subprocess
import sys

import pytest
import torch

ON_CPU = not torch.cuda.is_available()
STALE_TRITON = ON_CPU and 'triton' in sys.modules and os.environ.get('TRITON_INTERPRET') != '1'
if ON_CPU:
    os.environ['TRITON_INTERPRET'] = '1'

run_here = pytest.mark.skipif(STALE_TRITON, reason='triton was imported without the '
                                'interpreter; test_in_fresh_process runs this file instead')


def run_in_fresh_process(path):
    """Runs the test file ``path`` in a new pytest process with the interpreter on."""
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                             str(path)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
