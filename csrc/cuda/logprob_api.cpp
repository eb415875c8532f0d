// pybind11 entry points of the logprob family in rlfuse._cuda (host compiler).
#include <cstdint>

#include "api.h"

namespace py = pybind11;
using rlfuse::cuda_api::as_ptr;
using rlfuse::cuda_api::launch;

extern "C" {
int rlfuse_token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* ids, int ids_dtype, void* out_logp, void* out_entropy,
                              void* out_lse, double inv_temp, int64_t ignore_index, void* stream);
int rlfuse_token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* ids, int ids_dtype, const void* lse,
                              const void* entropy, const void* g_logp, const void* g_entropy,
                              void* dlogits, double inv_temp, int64_t ignore_index,
                              void* stream);
}

void rlfuse_bind_cuda_logprob(py::module_& m) {
  m.def(
      "token_logprobs_fwd",
      [](std::uint64_t logits, int dtype, std::int64_t n_outer, std::int64_t n_inner,
         std::int64_t stride_outer, std::int64_t stride_inner, std::int64_t V,
         std::uint64_t ids, int ids_dtype, std::uint64_t out_logp, std::uint64_t out_entropy,
         std::uint64_t out_lse, double inv_temp, std::int64_t ignore_index,
         std::uint64_t stream) {
        launch("token_logprobs_fwd", [&] {
          return rlfuse_token_logprobs_fwd(as_ptr(logits), dtype, n_outer, n_inner,
                                           stride_outer, stride_inner, V, as_ptr(ids),
                                           ids_dtype, as_ptr(out_logp), as_ptr(out_entropy),
                                           as_ptr(out_lse), inv_temp, ignore_index,
                                           as_ptr(stream));
        });
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_outer"), py::arg("n_inner"),
      py::arg("stride_outer"), py::arg("stride_inner"), py::arg("V"), py::arg("ids"),
      py::arg("ids_dtype"), py::arg("out_logp"), py::arg("out_entropy"), py::arg("out_lse"),
      py::arg("inv_temp"), py::arg("ignore_index"), py::arg("stream"),
      "Per-row token log-prob, entropy and logsumexp of logits * inv_temp.\n"
      "Row r (0 <= r < n_outer*n_inner) starts at element (r // n_inner)*stride_outer + "
      "(r % n_inner)*stride_inner and has V contiguous elements. Writes the contiguous [N] "
      "arrays out_logp, out_lse and (when out_entropy != 0) out_entropy; rows whose id equals "
      "ignore_index get zeros.");

  m.def(
      "token_logprobs_bwd",
      [](std::uint64_t logits, int dtype, std::int64_t n_outer, std::int64_t n_inner,
         std::int64_t stride_outer, std::int64_t stride_inner, std::int64_t V,
         std::uint64_t ids, int ids_dtype, std::uint64_t lse, std::uint64_t entropy,
         std::uint64_t g_logp, std::uint64_t g_entropy, std::uint64_t dlogits, double inv_temp,
         std::int64_t ignore_index, std::uint64_t stream) {
        launch("token_logprobs_bwd", [&] {
          return rlfuse_token_logprobs_bwd(as_ptr(logits), dtype, n_outer, n_inner,
                                           stride_outer, stride_inner, V, as_ptr(ids),
                                           ids_dtype, as_ptr(lse), as_ptr(entropy),
                                           as_ptr(g_logp), as_ptr(g_entropy), as_ptr(dlogits),
                                           inv_temp, ignore_index, as_ptr(stream));
        });
      },
      py::arg("logits"), py::arg("dtype"), py::arg("n_outer"), py::arg("n_inner"),
      py::arg("stride_outer"), py::arg("stride_inner"), py::arg("V"), py::arg("ids"),
      py::arg("ids_dtype"), py::arg("lse"), py::arg("entropy"), py::arg("g_logp"),
      py::arg("g_entropy"), py::arg("dlogits"), py::arg("inv_temp"), py::arg("ignore_index"),
      py::arg("stream"),
      "Gradient of sum(g_logp*logp + g_entropy*entropy) w.r.t. the logits. Writes every "
      "element of the contiguous [N, V] dlogits (logits dtype); ignored rows get zeros.");
}
