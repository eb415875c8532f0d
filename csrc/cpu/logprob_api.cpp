// pybind11 entry points of the logprob family in rlfuse._C (compiled once; the
// kernels behind them are per-ISA, see isa.h).
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/api_checks.h"
#include "cpu/logprob.h"
#include "cpu/memory.h"

namespace py = pybind11;

namespace {
inline const void* cptr(uint64_t p) { return reinterpret_cast<const void*>(p); }
inline void* mptr(uint64_t p) { return reinterpret_cast<void*>(p); }
}  // namespace

void rlfuse_bind_logprob(py::module_& m) {
  m.def(
      "token_logprobs_fwd",
      [](uint64_t logits, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
         int64_t stride_inner, int64_t V, uint64_t ids, int ids_dtype, uint64_t out_lp,
         uint64_t out_ent, uint64_t out_lse, double inv_temp, int64_t ignore_index,
         int num_threads) {
        using rlfuse::cpu::require_data;
        const bool work = n_outer > 0 && n_inner > 0 && V > 0;
        require_data("token_logprobs_fwd", "logits", logits, work);
        require_data("token_logprobs_fwd", "token_ids", ids, work);
        require_data("token_logprobs_fwd", "the log-prob output", out_lp, work);
        require_data("token_logprobs_fwd", "the lse output", out_lse, work);
        py::gil_scoped_release release;
        return RLFUSE_ISA_CALL(token_logprobs_fwd, cptr(logits), dtype, n_outer, n_inner,
                               stride_outer, stride_inner, V, cptr(ids), ids_dtype,
                               mptr(out_lp), mptr(out_ent), mptr(out_lse), inv_temp,
                               ignore_index, num_threads);
      },
      "Forward; returns the first row whose id is out of range, or -1.");
  m.def(
      "token_logprobs_bwd",
      [](uint64_t logits, int dtype, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
         int64_t stride_inner, int64_t V, uint64_t ids, int ids_dtype, uint64_t lse,
         uint64_t ent, uint64_t g_lp, uint64_t g_ent, uint64_t dlogits, double inv_temp,
         int64_t ignore_index, int num_threads) {
        using rlfuse::cpu::require_data;
        const bool work = n_outer > 0 && n_inner > 0 && V > 0;
        require_data("token_logprobs_bwd", "logits", logits, work);
        require_data("token_logprobs_bwd", "token_ids", ids, work);
        require_data("token_logprobs_bwd", "lse", lse, work);
        require_data("token_logprobs_bwd", "the dlogits output", dlogits, work);
        py::gil_scoped_release release;
        static const size_t kElem[] = {4, 2, 2, 8};
        if (dtype >= 0 && dtype <= 3 && n_outer > 0 && n_inner > 0 && V > 0)
          rlfuse::cpu::advise_huge_pages(mptr(dlogits),
                                         size_t(n_outer * n_inner) * size_t(V) * kElem[dtype]);
        RLFUSE_ISA_CALL(token_logprobs_bwd, cptr(logits), dtype, n_outer, n_inner,
                        stride_outer, stride_inner, V, cptr(ids), ids_dtype, cptr(lse),
                        cptr(ent), cptr(g_lp), cptr(g_ent), mptr(dlogits), inv_temp,
                        ignore_index, num_threads);
      },
      "Backward: writes dlogits (contiguous [N, V], logits dtype).");
}
