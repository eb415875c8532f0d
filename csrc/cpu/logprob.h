// Token log-probs + entropy (csrc/cpu/logprob.cpp), declared for every ISA level.
#pragma once
#include <cstdint>

#include "isa.h"

#define RLFUSE_LOGPROB_DECLS(NS)                                                             \
  namespace rlfuse { namespace cpu { namespace NS {                                          \
  /* Returns the first row whose id is outside [0, V) (and not ignore_index), or -1. */     \
  int64_t token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer,                 \
                             int64_t n_inner, int64_t stride_outer, int64_t stride_inner,    \
                             int64_t V, const void* ids, int ids_dtype, void* out_lp,        \
                             void* out_ent, void* out_lse, double inv_temp,                  \
                             int64_t ignore_index, int num_threads);                         \
  void token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,   \
                          int64_t stride_outer, int64_t stride_inner, int64_t V,             \
                          const void* ids, int ids_dtype, const void* lse, const void* ent,  \
                          const void* g_lp, const void* g_ent, void* dlogits,                \
                          double inv_temp, int64_t ignore_index, int num_threads);           \
  } } }

RLFUSE_FOR_EACH_ISA(RLFUSE_LOGPROB_DECLS)
