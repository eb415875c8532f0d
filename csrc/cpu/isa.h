// Run-time ISA dispatch for the CPU kernels, as PyTorch and numpy do.
//
// Every hot kernel file csrc/cpu/<family>.cpp is compiled once per x86-64 level with
// -DRLFUSE_ISA=<namespace> (see CMakeLists.txt), so its kernels exist as
// rlfuse::cpu::x86_64_v2::f, ...::x86_64_v3::f and ...::x86_64_v4::f.  A family header
// declares them for every level with RLFUSE_FOR_EACH_ISA, and the family's *_api.cpp
// (compiled once) calls them through RLFUSE_ISA_CALL, which picks the level chosen at
// first use from the CPU's features (RLFUSE_CPU_ISA overrides it).
#pragma once

namespace rlfuse {
namespace cpu {

enum Level : int { kV2 = 0, kV3 = 1, kV4 = 2, kBaseline = 3 };

Level level();             // the level in use
const char* active_isa();  // its name: "x86-64-v4", "x86-64-v3", "x86-64-v2" or "baseline"
bool set_isa(const char* name);  // force a level; false if this CPU lacks it

}  // namespace cpu
}  // namespace rlfuse

#if defined(__x86_64__) || defined(_M_X64)
#define RLFUSE_FOR_EACH_ISA(X) X(x86_64_v2) X(x86_64_v3) X(x86_64_v4)
#define RLFUSE_ISA_CALL(fn, ...)                                                         \
  (::rlfuse::cpu::level() == ::rlfuse::cpu::kV4   ? ::rlfuse::cpu::x86_64_v4::fn(__VA_ARGS__) \
   : ::rlfuse::cpu::level() == ::rlfuse::cpu::kV3 ? ::rlfuse::cpu::x86_64_v3::fn(__VA_ARGS__) \
                                                  : ::rlfuse::cpu::x86_64_v2::fn(__VA_ARGS__))
#else
#define RLFUSE_FOR_EACH_ISA(X) X(baseline)
#define RLFUSE_ISA_CALL(fn, ...) (::rlfuse::cpu::baseline::fn(__VA_ARGS__))
#endif
