"""Helpers for the CPU tests of the CUDA C++ kernels (``vim_mm/ops/csrc``): compiling a
kernel's source by NVRTC, which needs no GPU, and building its C++ emulation
(``cuda_emulation.h``: a std::thread per CUDA thread) into a library to call by ctypes."""
import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def nvrtc():
    """torch's NVRTC compile function (source, kernel name, arch) -> (cubin, name); the test
    is skipped where this torch build has no NVRTC library."""
    try:
        from torch.cuda._utils import _nvrtc_compile
        _nvrtc_compile('extern "C" __global__ void k() {}', 'k', '90')
    except Exception as exc:  # no NVRTC library in this torch build
        pytest.skip(f'NVRTC unavailable: {exc!r}')
    return _nvrtc_compile


def build_emulated(tmp_path, defines: str, kernel_text: str, driver: str) -> ctypes.CDLL:
    """The kernel source (after its #defines and the emulation header) plus a C driver that
    calls ``emulate``, compiled by g++ (skipped without one)."""
    if shutil.which('g++') is None:
        pytest.skip('needs g++')
    source = tmp_path / 'emulated.cpp'
    source.write_text(defines + '#include "cuda_emulation.h"\n' + kernel_text + driver)
    lib = tmp_path / 'emulated.so'
    subprocess.run(['g++', '-O1', '-std=c++20', '-pthread', '-shared', '-fPIC',
                    '-Wno-unknown-pragmas', f'-I{HERE}', str(source), '-o', str(lib)],
                   check=True, capture_output=True, text=True, timeout=300)
    return ctypes.CDLL(str(lib))
