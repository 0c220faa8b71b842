// Inference scan of the Vim mixer, both directions, in CUDA C++ (compiled at run time by NVRTC).
//
// What one call computes, for a (batch, L, E) token-major layout (vim_mm/ops/cuda_scan.py):
//   dt_t  = softplus(W_dt . xdbl_t[dt] + bias)                (dt_proj folded in: R FMAs)
//   h_t   = exp(dt_t A) h_{t-1} + dt_t B_t u_t                 (forward: t = 0..L-1)
//   h_t   = exp(dt_t A) h_{t+1} + dt_t B_t u_t                 (backward: t = L-1..0)
//   out[t, dir * E + e] = (C_t . h_t + D u_t) * silu(z_t) / 2  (out_proj sums the two halves)
//
// Why it is shaped like this: every (token, channel, state, direction) needs one exp, and the
// MUFU unit does 16 per clock per SM, so the kernel computes each exp ONCE and walks the whole
// sequence (or one chunk of it) in one pass. One pass gives few threads (batch x E x 2 at
// 1024 px: 12288), and one warp per SM sub-partition stalls on its own latencies (measured:
// an instruction every 2.6 cycles), so the NS states of a channel are split over SPLIT
// neighbouring lanes (NS / SPLIT states each): SPLIT times the warps, each exp still once.
// Per tile of TT tokens (staged in shared memory by cp.async, STAGES tiles ahead):
//   1. B, C and the low-rank dt of each token (the same for every channel) in fp32, once;
//   2. per (token, channel), by one of its SPLIT lanes: dt_proj (R FMAs), softplus, dt u and
//      the gate, which do not depend on the state (independent work: latencies overlap);
//   3. the walk: per token and lane NS / SPLIT exps and FMAs and a partial C . h;
//   4. per (token, channel), by one lane: the partials summed, D u added, gated, stored.
// NPOLY of a lane's exps per token can run as a degree-5 polynomial on the FMA pipe instead of
// MUFU (relative error 2.3e-7, like ex2.approx).
// When the batch cannot fill the GPU (long sequences, small batch), the sequence is cut into
// chunks: vim_scan_summary walks each chunk from a zero state (its end state and sum of dt),
// and vim_scan_final starts every chunk from the combination of the chunks before it in its
// walk order (a few exps per chunk, not per token).
//
// Measured on an H200 (benchmarks/README.md, "Seventh session"): faster than the Triton scan at
// 32 x 1025 tokens; at 16 x 4097, 974 us of kernel time with the wrapper's defaults (ncu), with
// shared memory (L1) at 84-90% of its throughput and 31% of its wavefronts bank conflicts:
// steps 2 and 4 index the tile rows by lane (row stride a multiple of 128 bytes). PREP_BY_ROW=1
// maps them by row instead; it is checked on the CPU (tests/test_cuda_scan_emulated.py), not
// yet timed on a GPU.
//
// Compile-time constants (prepended by the wrapper): NS (states), R (dt rank), XW (x_dbl row
// width, [dt | B | C]), CH (channels per block), SPLIT (lanes per channel: CH * SPLIT threads),
// TT (tokens per tile), STAGES, FP16 (inputs fp16 instead of bf16), NPOLY, MIN_BLOCKS (blocks
// per SM the registers must allow), PREP_BY_ROW (below).

typedef unsigned short u16;
typedef long long i64;

#define XF (((2 * NS + R) + 3) / 4 * 4)  // fp32 row of a tile: [B | C | dt | pad]
#define NT (CH * SPLIT)                   // threads per block
#define NPT (NS / SPLIT)                  // states per lane
// Steps 2 and 4 handle (token row, channel) pairs. PREP_BY_ROW=0: thread (c, lane) of the walk
// takes its own channel c and the rows lane, lane + SPLIT, ... (a warp touches SPLIT rows, with
// a row stride of a multiple of 128 bytes: bank conflicts, measured), so a __syncwarp orders
// them with the walk. PREP_BY_ROW=1: thread i takes channel i % CH of the rows i / CH + k SPLIT
// (a warp touches one row: conflict-free, global stores coalesced), and needs __syncthreads.
#if PREP_BY_ROW
#define PREP_C (threadIdx.x % CH)
#define PREP_R0 (threadIdx.x / CH)
#define PREP_SYNC __syncthreads
#else
#define PREP_C (threadIdx.x / SPLIT)
#define PREP_R0 (threadIdx.x % SPLIT)
#define PREP_SYNC __syncwarp
#endif
static_assert(NS % 4 == 0 && R % 4 == 0 && NS % SPLIT == 0 && 32 % SPLIT == 0,
              "vim_scan: NS and R must be multiples of 4, SPLIT divide NS and 32");

