// Inference scan of the Vim mixer, both directions, in CUDA C++ (compiled at run time by NVRTC).
//
// What one call computes, for a (batch, L, E) token-major layout (vim_mm/ops/cuda_scan.py):
//   dt_t  = softplus(W_dt . xdbl_t[dt] + bias)                (dt_proj folded in: R / 2 HFMA2s)
//   h_t   = exp(dt_t A) h_{t-1} + dt_t B_t u_t                 (forward: t = 0..L-1)
//   h_t   = exp(dt_t A) h_{t+1} + dt_t B_t u_t                 (backward: t = L-1..0)
//   out[t, dir * E + e] = (C_t . h_t + D u_t) * silu(z_t) / 2  (out_proj sums the two halves)
// In base 2 throughout (v22): the wrapper passes W_dt and bias times log2(e), so the dt_proj
// sum x' is softplus's argument in log2 units and l = log2(1 + 2^x') = dt / ln 2; the state
// kept is h / ln 2 (h' = 2^(l A) h' + l B u), so C . h' times ln 2 is C . h: the ln 2 rides on
// the gate (q below), and D comes divided by ln 2 so that D u times that gate is D u silu(z) / 2.
// No FMUL per (token, channel) for either constant. dt_proj's R products per (token, channel)
// are R / 2 fp16x2 FMAs (fma.rn.f16x2) of W_dt (fp16, from the wrapper) and the tile's dt
// columns converted to fp16 pairs once per tile (xh): a chain of R / 2 fp16 roundings, less
// than the bf16 rounding of the dt_proj output that mamba-ssm's path (the authors') has.
//
// Why it is shaped like this: every (token, channel, state, direction) needs one exp, and the
// MUFU unit does 16 per clock per SM, so the kernel computes each exp ONCE and walks the whole
// sequence (or one chunk of it) in one pass. One pass gives few threads (batch x E x 2 at
// 1024 px: 12288), and one warp per SM sub-partition stalls on its own latencies (measured:
// an instruction every 2.6 cycles), so the NS states of a channel are split over SPLIT
// neighbouring lanes (NS / SPLIT states each): SPLIT times the warps, each exp still once.
// Per tile of TT tokens (staged in shared memory by cp.async, STAGES tiles ahead):
//   1. B and C of each token (the same for every channel) in fp32, its low-rank dt as fp16
//      pairs, once;
//   2. per (token, channel), by one thread: dt_proj (R / 2 HFMA2s), softplus, dt u and the
//      gate, which do not depend on the state (independent work: latencies overlap);
//   3. the walk: per token and lane NS / SPLIT exps and FMAs and a partial C . h;
//   4. per (token, channel), by one lane: the partials summed, D u added, gated, stored.
// NPOLY of a lane's exps per token can run as a degree-5 polynomial on the FMA pipe instead of
// MUFU (relative error 2.3e-7, like ex2.approx).
// When the batch cannot fill the GPU (long sequences, small batch), the sequence is cut into
// chunks: vim_scan_summary walks each chunk from a zero state (its end state and sum of dt),
// and vim_scan_final starts every chunk from the combination of the chunks before it in its
// walk order (a few exps per chunk, not per token).
//
// Measured on an H200 (benchmarks/README.md, "Seventh" to "Tenth session", ncu): the seventh
// session's version was bound by shared memory (steps 2 and 4 indexed tile rows by lane:
// PREP_BY_ROW=1 maps them by row, conflict-free); the eighth's by latency, ~310 cycles per token
// and warp, each token waiting for its own shared-memory loads. Since the ninth the walk fetches
// a token's operands one token ahead, steps 2 and 4 read every row before storing any, and the
// whole-tile walk has its direction at compile time: 16 x 4097 tokens 0.642 -> 0.519 ms, issue
// slots 65% busy (the bound is now the instruction count, ~15 per state and token). The tenth
// session's (v11) copies and converts tiles with per-thread pieces fixed at compile time and
// 32-bit offsets: ~1690 -> ~1520 instructions per tile and warp, 16 x 4097 0.518 -> 0.480 ms;
// v12 gates by tanh.approx. Now issue slots are 63% busy and MUFU 52%: the most frequent stall
// is waiting on MUFU and shared-memory results (ncu), not the instruction count alone. v13
// (eleventh session) keeps the gates in registers instead of a shared-memory tile: 16 x 4097
// 0.482 -> 0.456 ms, 2-5% at every shape. Measured slower in the same calls and not kept: the
// lanes' partials summed by warp shuffles in the walk (5-11%; also with the 1-3 more blocks
// per SM the smaller tiles allow), (l, dt u) loaded for two tokens at once (3%), the partials
// stored for two tokens at once (2.6%), the walk unrolled 2 (1.5%) or 8 (+-1%) tokens deep.
//
// Compile-time constants (prepended by the wrapper): NS (states), R (dt rank), XW (x_dbl row
// width, [dt | B | C]), CH (channels per block), SPLIT (lanes per channel: CH * SPLIT threads),
// TT (tokens per tile), STAGES, XV (bytes per copy of an x_dbl row piece), FP16 (inputs fp16
// instead of bf16), NPOLY, MIN_BLOCKS (blocks per SM the registers must allow), PREP_BY_ROW
// (below), DYN_SMEM (BLOCK_TILES).
//
// Tried and removed: a producer warp per block staging and preparing tile k + 1 while the walkers
// walked tile k (SPECIALIZED, commit 807ab2d): slower than the faster preset at every shape
// timed, e.g. 0.475 ms at best against 0.455 at 16 x 4097 (thirteenth session,
// results/h200_infer_scan_ws_explore.json). dt_proj of each tile as mma.sync tiles on the tensor
// cores instead of step 2's R FMAs per (token, channel) (commit dd5ff50): 7% fewer instructions
// but 8% slower, 0.4627 against 0.4275 ms at 16 x 4097 (fifteenth session,
// results/h200_infer_scan_v17_ab.json; ncu: the SM sub-partitions idle more, not a busier pipe).
// Three barriers per tile instead of four, the next tile converted with this tile's output step
// (commit a3c4778): 0.6% slower at 16 x 4097 (results/h200_infer_scan_v18_ab.json).
// v22 (eighteenth session, base 2 and fp16x2 dt_proj, above; committed as "Scan v19", f74be32,
// not the seventeenth session's reverted v19-v21): step 2 296 -> 240 instructions per tile and
// thread in the SASS; 16 x 4097 0.4216 -> 0.4113 ms, 16 x 6085 0.6218 -> 0.6068, 2.4-4.3% at
// every shape timed (results/h200_infer_scan_v23*.json); Vim-Ti +2.8% at 1024 px b16. Slower
// and reverted: steps 2 and 4 with two neighbouring channels per thread (v23, 65f7e8d: 6% slower
// at 16 x 4097 and 16 x 6085, 0-1% faster at the other shapes).
// v27 (nineteenth session): the whole-tile walk fully unrolled and one C . h chain per token:
// 16 x 4097 0.4112 -> 0.3992 ms, 16 x 6085 0.6063 -> 0.5891, 2.1-4.4% at every shape timed
// (results/h200_infer_scan_v27_ab.json); Vim-Ti +1.7% at 1024 and 1248 px b16. Measured in the
// same calls and not kept: whole tiles copied by addresses kept in registers and moved per tile
// (2102ba0, with one chain: ~46 fewer instructions per tile, yet 0.9-1.3% slower at 16 x 4097
// and 16 x 6085, 1-3% faster at the other shapes); the pipelined walk (v26, c4b1ee7: step 2 of tile k + 1 and
// step 4 of tile k - 1 in the loop walking tile k, to mix MUFU-bound and issue-bound work in one
// thread's stream; 16-token tiles, two of each converted tile: 13-22% slower at 16 x 4097,
// slower at every shape, results/h200_infer_scan_v26_explore.json).

