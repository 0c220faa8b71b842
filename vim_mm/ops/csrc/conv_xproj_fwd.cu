// Both directions' conv1d + SiLU and x_proj of the Vim mixer in one CUDA C++ kernel (inference;
// compiled at run time by NVRTC, vim_mm/ops/cuda_conv_xproj.py).
//
// For a (batch, L, E) token-major x (in_proj's x half), per token t and channel c:
//   u_f[t, c] = silu(2 (bias[0, c] + sum_k taps[0, c, k] x[t - 3 + k, c]))   (causal, W = 4)
//   u_b[t, c] = silu(2 (bias[1, c] + sum_k taps[1, c, k] x[t + 3 - k, c]))   (anti-causal: the
//                                                                    reversed sequence's)
// (taps and biases are the conv's halved: the SiLU below takes half its argument)
//   xd[dir, t, :] = u_dir[t, :] . Wx[dir]^T                       (x_proj, P rows)
// Outputs: u (2, batch, L, E) and xd (2, batch, L, P), 16-bit, what the Triton conv and one
// batched GEMM give (the scan reads both).
//
// Why one kernel: the conv reads x (E per token) and writes u (2E), then x_proj reads u again;
// here a block keeps its tokens' u in shared memory, channel chunk by channel chunk, and feeds
// them to mma.sync tiles, so u is written once and never read back.
//
// A block takes TL tokens of one sequence and walks the channels in chunks of CC. Each chunk's
// inputs (x rows t0 - 3 .. t0 + TL + 2 of its channels, zero outside [0, L); both directions'
// x_proj columns; the conv taps and biases) are staged by cp.async into one of STAGES buffers,
// STAGES - 1 chunks ahead of the one computed. Per chunk:
//   1. each thread convolves a channel pair over TPG consecutive tokens (a sliding window of
//      shared-memory rows) into a shared (2, TL, CC) u tile;
//   2. after a barrier the tile goes to global memory in 16-byte pieces, and each warp
//      multiplies one 16-token slice of one direction's tile with that direction's staged
//      x_proj columns (m16n8k16, fp32 accumulators kept over chunks).
// At the end the accumulators pass through the u tile to leave as 16-byte pieces of xd.
// H200, bf16, 16 x 4097 tokens of Vim-Ti (benchmarks/README.md, "Sixteenth session"): 68.3 us
// against 82.5 for the Triton conv + one cuBLAS bmm it replaces (98.7 / 119.7 at 16 x 6085).
// The way there, each step timed: e68ac4a stored u and read x_proj by 4-byte global accesses
// (2.1x slower than the pair; ncu: L1 79.8% busy, warps stalled on LSU queues); 02990e0 staged
// all of a block's x rows up front and computed with no loads in flight (96 us at its best
// tile); two staged chunks with the next one in flight (88 us); copies as compile-time piece
// loops and taps stacked once per weight update (76 us); ldmatrix fragments (74.6 us); halved
// taps, so the SiLU needs no multiply (73.3 us); taps in registers once per chunk and 64
// tokens per block (68.9 us). Measured slower and removed: three stages (less occupancy), the
// conv in two passes over a thread's tokens, u leaving by sm_90 bulk copies (79.1 us, 553cf17).
//
// Compile-time constants (prepended by the wrapper): E (channels, a multiple of CC), P (x_proj
// rows, padded to a multiple of 8), FP16 (16-bit format), TL, CC, NTH (threads per block),
// STAGES (chunks staged: this one and STAGES - 1 ahead), MIN_BLOCKS (blocks per SM that the
// registers must allow).

// The shared PTX helpers (u16, to_f32, cp_async, ...): ptx_helpers.cuh, put in front of this
// file by the wrapper; this kernel's own follow (tests/cuda_emulation.h: their C++ versions).
#ifndef VIM_SCAN_EMULATE
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4],
                                          const unsigned (&b)[2]) {
#if FP16
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four (two) 8 x 8 16-bit matrices from shared memory, in the mma fragment layout: lane
// 8 j + i gives row i of matrix j (lanes 0-15 for x2); a lane gets of matrix j row lane / 4,
// elements 2 (lane % 4), + 1, in r[j].
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], SmemPtr row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(row));
}

