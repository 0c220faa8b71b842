"""The CUDA C++ inference scan's logic on the CPU (tests/cuda_emulation.h: a std::thread per
CUDA thread, barriers as std::barrier), against the PyTorch twin: tiling, the lane split,
partial tiles and channel blocks, both directions, chunk summaries and their combination, the
gate and the side-by-side output. Speed and what only the hardware does are the GPU check's
(benchmarks/gpu_infer_scan.py)."""
import ctypes
import dataclasses
import math

import pytest
import torch
from _cuda_host import build_emulated

from vim_mm.ops import cuda_scan
from vim_mm.ops.cuda_scan import (DEFAULT_CONFIG, bidirectional_scan_infer_reference,
                                  launch_plan, source_defines)

DRIVER = r'''
#define SCAN_NAMES u_f, u_b, su_b, su_l, x_f, x_b, sx_b, sx_l, z, sz_b, sz_l, W_f, bias_f, A_f, \
    D_f, W_b, bias_b, A_b, D_b, out, so_b, so_l, hsum, ssum, batch, L, E, n_chunks, chunk_l
extern "C" void run(int summary, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                    SCAN_ARGS) {
  emulate(summary ? vim_scan_summary : vim_scan_final, gx, gy, gz, threads, SCAN_NAMES);
}
'''


def build(tmp_path, d_state, dt_rank, dtype, cfg):
    """The kernels (both; NPOLY as in the final one) compiled for the CPU emulation."""
    return build_emulated(tmp_path, source_defines(d_state, dt_rank, dtype, cfg, 'vim_scan_final'),
                          cuda_scan.kernel_text(cuda_scan.SOURCE), DRIVER)


def inputs(batch, L, E, N, R, dtype, seed, x_pad=0):
    """Vim-like inputs as the mixer has them: token-major, z a slice of in_proj's output, x_proj's
    output a slice of rows padded by ``x_pad`` (the mixer pads them to 16 bytes)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, L, 2 * E, generator=g).to(dtype)[..., E:]
    us, xs, dirs = [], [], []
    for _ in range(2):
        us.append(torch.nn.functional.silu(torch.randn(batch, L, E, generator=g)).to(dtype))
        x = torch.randn(batch, L, R + 2 * N + x_pad, generator=g).to(dtype)
        xs.append(x[..., :R + 2 * N])  # [dt | B | C]
        dt = torch.exp(torch.rand(E, generator=g) * (math.log(0.1) - math.log(1e-3))
                       + math.log(1e-3))
        A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(E, 1)
        dirs.append(dict(dt_proj_w=(torch.rand(E, R, generator=g) * 2 - 1) * R ** -0.5,
                         dt_bias=dt + torch.log(-torch.expm1(-dt)),
                         A=A * (0.5 + torch.rand(E, N, generator=g)), D=torch.randn(E, generator=g)))
    return us, xs, z, dirs


def emulated(tmp_path, us, xs, z, dirs, cfg):
    """Builds the kernels for the config launch_plan fits to these inputs and runs its launches:
    (output, number of launches, the fitted config)."""
    cfg, out, args, launches = launch_plan(us[0], xs[0], us[1], xs[1], z, dirs[0], dirs[1], cfg,
                                           sm_count=132)
    N, R = dirs[0]['A'].shape[1], dirs[0]['dt_proj_w'].shape[1]
    lib = build(tmp_path, N, R, us[0].dtype, cfg)
    out.fill_(float('nan'))  # every element must be written
    c_args = [ctypes.c_void_p(a.data_ptr()) if torch.is_tensor(a) else ctypes.c_int(a)
              for a in args]
    for name, grid, block in launches:
        lib.run(int(name == 'vim_scan_summary'), *grid, block[0], *c_args)
    return out, len(launches), cfg


CASES = [  # (batch, L, E, N, R), dtype, config changes, chunks
    ((2, 77, 128, 16, 12), torch.bfloat16, {}, 1),
    ((2, 77, 128, 16, 12), torch.bfloat16, {}, 3),  # chunked: summaries + their combination
    ((3, 45, 136, 16, 12), torch.bfloat16, {}, 2),  # a partly used channel block, partial tiles
    ((1, 40, 64, 8, 4), torch.float16, {}, 2),  # the demo model's widths, fp16
    ((2, 70, 64, 16, 12), torch.bfloat16, dict(channels=32, tile_l=32, split=2), 2),
    # steps 2 and 4 by tile row (prep_by_row): the same cases that stress them
    ((2, 77, 128, 16, 12), torch.bfloat16, dict(prep_by_row=True), 3),
    ((3, 45, 136, 16, 12), torch.bfloat16, dict(prep_by_row=True), 1),
    ((1, 40, 64, 8, 4), torch.float16, dict(prep_by_row=True, channels=32, tile_l=32), 2),
    # auto_config's two presets as launched (x_proj rows padded 44 -> 48, as in the mixer)
    ((2, 77, 128, 16, 12), torch.bfloat16, 'many_blocks', 1),
    ((2, 77, 128, 16, 12), torch.bfloat16, 'many_blocks', 3),
    ((3, 101, 48, 16, 12), torch.bfloat16, 'few_blocks', 1),
    ((1, 130, 32, 16, 12), torch.float16, 'few_blocks', 3),
    ((2, 70, 64, 16, 12), torch.bfloat16, ('few_blocks', dict(stages=3)), 2),
    # tiles past 48 KB (dynamic shared memory on the GPU; the emulation keeps them static)
    ((2, 77, 128, 16, 12), torch.bfloat16, ('many_blocks', dict(tile_l=32, dynamic_smem=True)), 3),
]


@pytest.mark.parametrize('shape, dtype, options, chunks', CASES)
def test_emulated_kernel_matches_the_pytorch_twin(tmp_path, shape, dtype, options, chunks):
    batch, L, E, N, R = shape
    if isinstance(options, str):
        options = (options, {})
    if isinstance(options, tuple):  # a preset: x_proj's rows padded as the mixer pads them
        preset, changes = options
        cfg = dataclasses.replace(cuda_scan.PRESETS[preset].config, **changes)
        x_pad = -(R + 2 * N) % 8
    else:
        cfg, x_pad = dataclasses.replace(DEFAULT_CONFIG, **options), 0
    cfg = dataclasses.replace(cfg, n_chunks=chunks)
    us, xs, z, dirs = inputs(batch, L, E, N, R, dtype, seed=sum(shape) + chunks, x_pad=x_pad)
    out, n_launches, launched = emulated(tmp_path, us, xs, z, dirs, cfg)
    assert n_launches == (2 if chunks > 1 else 1)
    # x_proj rows copied in 16-byte pieces where padded to them (the mixer's), else 8 bytes
    assert launched.x_piece == (16 if x_pad else 8)
    assert torch.isfinite(out).all()
    got = out[..., :E].float() + out[..., E:].float()
    want = bidirectional_scan_infer_reference(us[0], xs[0], us[1], xs[1], z, dirs[0], dirs[1])
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 2e-3), err