// x_dbl rows are copied in XV-byte pieces (16 where the rows are 16-byte aligned and padded, as
// the mixer makes them; else 8): XWP elements of each row are staged. A tile's rows are then
// converted once for the lanes: [B | C] to fp32 (xf), dt to fp16 pairs (xh, step 2's only
// reader of it): Vim's 44 staged columns take 176 bytes per row as fp32 [dt | B | C] (before v22),
// 128 + 32 now, so that five 32-channel blocks still share an SM's 228 KB.
#define XWP ((XW * 2 + XV - 1) / XV * XV / 2)
#define XF (2 * NS)                       // fp32 row of a tile: [B | C]
#define XB 0                              // where B starts in a row of xf
#define XC NS                             // where C starts
#define NT (CH * SPLIT)                   // threads of a block
#define NPT (NS / SPLIT)                  // states per lane
#define RH (R / 2)                        // fp16 pairs of a token's dt columns
#define XH ((RH + 3) / 4 * 4)             // a row of xh, whole 16-byte vectors
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

// The scan's own PTX helpers (the shared ones, u16, to_f32, cp_async, ...: ptx_helpers.cuh, put
// in front of this file by the wrapper); tests/cuda_emulation.h has their C++ versions.
#ifndef VIM_SCAN_EMULATE
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

