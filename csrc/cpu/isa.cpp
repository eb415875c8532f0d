// Which ISA level the CPU kernels run at: chosen once from the CPU's features.
#include "isa.h"

#include <cstdlib>
#include <cstring>
#include <initializer_list>

namespace rlfuse {
namespace cpu {
namespace {

bool cpu_has(Level l) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  // GCC 12 checks a whole level (every feature -march=x86-64-vN may use, and the OS's
  // support for the wider registers)
  switch (l) {
    case kV2: return __builtin_cpu_supports("x86-64-v2");
    case kV3: return __builtin_cpu_supports("x86-64-v3");
    case kV4: return __builtin_cpu_supports("x86-64-v4");
    default: return false;
  }
#else
  // older compilers: the features the kernels' code generation is known to use at each
  // level (a compiler may still emit another of the level's instructions)
  switch (l) {
    case kV2:
      return __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt") &&
             __builtin_cpu_supports("ssse3");
    case kV3:
      return cpu_has(kV2) && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case kV4:
      return cpu_has(kV3) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd");
    default:
      return false;
  }
#endif
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
#if defined(__x86_64__) || defined(_M_X64)
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
  static Level lvl = best_level();
  return lvl;
}

}  // namespace

Level level() { return current(); }

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

}  // namespace cpu
}  // namespace rlfuse
