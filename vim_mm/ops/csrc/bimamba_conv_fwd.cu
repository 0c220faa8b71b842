// Both directions' depthwise conv1d + SiLU of the Vim mixer (inference), in CUDA C++ (compiled
// at run time by NVRTC, vim_mm/ops/cuda_conv.py):
//   u_f[t] = silu(b_f + sum_k w_f[k] x[t - 3 + k])       (causal, taps k = 0..3)
//   u_b[t] = silu(b_b + sum_k w_b[k] x[t + 3 - k])       (the reversed sequence's causal conv)
// x (batch, L, E) 16-bit with unit channel stride and 16-byte aligned rows (a half of in_proj's
// output); u_f, u_b contiguous (batch, L, E) in x's dtype; weights (E, 4) and biases fp32.
//
// Why not Triton: its streaming kernel (triton_conv.py) moves 8 bytes per thread and access
// and reaches ~2.36 TB/s on an H200 (16 x 4097 x 384: 64 us); 16-byte accesses from Triton
// (8 channels per thread) were slower still (results/h200_conv_sweep_v2.json). Here a thread
// owns 8 channels (one 16-byte load or store per row) and RUN consecutive tokens: it loads all
// RUN + 6 rows it needs before computing anything (RUN + 6 loads in flight), then computes and
// stores RUN rows of each output. Consecutive threads take consecutive channel groups, so a
// warp's access to a row is 512 contiguous bytes.
//
// Compile-time constants (prepended by the wrapper): RUN (tokens per thread), FP16.

typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float to_f32(u16 v) {
#if FP16
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
#else
  return __uint_as_float(((unsigned)v) << 16);
#endif
}

__device__ __forceinline__ float lo_f32(unsigned v) { return to_f32((u16)(v & 0xffffu)); }
__device__ __forceinline__ float hi_f32(unsigned v) { return to_f32((u16)(v >> 16)); }

__device__ __forceinline__ unsigned pack2(float a, float b) {  // a in the low half
  u16 lo, hi;
#if FP16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(a));
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(b));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(lo) : "f"(a));
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(hi) : "f"(b));
#endif
  return (unsigned)lo | ((unsigned)hi << 16);
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

__device__ __forceinline__ void unpack8(const uint4& r, float (&f)[8]) {
  f[0] = lo_f32(r.x); f[1] = hi_f32(r.x); f[2] = lo_f32(r.y); f[3] = hi_f32(r.y);
  f[4] = lo_f32(r.z); f[5] = hi_f32(r.z); f[6] = lo_f32(r.w); f[7] = hi_f32(r.w);
}

// grid (ceil(E / 8 / blockDim.x), ceil(L / (RUN * blockDim.y)), batch); thread (gx, gy) takes
// channels 8 * (blockIdx.x * blockDim.x + gx) .. + 7 and tokens t0 .. t0 + RUN - 1.
extern "C" __global__ void vim_bi_conv(const u16* __restrict__ x, int sx_b, int sx_l,
                                       const float* __restrict__ w_f,
                                       const float* __restrict__ b_f,
                                       const float* __restrict__ w_b,
                                       const float* __restrict__ b_b, u16* __restrict__ u_f,
                                       u16* __restrict__ u_b, int L, int E) {
  const int c0 = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
  const int t0 = (blockIdx.y * blockDim.y + threadIdx.y) * RUN;
  if (c0 >= E || t0 >= L) return;
  const u16* xr = x + (i64)blockIdx.z * sx_b + c0;
  // every row this thread reads, t0 - 3 .. t0 + RUN + 2, in flight at once (zeros off the ends)
  uint4 rows[RUN + 6];
#pragma unroll
  for (int i = 0; i < RUN + 6; ++i) {
    const int t = t0 - 3 + i;
    rows[i] = (t >= 0 && t < L) ? *reinterpret_cast<const uint4*>(xr + (i64)t * sx_l)
                                : make_uint4(0u, 0u, 0u, 0u);
  }
  float wf[8][4], wb[8][4], bf[8], bb[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const float4 f = *reinterpret_cast<const float4*>(w_f + (c0 + c) * 4);
    const float4 b = *reinterpret_cast<const float4*>(w_b + (c0 + c) * 4);
    wf[c][0] = f.x; wf[c][1] = f.y; wf[c][2] = f.z; wf[c][3] = f.w;
    wb[c][0] = b.x; wb[c][1] = b.y; wb[c][2] = b.z; wb[c][3] = b.w;
    bf[c] = b_f[c0 + c];
    bb[c] = b_b[c0 + c];
  }
  const i64 out0 = ((i64)blockIdx.z * L + t0) * E + c0;
#pragma unroll
  for (int i = 0; i < RUN; ++i) {
    if (t0 + i >= L) break;
    float acc_f[8], acc_b[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) { acc_f[c] = bf[c]; acc_b[c] = bb[c]; }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float xf[8], xb[8];
      unpack8(rows[i + k], xf);      // x[t - 3 + k]
      unpack8(rows[i + 6 - k], xb);  // x[t + 3 - k]
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        acc_f[c] = fmaf(wf[c][k], xf[c], acc_f[c]);
        acc_b[c] = fmaf(wb[c][k], xb[c], acc_b[c]);
      }
    }
    uint4 of, ob;
    of.x = pack2(silu(acc_f[0]), silu(acc_f[1])); of.y = pack2(silu(acc_f[2]), silu(acc_f[3]));
    of.z = pack2(silu(acc_f[4]), silu(acc_f[5])); of.w = pack2(silu(acc_f[6]), silu(acc_f[7]));
    ob.x = pack2(silu(acc_b[0]), silu(acc_b[1])); ob.y = pack2(silu(acc_b[2]), silu(acc_b[3]));
    ob.z = pack2(silu(acc_b[4]), silu(acc_b[5])); ob.w = pack2(silu(acc_b[6]), silu(acc_b[7]));
    *reinterpret_cast<uint4*>(u_f + out0 + (i64)i * E) = of;
    *reinterpret_cast<uint4*>(u_b + out0 + (i64)i * E) = ob;
  }
}