// fp16 pairs in a 32-bit word (element 0 in the low half): d = a b + c per half, one rounding
__device__ __forceinline__ unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ unsigned pack_h2(float lo, float hi) {
  unsigned d;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
}

// the sum of a pair's two halves, in fp32
__device__ __forceinline__ float h2_sum(unsigned v) {
  float lo, hi;
  asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
      : "=f"(lo), "=f"(hi) : "r"(v));
  return lo + hi;
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

// Rows of xf and ld are stored one down (row r at index r + 1): the walk fetches the operands of
// the token after its last, row TT (forward) or -1 (backward), which then exist and are unused.
struct Tiles {
  u16 u[STAGES][TT][CH];
  u16 z[STAGES][TT][CH];
  u16 x[STAGES][TT][XWP];
  float xf[TT + 2][XF];     // the tile's [B | C] in fp32, read by every lane
  float2 ld[TT + 2][CH];    // (log2(1 + e^x), dt u) per token and channel
  float yp[TT][CH][SPLIT];  // the lanes' partial C . h
  unsigned xh[TT + 2][XH];  // the tile's dt columns as fp16 pairs (rows one down, like xf)
};

// Where a block's tiles live: static shared memory (at most 48 KB), or with DYN_SMEM dynamic
// shared memory (the launch passes its size: up to the device's opt-in limit, larger tiles).
// The CPU emulation keeps static tiles (the same logic).
#if DYN_SMEM && !defined(VIM_SCAN_EMULATE)
#define BLOCK_TILES(s)                                    \
  extern __shared__ __align__(16) unsigned char s##_raw[]; \
  Tiles& s = *reinterpret_cast<Tiles*>(s##_raw)
#else
#define BLOCK_TILES(s) __shared__ __align__(16) Tiles s
#endif

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

// Where Tiles::u, z and x start: its first three members, whole numbers of 16 bytes, no padding
// (NVRTC takes no offsetof).
#define TILE_OFFSET_u 0u
#define TILE_OFFSET_z (unsigned)(STAGES * TT * CH * 2)
#define TILE_OFFSET_x (unsigned)(2 * STAGES * TT * CH * 2)
#define TILE_OFFSET(member) TILE_OFFSET_##member

// Copies tile k of the walk, [t0, t0 + TT), into stage `stage` (cp.async; tokens outside
// [lo, hi) zero-filled). Each thread's pieces are fixed by its index with compile-time trip
// counts, and a staged row is a whole number of pieces, so piece i lands at byte i * size of
// its stage (the ninth session's loops computed row, column and bounds per piece: ~190
// instructions per tile and thread, as many as 7 tokens of the walk). Offsets within a batch
// row are unsigned 32-bit (launch_plan checks that they fit), and the destinations are offsets
// from `sm`, the tiles' shared address taken once per walk (v16 converted a pointer per copy:
// with the sign extensions ~100 instructions per whole tile for its 4 copies per thread, ~60
// now; 1.1% faster at 16 x 4097, results/h200_infer_scan_v17_ab.json). WHOLE: every token of
// the tile is in [lo, hi) (all but a chunk's last tile), no token checks.
template <bool FINAL, bool WHOLE>
__device__ __forceinline__ void issue_tile(SmemPtr sm, const Walk& w, int k, int stage) {
  const unsigned t0 = w.rev ? w.hi - (k + 1) * TT : w.lo + k * TT;
  constexpr int UPR = CH / 8;              // 16-byte pieces per row of a (TT, CH) 16-bit tile
  constexpr int U_PIECES = TT * UPR, U_ROWS_PER_PASS = NT / UPR;
  const unsigned ucol = (threadIdx.x % UPR) * 8;
  const bool chan_ok = w.e0 + (int)ucol < w.E;
#pragma unroll
  for (int j = 0; j < (U_PIECES + NT - 1) / NT; ++j) {
    const unsigned i = threadIdx.x + j * NT;
    if (U_PIECES % NT != 0 && i >= U_PIECES) break;
    const unsigned t = t0 + threadIdx.x / UPR + j * U_ROWS_PER_PASS;
    const bool ok = chan_ok && (WHOLE || ((int)t >= w.lo && (int)t < w.hi));
    const unsigned dst = (stage * TT * CH + i * 8) * 2;
    cp_async<16>(sm + TILE_OFFSET(u) + dst, w.u + (ok ? t * w.su_l + ucol : 0u), ok);
    if (FINAL) cp_async<16>(sm + TILE_OFFSET(z) + dst, w.z + (ok ? t * w.sz_l + ucol : 0u), ok);
  }
  constexpr int PIECE = XV / 2, PPR = XWP / PIECE, X_PIECES = TT * PPR;
#pragma unroll
  for (int j = 0; j < (X_PIECES + NT - 1) / NT; ++j) {
    const unsigned i = threadIdx.x + j * NT;
    if (X_PIECES % NT != 0 && i >= X_PIECES) break;
    const unsigned row = i / PPR, col = (i - row * PPR) * PIECE, t = t0 + row;
    const bool ok = WHOLE || ((int)t >= w.lo && (int)t < w.hi);
    cp_async<XV>(sm + TILE_OFFSET(x) + (stage * TT * XWP + i * PIECE) * 2,
                 w.xd + (ok ? t * w.sx_l + col : 0u), ok);
  }
}

// Step 2: the part of a token that does not depend on the state, for channel c and the tokens
// r0, r0 + SPLIT, ... of the tile (see PREP_BY_ROW for which thread takes which).
// r0 < SPLIT, so every thread takes exactly TT / SPLIT rows (a fixed count: unrolled with no exit
// branches). Written stage by stage over the rows, so each MUFU stage has TT / SPLIT independent
// operations in flight (written row by row, the SASS ran one row's dependent chain at a time).
// The gate and D u gate stay in this thread's registers (go): step 4 takes the same rows and
// channel (the tenth session's kernel passed them through shared memory).
constexpr int PREP_ROWS = TT / SPLIT;
template <bool FINAL>
__device__ __forceinline__ void prepare(Tiles& s, int stage, int c, int r0,
                                        const unsigned (&W)[RH], float bias, float D,
                                        float2 (&go)[PREP_ROWS]) {
  constexpr int K = PREP_ROWS;
  float x[K], u[K], zz[K], e[K], l[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int r = r0 + k * SPLIT;
    unsigned xh[XH];  // the row's dt pairs, as 16-byte vectors (the row is 16-byte aligned)
#pragma unroll
    for (int j = 0; j < XH; j += 4) {
      const uint4 v = *reinterpret_cast<const uint4*>(&s.xh[r + 1][j]);
      xh[j] = v.x; xh[j + 1] = v.y; xh[j + 2] = v.z; xh[j + 3] = v.w;
    }
    unsigned acc = 0u;  // (+0, +0)
#pragma unroll
    for (int j = 0; j < RH; ++j) acc = hfma2(W[j], xh[j], acc);
    x[k] = bias + h2_sum(acc);  // log2 units (W and bias times log2(e))
    u[k] = to_f32(s.u[stage][r][c]);
    if (FINAL) zz[k] = to_f32(s.z[stage][r][c]);
  }
  // softplus in base 2: l = log2(1 + 2^x) = dt / ln 2, and exp(dt A) = 2^(l A)
  constexpr float BIG = 20.f * 1.4426950408889634f;  // softplus(x) = x past x = 20
#pragma unroll
  for (int k = 0; k < K; ++k) e[k] = ex2(x[k]);
#pragma unroll
  for (int k = 0; k < K; ++k) l[k] = x[k] > BIG ? x[k] : lg2(1.f + e[k]);
#pragma unroll
  for (int k = 0; k < K; ++k)  // (l, l u): the state is h / ln 2
    s.ld[r0 + k * SPLIT + 1][c] = make_float2(l[k], l[k] * u[k]);
  if (FINAL) {  // the gate silu(z) / 2 times ln 2 (for h / ln 2), and D u times it (D / ln 2)
#pragma unroll
    for (int k = 0; k < K; ++k) e[k] = tanh_approx(0.5f * zz[k]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float q = (0.25f * 0.6931471805599453f) * zz[k];
      const float g = fmaf(q, e[k], q);  // ln 2 z sigmoid(z) / 2 = ln 2 z (1 + tanh(z / 2)) / 4
      go[k] = make_float2(g, D * u[k] * g);
    }
  }
}

// Step 3. A token's operands for this lane, read from the tile one token ahead of their use:
// the walk's loads of token k + 1 are issued before its store of token k's partial, which the
// compiler would not move them over (it cannot prove the two shared-memory accesses disjoint),
// so each token would wait for its own loads (measured: ~310 cycles per token and warp).
struct Operands {
  float2 ld;      // (log2 decay per unit A, dt u)
  float b[NPT];   // this lane's B
  float c[NPT];   // this lane's C (output walk only)
};

template <bool FINAL>
__device__ __forceinline__ void fetch(const Tiles& s, int r, int c, int lane,
                                      Operands& o) {
  const float* xf = s.xf[r + 1];
  o.ld = s.ld[r + 1][c];
#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    o.b[j] = xf[XB + lane * NPT + j];
    if (FINAL) o.c[j] = xf[XC + lane * NPT + j];
  }
}

