"""Both directions' conv1d + SiLU and x_proj of the Vim mixer in one CUDA C++ kernel (inference).

``csrc/conv_xproj_fwd.cu``: a block stages TL tokens of x (plus a 3-token halo each side) in
shared memory chunk of channels by chunk (the next chunk in flight), convolves them, stores u
once, and multiplies each chunk's u with x_proj's rows on the tensor cores (mma.sync) from
shared memory. The pair it replaces (the Triton stream conv, then one batched GEMM) writes u
and reads it back. H200, bf16, Vim-Ti 16 x 4097 tokens: 68.3 us against the pair's 82.5
(16 x 6085: 98.7 / 119.7; Vim-S 16 x 4097: 125.6 / 153.8); end to end ~2% more img/s at
1024 and 1248 px (benchmarks/README.md, "Sixteenth session").

Forward only, 16-bit activations, conv width <= 4, E a multiple of 64: what the mixer has under
``torch.no_grad()`` with autocast, where the CUDA C++ scan runs; the mixer takes it there by
default (``VIM_MM_CONV_XPROJ=pair`` for the pair). Compiled by NVRTC at first use like the scan
(``cuda_scan.py``); its logic is checked on the CPU by compiling the same source as C++ with a
thread per CUDA thread (tests/cuda_emulation.h, tests/test_cuda_conv_xproj_emulated.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .cuda_scan import kernel_text

__all__ = ['conv_xproj_applies', 'conv_xproj', 'stack_conv_weights', 'conv_xproj_reference',
           'conv_xproj_choice', 'source_defines', 'launch', 'Tile', 'WIDE', 'NARROW', 'tile_for']
ENV_VAR = 'VIM_MM_CONV_XPROJ'


def conv_xproj_choice() -> str:
    """$VIM_MM_CONV_XPROJ: 'fused' (default: this kernel wherever it and the CUDA C++ scan
    apply) or 'pair' (the Triton conv, then one batched GEMM)."""
    choice = os.environ.get(ENV_VAR, 'fused').lower()
    if choice not in ('pair', 'fused'):
        raise ValueError(f"{ENV_VAR}={choice!r}; choose 'pair' or 'fused'.")
    return choice


SOURCE = Path(__file__).with_name('csrc') / 'conv_xproj_fwd.cu'
WIDTH = 4


class Tile(NamedTuple):
    """A block's work: ``tokens`` of one sequence, walked ``channels`` at a time, with
    registers for ``min_blocks`` blocks per SM and ``stages`` chunks staged (the one computed
    and the next ones). A warp per 16-token slice and direction: 4 x tokens threads."""
    tokens: int
    channels: int
    min_blocks: int
    stages: int = 2

    @property
    def threads(self) -> int:
        return 4 * self.tokens


# The H200 sweep's fastest at 16 x 4097 and 16 x 6085 tokens, Vim-Ti and Vim-S
# (results/h200_layer_ops_conv_xproj_v7.json; 3 stages no faster, v6; registers for 3 blocks
# per SM spill: 41-51% slower).
WIDE = Tile(64, 64, 2)
# Twice the blocks, for grids WIDE leaves short of two blocks per SM (1024 px batch 1: 65
# blocks for 132 SMs); 1.4-2.3% slower than WIDE where both fill the GPU (same sweep).
NARROW = Tile(32, 64, 4)
TILE: Tile | None = None  # forces a tile (benchmarks); None: tile_for's choice
CHANNELS = math.lcm(WIDE.channels, NARROW.channels)  # E must be a multiple of this


def tile_for(batch: int, L: int, sms: int) -> Tile:
    """WIDE where its grid gives every one of ``sms`` SMs its two blocks, else NARROW (or
    :data:`TILE` where set)."""
    if TILE is not None:
        return TILE
    return WIDE if batch * math.ceil(L / WIDE.tokens) >= WIDE.min_blocks * sms else NARROW


def conv_xproj_applies(x: torch.Tensor, taps: torch.Tensor, x_proj: torch.Tensor) -> str | None:
    """None when the kernel can run on x (batch, L, E) with :func:`stack_conv_weights`' taps
    and the stacked x_proj rows (2, P, E); else why not."""
    if not x.is_cuda:
        return 'needs CUDA tensors'
    if not hasattr(torch.cuda, '_compile_kernel'):
        return f'needs torch.cuda._compile_kernel (NVRTC), which torch {torch.__version__} lacks'
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return 'needs a GPU of compute capability 8.0 or newer (cp.async, bf16 mma)'
    if x.dtype not in (torch.bfloat16, torch.float16) or x_proj.dtype != x.dtype:
        return f'needs bf16/fp16 activations and x_proj rows of their dtype (got {x.dtype})'
    E = x.shape[-1]
    if E % CHANNELS or x_proj.shape[-1] != E or x_proj.shape[1] % 8 or x_proj.shape[0] != 2:
        return (f'needs E a multiple of {CHANNELS} and (2, P, E) x_proj rows with P a multiple '
                'of 8')
    if taps.shape[-1] != WIDTH:
        return f'needs conv widths <= {WIDTH}'
    if not (x.stride(-1) == 1 and x.stride(1) % 8 == 0 and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0):
        return 'needs token-major x with 16-byte aligned rows'
    if x.shape[1] * x.stride(1) >= 2 ** 31:
        return 'needs a batch row below 2^31 elements'
    return None


def source_defines(E: int, P: int, dtype: torch.dtype, tile: Tile = WIDE) -> str:
    consts = dict(E=E, P=P, FP16=int(dtype == torch.float16), TL=tile.tokens, CC=tile.channels,
                  NTH=tile.threads, MIN_BLOCKS=tile.min_blocks, STAGES=tile.stages)
    return ''.join(f'#define {k} {v}\n' for k, v in consts.items())


def smem_bytes(E: int, P: int, tile: Tile = WIDE) -> int:
    """The kernel's Smem: tile.stages stages (a chunk's TL + 6 x rows of CC channels and (2, P,
    CC + 8) x_proj columns, 16-bit; its (2, CC) conv taps (4 each) and biases, fp32) and the
    (2, TL, CC + 8) u tile, 16-bit (TL, CC: the tile's tokens and channels)."""
    TL, CC = tile.tokens, tile.channels
    stage = (TL + 6) * CC * 2 + 2 * P * (CC + 8) * 2 + 2 * CC * 5 * 4
    return tile.stages * stage + 2 * TL * (CC + 8) * 2


def stack_conv_weights(w_f, b_f, w_b, b_b):
    """The kernel's conv weights: both directions' taps (2, E, 4) (leading zero taps for
    narrower convs; wider ones stay as they are, and the kernel refuses them) and biases
    (2, E), fp32, new tensors (16-byte aligned), HALVED: the kernel's SiLU takes half its
    argument (silu(x) = h + h tanh(h), h = x / 2), so convolving with halves saves a multiply
    per output (exact: a power of two). The mixer derives them once per weight version
    (``InferenceWeights``), not per call."""
    taps = torch.stack([w.reshape(w.shape[0], -1).float() for w in (w_f, w_b)])
    taps = F.pad(taps, (max(WIDTH - taps.shape[-1], 0), 0))
    return 0.5 * taps, 0.5 * torch.stack([b_f.float(), b_b.float()])


def launch(x, taps, bias, x_proj, tile: Tile):
    """(u (2, batch, L, E), xd (2, batch, L, P), kernel arguments, grid, block) for these inputs
    and that tile."""
    batch, L, E = x.shape
    P = x_proj.shape[1]
    u = torch.empty(2, batch, L, E, dtype=x.dtype, device=x.device)
    xd = torch.empty(2, batch, L, P, dtype=x.dtype, device=x.device)
    args = [x, x.stride(0), x.stride(1), taps.contiguous(), bias.contiguous(),
            x_proj.contiguous(), u, xd, batch, L]
    return u, xd, args, (math.ceil(L / tile.tokens), batch, 1), (tile.threads, 1, 1)


_kernels: dict = {}


def _compile(E: int, P: int, dtype: torch.dtype, tile: Tile):
    key = (E, P, dtype, tile, torch.cuda.current_device())
    if key not in _kernels:
        kernel = torch.cuda._compile_kernel(
            source_defines(E, P, dtype, tile) + kernel_text(SOURCE), 'vim_conv_xproj')
        kernel.set_shared_memory_config(smem_bytes(E, P, tile))
        _kernels[key] = kernel
    return _kernels[key]


def conv_xproj(x, taps, bias, x_proj):
    """x (batch, L, E) -> (u, xd): u (2, batch, L, E) the two convs + SiLU (the second
    anti-causal, as in ``triton_conv``), xd (2, batch, L, P) = u . x_proj^T per direction.
    ``taps``, ``bias``: :func:`stack_conv_weights`; ``x_proj`` (2, P, E) in x's dtype."""
    why_not = conv_xproj_applies(x, taps, x_proj)
    if why_not:
        raise ValueError(f'conv_xproj: {why_not}')
    E, P = x.shape[-1], x_proj.shape[1]
    tile = tile_for(x.shape[0], x.shape[1],
                    torch.cuda.get_device_properties(x.device).multi_processor_count)
    u, xd, args, grid, block = launch(x, taps, bias, x_proj, tile)
    if x.shape[0] * x.shape[1]:
        _compile(E, P, x.dtype, tile)(grid=grid, block=block, args=args,
                                      shared_mem=smem_bytes(E, P, tile))
    return u, xd


def conv_xproj_reference(x, taps, bias, x_proj):
    """fp32 PyTorch twin: (u, xd) as :func:`conv_xproj` computes them, any device (``taps``,
    ``bias``: :func:`stack_conv_weights`' halves)."""
    from .triton_conv import bidirectional_conv_torch
    taps, bias = 2 * taps, 2 * bias
    u = torch.stack(bidirectional_conv_torch(x.float(), taps[0], bias[0], taps[1], bias[1]))
    return u, u @ x_proj.float().transpose(1, 2).unsqueeze(1)
