// rlfuse/cuda_utils.cuh -- small, dependency-free helpers shared by the CUDA ops.
//
// * dtype helpers for the four logits dtypes (float, __half, __nv_bfloat16, double):
//   accumulation type, load/convert to the accumulation type, round-to-nearest store.
// * accumulation-type math wrappers (exp/log/fma/max/mul) that are usable from both host and
//   device code, so per-thread math can be unit-tested on the CPU.
// * 16-byte "group" load/store helpers (vectorized when the pointer is 16-byte aligned, scalar
//   otherwise, with the SAME element grouping either way).
// * a deterministic, fixed-order warp/block reduction for any trivially-copyable state type.
//
// Everything here is header-only and must be included from .cu files compiled by nvcc (the
// __host__ __device__ parts also work when a .cu file is compiled for the host only).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__CUDACC__)
#define RLFUSE_HD __host__ __device__ __forceinline__
#define RLFUSE_DEVICE __device__ __forceinline__
#else
#define RLFUSE_HD inline
#endif

// `#pragma unroll` for device code only (host compilers warn about the unknown pragma when a
// __host__ __device__ function is compiled for the host).
#if defined(__CUDA_ARCH__)
#define RLFUSE_UNROLL _Pragma("unroll")
#else
#define RLFUSE_UNROLL
#endif

// Defined in csrc/cuda/runtime.cu: records `msg` as the calling thread's last error and
// returns `err` (a cudaError_t value), so launchers can `return rlfuse_cuda_fail(...)`.
extern "C" int rlfuse_cuda_fail(int err, const char* msg);