// One token for this lane's states n = lane * NPT + j; returns its partial C . h, one chain (a
// product and NPT - 1 FMAs: v27; two chains from zero took NPT FMAs and an add, and the fully
// unrolled walk overlaps the tokens' sums anyway, none depending on another's).
template <bool FINAL>
__device__ __forceinline__ float advance(const Operands& o, float (&h)[NPT],
                                         const float (&A)[NPT], float& dt_sum) {
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < NPT; ++j) {
    const float a = j < NPOLY ? ex2_fma(o.ld.x * A[j]) : ex2(o.ld.x * A[j]);
    h[j] = fmaf(a, h[j], o.b[j] * o.ld.y);
    if (FINAL) y = j ? fmaf(o.c[j], h[j], y) : o.c[j] * h[j];
  }
  if (!FINAL) dt_sum += o.ld.x;
  return y;
}

// Step 4's sum of a (token, channel)'s SPLIT partials, read as one vector (the row of SPLIT
// floats is 4 * SPLIT-byte aligned: every member of Tiles before yp is a multiple of 16 bytes).
__device__ __forceinline__ float sum_partials(const float (&p)[SPLIT]) {
  if (SPLIT == 4) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    return (v.x + v.y) + (v.z + v.w);
  }
  if (SPLIT == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    return v.x + v.y;
  }
  float y = 0.f;