// The PTX helpers; tests/cuda_emulation.h gives C++ versions of the same to run the kernels'
// logic on the CPU (VIM_SCAN_EMULATE, in the tests only).
#ifndef VIM_SCAN_EMULATE
__device__ __forceinline__ float to_f32(u16 v) {
#if FP16
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
#else
  return __uint_as_float(((unsigned)v) << 16);
#endif
}

__device__ __forceinline__ u16 from_f32(float f) {
  u16 v;
#if FP16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
#endif
  return v;
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  // zero-fills the destination when !valid (src is then never read)
  const int n = valid ? BYTES : 0;
  if (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(n) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "n"(BYTES), "r"(n) : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif  // VIM_SCAN_EMULATE

// the two 16-bit values of a 32-bit word (element 0 in the low half)
__device__ __forceinline__ float lo_f32(unsigned v) {
#if FP16
  return to_f32((u16)(v & 0xffffu));
#else
  return __uint_as_float(v << 16);
#endif
}

__device__ __forceinline__ float hi_f32(unsigned v) {
#if FP16
  return to_f32((u16)(v >> 16));
#else
  return __uint_as_float(v & 0xffff0000u);
#endif
}

// 2^x for x <= 0 without MUFU: 2^round(x) by exponent arithmetic times a polynomial for
// 2^f, f in [-1/2, 1/2] (least-squares fit for relative error, max 2.3e-7).
__device__ __forceinline__ float ex2_fma(float x) {
  x = fmaxf(x, -125.f);
  const float t = x + 12582912.f;  // 1.5 * 2^23: round to nearest integer j in the low bits
  const float f = x - (t - 12582912.f);
  float p = 0.001327647129073739f;
  p = fmaf(p, f, 0.009675541892647743f);
  p = fmaf(p, f, 0.05550713092088699f);
  p = fmaf(p, f, 0.24022120237350464f);
  p = fmaf(p, f, 0.6931469440460205f);
  p = fmaf(p, f, 1.0000001192092896f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));  // p * 2^j
}

struct Tiles {
  u16 u[STAGES][TT][CH];
  u16 z[STAGES][TT][CH];
  u16 x[STAGES][TT][XW];
  float xf[TT][XF];          // the tile's [B | C | dt] in fp32, read by every lane
  float2 ld[TT][CH];         // (log2(1 + e^x), dt u) per token and channel
  float2 go[TT][CH];         // (gate, D u gate) per token and channel
  float yp[TT][CH][SPLIT];   // the lanes' partial C . h
};

// Everything one block needs to know about its direction, batch row and token range.
struct Walk {
  const u16* u;    // this batch row's u, token-major (stride su_l), at channel e0
  const u16* z;    // likewise z
  const u16* xd;   // this batch row's x_dbl rows [dt | B | C]
  u16* out;        // this batch row's output at column dir * E + e0
  int su_l, sz_l, sx_l, so_l;
  int lo, hi;      // tokens [lo, hi) of the chunk
  bool rev;        // walk right to left
  int e0, E;
};

template <bool FINAL>
__device__ __forceinline__ void issue_tile(Tiles& s, const Walk& w, int k, int stage) {
  // tile k of the walk covers [t0, t0 + TT); tokens outside [lo, hi) are zero-filled
  const int t0 = w.rev ? w.hi - (k + 1) * TT : w.lo + k * TT;
  constexpr int U_CHUNKS = TT * CH / 8;  // 16-byte pieces of a (TT, CH) 16-bit tile
  for (int i = threadIdx.x; i < U_CHUNKS; i += NT) {
    const int row = i / (CH / 8), col = (i % (CH / 8)) * 8;
    const int t = t0 + row;
    const bool ok = t >= w.lo && t < w.hi && w.e0 + col < w.E;
    const int tc = ok ? t : w.lo;
    cp_async<16>(&s.u[stage][row][col], w.u + (i64)tc * w.su_l + (ok ? col : 0), ok);
    if (FINAL) cp_async<16>(&s.z[stage][row][col], w.z + (i64)tc * w.sz_l + (ok ? col : 0), ok);
  }
  constexpr int X_CHUNKS = TT * XW / 4;  // 8-byte pieces: x_dbl rows are 8-byte aligned
  for (int i = threadIdx.x; i < X_CHUNKS; i += NT) {
    const int row = i / (XW / 4), col = (i % (XW / 4)) * 4;
    const int t = t0 + row;
    const bool ok = t >= w.lo && t < w.hi;
    cp_async<8>(&s.x[stage][row][col], w.xd + (i64)(ok ? t : w.lo) * w.sx_l + col, ok);
  }
}

// Step 2: the part of a token that does not depend on the state, for channel c and the tokens
// r0, r0 + SPLIT, ... of the tile (see PREP_BY_ROW for which thread takes which).
template <bool FINAL>
__device__ __forceinline__ void prepare(Tiles& s, int stage, int c, int r0, const float (&W)[R],
                                        float bias, float D) {
#pragma unroll
  for (int r = r0; r < TT; r += SPLIT) {
    const float* xf = s.xf[r];
    float x0 = bias, x1 = 0.f, x2 = 0.f;  // three short FMA chains instead of one of length R
#pragma unroll
    for (int j = 0; j < R; j += 3) {
      x0 = fmaf(W[j], xf[2 * NS + j], x0);
      if (j + 1 < R) x1 = fmaf(W[j + 1], xf[2 * NS + j + 1], x1);
      if (j + 2 < R) x2 = fmaf(W[j + 2], xf[2 * NS + j + 2], x2);
    }
    const float x = x0 + (x1 + x2);
    // softplus in base 2: l = log2(1 + e^x), dt = l ln2, and exp(dt A) = 2^(l A)
    float l = lg2(1.f + ex2(x * 1.4426950408889634f));
    l = x > 20.f ? x * 1.4426950408889634f : l;
    const float u = to_f32(s.u[stage][r][c]);
    s.ld[r][c] = make_float2(l, l * 0.6931471805599453f * u);
    if (FINAL) {
      const float zz = to_f32(s.z[stage][r][c]);
      const float g = 0.5f * zz * rcp(1.f + ex2(-zz * 1.4426950408889634f));
      s.go[r][c] = make_float2(g, D * u * g);
    }
  }
}

// Step 3 for one token: this lane's states n = lane * NPT + j.
template <bool FINAL>
__device__ __forceinline__ void step(Tiles& s, int r, int c, int lane, float (&h)[NPT],
                                     const float (&A)[NPT], float& dt_sum) {
  const float* xf = s.xf[r];
  const float2 ld = s.ld[r][c];
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    const float a = j < NPOLY ? ex2_fma(ld.x * A[j]) : ex2(ld.x * A[j]);
    h[j] = fmaf(a, h[j], xf[lane * NPT + j] * ld.y);
    if (FINAL) y = fmaf(xf[NS + lane * NPT + j], h[j], y);
  }
  if (FINAL) s.yp[r][c][lane] = y;
  else dt_sum += ld.x;
}

