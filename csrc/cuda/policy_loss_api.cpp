// pybind11 entry points of the policy_loss family in rlfuse._cuda (host compiler).  The
// argument arrays use the layout of csrc/cpu/policy_loss.h; pointers are device addresses
// (uint64 integers), the stream a uint64 handle.  Launches are asynchronous on that stream.
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "cpu/policy_loss.h"

namespace py = pybind11;
using rlfuse::cuda_api::as_ptr;
using rlfuse::cuda_api::launch;

extern "C" {
int rlfuse_policy_loss_rows(const int64_t* ia, const double* fa, const void* cpg,
                            const void* xs, void* rows, void* stream);
int rlfuse_value_loss_rows(const int64_t* ia, const double* fa, const void* coef, void* rows,
                           void* stream);
int rlfuse_kl_penalty(const int64_t* ia, const double* fa, void* stream);
}

namespace {

void check_len(const char* fn, const std::vector<int64_t>& ia, size_t ni,
               const std::vector<double>& fa, size_t nf) {
  if (ia.size() != ni || fa.size() != nf)
    throw std::invalid_argument(std::string("rlfuse._cuda.") + fn + ": expected " +
                                std::to_string(ni) + " int and " + std::to_string(nf) +
                                " float arguments, got " + std::to_string(ia.size()) + " and " +
                                std::to_string(fa.size()));
}

}  // namespace

void rlfuse_bind_cuda_policy_loss(py::module_& m) {
  using namespace rlfuse::cpu::pl;
  m.def(
      "policy_loss_rows",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa, std::uint64_t cpg,
         std::uint64_t xs, std::uint64_t rows, std::uint64_t stream) {
        check_len("policy_loss_rows", ia, kNumPolicyI, fa, kNumPolicyF);
        launch("policy_loss_rows", [&] {
          return rlfuse_policy_loss_rows(ia.data(), fa.data(), as_ptr(cpg), as_ptr(xs),
                                         as_ptr(rows), as_ptr(stream));
        });
      },
      py::arg("iargs"), py::arg("fargs"), py::arg("cpg"), py::arg("xs"), py::arg("rows"),
      py::arg("stream"),
      "Fused policy loss, one block per row: writes d(loss)/d(logp) (times c_i) and "
      "rows[B, 12] (the row sums, the GSPO coupling sum and the count of non-finite "
      "advantages under the mask).");
  m.def(
      "value_loss_rows",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa, std::uint64_t coef,
         std::uint64_t rows, std::uint64_t stream) {
        check_len("value_loss_rows", ia, kNumValueI, fa, kNumValueF);
        launch("value_loss_rows", [&] {
          return rlfuse_value_loss_rows(ia.data(), fa.data(), as_ptr(coef), as_ptr(rows),
                                        as_ptr(stream));
        });
      },
      py::arg("iargs"), py::arg("fargs"), py::arg("coef"), py::arg("rows"), py::arg("stream"),
      "Clipped value loss, one block per row: writes the gradient and rows[B, 3].");
  m.def(
      "kl_penalty",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa, std::uint64_t stream) {
        check_len("kl_penalty", ia, kNumKlI, fa, kNumKlF);
        launch("kl_penalty",
               [&] { return rlfuse_kl_penalty(ia.data(), fa.data(), as_ptr(stream)); });
      },
      py::arg("iargs"), py::arg("fargs"), py::arg("stream"),
      "KL estimate (forward) or grad_out * d(estimate)/d(logp) (backward), elementwise.");
}
