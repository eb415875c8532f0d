// pybind11 module rlfuse._C: thin wrappers over the CPU kernels.  Pointers
// arrive as integers (data_ptr() on the Python side); Python validates shapes,
// dtypes and strides before any call.  The GIL is released while kernels run.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/kernels.h"

namespace py = pybind11;

namespace {

inline const void* cptr(uint64_t p) { return reinterpret_cast<const void*>(p); }
inline void* mptr(uint64_t p) { return reinterpret_cast<void*>(p); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rlfuse CPU kernels (raw-pointer interface; use rlfuse.ops instead)";

  m.def("active_isa", &rlfuse::cpu::active_isa,
        "The x86-64 ISA level the CPU kernels run at.");
  m.def("set_isa", [](const std::string& name) { return rlfuse::cpu::set_isa(name.c_str()); },
        py::arg("name"), "Force an ISA level; returns False if this CPU lacks it.");
  m.def("openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });

  m.def(
      "token_logprobs_fwd",
      [](uint64_t logits, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
         int64_t stride_inner, int64_t V, uint64_t ids, int ids_dtype, uint64_t out_lp,
         uint64_t out_ent, uint64_t out_lse, double inv_temp, int64_t ignore_index,
         int num_threads) {
        py::gil_scoped_release release;
        return rlfuse::cpu::token_logprobs_fwd(cptr(logits), dtype, n_outer, n_inner,
                                               stride_outer, stride_inner, V, cptr(ids),
                                               ids_dtype, mptr(out_lp), mptr(out_ent),
                                               mptr(out_lse), inv_temp, ignore_index,
                                               num_threads);
      },
      "Forward; returns the first row whose id is out of range, or -1.");
  m.def(
      "token_logprobs_bwd",
      [](uint64_t logits, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
         int64_t stride_inner, int64_t V, uint64_t ids, int ids_dtype, uint64_t lse,
         uint64_t ent, uint64_t g_lp, uint64_t g_ent, uint64_t dlogits, double inv_temp,
         int64_t ignore_index, int num_threads) {
        py::gil_scoped_release release;
        rlfuse::cpu::token_logprobs_bwd(cptr(logits), dtype, n_outer, n_inner, stride_outer,
                                        stride_inner, V, cptr(ids), ids_dtype, cptr(lse),
                                        cptr(ent), cptr(g_lp), cptr(g_ent), mptr(dlogits),
                                        inv_temp, ignore_index, num_threads);
      },
      "Backward: writes dlogits (contiguous [N, V], logits dtype).");
}