namespace rlfuse {
namespace cu {

// ------------------------------------------------------------------------------------------
// dtype codes shared with the Python side
// ------------------------------------------------------------------------------------------
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// ------------------------------------------------------------------------------------------
// accumulation type: float for float/half/bf16, double for double
// ------------------------------------------------------------------------------------------
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// Number of T elements in 16 bytes (4 for float, 8 for half/bf16, 2 for double).
template <typename T>
struct Vec16 {
  static_assert(16 % sizeof(T) == 0, "element size must divide 16");
  static constexpr int N = static_cast<int>(16 / sizeof(T));
};

// ------------------------------------------------------------------------------------------
// conversions
// ------------------------------------------------------------------------------------------
RLFUSE_HD float to_acc(float x) { return x; }
RLFUSE_HD double to_acc(double x) { return x; }
RLFUSE_HD float to_acc(__half x) { return __half2float(x); }
RLFUSE_HD float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Accumulation value -> storage dtype, round-to-nearest-even.
template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  RLFUSE_HD static float cvt(float x) { return x; }
};
template <>
struct FromAcc<double> {
  RLFUSE_HD static double cvt(double x) { return x; }
};
template <>
struct FromAcc<__half> {
  RLFUSE_HD static __half cvt(float x) { return __float2half_rn(x); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  RLFUSE_HD static __nv_bfloat16 cvt(float x) { return __float2bfloat16_rn(x); }
};
template <typename T>
RLFUSE_HD T from_acc(acc_t<T> x) {
  return FromAcc<T>::cvt(x);
}

// ------------------------------------------------------------------------------------------
// accumulation-type math (accurate library functions, never the __expf-style intrinsics)
// ------------------------------------------------------------------------------------------
RLFUSE_HD float exp_acc(float x) { return expf(x); }
RLFUSE_HD double exp_acc(double x) { return exp(x); }
RLFUSE_HD float log_acc(float x) { return logf(x); }
RLFUSE_HD double log_acc(double x) { return log(x); }
RLFUSE_HD float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
RLFUSE_HD double fma_acc(double a, double b, double c) { return fma(a, b, c); }
// IEEE maxNum: a NaN argument is ignored (fmax(NaN, x) == x).
RLFUSE_HD float fmax_acc(float a, float b) { return fmaxf(a, b); }
RLFUSE_HD double fmax_acc(double a, double b) { return fmax(a, b); }

// Product that the compiler may NOT contract into a following add/sub (keeps results identical
// between template instantiations and between host emulation and device code).
RLFUSE_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
RLFUSE_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename A>
RLFUSE_HD A neg_inf() {
  return static_cast<A>(-INFINITY);
}
// Most negative finite value.
template <typename A>
RLFUSE_HD A lowest();
template <>
RLFUSE_HD float lowest<float>() {
  return -3.40282346638528859812e+38f;
}
template <>
RLFUSE_HD double lowest<double>() {
  return -1.79769313486231570815e+308;
}
template <typename A>
RLFUSE_HD A quiet_nan() {
  return static_cast<A>(NAN);
}

// ------------------------------------------------------------------------------------------
// loads / stores
// ------------------------------------------------------------------------------------------
// Read-only (non-coherent cache) scalar load.
template <typename T>
RLFUSE_HD T ld_ro(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Load one 16-byte group of Vec16<T>::N consecutive elements starting at p.
//   kAligned = true : p must be 16-byte aligned; one 128-bit load.
//   kAligned = false: N scalar loads (any alignment). Same values, same order.
template <typename T, bool kAligned>
RLFUSE_HD void load_group(const T* p, T (&v)[Vec16<T>::N]) {
  if constexpr (kAligned) {
#if defined(__CUDA_ARCH__)
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
#else
    uint4 raw;
    memcpy(&raw, static_cast<const void*>(p), 16);
#endif
    memcpy(static_cast<void*>(&v[0]), &raw, 16);
  } else {
    RLFUSE_UNROLL
    for (int j = 0; j < Vec16<T>::N; ++j) v[j] = ld_ro(p + j);
  }
}

// Store one group of N consecutive elements (N == Vec16<T>::N with kAligned, any N without).
// The aligned store uses the streaming (evict-first) hint: outputs are written once.
template <typename T, bool kAligned, int N>
RLFUSE_HD void store_group(T* p, const T (&v)[N]) {
  if constexpr (kAligned) {
    static_assert(N == Vec16<T>::N, "aligned store needs a full 16-byte group");
    uint4 raw;
    memcpy(&raw, static_cast<const void*>(&v[0]), 16);
#if defined(__CUDA_ARCH__)
    __stcs(reinterpret_cast<uint4*>(p), raw);
#else
    memcpy(static_cast<void*>(p), &raw, 16);
#endif
  } else {
    RLFUSE_UNROLL
    for (int j = 0; j < N; ++j) p[j] = v[j];
  }
}

// True iff p is 16-byte aligned.
RLFUSE_HD bool is_aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------------
// deterministic reductions (device only)
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

// __shfl_down_sync for any trivially-copyable type whose size is a multiple of 4 bytes.
template <typename S>
RLFUSE_DEVICE S shfl_down_any(const S& v, unsigned delta) {
  static_assert(sizeof(S) % sizeof(int) == 0, "state size must be a multiple of 4 bytes");
  constexpr int kWords = static_cast<int>(sizeof(S) / sizeof(int));
  int w[kWords];
  memcpy(w, &v, sizeof(S));
  RLFUSE_UNROLL
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_down_sync(0xffffffffu, w[i], delta);
  S out;
  memcpy(&out, w, sizeof(S));
  return out;
}

// Fixed-order tree over a full warp: after the call, lane 0 holds the combination of all 32
// values, paired at lane distance 16, then 8, 4, 2, 1, the lower lane always the left operand of
// op. Other lanes hold partial results. All 32 lanes must be active.
template <typename S, typename Op>
RLFUSE_DEVICE S warp_reduce_down(S v, const Op& op) {
  RLFUSE_UNROLL
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_down_any(v, static_cast<unsigned>(off)));
  return v;
}

// Fixed-order block reduction; the result is returned to EVERY thread of the block.
// Requirements: blockDim.x is a multiple of 32 and <= 1024, blockDim.y == blockDim.z == 1,
// all threads call it (it contains __syncthreads), smem points to >= 32 elements of S in shared
// memory. `identity` must satisfy op(x, identity) == x bitwise. Safe to call repeatedly with the
// same smem (the leading barrier protects the previous result).
// The combination order depends only on blockDim.x, never on blockIdx or timing, so results are
// bitwise reproducible.
template <typename S, typename Op>
__device__ __forceinline__ S block_reduce(S v, const Op& op, const S& identity, S* smem) {
  const int lane = static_cast<int>(threadIdx.x & 31u);
  const int wid = static_cast<int>(threadIdx.x >> 5);
  const int nwarps = static_cast<int>((blockDim.x + 31u) >> 5);
  v = warp_reduce_down(v, op);
  __syncthreads();  // previous users of smem are done
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  if (wid == 0) {
    S x = lane < nwarps ? smem[lane] : identity;
    x = warp_reduce_down(x, op);
    if (lane == 0) smem[0] = x;  // only lane 0 read smem[0] above, before the shuffles
  }
  __syncthreads();
  return smem[0];
}

#endif  // __CUDACC__

}  // namespace cu
}  // namespace rlfuse
