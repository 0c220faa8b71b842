// PTX helpers shared by the CUDA C++ kernels (bimamba_scan_fwd.cu, conv_xproj_fwd.cu). The
// Python wrappers put this file in front of a kernel's source (``cuda_scan.kernel_text``):
// NVRTC compiles each as one program, with no include path. tests/cuda_emulation.h gives C++
// versions of the same to run the kernels' logic on the CPU (VIM_SCAN_EMULATE, tests only).
// FP16 (1: fp16, 0: bf16) is #defined in front of it.

typedef unsigned short u16;
typedef long long i64;

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

// one MUFU op: the scan's gate sigmoid (where ex2 + rcp took two; max relative error 2^-10.99,
// the gated output is rounded to 16 bits after it: H200, tenth session, 0.5-4% faster per
// call) and the conv's SiLU
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// A shared-memory address as cp.async and ldmatrix take it (the emulation's is a plain pointer).
typedef unsigned SmemPtr;
__device__ __forceinline__ SmemPtr smem_ptr(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

template <int BYTES>
__device__ __forceinline__ void cp_async(SmemPtr dst, const void* src, bool valid) {
  // zero-fills the destination when !valid (src is then never read)
  const int n = valid ? BYTES : 0;
  if (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                 "l"(src), "r"(n) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst),
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