__device__ __forceinline__ void ldmatrix_x2(unsigned (&r)[2], SmemPtr row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
               : "=r"(r[0]), "=r"(r[1]) : "r"(row));
}
#endif  // VIM_SCAN_EMULATE

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  return from_f32(lo) | ((unsigned)from_f32(hi) << 16);
}

// silu(x) = x sigmoid(x) = h (1 + tanh(h)) with h = x / 2: one MUFU op (the Triton conv's
// 'tanh' mode), and no multiply when the convolution gives h (halved taps and bias)
__device__ __forceinline__ float silu_of_half(float h) { return fmaf(h, tanh_approx(h), h); }

constexpr int HALO = 3;
constexpr int XR = TL + 2 * HALO;  // x rows staged
constexpr int UP = CC + 8;         // a u tile row (16-bit): 16 bytes of pad, conflict-free A loads
constexpr int NWARP = NTH / 32;
constexpr int MT = TL / 16;        // 16-token slices per direction: one per warp
constexpr int NT8 = P / 8;         // x_proj's 8-row tiles
constexpr int PAIRS = CC / 2;      // channel pairs of a chunk
constexpr int TPG = TL / (NTH / PAIRS);  // consecutive tokens a thread convolves per chunk
constexpr int PIECES = CC / 8;     // 16-byte pieces of a chunk's row of 16-bit values
static_assert(E % CC == 0 && CC % 16 == 0 && P % 8 == 0 && TL % 16 == 0 && P <= UP,
              "vim_conv_xproj: E a multiple of CC, CC of 16, P of 8 and <= CC + 8, TL of 16");
static_assert(NWARP == 2 * MT && NTH % PAIRS == 0 && TL % (NTH / PAIRS) == 0,
              "vim_conv_xproj: one warp per 16-token slice and direction; whole token groups");

struct Stage {           // one chunk's inputs (channels c0 .. c0 + CC - 1)
  u16 x[XR][CC];         // x[t0 - 3 + r]
  u16 w[2][P][UP];       // x_proj columns, per direction (B fragments)
  float taps[2][CC][4];  // conv taps, per direction
  float bias[2][CC];
};

struct Smem {
  Stage stage[STAGES];  // this chunk's and the next ones'
  u16 u[2][TL][UP];    // this chunk's u, per direction; at the end xd's rows
};

// f(i) for i = threadIdx.x, + NTH, ... below N. The trip count is known at compile time, so
// divisions in f fold into shifts and a thread's fixed terms leave the chunk loop (as a
// run-time strided loop, 02990e0's copies were most of the kernel's instructions).
template <int N, class F>
__device__ __forceinline__ void for_each_piece(F f) {
#pragma unroll
  for (int j = 0; j < (N + NTH - 1) / NTH; ++j) {
    const int i = threadIdx.x + j * NTH;
    if (N % NTH == 0 || i < N) f(i);
  }
}

