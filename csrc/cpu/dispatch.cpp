// Run-time ISA dispatch for the CPU kernels, as PyTorch and numpy do: the
// kernels are built for several x86-64 levels and the best one the CPU
// supports is chosen once, at first use.  RLFUSE_CPU_ISA overrides it.
#include "kernels.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

#if defined(__x86_64__) || defined(_M_X64)
#define RLFUSE_X86 1
RLFUSE_CPU_KERNELS(x86_64_v2)
RLFUSE_CPU_KERNELS(x86_64_v3)
RLFUSE_CPU_KERNELS(x86_64_v4)
#else
RLFUSE_CPU_KERNELS(baseline)
#endif

namespace rlfuse {
namespace cpu {
namespace {

enum Level { kV2 = 0, kV3 = 1, kV4 = 2, kBaseline = 3 };

bool cpu_has(Level l) {
#ifdef RLFUSE_X86
  __builtin_cpu_init();
  switch (l) {
    case kV2:
      return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt");
    case kV3:
      return cpu_has(kV2) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi2");
    case kV4:
      return cpu_has(kV3) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
    default:
      return false;
  }
#else
  return l == kBaseline;
#endif
}

const char* level_name(Level l) {
  switch (l) {
    case kV2: return "x86-64-v2";
    case kV3: return "x86-64-v3";
    case kV4: return "x86-64-v4";
    default: return "baseline";
  }
}

Level best_level() {
#ifdef RLFUSE_X86
  if (const char* env = std::getenv("RLFUSE_CPU_ISA")) {
    for (Level l : {kV2, kV3, kV4})
      if (std::strcmp(env, level_name(l)) == 0 && cpu_has(l)) return l;
  }
  if (cpu_has(kV4)) return kV4;
  if (cpu_has(kV3)) return kV3;
  return kV2;
#else
  return kBaseline;
#endif
}

Level& current() {
  static Level level = best_level();
  return level;
}

}  // namespace

const char* active_isa() { return level_name(current()); }

bool set_isa(const char* name) {
  for (Level l : {kV2, kV3, kV4, kBaseline}) {
    if (std::strcmp(name, level_name(l)) == 0 && cpu_has(l)) {
      current() = l;
      return true;
    }
  }
  return false;
}

#ifdef RLFUSE_X86
#define RLFUSE_DISPATCH(fn, ...)                                   \
  switch (current()) {                                             \
    case kV4: return x86_64_v4::fn(__VA_ARGS__);                   \
    case kV3: return x86_64_v3::fn(__VA_ARGS__);                   \
    default: return x86_64_v2::fn(__VA_ARGS__);                    \
  }
#else
#define RLFUSE_DISPATCH(fn, ...) return baseline::fn(__VA_ARGS__);
#endif

int64_t token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                           int64_t stride_outer, int64_t stride_inner, int64_t V,
                           const void* ids, int ids_dtype, void* out_lp, void* out_ent,
                           void* out_lse, double inv_temp, int64_t ignore_index,
                           int num_threads) {
  RLFUSE_DISPATCH(token_logprobs_fwd, logits, dtype, n_outer, n_inner, stride_outer,
                  stride_inner, V, ids, ids_dtype, out_lp, out_ent, out_lse, inv_temp,
                  ignore_index, num_threads)
}

void token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                        int64_t stride_outer, int64_t stride_inner, int64_t V, const void* ids,
                        int ids_dtype, const void* lse, const void* ent, const void* g_lp,
                        const void* g_ent, void* dlogits, double inv_temp,
                        int64_t ignore_index, int num_threads) {
  RLFUSE_DISPATCH(token_logprobs_bwd, logits, dtype, n_outer, n_inner, stride_outer,
                  stride_inner, V, ids, ids_dtype, lse, ent, g_lp, g_ent, dlogits, inv_temp,
                  ignore_index, num_threads)
}

}  // namespace cpu
}  // namespace rlfuse
