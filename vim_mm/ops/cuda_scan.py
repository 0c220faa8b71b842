"""Inference scan of the Vim mixer in CUDA C++: both directions, dt_proj folded in, exps once.

The default inference scan of the token-major mixer (``backend='triton'``) wherever it applies
(``VIM_MM_INFER_SCAN``: 'auto' default, 'triton' for the Triton scan, 'cuda' to insist). Why it
exists: the Triton scan (triton_scan.py) walks a chunk of tokens per thread and, when the batch
cannot fill the GPU (1024 px and up), chunks every sequence and so computes each exp twice,
while the exps (one per token, channel, state and direction, 16 per clock per SM on the MUFU
unit) bound the scan. ``csrc/bimamba_scan_fwd.cu`` walks each sequence in one pass where the
batch fills the GPU (chunks otherwise, with chunk summaries combined per chunk instead of a
carry pass), stages its inputs in shared memory by cp.async, splits a channel's states over
``split`` lanes, applies dt_proj (rank R) itself instead of a GEMM that writes (batch, L, E)
twice per direction, and reads x_proj's output as it is. :func:`auto_config` picks one of two
presets and the chunk count per shape from a time model fitted to an H200 sweep.

What it measures (H200, benchmarks/README.md "Thirteenth session", results/h200_infer_scan_v16,
CUDA-graph replays, auto_config's plans; v17, fifteenth session, is 0.3-1.1% faster still,
results/h200_infer_scan_v17_ab.json, v22, eighteenth session, 2.4-4.3% faster than v17,
results/h200_infer_scan_v23.json, and v27, nineteenth session, 2.1-4.4% faster than v22,
results/h200_infer_scan_v27_ab.json): faster than the Triton scan (with its dt_proj GEMMs)
at every Vim-Ti shape timed: 1.45x at 2048 px b4, 1.6x at 224 px b128, 2.2x at 1024 px b16,
2.6x at 1024 px b1, 3.1x at 512 px b32, and 4.5-10x faster than two mamba-ssm scans with their
flips; correct everywhere checked (bf16 within 3.6e-3, fp16 within 3.5e-4 of the fp32 PyTorch
twin).

Forward only, 16-bit token-major activations: what the mixer has under ``torch.no_grad()``
with autocast. Compiled by NVRTC at first use (``torch.cuda._compile_kernel``: no toolchain
needed); checked against the PyTorch path on the GPU by ``benchmarks/gpu_infer_scan.py``, and
its logic on the CPU by compiling the same source as C++ with a thread per CUDA thread
(tests/cuda_emulation.h, tests/test_cuda_scan_emulated.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ['InferScanConfig', 'infer_scan_choice', 'cuda_scan_applies', 'layout_problem',
           'Preset', 'PRESETS', 'auto_config', 'fitted', 'staged_width', 'shared_bytes',
           'x_piece_bytes', 'smem_limit', 'launch_smem',
           'launch_plan', 'bidirectional_scan_infer', 'bidirectional_scan_infer_reference']

SOURCE = Path(__file__).with_name('csrc') / 'bimamba_scan_fwd.cu'
HELPERS = SOURCE.with_name('ptx_helpers.cuh')  # PTX helpers shared with cuda_conv_xproj


def kernel_text(source: Path) -> str:
    """A kernel file with the PTX helpers it shares (``csrc/ptx_helpers.cuh``) in front: NVRTC
    compiles it as one program. Files from before the helpers were shared (0d7b2f8; e.g. an
    older commit's conv + x_proj source in ``benchmarks/gpu_layer_ops.py --ab``) carry their
    own."""
    text = Path(source).read_text()
    if 'float to_f32(u16 v) {' in text:  # self-contained
        return text
    return HELPERS.read_text() + text


ENV_VAR = 'VIM_MM_INFER_SCAN'
CHOICES = ('auto', 'triton', 'cuda')


@dataclass(frozen=True)
class InferScanConfig:
    """``channels`` channels per block, ``split`` lanes each; tiles of ``tile_l`` tokens staged
    ``stages - 1`` tiles ahead; ``poly_final`` / ``poly_summary`` of a lane's exps per token as
    polynomials on the FMA pipe in the output / chunk-summary walks (0: measured slower, the
    kernel is not MUFU-bound); the swept options are in benchmarks/README.md, "Seventh
    session" and "Eighth session"."""
    channels: int = 64
    split: int = 4  # lanes per channel, NS / split states each (more warps, exps still once)
    tile_l: int = 16
    stages: int = 3  # at most: fewer where the tiles would not fit 48 KB of shared memory
    poly_final: int = 0
    poly_summary: int = 0
    min_blocks: int = 1  # __launch_bounds__: blocks per SM the register budget must allow
    # steps 2 and 4 by tile row (conflict-free) instead of by lane: 15-30% faster on the H200
    # (both presets use it; False keeps the kernel measured first)
    prep_by_row: bool = False
    n_chunks: int = 1  # chunks per sequence (auto_config plans it per shape)
    # bytes per cp.async of x_dbl's rows: 16 where the rows are 16-byte aligned and padded to it
    # (the mixer's are), 8 otherwise (launch_plan decides from the inputs)
    x_piece: int = 16
    # the tiles in dynamic shared memory, up to DYNAMIC_SMEM_LIMIT per block instead of the 48 KB
    # of static shared memory: larger tiles for sweeps (no preset uses it; the configs timed
    # so far were no faster than static ones, benchmarks/README.md "Thirteenth session")
    dynamic_smem: bool = False


DEFAULT_CONFIG = InferScanConfig()


def infer_scan_choice() -> str:
    """$VIM_MM_INFER_SCAN: 'auto' (default: this kernel wherever it applies, else the Triton
    scan), 'triton', or 'cuda' (this kernel, or an error)."""
    choice = os.environ.get(ENV_VAR, 'auto').lower()
    if choice not in CHOICES:
        raise ValueError(f'{ENV_VAR}={choice!r}; choose one of {CHOICES}.')
    return choice


def cuda_scan_applies(u, z, d_state: int, dt_rank: int) -> str | None:
    """None when the kernel can run on these (batch, L, E) inputs (x_proj's output being a
    fresh (batch, L, dt_rank + 2 N) tensor of their dtype), else why not."""
    if not (u.is_cuda and z.is_cuda):
        return 'needs CUDA tensors'
    if not hasattr(torch.cuda, '_compile_kernel'):
        return f'needs torch.cuda._compile_kernel (NVRTC), which torch {torch.__version__} lacks'
    if torch.cuda.get_device_capability(u.device) < (8, 0):
        return 'needs a GPU of compute capability 8.0 or newer (cp.async)'
    return layout_problem(u, z, d_state, dt_rank)


def layout_problem(u, z, d_state: int, dt_rank: int) -> str | None:
    """What, apart from the device, keeps the kernel from these inputs (None: nothing)."""
    if u.dtype not in (torch.bfloat16, torch.float16) or z.dtype != u.dtype:
        return f'needs bf16/fp16 activations (got {u.dtype}, {z.dtype})'
    if d_state % 4 or dt_rank % 4:
        return f'needs d_state and dt_rank multiples of 4 (got {d_state}, {dt_rank})'
    if u.shape[-1] % 8:
        return f'needs a multiple of 8 channels (got {u.shape[-1]})'
    for t in (u, z):
        if not _rows_aligned(t, 8):
            return 'needs token-major activations with 16-byte aligned rows'
    if not _offsets_fit(u.shape[1], u, z):
        return 'needs offsets within a batch row below 2^31 elements (32-bit in the kernel)'
    return None


def _offsets_fit(L: int, *ts) -> bool:
    """Whether every token offset within a batch row of these (batch, L, X) tensors, and of the
    (batch, L, 2E) output, fits the kernel's 32-bit arithmetic."""
    widest = max([t.stride(1) for t in ts] + [2 * ts[0].shape[-1]])
    return L * widest < 2 ** 31


def _rows_aligned(t: torch.Tensor, vec: int) -> bool:
    """(batch, L, X) with unit channel stride and rows starting on ``vec``-element bounds."""
    return (t.stride(-1) == 1 and t.stride(1) % vec == 0 and t.stride(0) % vec == 0
            and t.data_ptr() % (vec * t.element_size()) == 0)


@dataclass(frozen=True)
class Preset:
    """A config and the time model :func:`auto_config` plans with, fitted to the H200 sweep of
    the kernel as it is (benchmarks/README.md, "Eleventh session" and "Thirteenth session";
    benchmarks/fit_scan_model.py): a walk costs, per token, ``block_us`` per block sharing an SM
    after the first (:meth:`round_us`), ``latency_us`` for the first, and ``chunked_factor``
    times that when chunked (summary + output walks), plus ``launch_us`` per kernel launched;
    ``blocks_per_sm`` blocks fit an SM at once (registers, shared memory)."""
    config: InferScanConfig
    blocks_per_sm: int
    block_us: float
    latency_us: float
    chunked_factor: float
    launch_us: float

    def round_us(self, k: int) -> float:
        """Per token, k blocks sharing an SM: one walk's latency, plus ``block_us`` for each
        further block (more blocks hide latency, so a block costs less than alone)."""
        return self.latency_us + (k - 1) * self.block_us

    def predicted_us(self, batch: int, E: int, L: int, n_chunks: int, sm_count: int) -> float:
        """Modelled kernel time of this preset cutting each sequence into ``n_chunks``."""
        tile = self.config.tile_l
        chunk_l = -(-math.ceil(L / n_chunks) // tile) * tile
        n_chunks = math.ceil(L / chunk_l)
        blocks = batch * math.ceil(E / self.config.channels) * 2 * n_chunks
        full, rest = divmod(math.ceil(blocks / sm_count), self.blocks_per_sm)
        per_token = full * self.round_us(self.blocks_per_sm) + (self.round_us(rest) if rest else 0)
        if n_chunks == 1:
            return chunk_l * per_token + self.launch_us
        return chunk_l * per_token * self.chunked_factor + 2 * self.launch_us


# many_blocks: two lanes per channel (8 states per lane, fewer shuffles), the faster one when the
# batch fills the GPU; few_blocks: 32 channels and 32-token tiles per block, 4 lanes per channel
# (128 threads, 45 KB of tiles, at most 102 registers: 5 blocks per SM; with the v13 kernel 4.5%
# faster than 16 channels at 16 x 4097 and 16 x 6085, v15_explore, where v11's were even; the
# register bound another 1.7%, v16_explore).
PRESETS = dict(
    many_blocks=Preset(InferScanConfig(channels=64, split=2, tile_l=16, prep_by_row=True,
                                       min_blocks=4),
                       blocks_per_sm=4, block_us=0.0499, latency_us=0.0873, chunked_factor=1.564,
                       launch_us=7.65),
    few_blocks=Preset(InferScanConfig(channels=32, split=4, tile_l=32, stages=2,
                                      prep_by_row=True, min_blocks=5),
                      blocks_per_sm=5, block_us=0.0258, latency_us=0.0494, chunked_factor=1.672,
                      launch_us=9.84),
)


@functools.lru_cache(maxsize=256)  # ~70 us of Python per plan at batch 1, per layer and call
def auto_config(batch: int, E: int, L: int, sm_count: int) -> InferScanConfig:
    """The preset and chunk count of least modelled time (:meth:`Preset.predicted_us`), with
    chunk counts up to what one wave of blocks holds (the range the model was fitted and
    checked on). Plans within 3% of the least modelled time count as equal, and of those the
    one with the most threads wins: more resident warps hide more latency than the model sees
    (the fastest plan of every chunked shape timed fills the wave, h200_infer_scan_v9b, _v12
    and _v13)."""
    plans = []
    for preset in PRESETS.values():
        blocks = batch * math.ceil(E / preset.config.channels) * 2
        most = max(1, min(preset.blocks_per_sm * sm_count // blocks,
                          L // (4 * preset.config.tile_l)))
        threads = blocks * preset.config.channels * preset.config.split
        plans += [(preset.predicted_us(batch, E, L, n, sm_count), threads * n, preset, n)
                  for n in range(1, most + 1)]
    fastest = min(t for t, *_ in plans)
    _, _, preset, n = max((p for p in plans if p[0] <= 1.03 * fastest), key=lambda p: p[1])
    return dataclasses.replace(preset.config, n_chunks=n)


_kernels: dict = {}
SMEM_LIMIT = 48 * 1024  # static shared memory of one block
DYNAMIC_SMEM_LIMIT = 227 * 1024  # dynamic shared memory of one block on sm_90 (opt-in)


def smem_limit(cfg: InferScanConfig) -> int:
    return DYNAMIC_SMEM_LIMIT if cfg.dynamic_smem else SMEM_LIMIT


def staged_width(width: int, piece_bytes: int) -> int:
    """x_dbl elements (16-bit) the kernel stages per row: ``width`` rounded up to whole pieces."""
    return -(-width * 2 // piece_bytes) * piece_bytes // 2


def shared_bytes(d_state: int, dt_rank: int, cfg, stages: int) -> int:
    """Shared memory of the kernel's ``Tiles``: u, z and x_dbl stages, x_dbl's [B | C] in fp32
    and (l, dt u) per token and channel (two spare rows each), the lanes' partial outputs (the
    gates stay in registers since v13), the dt columns as fp16 pairs (16-byte rows, two spare)."""
    width, T, C = dt_rank + 2 * d_state, cfg.tile_l, cfg.channels
    staged = staged_width(width, cfg.x_piece)
    return (stages * T * (2 * C + staged) * 2 + (T + 2) * 2 * d_state * 4
            + (T + 2) * C * 8 + T * C * cfg.split * 4 + (T + 2) * -(-dt_rank // 8) * 16)


def fitted(cfg: InferScanConfig, d_state: int, dt_rank: int) -> InferScanConfig:
    """``cfg`` with fewer stages (down to 2), then fewer channels per block, until the tiles
    fit the shared memory of a block (:func:`smem_limit`: 48 KB static, or the dynamic limit)."""
    while shared_bytes(d_state, dt_rank, cfg, cfg.stages) > smem_limit(cfg):
        if cfg.stages > 2:
            cfg = dataclasses.replace(cfg, stages=cfg.stages - 1)
        elif cfg.channels > 8:
            cfg = dataclasses.replace(cfg, channels=cfg.channels // 2)
        else:
            raise ValueError(f'InferScanConfig {cfg} cannot fit {smem_limit(cfg) // 1024} KB '
                             f'of shared memory for d_state={d_state}, dt_rank={dt_rank}; '
                             'lower tile_l')
    return cfg


def source_defines(d_state: int, dt_rank: int, dtype: torch.dtype, cfg: InferScanConfig,
                   kernel: str) -> str:
    """The compile-time constants the kernel source expects, as #defines, for a fitted config."""
    consts = dict(NS=d_state, R=dt_rank, XW=dt_rank + 2 * d_state, CH=cfg.channels,
                  SPLIT=cfg.split, TT=cfg.tile_l, STAGES=cfg.stages,
                  FP16=int(dtype == torch.float16), MIN_BLOCKS=cfg.min_blocks,
                  PREP_BY_ROW=int(cfg.prep_by_row), XV=cfg.x_piece,
                  DYN_SMEM=int(cfg.dynamic_smem),
                  NPOLY=cfg.poly_final if kernel == 'vim_scan_final' else cfg.poly_summary)
    return ''.join(f'#define {k} {v}\n' for k, v in consts.items())


def _compile(d_state: int, dt_rank: int, dtype: torch.dtype, cfg: InferScanConfig):
    """The two kernels for a fitted config (NVRTC, once per process and device)."""
    key = (d_state, dt_rank, dtype, dataclasses.replace(cfg, n_chunks=1),  # a launch setting
           torch.cuda.current_device())
    if key not in _kernels:
        kernels = tuple(
            torch.cuda._compile_kernel(source_defines(d_state, dt_rank, dtype, cfg, name)
                                       + kernel_text(SOURCE), name)
            for name in ('vim_scan_final', 'vim_scan_summary'))
        if cfg.dynamic_smem:  # the attribute a launch with more than 48 KB needs
            for kernel in kernels:
                if not hasattr(kernel, 'set_shared_memory_config'):
                    raise RuntimeError('InferScanConfig(dynamic_smem=True) needs torch with '
                                       f'_CudaKernel.set_shared_memory_config ({torch.__version__} '
                                       'lacks it); use the static presets')
                kernel.set_shared_memory_config(launch_smem(d_state, dt_rank, cfg))
        _kernels[key] = kernels
    return _kernels[key]


def launch_smem(d_state: int, dt_rank: int, cfg: InferScanConfig) -> int:
    """Dynamic shared memory bytes a launch of the fitted ``cfg`` passes (0: static tiles)."""
    return shared_bytes(d_state, dt_rank, cfg, cfg.stages) if cfg.dynamic_smem else 0


def _direction(p: dict):
    """(dt_proj weight (E, R), dt bias, A (E, N), D), fp32 contiguous."""
    return [t.detach().float().contiguous() for t in (p['dt_proj_w'], p['dt_bias'], p['A'], p['D'])]


LOG2E, LN2 = 1.4426950408889634, 0.6931471805599453
FP16_MAX = 65504.
KERNEL_KEYS = ('kernel_w', 'kernel_bias', 'kernel_D')


def kernel_weights(p: dict) -> dict:
    """What the kernel takes of a direction's dt_proj and D (it computes in base 2 and keeps the
    state divided by ln 2, ``csrc/bimamba_scan_fwd.cu``): dt_proj's weight times log2(e) in
    fp16 (its HFMA2s; clamped to fp16's range), the dt bias times log2(e) and D / ln 2 in fp32.
    The mixer caches them with its other inference weights, so no call derives them."""
    w, bias, _, D = _direction(p)
    return dict(kernel_w=(w * LOG2E).clamp(-FP16_MAX, FP16_MAX).half().contiguous(),
                kernel_bias=(bias * LOG2E).contiguous(), kernel_D=(D / LN2).contiguous())


def kernel_direction(p: dict):
    """The kernel's four direction arguments (:func:`kernel_weights`, and A in fp32): the cached
    tensors where ``p`` has them (no copies), else derived from the parameters."""
    k = p if all(key in p for key in KERNEL_KEYS) else kernel_weights(p)
    return [k['kernel_w'], k['kernel_bias'], p['A'].detach().float().contiguous(), k['kernel_D']]


def launch_plan(u_f, x_f, u_b, x_b, z, fwd: dict, bwd: dict, cfg: InferScanConfig | None,
                sm_count: int):
    """What :func:`bidirectional_scan_infer` launches, on the inputs' device: the fitted config,
    the output, the kernels' arguments and [(kernel name, grid, block)] in launch order."""
    batch, L, E = u_f.shape
    d_state, dt_rank = fwd['A'].shape[1], fwd['dt_proj_w'].shape[1]
    if u_b.stride() != u_f.stride() or x_b.stride() != x_f.stride() or not all(
            _rows_aligned(t, 4) for t in (x_f, x_b)) or x_f.shape[-1] != dt_rank + 2 * d_state:
        raise ValueError('bidirectional_scan_infer: u_f/u_b and x_f/x_b must share their '
                         'layouts, x_* be (batch, L, dt_rank + 2 N) with 8-byte aligned rows')
    if not _offsets_fit(L, u_f, x_f, z):
        raise ValueError('bidirectional_scan_infer: a batch row spans 2^31 elements or more; '
                         'the kernel addresses within a row in 32 bits (split the batch row)')
    if cfg is None:
        cfg = auto_config(batch, E, L, sm_count)
    cfg = fitted(dataclasses.replace(cfg, x_piece=x_piece_bytes(x_f, x_b)), d_state, dt_rank)
    if cfg.n_chunks < 1:
        raise ValueError(f'InferScanConfig.n_chunks must be >= 1 (got {cfg.n_chunks})')
    n_chunks = cfg.n_chunks
    chunk_l = -(-math.ceil(L / n_chunks) // cfg.tile_l) * cfg.tile_l
    n_chunks = math.ceil(L / chunk_l)
    out = torch.empty(batch, L, 2 * E, dtype=u_f.dtype, device=u_f.device)
    if n_chunks > 1:
        hsum = torch.empty(2, batch, n_chunks, d_state, E, dtype=torch.float32, device=u_f.device)
        ssum = torch.empty(2, batch, n_chunks, E, dtype=torch.float32, device=u_f.device)
    else:
        hsum = ssum = out
    args = [u_f, u_b, u_f.stride(0), u_f.stride(1), x_f, x_b, x_f.stride(0), x_f.stride(1),
            z, z.stride(0), z.stride(1), *kernel_direction(fwd), *kernel_direction(bwd),
            out, out.stride(0), out.stride(1), hsum, ssum, batch, L, E, n_chunks, chunk_l]
    grid_x, block = math.ceil(E / cfg.channels), (cfg.channels * cfg.split, 1, 1)
    launches = [('vim_scan_final', (grid_x, batch, 2 * n_chunks), block)]
    if n_chunks > 1:
        launches.insert(0, ('vim_scan_summary', (grid_x, batch, 2 * (n_chunks - 1)), block))
    return cfg, out, args, launches


def x_piece_bytes(*xs) -> int:
    """16 when every x_dbl row can be copied in 16-byte pieces (rows 16-byte aligned and padded
    in memory to a multiple of 16 bytes, like the mixer's x_proj outputs), else 8."""
    for x in xs:
        batch, L, width = x.shape
        staged = staged_width(width, 16)
        last = x.storage_offset() + (batch - 1) * x.stride(0) + (L - 1) * x.stride(1) + staged
        if not (_rows_aligned(x, 8) and x.stride(1) >= staged
                and last * x.element_size() <= x.untyped_storage().nbytes()):
            return 8
    return 16


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def bidirectional_scan_infer(u_f, x_f, u_b, x_b, z, fwd: dict, bwd: dict,
                             cfg: InferScanConfig | None = None) -> torch.Tensor:
    """Both scan directions of a Vim layer, gated and halved, side by side.

    u_*: (batch, L, E) conv outputs in original token order (u_b from the anti-causal conv);
    x_*: their x_proj outputs (batch, L, R + 2N) = [dt | B | C]; z: (batch, L, E); fwd / bwd:
    the direction parameters of :meth:`BiMambaMixer.direction_params`. Returns (batch, L, 2E):
    ``[y_fwd, y_bwd] * silu(z) / 2``, so ``out_proj`` over ``[W, W]`` gives the mixer output.
    ``cfg`` None: :func:`auto_config`'s plan for this batch, length and width.
    """
    sm_count = _sm_count(u_f.device.index if u_f.device.index is not None
                         else torch.cuda.current_device())
    cfg, out, args, launches = launch_plan(u_f, x_f, u_b, x_b, z, fwd, bwd, cfg, sm_count)
    d_state, dt_rank = fwd['A'].shape[1], fwd['dt_proj_w'].shape[1]
    final, summary = _compile(d_state, dt_rank, u_f.dtype, cfg)
    kernels = dict(vim_scan_final=final, vim_scan_summary=summary)
    smem = launch_smem(d_state, dt_rank, cfg)
    for name, grid, block in launches:
        kernels[name](grid=grid, block=block, args=args, shared_mem=smem)
    return out


def bidirectional_scan_infer_reference(u_f, x_f, u_b, x_b, z, fwd: dict, bwd: dict):
    """PyTorch twin of :func:`bidirectional_scan_infer` (same arguments), fp32, any device:
    the two halves already summed, (batch, L, E)."""
    from .triton_scan import bidirectional_selective_scan_reference
    args = []
    for u, x, p in ((u_f, x_f, fwd), (u_b, x_b, bwd)):
        R, N = p['dt_proj_w'].shape[1], p['A'].shape[1]
        x = x.float()
        delta = x[..., :R] @ p['dt_proj_w'].float().t()
        args += [u.float().transpose(1, 2), delta.transpose(1, 2), p['A'],
                 x[..., R:R + N].transpose(1, 2), x[..., R + N:].transpose(1, 2), p['D'],
                 p['dt_bias']]
    return bidirectional_selective_scan_reference(*args, z.float().transpose(1, 2)).transpose(1, 2)
