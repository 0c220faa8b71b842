"""vim_mm: Vision Mamba (Vim) backbones for the OpenMMLab 2.x stack."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"__version__ = '([^']+)'", (HERE / 'vim_mm/version.py').read_text()).group(1)

# The known-good set for the 2-core CPU machines (see tools/install.sh, which also builds mmcv).
OPENMMLAB = ['mmengine==0.10.7', 'mmcv==2.1.0', 'mmdet==3.3.0', 'mmsegmentation==1.2.2',
             'mmpretrain==1.2.0', 'ftfy', 'regex', 'pycocotools']

setup(
    name='vim_mm',
    version=VERSION,
    description='Vision Mamba (Vim) for mmsegmentation, mmdetection and mmpretrain',
    long_description=(HERE / 'README.md').read_text() if (HERE / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['vim_mm', 'vim_mm.*']),
    package_data={'vim_mm.ops': ['csrc/*.cu']},  # compiled at run time (NVRTC)
    python_requires='>=3.10',
    install_requires=['torch>=2.1', 'numpy'],
    extras_require={
        'mm': OPENMMLAB,
        # GPU fast path; needs a CUDA toolchain matching torch to build
        'cuda': ['mamba-ssm>=2.2', 'causal-conv1d>=1.4'],
        'dev': OPENMMLAB + ['pytest', 'matplotlib'],
    },
    license='Apache-2.0',
)
