// The fused sampling of a decoding step (csrc/cpu/sample.cpp), declared for every ISA level.
#pragma once
#include <cstdint>

#include "isa.h"

#define RLFUSE_SAMPLE_DECLS(NS)                                                              \
  namespace rlfuse { namespace cpu { namespace NS {                                          \
  /* Rows r < R of float32 logits (row r at logits + r * stride): a row with done[r] == 0 */ \
  /* gets ids[r] sampled from softmax(x / T) at the uniform u[r]; a row with done[r] != 0 */  \
  /* gets ids[r] = pad_id (in [0, V)).  lp[r]: log softmax(x)[ids[r]] (raw logits). */       \
  void sample_logits_rows(const float* logits, int64_t stride, int64_t R, int64_t V,         \
                          const uint8_t* done, int64_t pad_id, const float* u,               \
                          double temperature, int64_t* ids, float* lp, int num_threads);     \
  } } }

RLFUSE_FOR_EACH_ISA(RLFUSE_SAMPLE_DECLS)