#pragma unroll
  for (int j = 0; j < SPLIT; ++j) y += p[j];
  return y;
}

// Step 3 over a whole tile, operands one token ahead (see Operands); the direction a compile-time
// constant and the loop fully unrolled (v27; it was unrolled 4 deep), so every row address is an
// immediate offset and no loop counter remains.
template <bool FINAL, bool REV>
__device__ __forceinline__ void walk_tile(Tiles& s, int c, int lane, float (&h)[NPT],
                                          const float (&A)[NPT], float& dt_sum) {
  constexpr int r0 = REV ? TT - 1 : 0, dr = REV ? -1 : 1;
  Operands cur, next;
  fetch<FINAL>(s, r0, c, lane, cur);
#pragma unroll
  for (int kk = 0; kk < TT; ++kk) {
    fetch<FINAL>(s, r0 + (kk + 1) * dr, c, lane, next);
    const float y = advance<FINAL>(cur, h, A, dt_sum);
    if (FINAL) s.yp[r0 + kk * dr][c][lane] = y;
    cur = next;
  }
}

// Step 1: the staged tile's x_dbl rows converted, by the threads that stage tiles (threadIdx.x
// of NT): [B | C] in fp32 into xf, one pass over their float4s, then dt as fp16 pairs into xh.
__device__ __forceinline__ void convert_tile(Tiles& s, int stage) {
  constexpr int QR = XF / 4, QN = TT * QR;
  const uint2* src = reinterpret_cast<const uint2*>(&s.x[stage][0][0]);
  float4* dst = reinterpret_cast<float4*>(&s.xf[1][0]);
#pragma unroll
  for (int j = 0; j < (QN + NT - 1) / NT; ++j) {
    const int i = threadIdx.x + j * NT;
    if (QN % NT != 0 && i >= QN) break;
    const uint2 v = src[i / QR * (XWP / 4) + R / 4 + i % QR];  // past the row's dt columns
    dst[i] = make_float4(lo_f32(v.x), hi_f32(v.x), lo_f32(v.y), hi_f32(v.y));
  }
  // the dt columns again as fp16 pairs for step 2's HFMA2s: R / 4 pieces of 4 per row
  constexpr int HQ = R / 4, HN = TT * HQ;
#pragma unroll
  for (int j = 0; j < (HN + NT - 1) / NT; ++j) {
    const int i = threadIdx.x + j * NT;
    if (HN % NT != 0 && i >= HN) break;
    const int row = i / HQ, q = i % HQ;
    const uint2 v = src[row * (XWP / 4) + q];
    *reinterpret_cast<uint2*>(&s.xh[row + 1][2 * q]) =
        make_uint2(pack_h2(lo_f32(v.x), hi_f32(v.x)), pack_h2(lo_f32(v.y), hi_f32(v.y)));
  }
}