// cp.async of chunk c0's inputs into st, 16-byte pieces (the caller commits the group).
__device__ __forceinline__ void load_stage(Stage& st, int c0, const u16* xb, int sx_l,
                                           const u16* wx, const float* taps, const float* bias,
                                           int t0, int L) {
  const SmemPtr x0 = smem_ptr(&st.x[0][0]), w0 = smem_ptr(&st.w[0][0][0]);
  const SmemPtr taps0 = smem_ptr(&st.taps[0][0][0]), bias0 = smem_ptr(&st.bias[0][0]);
  for_each_piece<XR * PIECES>([&](int i) {  // x rows: zeros outside [0, L)
    const int t = t0 - HALO + i / PIECES;
    const bool ok = t >= 0 && t < L;
    cp_async<16>(x0 + i * 16, xb + (ok ? (i64)t * sx_l + c0 + (i % PIECES) * 8 : 0), ok);
  });
  for_each_piece<2 * P * PIECES>([&](int i) {  // x_proj rows, direction-major
    const int row = i / PIECES, col = (i % PIECES) * 8;
    cp_async<16>(w0 + (row * UP + col) * 2, wx + (i64)row * E + c0 + col, true);
  });
  for_each_piece<2 * CC>([&](int i) {  // a channel's 4 taps
    cp_async<16>(taps0 + i * 16, taps + ((i / CC) * E + c0 + i % CC) * 4, true);
  });
  for_each_piece<CC / 2>([&](int i) {  // 4 biases
    constexpr int PER_DIR = CC / 4;
    cp_async<16>(bias0 + i * 16, bias + (i / PER_DIR) * E + c0 + (i % PER_DIR) * 4, true);
  });
}

extern "C" __global__ void __launch_bounds__(NTH, MIN_BLOCKS)
vim_conv_xproj(const u16* x, int sx_b, int sx_l, const float* taps, const float* bias,
               const u16* wx, u16* u, u16* xd, int batch, int L) {
#ifdef VIM_SCAN_EMULATE
  static Smem s;
#else
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& s = *reinterpret_cast<Smem*>(smem_raw);
#endif
  const int bat = blockIdx.y, t0 = blockIdx.x * TL;
  const u16* xb = x + (i64)bat * sx_b;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, tig = lane % 4;
  const int cp = threadIdx.x % PAIRS, r0 = (threadIdx.x / PAIRS) * TPG;  // conv: pair, tokens
  const int mdir = warp / MT, m0 = (warp % MT) * 16;                   // mma: direction, slice
  u16* const u0 = u + ((i64)bat * L + t0) * E;  // direction 0's rows; direction 1's follow
  const i64 u_dir = (i64)batch * L * E;        // after batch * L rows
  // ldmatrix rows: this lane's u tile row (A) and x_proj row (B, from a stage's w)
  const SmemPtr u_rows = smem_ptr(&s.u[mdir][m0 + lane % 16][(lane / 16) * 8]);
  const unsigned b_lane = ((mdir * P + (lane / 16) * 8 + lane % 8) * UP + ((lane / 8) % 2) * 8) * 2;
  float acc[NT8][4];
#pragma unroll
  for (int n = 0; n < NT8; ++n)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[n][j] = 0.f;

  constexpr int NCHUNK = E / CC;
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {  // chunks 0 .. STAGES - 2 in flight
    if (k < NCHUNK) load_stage(s.stage[k], k * CC, xb, sx_l, wx, taps, bias, t0, L);
    cp_async_commit();  // (empty groups keep the count: a group per chunk)
  }
  for (int k = 0; k < NCHUNK; ++k) {
    const int c0 = k * CC;
    const Stage& st = s.stage[k % STAGES];
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // chunk k staged; every thread is past chunk k - 1's mma (s.u, its buffer)
    if (k + STAGES - 1 < NCHUNK)  // in flight during this chunk's work
      load_stage(s.stage[(k + STAGES - 1) % STAGES], c0 + (STAGES - 1) * CC, xb, sx_l, wx, taps,
                 bias, t0, L);
    cp_async_commit();
    // 1. the convs of channels 2 cp, 2 cp + 1 over tokens r0 .. r0 + TPG - 1 of the tile
    float wf[2][4], wb[2][4], bf[2], bb[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        wf[j][q] = st.taps[0][2 * cp + j][q];
        wb[j][q] = st.taps[1][2 * cp + j][q];
      }
      bf[j] = st.bias[0][2 * cp + j];
      bb[j] = st.bias[1][2 * cp + j];
    }
    float xw[2][TPG + 2 * HALO];  // staged rows r0 .. r0 + TPG + 5: tokens r0 - 3 ..
#pragma unroll
    for (int i = 0; i < TPG + 2 * HALO; ++i) {
      const unsigned v = *reinterpret_cast<const unsigned*>(&st.x[r0 + i][2 * cp]);
      xw[0][i] = to_f32((u16)(v & 0xffffu));
      xw[1][i] = to_f32((u16)(v >> 16));
    }
#pragma unroll
    for (int i = 0; i < TPG; ++i) {
      float yf[2], yb[2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float af = bf[j], ab = bb[j];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          af = fmaf(wf[j][q], xw[j][i + q], af);              // x[t - 3 + q]
          ab = fmaf(wb[j][q], xw[j][i + 2 * HALO - q], ab);   // x[t + 3 - q]
        }
        yf[j] = silu_of_half(af);  // af, ab: half the conv's outputs
        yb[j] = silu_of_half(ab);
      }
      const int tt = r0 + i;
      *reinterpret_cast<unsigned*>(&s.u[0][tt][2 * cp]) = pack2(yf[0], yf[1]);
      *reinterpret_cast<unsigned*>(&s.u[1][tt][2 * cp]) = pack2(yb[0], yb[1]);
    }
    __syncthreads();
    // 2a. the u tile to global memory, 16-byte pieces (rows past L stay unwritten)
    for_each_piece<2 * TL * PIECES>([&](int i) {
      const int row = i / PIECES, col = (i % PIECES) * 8, dir = row / TL, tt = row % TL;
      if (t0 + tt < L)
        *reinterpret_cast<uint4*>(u0 + dir * u_dir + (i64)tt * E + c0 + col) =
            *reinterpret_cast<const uint4*>(&s.u[0][0][0] + row * UP + col);
    });
    // 2b. xd[mdir, m0 .. m0 + 15, :] += u[mdir, m0 .., chunk] . Wx[mdir, :, chunk]^T, the
    // fragments by ldmatrix (A: lane l gives u row m0 + l % 16 at column 8 (l / 16); B: x_proj
    // row 8 (n + l / 16) + l % 8 at column 8 ((l / 8) % 2), two 8-row tiles per x4)
    const SmemPtr w_rows = smem_ptr(&st.w[0][0][0]) + b_lane;
