// pybind11 entry points of the policy_loss family in rlfuse._C (compiled once; the kernels
// behind them are per-ISA, see isa.h).  Arguments arrive as two lists (int64 and double)
// whose layout is in cpu/policy_loss.h; pointers are integers from tensor.data_ptr().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/api_checks.h"
#include "cpu/policy_loss.h"

namespace py = pybind11;

namespace {

void check_len(const char* fn, const std::vector<int64_t>& ia, size_t ni,
               const std::vector<double>& fa, size_t nf) {
  if (ia.size() != ni || fa.size() != nf)
    throw std::invalid_argument(std::string("rlfuse._C.") + fn + ": expected " +
                                std::to_string(ni) + " int and " + std::to_string(nf) +
                                " float arguments, got " + std::to_string(ia.size()) + " and " +
                                std::to_string(fa.size()));
}

}  // namespace

void rlfuse_bind_policy_loss(py::module_& m) {
  using namespace rlfuse::cpu::pl;
  m.def(
      "policy_loss_fwd",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        check_len("policy_loss_fwd", ia, kNumPolicyI, fa, kNumPolicyF);
        rlfuse::cpu::require_data("policy_loss_fwd", "logp", uint64_t(ia[kLp]),
                                  ia[kB] > 0 && ia[kT] > 0);
        rlfuse::cpu::require_data("policy_loss_fwd", "the loss output", uint64_t(ia[kLossOut]));
        rlfuse::cpu::require_data("policy_loss_fwd", "the stats output",
                                  uint64_t(ia[kStatsOut]));
        std::array<int64_t, 3> err{0, -1, -1};
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(policy_loss_fwd, ia.data(), fa.data(), err.data());
        }
        return err;
      },
      "Fused policy loss (see cpu/policy_loss.h for the argument layout). Returns "
      "[error code, row, token]: 0 ok, 1 mask value other than 0/1, 2 non-finite advantage "
      "under the mask.");
  m.def(
      "value_loss_fwd",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        check_len("value_loss_fwd", ia, kNumValueI, fa, kNumValueF);
        rlfuse::cpu::require_data("value_loss_fwd", "values", uint64_t(ia[kVVal]),
                                  ia[kVB] > 0 && ia[kVT] > 0);
        rlfuse::cpu::require_data("value_loss_fwd", "the loss output", uint64_t(ia[kVLossOut]));
        rlfuse::cpu::require_data("value_loss_fwd", "the stats output",
                                  uint64_t(ia[kVStatsOut]));
        std::array<int64_t, 3> err{0, -1, -1};
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(value_loss_fwd, ia.data(), fa.data(), err.data());
        }
        return err;
      },
      "Clipped value loss; returns [error code, row, token] like policy_loss_fwd.");
  m.def(
      "kl_penalty",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        check_len("kl_penalty", ia, kNumKlI, fa, kNumKlF);
        const bool work = ia[kKR] > 0 && ia[kKC] > 0;
        rlfuse::cpu::require_data("kl_penalty", "logp", uint64_t(ia[kKLp]), work);
        rlfuse::cpu::require_data("kl_penalty", "ref_logp", uint64_t(ia[kKRef]), work);
        rlfuse::cpu::require_data("kl_penalty", "the output", uint64_t(ia[kKOut]), work);
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(kl_penalty_run, ia.data(), fa.data());
      },
      "KL estimate (forward) or grad_out * d(estimate)/d(logp) (backward), elementwise.");
}