template <bool FINAL>
__device__ __forceinline__ void walk(Tiles& s, const Walk& w, int c, int lane, float (&h)[NPT],
                                     const float (&A)[NPT], const float (&W)[R], float bias,
                                     float D, float& dt_sum) {
  const int n_tiles = (w.hi - w.lo + TT - 1) / TT;
  const int pc = PREP_C, pr0 = PREP_R0;  // steps 2 and 4: channel pc, tokens pr0 + k SPLIT
  const bool active = w.e0 + pc < w.E;
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < n_tiles) issue_tile<FINAL>(s, w, k, k);
    cp_async_commit();
  }
  for (int k = 0; k < n_tiles; ++k) {
    const int stage = k % STAGES;
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile k is in; every thread is done with tile k - 1
    if (k + STAGES - 1 < n_tiles)
      issue_tile<FINAL>(s, w, k + STAGES - 1, (k + STAGES - 1) % STAGES);
    cp_async_commit();
    // [dt|B|C] -> fp32 [B|C|dt], four values at a time (NS and R are multiples of 4)
    constexpr int Q = (2 * NS + R) / 4;
    for (int i = threadIdx.x; i < TT * Q; i += NT) {
      const int row = i / Q, q = i % Q;
      const int src = q < 2 * NS / 4 ? R / 4 + q : q - 2 * NS / 4;
      const uint2 v = *reinterpret_cast<const uint2*>(&s.x[stage][row][src * 4]);
      *reinterpret_cast<float4*>(&s.xf[row][q * 4]) =
          make_float4(lo_f32(v.x), hi_f32(v.x), lo_f32(v.y), hi_f32(v.y));
    }
    __syncthreads();
    prepare<FINAL>(s, stage, pc, pr0, W, bias, D);
    PREP_SYNC();
    const int t0 = w.rev ? w.hi - (k + 1) * TT : w.lo + k * TT;
    const int r0 = w.rev ? TT - 1 : 0, dr = w.rev ? -1 : 1;
    const bool whole = t0 >= w.lo && t0 + TT <= w.hi;
    if (whole) {  // no token checks: tokens interleave
#pragma unroll 4
      for (int kk = 0; kk < TT; ++kk) step<FINAL>(s, r0 + kk * dr, c, lane, h, A, dt_sum);
    } else {
      for (int kk = 0; kk < TT; ++kk) {
        const int r = r0 + kk * dr;
        if (t0 + r >= w.lo && t0 + r < w.hi) step<FINAL>(s, r, c, lane, h, A, dt_sum);
      }
    }
    if (FINAL) {  // step 4
      PREP_SYNC();
#pragma unroll
      for (int r = pr0; r < TT; r += SPLIT) {
        const int t = t0 + r;
        float y = 0.f;
#pragma unroll
        for (int j = 0; j < SPLIT; ++j) y += s.yp[r][pc][j];
        const float2 go = s.go[r][pc];
        if (active && t >= w.lo && t < w.hi)
          w.out[(i64)t * w.so_l + pc] = from_f32(fmaf(go.x, y, go.y));
      }
    }
  }
  cp_async_wait<0>();
}

