"""The CUDA C++ inference scan's host side: its source compiles (NVRTC, no GPU needed) for every
preset with the shared memory the wrapper budgets, and the chunking / fitting rules.

The kernel's numbers are checked on a GPU against the PyTorch twin by
benchmarks/gpu_infer_scan.py (results in benchmarks/results/h200_infer_scan_v*.json)."""
import dataclasses
import json
import struct
from pathlib import Path

import pytest
import torch
from _cuda_host import nvrtc

from vim_mm.ops import cuda_scan
from vim_mm.ops.cuda_scan import (DEFAULT_CONFIG, SMEM_LIMIT, auto_config, fitted, launch_plan,
                                  shared_bytes)

PRESETS = {'tiny': (16, 12), 'small': (16, 24), 'base': (16, 48), 'demo': (8, 4)}
RESERVED_SMEM = 1024


def elf_sections(blob: bytes) -> dict:
    """{name: size} of an ELF64 (little-endian) file's sections, e.g. a cubin's."""
    shoff, = struct.unpack_from('<Q', blob, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', blob, 0x3A)
    headers = [struct.unpack_from('<IIQQQQ', blob, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]
    names = {}
    for name_off, _, _, _, _, size in headers:
        end = blob.index(b'\0', strtab + name_off)
        names[blob[strtab + name_off:end].decode()] = size
    return names


@pytest.mark.parametrize('preset', sorted(PRESETS))
@pytest.mark.parametrize('fp16', [0, 1])
@pytest.mark.parametrize('plan', ['default', *sorted(cuda_scan.PRESETS)])
def test_kernels_compile_with_the_budgeted_shared_memory(preset, fp16, plan):
    compile_ = nvrtc()
    d_state, dt_rank = PRESETS[preset]
    base = (dataclasses.replace(DEFAULT_CONFIG, poly_final=1, prep_by_row=bool(fp16))
            if plan == 'default' else cuda_scan.PRESETS[plan].config)
    cfg = fitted(base, d_state, dt_rank)
    dtype = torch.float16 if fp16 else torch.bfloat16
    source = (cuda_scan.source_defines(d_state, dt_rank, dtype, cfg, 'vim_scan_final')
              + cuda_scan.kernel_text(cuda_scan.SOURCE))
    cubin, name = compile_(source, 'vim_scan_final', '90')
    sections = elf_sections(cubin)
    budget = shared_bytes(d_state, dt_rank, cfg, cfg.stages)
    assert budget <= SMEM_LIMIT
    for kernel in ('vim_scan_final', 'vim_scan_summary'):
        assert f'.text.{kernel}' in sections
        # the section also holds the 1 KB that sm_80+ reserve per block for the system
        assert sections[f'.nv.shared.{kernel}'] - RESERVED_SMEM == budget


def test_dynamic_shared_memory_takes_tiles_past_48_kb():
    """dynamic_smem: tiles of more than 48 KB are kept whole (up to the dynamic limit), live in
    no static shared memory, and the launch passes their size."""
    compile_ = nvrtc()
    d_state, dt_rank = PRESETS['tiny']
    big = dataclasses.replace(cuda_scan.PRESETS['many_blocks'].config, tile_l=32, stages=3)
    assert fitted(big, d_state, dt_rank).tile_l == 32
    assert fitted(big, d_state, dt_rank).channels < big.channels  # static: shrunk to 48 KB
    cfg = fitted(dataclasses.replace(big, dynamic_smem=True), d_state, dt_rank)
    assert (cfg.channels, cfg.stages) == (big.channels, big.stages)  # dynamic: kept whole
    budget = shared_bytes(d_state, dt_rank, cfg, cfg.stages)
    assert SMEM_LIMIT < budget <= cuda_scan.DYNAMIC_SMEM_LIMIT
    assert cuda_scan.launch_smem(d_state, dt_rank, cfg) == budget
    assert cuda_scan.launch_smem(d_state, dt_rank, fitted(big, d_state, dt_rank)) == 0
    source = (cuda_scan.source_defines(d_state, dt_rank, torch.bfloat16, cfg, 'vim_scan_final')
              + cuda_scan.kernel_text(cuda_scan.SOURCE))
    cubin, _ = compile_(source, 'vim_scan_final', '90')
    sections = elf_sections(cubin)
    for kernel in ('vim_scan_final', 'vim_scan_summary'):
        assert f'.text.{kernel}' in sections
        assert sections.get(f'.nv.shared.{kernel}', 0) <= RESERVED_SMEM  # no static tiles
    with pytest.raises(ValueError, match='227 KB'):
        fitted(dataclasses.replace(DEFAULT_CONFIG, tile_l=1024, dynamic_smem=True), 16, 12)


def test_fitted_drops_stages_then_channels_until_the_tiles_fit():
    big = dataclasses.replace(DEFAULT_CONFIG, stages=4, channels=128)
    for d_state, dt_rank in PRESETS.values():
        cfg = fitted(big, d_state, dt_rank)
        assert shared_bytes(d_state, dt_rank, cfg, cfg.stages) <= SMEM_LIMIT
        # it only shrinks, stages first: channels shrink only once stages are at 2
        assert cfg.stages <= 4 and cfg.channels <= 128
        assert cfg.channels == 128 or cfg.stages == 2
        # and it stops as soon as the tiles fit
        if cfg.channels < 128:
            assert shared_bytes(d_state, dt_rank, dataclasses.replace(cfg, channels=cfg.channels * 2),
                                2) > SMEM_LIMIT
    with pytest.raises(ValueError, match='shared memory'):
        fitted(dataclasses.replace(DEFAULT_CONFIG, tile_l=1024), 16, 12)


def test_launch_plan_cuts_whole_tiles_and_launches_summaries_first():
    """An explicit config walks in its n_chunks chunks of whole tiles (the last one shorter);
    chunked, the summary kernel runs first over the chunks that have a successor."""
    bf16 = dict(dtype=torch.bfloat16)
    batch, L, E, N, R = 2, 333, 128, 16, 12
    u, z = torch.zeros(batch, L, E, **bf16), torch.zeros(batch, L, 2 * E, **bf16)[..., E:]
    x = torch.zeros(batch, L, R + 2 * N + 4, **bf16)[..., :R + 2 * N]  # rows padded, as in the mixer
    p = dict(dt_proj_w=torch.zeros(E, R), dt_bias=torch.zeros(E), A=torch.zeros(E, N),
             D=torch.zeros(E))
    for n in (1, 3, 7):
        cfg = dataclasses.replace(DEFAULT_CONFIG, n_chunks=n)
        cfg, out, args, launches = launch_plan(u, x, u, x, z, p, p, cfg, sm_count=132)  # fitted
        n_chunks, chunk_l = args[-2:]
        assert chunk_l % cfg.tile_l == 0 and (n_chunks - 1) * chunk_l < L <= n_chunks * chunk_l
        assert n_chunks == n and out.shape == (batch, L, 2 * E)
        names = [name for name, _, _ in launches]
        assert names == (['vim_scan_summary', 'vim_scan_final'] if n > 1 else ['vim_scan_final'])
        assert launches[-1][1] == (E // cfg.channels, batch, 2 * n)
        if n > 1:
            assert launches[0][1] == (E // cfg.channels, batch, 2 * (n - 1))
    with pytest.raises(ValueError, match='n_chunks'):
        launch_plan(u, x, u, x, z, p, p, dataclasses.replace(DEFAULT_CONFIG, n_chunks=0), 132)


RESULTS = Path(__file__).resolve().parents[1] / 'benchmarks' / 'results'
# gpu_infer_scan.py --sweep of the current kernel and presets (v16, thirteenth session: both presets
# at every batch-filled shape, chunk counts up to and past a wave, auto_config's plans at the 9
# shapes; few_blocks with 32 channels and 5 blocks per SM)
SWEEPS = ['h200_infer_scan_v16.json']


def measured_plans():
    """{(batch, L): {(preset, n_chunks): ms}} of the presets in the committed H200 sweeps."""
    by_shape = {}
    for name in SWEEPS:
        result = json.loads((RESULTS / name).read_text())
        rows = [(r['option'], r['ms'], r['batch'], r['L']) for r in result['sweep']]
        rows += [(r['plan'], r['cuda_cpp_ms'], r['batch'], r['L']) for r in result['timings']]
        # sweep options, and the auto plans of the timings (these list only the fields that
        # shape the launch: the others are taken as the preset's)
        for option, ms, batch, L in rows:
            for preset, p in cuda_scan.PRESETS.items():
                fields = dataclasses.asdict(p.config)
                if all(option.get(k, v) == v for k, v in fields.items() if k != 'n_chunks'):
                    n = option.get('n_chunks') or 1
                    by_shape.setdefault((batch, L), {})[preset, n] = ms
    return by_shape


def test_the_time_model_follows_the_h200_sweep():
    """Preset.predicted_us against every timed preset plan of the sweeps (H200, 132 SMs): within
    20% where auto_config may choose (up to one full wave of blocks)."""
    within = []
    for (batch, L), plans in measured_plans().items():
        for (preset, n), ms in plans.items():
            p = cuda_scan.PRESETS[preset]
            blocks = batch * -(-384 // p.config.channels) * 2 * n
            if n == 1 or blocks <= p.blocks_per_sm * 132:
                within.append(abs(p.predicted_us(batch, 384, L, n, 132) / 1000 / ms - 1))
    assert len(within) >= 35 and max(within) < 0.2, (len(within), max(within))


def test_auto_config_picks_a_plan_near_the_fastest_measured():
    """At every Vim-Ti shape of the sweeps, the plan auto_config makes was timed, and it is within
    5% of the fastest preset plan timed there (224 px b128 to 2048 px b1)."""
    by_shape = measured_plans()
    shapes = [(128, 197), (32, 1025), (16, 4097), (16, 6085), (4, 16385), (8, 4097), (2, 4097),
              (1, 4097), (1, 16385)]
    for batch, L in shapes:
        cfg = auto_config(batch, 384, L, 132)
        preset = next(k for k, p in cuda_scan.PRESETS.items()
                      if dataclasses.replace(p.config, n_chunks=cfg.n_chunks) == cfg)
        plans = by_shape[batch, L]
        assert plans[preset, cfg.n_chunks] <= 1.05 * min(plans.values()), (batch, L, cfg)


def test_auto_config_chunks_only_short_batches_and_never_past_a_wave():
    for batch, L in ((128, 197), (32, 1025), (16, 4097), (64, 1025)):
        assert auto_config(batch, 384, L, 132).n_chunks == 1
    for batch, L, E in ((1, 4097, 384), (4, 16385, 384), (1, 16385, 768), (2, 4097, 768)):
        cfg = auto_config(batch, E, L, 132)
        p = next(p for p in cuda_scan.PRESETS.values() if p.config.channels == cfg.channels)
        blocks = batch * -(-E // cfg.channels) * 2
        assert cfg.n_chunks > 1 and blocks * cfg.n_chunks <= p.blocks_per_sm * 132
        assert L / cfg.n_chunks >= 4 * cfg.tile_l  # chunks of several tiles, not slivers
    assert auto_config(1, 384, 5, 132).n_chunks == 1  # too short to cut
    # fewer SMs: fewer chunks for the same problem
    assert auto_config(1, 384, 4097, 66).n_chunks < auto_config(1, 384, 4097, 132).n_chunks


def test_choice_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv('VIM_MM_INFER_SCAN', raising=False)
    assert cuda_scan.infer_scan_choice() == 'auto'
    monkeypatch.setenv('VIM_MM_INFER_SCAN', 'triton')
    assert cuda_scan.infer_scan_choice() == 'triton'
    monkeypatch.setenv('VIM_MM_INFER_SCAN', 'CUDA')
    assert cuda_scan.infer_scan_choice() == 'cuda'
    monkeypatch.setenv('VIM_MM_INFER_SCAN', 'fast')
    with pytest.raises(ValueError, match='VIM_MM_INFER_SCAN'):
        cuda_scan.infer_scan_choice()


def test_inputs_the_kernel_cannot_take_are_named():
    bf16 = dict(dtype=torch.bfloat16)
    xz = torch.zeros(2, 7, 2 * 384, **bf16)
    u, z = torch.zeros(2, 7, 384, **bf16), xz[..., 384:]  # z: a slice of in_proj's output
    assert cuda_scan.layout_problem(u, z, 16, 12) is None
    assert 'CUDA' in cuda_scan.cuda_scan_applies(u, z, 16, 12)
    assert 'bf16/fp16' in cuda_scan.layout_problem(u.float(), z.float(), 16, 12)
    assert 'multiples of 4' in cuda_scan.layout_problem(u, z, 16, 13)
    assert 'multiple of 8 channels' in cuda_scan.layout_problem(u[..., :380], z[..., :380], 16, 12)
    channel_major = torch.zeros(2, 384, 7, **bf16).transpose(1, 2)  # (batch, L, E) view
    assert 'token-major' in cuda_scan.layout_problem(channel_major, z, 16, 12)
    shifted = xz[..., 4:388]  # rows start 8 bytes off a 16-byte boundary
    assert 'aligned' in cuda_scan.layout_problem(shifted, z, 16, 12)
    # the kernel's offsets within a batch row are 32-bit: L x row stride must stay below 2^31
    L, stride = 2 ** 18, 2 ** 13
    wide = torch.empty(1, L, 8, device='meta', **bf16).as_strided((1, L, 8), (L * stride, stride, 1))
    assert '2^31' in cuda_scan.layout_problem(wide, wide, 16, 12)
    assert cuda_scan.layout_problem(wide[:, :L - 1], wide[:, :L - 1], 16, 12) is None


def test_x_dbl_rows_are_copied_in_16_bytes_only_where_aligned_and_padded():
    """The kernel's 16-byte copies read whole 16-byte pieces of a row: only where rows start on
    16 bytes and memory holds the padding up to it, including after the last row."""
    bf16 = dict(dtype=torch.bfloat16)
    padded = torch.zeros(2, 7, 48, **bf16)
    assert cuda_scan.x_piece_bytes(padded[..., :44]) == 16  # the mixer's x_proj output
    assert cuda_scan.x_piece_bytes(torch.zeros(2, 7, 44, **bf16)) == 8  # 88-byte rows
    short = torch.zeros(2 * 7 * 48 - 4, **bf16)  # storage ends after the last row's element 44
    cut = short.as_strided((2, 7, 44), (7 * 48, 48, 1))
    assert cuda_scan.x_piece_bytes(cut) == 8
    assert cuda_scan.x_piece_bytes(padded[..., :44], torch.zeros(2, 7, 44, **bf16)) == 8
    assert cuda_scan.staged_width(44, 16) == 48 and cuda_scan.staged_width(44, 8) == 44
