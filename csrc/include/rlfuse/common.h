// Shared definitions for the CPU kernels: dtype codes, element load/store, a
// vectorisable exp, and the per-ISA namespace macro.
//
// The extension modules never see a torch tensor: Python passes raw pointers,
// sizes, strides (in elements) and a dtype code, after validating everything.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace rlfuse {
// Internal linkage: every ISA build of a kernel file gets its own copy of these
// helpers, so the linker can never hand an AVX-512 copy to the SSE4.2 build.
namespace {

// Dtype codes shared with python/rlfuse/_backend.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// Index dtype codes.
enum IndexType : int { kInt32 = 0, kInt64 = 1 };

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(float x) { return x; }
inline double to_float(double x) { return x; }
inline float to_float(bf16 x) { return bits_to_float(uint32_t(x.bits) << 16); }
inline float to_float(f16 x) {
  // IEEE half -> float, branch-light so loops stay vectorisable.
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  // Normal and subnormal numbers: shift into place and rescale by 2^112.
  float mag = bits_to_float(em << 13) * 5.192296858534828e+33f;  // 2^112
  // Inf/NaN: exponent all ones.
  uint32_t infnan = (em >= 0x7c00u) ? (0x7f800000u | (em & 0x3ffu) << 13) : 0u;
  uint32_t out = infnan ? infnan : float_to_bits(mag);
  return bits_to_float(out | sign);
}

template <typename T> inline T from_float(float v);
template <> inline float from_float<float>(float v) { return v; }
template <> inline double from_float<double>(float v) { return v; }
template <> inline bf16 from_float<bf16>(float v) {
  uint32_t u = float_to_bits(v);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // Signed compare (both sides are non-negative): AVX2 has no unsigned vector compare.
  uint32_t nan = (int32_t(u & 0x7fffffffu) > int32_t(0x7f800000)) ? ((u >> 16) | 0x40u) : rounded;
  return bf16{uint16_t(nan)};
}
template <> inline f16 from_float<f16>(float v) {
  // Round-to-nearest-even float -> half (handles overflow to inf, subnormals, NaN).
  uint32_t u = float_to_bits(v);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  uint16_t out;
  if (a > 0x7f800000u) {
    out = uint16_t(sign | 0x7e00u);
  } else if (a >= 0x477ff000u) {  // rounds to >= 65520 -> inf
    out = uint16_t(sign | 0x7c00u);
  } else if (a < 0x38800000u) {   // below the smallest normal half: subnormal or zero
    float f = bits_to_float(a) + 0.5f;  // exploit float rounding at 2^-24 granularity
    out = uint16_t(sign | (float_to_bits(f) - 0x3f000000u));
  } else {
    uint32_t mant_odd = (a >> 13) & 1u;
    a += 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
    out = uint16_t(sign | (a >> 13));
  }
  return f16{out};
}

// exp(x) for float, accurate to ~1 ulp over the range that matters, written
// without branches or libm calls so that loops calling it auto-vectorise.
// x <= -87.3 returns 0; NaN propagates.
inline float vexp(float x) {
  const float hi = 88.3762626647949f;
  const float lo = -87.3365478515625f;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln2) via the 1.5 * 2^23 trick.
  const float shifter = 12582912.0f;
  float t = xc * 1.44269504088896341f + shifter;
  float n = t - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t ni = int32_t(float_to_bits(t) - float_to_bits(shifter));
  float scale = bits_to_float(uint32_t(ni + 127) << 23);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}
inline double vexp(double x) { return std::exp(x); }

// 2^u for u <= 0 (log2-scaled value minus the running maximum), the hot exponential
// of the log-prob kernels: one rounding, a degree-6 polynomial (max relative error
// 9.7e-8, under one float ulp) and an exponent insert, branch-free so loops vectorise.
// u is clamped at -126 (returns 2^-126 ~ 1.2e-38 there, invisible in a softmax sum,
// whose maximum contributes 1); NaN propagates.  Slightly positive u (rounding) is fine.
// vexp2_clamped: the same with u clamped at `lo` (>= -127; at -127 the exponent field of
// the scale is 0, so the result is exactly 0 there).
inline float vexp2_clamped(float u, float lo) {
  u = u < lo ? lo : u;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = u + shifter;
  float n = t - shifter;
  float f = u - n;  // [-0.5, 0.5]
  float p = 1.535336196e-04f;
  p = p * f + 1.339887502e-03f;
  p = p * f + 9.618436918e-03f;
  p = p * f + 5.550332367e-02f;
  p = p * f + 2.402264774e-01f;
  p = p * f + 6.931471825e-01f;
  p = p * f + 1.0f;
  int32_t ni = int32_t(float_to_bits(t) - float_to_bits(shifter));
  return p * bits_to_float(uint32_t(ni + 127) << 23);
}
inline float vexp2_nonpos(float u) { return vexp2_clamped(u, -126.0f); }
inline double vexp2_nonpos(double u) { return std::exp2(u); }

// out[j] = float(src[j]) for 16 consecutive elements.  The raw bits are copied in one
// block first: reading the 16-bit structs one by one makes GCC assemble the vector
// with 16 inserts.
inline void load16(const float* __restrict src, float* __restrict out) {
  std::memcpy(out, src, 16 * sizeof(float));
}
inline void load16(const double* __restrict src, double* __restrict out) {
  std::memcpy(out, src, 16 * sizeof(double));
}
// The 16-bit structs are read through a pointer to their (first and only) uint16_t
// member, which GCC turns into one widening vector load (no stack round trip).
inline void load16(const bf16* __restrict src, float* __restrict out) {
  const uint16_t* raw = &src->bits;
  for (int j = 0; j < 16; ++j) out[j] = bits_to_float(uint32_t(raw[j]) << 16);
}
inline void load16(const f16* __restrict src, float* __restrict out) {
  const uint16_t* raw = &src->bits;
  for (int j = 0; j < 16; ++j) out[j] = to_float(f16{raw[j]});
}

// lane[j] = max(lane[j], v[j]) for 16 floats.  Written with the widest intrinsics the
// ISA build has, because GCC scalarises this select-reduction otherwise.  maxps returns
// its second operand when either is NaN, so NaN in v is ignored here (the exp-sums
// propagate it instead).
inline void lane_max16(float* __restrict lane, const float* __restrict v) {
#if defined(__AVX512F__)
  _mm512_storeu_ps(lane, _mm512_max_ps(_mm512_loadu_ps(v), _mm512_loadu_ps(lane)));
#elif defined(__AVX__)
  for (int k = 0; k < 16; k += 8)
    _mm256_storeu_ps(lane + k, _mm256_max_ps(_mm256_loadu_ps(v + k), _mm256_loadu_ps(lane + k)));
#elif defined(__SSE2__)
  for (int k = 0; k < 16; k += 4)
    _mm_storeu_ps(lane + k, _mm_max_ps(_mm_loadu_ps(v + k), _mm_loadu_ps(lane + k)));
#else
  for (int j = 0; j < 16; ++j) lane[j] = v[j] > lane[j] ? v[j] : lane[j];
#endif
}
inline void lane_max16(double* __restrict lane, const double* __restrict v) {
  for (int j = 0; j < 16; ++j) lane[j] = v[j] > lane[j] ? v[j] : lane[j];
}


}  // namespace
}  // namespace rlfuse

// Each hot kernel file is compiled once per x86-64 ISA level with
// -DRLFUSE_ISA=<name>; kernels live in rlfuse::cpu::<name>, and
// csrc/cpu/dispatch.cpp picks one at run time from the CPU's features.
#ifndef RLFUSE_ISA
#define RLFUSE_ISA baseline
#endif
