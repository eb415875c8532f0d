// pybind11 entry point of the preference family in rlfuse._cuda (host compiler).  The
// argument arrays use the layout of csrc/cpu/preference.h; pointers are device addresses
// (uint64 integers), the stream a uint64 handle.  The launch is asynchronous on that stream.
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "cpu/preference.h"

namespace py = pybind11;
using rlfuse::cuda_api::as_ptr;
using rlfuse::cuda_api::launch;

extern "C" int rlfuse_preference_loss(const int64_t* ia, const double* fa, void* stream);

void rlfuse_bind_cuda_preference(py::module_& m) {
  using namespace rlfuse::cpu::pref;
  m.def(
      "preference_loss",
      [](const std::vector<int64_t>& ia, const std::vector<double>& fa, std::uint64_t stream) {
        if (ia.size() < size_t(kNumPrefIFixed) || fa.size() < size_t(kNumPrefFFixed))
          throw std::invalid_argument("rlfuse._cuda.preference_loss: argument lists too short");
        const int64_t K = ia[kNumTypes];
        if (K < 0 || ia.size() != size_t(kNumPrefIFixed + K) ||
            fa.size() != size_t(kNumPrefFFixed + K))
          throw std::invalid_argument("rlfuse._cuda.preference_loss: expected " +
                                      std::to_string(kNumPrefIFixed) + " + K int and " +
                                      std::to_string(kNumPrefFFixed) + " + K float arguments");
        for (int64_t k = 0; k < K; ++k)
          if (ia[kTypes + k] < 0 || ia[kTypes + k] >= kNumLossTypes)
            throw std::invalid_argument("rlfuse._cuda.preference_loss: bad loss-type code");
        launch("preference_loss",
               [&] { return rlfuse_preference_loss(ia.data(), fa.data(), as_ptr(stream)); });
      },
      py::arg("iargs"), py::arg("fargs"), py::arg("stream"),
      "Per-pair preference loss, one block: writes the loss, d loss / d chosen, "
      "d loss / d rejected and the statistics [5, P].");
}