// A: this lane's states of the walk's channel e; W, bias, D: channel e0 + PREP_C, which this
// thread prepares (channels past E read channel 0 and store nothing); h: the zero state.
__device__ __forceinline__ void load_direction(
    int dir, int e, int lane, bool active, int e0, int E, const float* W_f, const float* bias_f,
    const float* A_f, const float* D_f, const float* W_b, const float* bias_b, const float* A_b,
    const float* D_b, float (&A)[NPT], float (&W)[R], float& bias, float& D, float (&h)[NPT]) {
  const float* Wp = dir ? W_b : W_f;
  const float* Ap = dir ? A_b : A_f;
  const int ec = active ? e : 0;
#if PREP_BY_ROW
  const int ep = e0 + (int)PREP_C < E ? e0 + (int)PREP_C : 0;
#else
  const int ep = ec;  // PREP_C is the walk's channel
#endif
#pragma unroll
  for (int j = 0; j < NPT; ++j) A[j] = Ap[ec * NS + lane * NPT + j];
#pragma unroll
  for (int j = 0; j < R; ++j) W[j] = Wp[ep * R + j];
  bias = (dir ? bias_b : bias_f)[ep];
  D = (dir ? D_b : D_f)[ep];
#pragma unroll
  for (int j = 0; j < NPT; ++j) h[j] = 0.f;
}

#define SCAN_ARGS                                                                            \
  const u16 *u_f, const u16 *u_b, int su_b, int su_l, const u16 *x_f, const u16 *x_b,        \
      int sx_b, int sx_l, const u16 *z, int sz_b, int sz_l, const float *W_f,                \
      const float *bias_f, const float *A_f, const float *D_f, const float *W_b,             \
      const float *bias_b, const float *A_b, const float *D_b, u16 *out, int so_b, int so_l, \
      float *hsum, float *ssum, int batch, int L, int E, int n_chunks, int chunk_l

