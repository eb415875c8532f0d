// pybind11 entry point of the preference family in rlfuse._C (compiled once; the kernel
// behind it is per-ISA, see isa.h).  Arguments arrive as two lists (int64 and double) whose
// layout is in cpu/preference.h; pointers are integers from tensor.data_ptr().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/api_checks.h"
#include "cpu/preference.h"

namespace py = pybind11;

void rlfuse_bind_preference(py::module_& m) {
  using namespace rlfuse::cpu::pref;
  m.def(
      "preference_loss_fwd",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        if (ia.size() < size_t(kNumPrefIFixed) || fa.size() < size_t(kNumPrefFFixed))
          throw std::invalid_argument("rlfuse._C.preference_loss_fwd: argument lists too short");
        const int64_t K = ia[kNumTypes];
        if (K < 0 || ia.size() != size_t(kNumPrefIFixed + K) ||
            fa.size() != size_t(kNumPrefFFixed + K))
          throw std::invalid_argument(
              "rlfuse._C.preference_loss_fwd: expected " + std::to_string(kNumPrefIFixed) +
              " + K int and " + std::to_string(kNumPrefFFixed) + " + K float arguments (K = " +
              std::to_string(K) + " loss types), got " + std::to_string(ia.size()) + " and " +
              std::to_string(fa.size()));
        for (int64_t k = 0; k < K; ++k)
          if (ia[kTypes + k] < 0 || ia[kTypes + k] >= kNumLossTypes)
            throw std::invalid_argument("rlfuse._C.preference_loss_fwd: bad loss-type code");
        using rlfuse::cpu::require_data;
        require_data("preference_loss_fwd", "chosen_logps", uint64_t(ia[kC]), ia[kP] > 0);
        require_data("preference_loss_fwd", "rejected_logps", uint64_t(ia[kR]), ia[kP] > 0);
        require_data("preference_loss_fwd", "the loss output", uint64_t(ia[kLossOut]));
        require_data("preference_loss_fwd", "the stats output", uint64_t(ia[kStatsOut]),
                     ia[kP] > 0);
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(preference_loss_fwd, ia.data(), fa.data());
      },
      "Per-pair preference loss (see cpu/preference.h for the argument layout): writes the "
      "loss, d loss / d chosen, d loss / d rejected and the statistics.");
}
