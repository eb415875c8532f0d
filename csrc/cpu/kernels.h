// Declarations of the CPU kernels.  Every hot kernel is compiled once per ISA
// level into rlfuse::cpu::<isa>; RLFUSE_CPU_KERNELS(ns) declares one set, and
// dispatch.cpp routes each call to the best set this CPU supports.
#pragma once
#include <cstdint>

#define RLFUSE_CPU_KERNELS(NS)                                                               \
  namespace rlfuse { namespace cpu { namespace NS {                                          \
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

namespace rlfuse {
namespace cpu {

// The ISA level chosen at run time: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2+FMA),
// "x86-64-v2" (SSE4.2), or "baseline" on other architectures.
const char* active_isa();
// Force a level (for tests and benchmarks); returns false if the CPU lacks it.
bool set_isa(const char* name);

int64_t token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                           int64_t stride_outer, int64_t stride_inner, int64_t V,
                           const void* ids, int ids_dtype, void* out_lp, void* out_ent,
                           void* out_lse, double inv_temp, int64_t ignore_index,
                           int num_threads);
void token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                        int64_t stride_outer, int64_t stride_inner, int64_t V, const void* ids,
                        int ids_dtype, const void* lse, const void* ent, const void* g_lp,
                        const void* g_ent, void* dlogits, double inv_temp,
                        int64_t ignore_index, int num_threads);

}  // namespace cpu
}  // namespace rlfuse