__device__ __forceinline__ Walk make_walk(int dir, int chunk, int b, int e0, const u16* u_f,
                                          const u16* u_b, int su_b, int su_l, const u16* x_f,
                                          const u16* x_b, int sx_b, int sx_l, const u16* z,
                                          int sz_b, int sz_l, u16* out, int so_b, int so_l,
                                          int L, int E, int chunk_l) {
  Walk w;
  w.u = (dir ? u_b : u_f) + (i64)b * su_b + e0;
  w.z = z + (i64)b * sz_b + e0;
  w.xd = (dir ? x_b : x_f) + (i64)b * sx_b;
  w.out = out + (i64)b * so_b + dir * E + e0;
  w.su_l = su_l; w.sz_l = sz_l; w.sx_l = sx_l; w.so_l = so_l;
  w.lo = chunk * chunk_l;
  w.hi = min(L, w.lo + chunk_l);
  w.rev = dir == 1;
  w.e0 = e0; w.E = E;
  return w;
}

// Chunk summaries: the end state of every chunk walked from zero and its sum of dt (in log2
// units: the chunk's decay is 2^(A * sum)). Only chunks with a successor in their walk order:
// grid.z = 2 * (n_chunks - 1), forward chunks 0..n-2 then backward chunks 1..n-1.
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) vim_scan_summary(SCAN_ARGS) {
  __shared__ __align__(16) Tiles s;
  const int per_dir = n_chunks - 1;
  const int dir = blockIdx.z / per_dir;
  const int chunk = blockIdx.z % per_dir + dir;
  const int b = blockIdx.y, e0 = blockIdx.x * CH;
  const int c = threadIdx.x / SPLIT, lane = threadIdx.x % SPLIT;
  const bool active = e0 + c < E;
  float A[NPT], W[R], bias, D, h[NPT], dt_sum = 0.f;
  load_direction(dir, e0 + c, lane, active, e0, E, W_f, bias_f, A_f, D_f, W_b, bias_b, A_b, D_b,
                 A, W, bias, D, h);
  const Walk w = make_walk(dir, chunk, b, e0, u_f, u_b, su_b, su_l, x_f, x_b, sx_b, sx_l, z, sz_b,
                           sz_l, out, so_b, so_l, L, E, chunk_l);
  walk<false>(s, w, c, lane, h, A, W, bias, D, dt_sum);
  if (!active) return;
  const i64 row = ((i64)dir * batch + b) * n_chunks + chunk;  // (2, batch, n_chunks, [NS,] E)
#pragma unroll
  for (int j = 0; j < NPT; ++j) hsum[(row * NS + lane * NPT + j) * E + e0 + c] = h[j];
  if (lane == 0) ssum[row * E + e0 + c] = dt_sum;
}

// Outputs: grid.z = 2 * n_chunks (forward chunks, then backward chunks). With n_chunks > 1 each
// chunk first combines the summaries of the chunks before it in its walk order.
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS) vim_scan_final(SCAN_ARGS) {
  __shared__ __align__(16) Tiles s;
  const int dir = blockIdx.z / n_chunks;
  const int chunk = blockIdx.z % n_chunks;
  const int b = blockIdx.y, e0 = blockIdx.x * CH;
  const int c = threadIdx.x / SPLIT, lane = threadIdx.x % SPLIT;
  const bool active = e0 + c < E;
  float A[NPT], W[R], bias, D, h[NPT], dt_sum = 0.f;
  load_direction(dir, e0 + c, lane, active, e0, E, W_f, bias_f, A_f, D_f, W_b, bias_b, A_b, D_b,
                 A, W, bias, D, h);
  const int n_before = dir ? n_chunks - 1 - chunk : chunk;
  for (int i = 0; i < n_before; ++i) {  // chunks before this one, in walk order
    const int p = dir ? n_chunks - 1 - i : i;
    const i64 row = ((i64)dir * batch + b) * n_chunks + p;
    const int ec = active ? e0 + c : 0;
    const float S = ssum[row * E + ec];
#pragma unroll
    for (int j = 0; j < NPT; ++j)
      h[j] = fmaf(ex2(S * A[j]), h[j], hsum[(row * NS + lane * NPT + j) * E + ec]);
  }
  const Walk w = make_walk(dir, chunk, b, e0, u_f, u_b, su_b, su_l, x_f, x_b, sx_b, sx_l, z, sz_b,
                           sz_l, out, so_b, so_l, L, E, chunk_l);
  walk<true>(s, w, c, lane, h, A, W, bias, D, dt_sum);
}
