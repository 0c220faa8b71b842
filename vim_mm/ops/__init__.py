"""Kernels of the Vim mixer: a PyTorch twin that runs anywhere and the CUDA fast path."""
from .backend import BACKENDS, graphed_inference, requested_backend, resolve_backend
from .cuda_ops import CUDA_KERNELS_AVAILABLE, bimamba_inner_cuda
from .torch_ops import (causal_conv1d_torch, linear_channel_first, linear_recurrence,
                        mamba_inner_torch, selective_scan_torch)

__all__ = ['BACKENDS', 'CUDA_KERNELS_AVAILABLE', 'bimamba_inner_cuda', 'causal_conv1d_torch',
           'graphed_inference', 'linear_channel_first', 'linear_recurrence', 'mamba_inner_torch',
           'requested_backend', 'resolve_backend', 'selective_scan_torch']
