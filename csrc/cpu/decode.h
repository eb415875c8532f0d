// One-token decode steps of a Llama-family attention block (csrc/cpu/decode.cpp),
// declared for every ISA level.  Used by python/rlfuse/models/decode.py, which checks
// shapes, strides and dtypes (float32 only) before every call.
#pragma once
#include <cstdint>

#include "isa.h"

namespace rlfuse {
namespace cpu {

struct DecodeAttnArgs {
  // the new token's projections, row b at q + b * q_stride (nh heads of hd), likewise k, v
  // (nkv heads each); may be slices of one fused [B, (nh + 2 nkv) hd] tensor
  const float* q;
  const float* k;
  const float* v;
  int64_t q_stride, k_stride, v_stride;
  // rotary tables [N, hd] (row stride cs_stride) and each row's position (an index into
  // them, checked against N by the entry point)
  const float* cos;
  const float* sin;
  int64_t cs_stride;
  const int64_t* pos;
  // per-head RMSNorm weights [hd] applied to q and k before the rotary (Qwen3's q_norm /
  // k_norm), or null
  const float* q_norm;
  const float* k_norm;
  float norm_eps;
  // KV buffers, contiguous: keys transposed [B, nkv, hd, C], values [B, nkv, C, hd], C a
  // multiple of 64 (the mask too has C columns); the step writes column L and attends
  // columns 0 .. L
  float* kbuf;
  float* vbuf;
  // padding mask [B, C] (uint8, row stride mask_stride; the kernel reads the 64-column
  // blocks up to column L): nonzero = attended
  const uint8_t* mask;
  int64_t mask_stride;
  // output [B, nh * hd], row stride out_stride
  float* out;
  int64_t out_stride;
  int64_t B, nh, nkv, hd, C, L;
  float scale;
  int num_threads;
};

#define RLFUSE_DECL_DECODE(isa)                                                        \
  namespace isa {                                                                      \
  void decode_attention(const DecodeAttnArgs& a);                                      \
  void silu_mul(const float* g, const float* u, int64_t g_stride, int64_t u_stride,   \
                float* out, int64_t out_stride, int64_t B, int64_t n, int num_threads); \
  void rms_norm(const float* x, int64_t x_stride, const float* w, float eps, float* out,  \
                int64_t out_stride, int64_t B, int64_t n, int num_threads);            \
  }
RLFUSE_FOR_EACH_ISA(RLFUSE_DECL_DECODE)
#undef RLFUSE_DECL_DECODE

}  // namespace cpu
}  // namespace rlfuse