#pragma unroll
    for (int ks = 0; ks < CC / 16; ++ks) {
      unsigned a[4];
      ldmatrix_x4(a, u_rows + ks * 32);
#pragma unroll
      for (int n = 0; n + 1 < NT8; n += 2) {
        unsigned b[4];
        ldmatrix_x4(b, w_rows + (n * 8 * UP) * 2 + ks * 32);
        mma_16816(acc[n], a, {b[0], b[1]});
        mma_16816(acc[n + 1], a, {b[2], b[3]});
      }
      if (NT8 % 2) {
        unsigned b[2];
        ldmatrix_x2(b, w_rows + ((NT8 - 1) * 8 * UP) * 2 + ks * 32);
        mma_16816(acc[NT8 - 1], a, b);
      }
    }
  }
  // 3. xd through the u tile: rows m0 + g and m0 + g + 8, columns n * 8 + 2 tig, + 1
  __syncthreads();  // every warp is past the last chunk's mma
#pragma unroll
  for (int n = 0; n < NT8; ++n)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<unsigned*>(&s.u[mdir][m0 + g + 8 * h][n * 8 + 2 * tig]) =
          pack2(acc[n][2 * h], acc[n][2 * h + 1]);
  __syncthreads();
  constexpr int XD_PIECES = P / 8;
  for_each_piece<2 * TL * XD_PIECES>([&](int i) {
    const int row = i / XD_PIECES, col = (i % XD_PIECES) * 8, dir = row / TL, tt = row % TL;
    if (t0 + tt < L)
      *reinterpret_cast<uint4*>(xd + ((i64)(dir * batch + bat) * L + t0 + tt) * P + col) =
          *reinterpret_cast<const uint4*>(&s.u[0][0][0] + row * UP + col);
  });
}
