"""The fused conv + x_proj CUDA C++ kernel's logic on the CPU (tests/cuda_emulation.h: a
std::thread per CUDA thread, mma.sync emulated per warp), against its fp32 PyTorch twin: the
halo at both ends, partial blocks of tokens, several channel chunks, both directions, padded
x_proj rows and a strided x (in_proj's x half), bf16 and fp16, both tiles."""
import ctypes

import pytest
import torch
from _cuda_host import build_emulated

from vim_mm.ops import cuda_conv_xproj as cx

DRIVER = r'''
extern "C" void run(unsigned gx, unsigned gy, const u16* x, int sx_b, int sx_l, const float* taps,
                    const float* bias, const u16* wx, u16* u, u16* xd, int batch, int L) {
  emulate(vim_conv_xproj, gx, gy, 1, NTH, x, sx_b, sx_l, taps, bias, wx, u, xd, batch, L);
}
'''


@pytest.mark.parametrize('batch, L, E, P, width, dtype', [
    (2, 77, 128, 24, 4, torch.bfloat16),   # a partial block of tokens, two chunks
    (1, 130, 192, 48, 4, torch.float16),   # three chunks, Vim-Ti's padded x_proj rows
    (3, 5, 64, 8, 3, torch.bfloat16),      # fewer tokens than the halo, a narrower conv
])
@pytest.mark.parametrize('tile', [cx.WIDE, cx.NARROW], ids=['wide', 'narrow'])
def test_emulated_kernel_matches_the_pytorch_twin(tmp_path, batch, L, E, P, width, dtype, tile):
    g = torch.Generator().manual_seed(batch * L + E)
    xz = torch.randn(batch, L, 2 * E, generator=g).to(dtype)
    x = xz[..., :E]  # strided rows, as the mixer slices in_proj's output
    w_f, w_b = (torch.randn(E, 1, width, generator=g) * 0.5 for _ in range(2))
    b_f, b_b = (torch.randn(E, generator=g) * 0.1 for _ in range(2))
    x_proj = (torch.randn(2, P, E, generator=g) * E ** -0.5).to(dtype)
    taps, bias = cx.stack_conv_weights(w_f, b_f, w_b, b_b)
    u, xd, args, grid, block = cx.launch(x, taps, bias, x_proj, tile)
    u.fill_(float('nan'))
    xd.fill_(float('nan'))
    lib = build_emulated(tmp_path, cx.source_defines(E, P, dtype, tile), cx.kernel_text(cx.SOURCE),
                         DRIVER)
    c_args = [ctypes.c_void_p(a.data_ptr()) if torch.is_tensor(a) else ctypes.c_int(a)
              for a in args]
    lib.run(grid[0], grid[1], *c_args)
    want_u, want_xd = cx.conv_xproj_reference(x, taps, bias, x_proj)
    assert torch.isfinite(u).all() and torch.isfinite(xd).all()  # every element written
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=3e-3, rtol=3e-3)
    torch.testing.assert_close(u.float(), want_u, **tol)
    # x_proj from the 16-bit u it stored: compare against the twin's product of that u
    got_from_u = u.float() @ x_proj.float().transpose(1, 2).unsqueeze(1)
    torch.testing.assert_close(xd.float(), got_from_u, atol=2 * tol['atol'], rtol=2 * tol['rtol'])
    err = ((xd.float() - want_xd).abs().max() / want_xd.abs().max()).item()
    assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), err