// Step 4 for the tile starting at token t0 (whole: within the chunk), channel pc, rows
// pr0 + j SPLIT: every row's sum read before any is stored, gated by go, stored as 16 bits.
__device__ __forceinline__ void output_tile(const Tiles& s, const Walk& w, int t0,
                                            bool whole, int pc, int pr0,
                                            const float2 (&go)[PREP_ROWS], bool active) {
  constexpr int K = PREP_ROWS;
  float y[K];
#pragma unroll
  for (int j = 0; j < K; ++j) y[j] = sum_partials(s.yp[pr0 + j * SPLIT][pc]);
  u16* out = w.out + (t0 + pr0) * w.so_l + pc;  // 32-bit offsets: fewer instructions
  const int step = SPLIT * w.so_l;
#pragma unroll
  for (int j = 0; j < K; ++j, out += step) {
    const int t = t0 + pr0 + j * SPLIT;
    const u16 v = from_f32(fmaf(go[j].x, y[j], go[j].y));
    if (active && (whole || (t >= w.lo && t < w.hi))) *out = v;
  }
}

// Steps 1-4 of every tile by the same threads, four barriers per tile.
template <bool FINAL>
__device__ __forceinline__ void walk(Tiles& s, const Walk& w, int c, int lane, float (&h)[NPT],
                                     const float (&A)[NPT], const unsigned (&W)[RH], float bias,
                                     float D, float& dt_sum) {
  const int n_tiles = (w.hi - w.lo + TT - 1) / TT;
  const int pc = PREP_C, pr0 = PREP_R0;  // steps 2 and 4: channel pc, tokens pr0 + k SPLIT
  const bool active = w.e0 + pc < w.E;
  float2 go[PREP_ROWS];  // step 2's gates for step 4
  const SmemPtr sm = smem_ptr(&s);
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < n_tiles) issue_tile<FINAL, false>(sm, w, k, k);
    cp_async_commit();
  }
  for (int k = 0; k < n_tiles; ++k) {
    const int stage = k % STAGES;
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile k is in; every thread is done with tile k - 1
    const int kn = k + STAGES - 1;  // the tile issued now; all but the chunk's last are whole
    if (kn < n_tiles - 1) issue_tile<FINAL, true>(sm, w, kn, kn % STAGES);
    else if (kn == n_tiles - 1) issue_tile<FINAL, false>(sm, w, kn, kn % STAGES);
    cp_async_commit();
    convert_tile(s, stage);  // the tile's x_dbl rows in fp32
    __syncthreads();
    prepare<FINAL>(s, stage, pc, pr0, W, bias, D, go);
    PREP_SYNC();
    const int t0 = w.rev ? w.hi - (k + 1) * TT : w.lo + k * TT;
    const int r0 = w.rev ? TT - 1 : 0, dr = w.rev ? -1 : 1;
    const bool whole = t0 >= w.lo && t0 + TT <= w.hi;
    if (whole) {  // no token checks
      if (w.rev) walk_tile<FINAL, true>(s, c, lane, h, A, dt_sum);
      else walk_tile<FINAL, false>(s, c, lane, h, A, dt_sum);
    } else {
      for (int kk = 0; kk < TT; ++kk) {
        const int r = r0 + kk * dr;
        if (t0 + r >= w.lo && t0 + r < w.hi) {
          Operands o;
          fetch<FINAL>(s, r, c, lane, o);
          const float y = advance<FINAL>(o, h, A, dt_sum);
          if (FINAL) s.yp[r][c][lane] = y;
        }
      }
    }
    if (FINAL) {  // step 4
      PREP_SYNC();
      output_tile(s, w, t0, whole, pc, pr0, go, active);
    }
  }
  cp_async_wait<0>();
}


