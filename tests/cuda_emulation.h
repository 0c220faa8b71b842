// Runs the C++ of a CUDA kernel on the CPU: one std::thread per CUDA thread, blocks one after
// another, __syncthreads / __syncwarp as std::barrier. For tests of a kernel's logic (indexing,
// tiling, chunking, barriers between its steps) where no GPU is, like TRITON_INTERPRET for
// Triton; it says nothing about speed, and it cannot see what only the hardware does (memory
// ordering, bank conflicts). The kernel source guards its PTX helpers with VIM_SCAN_EMULATE;
// their C++ versions are here.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define VIM_SCAN_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time: its threads share the kernel's statics
#define __align__(n) __attribute__((aligned(n)))

struct uint3_ { unsigned x, y, z; };
inline thread_local uint3_ threadIdx, blockIdx;
inline std::barrier<>* block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline void __syncwarp() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
template <class To, class From> inline To bits(From v) { To t; std::memcpy(&t, &v, sizeof t); return t; }
inline float __uint_as_float(unsigned v) { return bits<float>(v); }
inline float __int_as_float(int v) { return bits<float>(v); }
inline int __float_as_int(float v) { return bits<int>(v); }
inline unsigned __float_as_uint(float v) { return bits<unsigned>(v); }
using std::fmaf;
using std::fmaxf;
using std::min;

typedef unsigned short u16;
inline float to_f32(u16 v) {
#if FP16
  return (float)bits<_Float16>(v);
#else
  return __uint_as_float(((unsigned)v) << 16);
#endif
}
inline u16 from_f32(float f) {  // round to nearest even, like cvt.rn
#if FP16
  return bits<u16>((_Float16)f);
#else
  const unsigned u = __float_as_uint(f);
  return (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}
inline float ex2(float x) { return std::exp2(x); }
inline float lg2(float x) { return std::log2(x); }
inline float tanh_approx(float x) { return std::tanh(x); }
// fp16 pairs (element 0 in the low half), as fma.rn.f16x2 / cvt.rn.f16x2.f32 / cvt.f32.f16 do
// them: the product and sum in double (exact for these operands), then one rounding to fp16
inline float h16(unsigned v, int hi) { return (float)bits<_Float16>((u16)(hi ? v >> 16 : v)); }
inline unsigned pack_h2(float lo, float hi) {
  return bits<u16>((_Float16)lo) | ((unsigned)bits<u16>((_Float16)hi) << 16);
}
inline unsigned hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned d = 0;
  for (int hi = 0; hi < 2; ++hi) {
    const double v = (double)h16(a, hi) * h16(b, hi) + h16(c, hi);
    d |= (unsigned)bits<u16>((_Float16)v) << (16 * hi);
  }
  return d;
}
inline float h2_sum(unsigned v) { return h16(v, 0) + h16(v, 1); }
typedef unsigned char* SmemPtr;
inline SmemPtr smem_ptr(const void* p) { return (SmemPtr)p; }
template <int BYTES> inline void cp_async(SmemPtr dst, const void* src, bool valid) {
  if (valid) std::memcpy(dst, src, BYTES); else std::memset(dst, 0, BYTES);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

// Runs kernel(args...) on a grid of blocks of `threads` threads.
template <class Kernel, class... Args>
void emulate(Kernel kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads, Args... args) {
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        std::barrier<> block(threads);
        block_barrier = &block;
        warp_barriers.clear();
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
          warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - 32 * w)));
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
          pool.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {x, y, z}; kernel(args...); });
        for (auto& th : pool) th.join();
      }
}

// mma.sync.m16n8k16 for one warp (the fused conv + x_proj kernel): every lane posts its
// fragments, then reads the others' (the PTX ISA's layouts: A row-major 16 x 16, B
// column-major 16 x 8, D 16 x 8 in fp32).
inline float half_of(unsigned v, int hi) { return to_f32((u16)(hi ? v >> 16 : v & 0xffffu)); }
inline void mma_16816(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  struct Fragments { unsigned a[4], b[2]; };
  static Fragments posted[32][32];  // [warp][lane]; one block runs at a time
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  posted[warp][lane] = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  __syncwarp();
  const Fragments* f = posted[warp];
  auto A = [&](int row, int k) {  // lane (row % 8) * 4 + (k % 8) / 2, register by row and k
    return half_of(f[(row % 8) * 4 + (k % 8) / 2].a[(row >= 8) + 2 * (k >= 8)], k % 2);
  };
  auto B = [&](int k, int col) { return half_of(f[col * 4 + (k % 8) / 2].b[k >= 8], k % 2); };
  const int g = lane / 4, tig = lane % 4;
  float out[4];
  for (int j = 0; j < 4; ++j) {
    const int row = g + 8 * (j >= 2), col = 2 * tig + j % 2;
    float acc = d[j];
    for (int k = 0; k < 16; ++k) acc = std::fmaf(A(row, k), B(k, col), acc);
    out[j] = acc;
  }
  __syncwarp();  // every lane has read the posted fragments before any posts new ones
  for (int j = 0; j < 4; ++j) d[j] = out[j];
}

// ldmatrix.sync.aligned.m8n8.x4 / .x2 (.shared.b16) for one warp: lane 8 j + i posts the address
// of row i of matrix j; lane l receives of matrix j row l / 4, its 32-bit word l % 4.
template <int N>
inline void ldmatrix_n(unsigned (&r)[N], SmemPtr row) {
  static SmemPtr posted[32][32];  // [warp][lane]; one block runs at a time
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  posted[warp][lane] = row;
  __syncwarp();
  for (int j = 0; j < N; ++j) std::memcpy(&r[j], posted[warp][8 * j + lane / 4] + 4 * (lane % 4), 4);
  __syncwarp();  // every lane has read the posted addresses before any posts new ones
}
inline void ldmatrix_x4(unsigned (&r)[4], SmemPtr row) { ldmatrix_n<4>(r, row); }
inline void ldmatrix_x2(unsigned (&r)[2], SmemPtr row) { ldmatrix_n<2>(r, row); }