// A: this lane's states of the walk's channel e; W, bias, D: channel e0 + PREP_C, which this
// thread prepares (channels past E read channel 0 and store nothing); h: the zero state.
__device__ __forceinline__ void load_direction(
    int dir, int e, int lane, bool active, int e0, int E, const unsigned* W_f,
    const float* bias_f, const float* A_f, const float* D_f, const unsigned* W_b,
    const float* bias_b, const float* A_b, const float* D_b, float (&A)[NPT], unsigned (&W)[RH],
    float& bias, float& D, float (&h)[NPT]) {
  const unsigned* Wp = dir ? W_b : W_f;
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
  for (int j = 0; j < RH; ++j) W[j] = Wp[ep * RH + j];
  bias = (dir ? bias_b : bias_f)[ep];
  D = (dir ? D_b : D_f)[ep];
#pragma unroll
  for (int j = 0; j < NPT; ++j) h[j] = 0.f;
}

#define SCAN_ARGS                                                                            \
  const u16 *u_f, const u16 *u_b, int su_b, int su_l, const u16 *x_f, const u16 *x_b,        \
      int sx_b, int sx_l, const u16 *z, int sz_b, int sz_l, const unsigned *W_f,             \
      const float *bias_f, const float *A_f, const float *D_f, const unsigned *W_b,          \
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
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS)
vim_scan_summary(SCAN_ARGS) {
  BLOCK_TILES(s);
  const int per_dir = n_chunks - 1;
  const int dir = blockIdx.z / per_dir;
  const int chunk = blockIdx.z % per_dir + dir;
  const int b = blockIdx.y, e0 = blockIdx.x * CH;
  const int c = threadIdx.x / SPLIT, lane = threadIdx.x % SPLIT;
  const bool active = e0 + c < E;
  float A[NPT], bias, D, h[NPT], dt_sum = 0.f;
  unsigned W[RH];
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
extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS)
vim_scan_final(SCAN_ARGS) {
  BLOCK_TILES(s);
  const int dir = blockIdx.z / n_chunks;
  const int chunk = blockIdx.z % n_chunks;
  const int b = blockIdx.y, e0 = blockIdx.x * CH;
  const int c = threadIdx.x / SPLIT, lane = threadIdx.x % SPLIT;
  const bool active = e0 + c < E;
  float A[NPT], bias, D, h[NPT], dt_sum = 0.f;
  unsigned W[RH];
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
