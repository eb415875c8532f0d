// Shared by the pybind11 side of rlfuse._cuda (bind_cuda.cpp and csrc/cuda/<family>_api.cpp),
// compiled by the host compiler: pointer conversion and CUDA error reporting.  Kernels and
// their extern "C" launchers live in csrc/cuda/<family>.cu (no pybind11 there).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

extern "C" {
int rlfuse_cuda_device_count();
const char* rlfuse_cuda_last_error();
}

namespace rlfuse {
namespace cuda_api {

inline void* as_ptr(std::uint64_t p) {
  return reinterpret_cast<void*>(static_cast<std::uintptr_t>(p));
}

[[noreturn]] inline void raise_cuda_error(const char* what, int code) {
  const char* msg = rlfuse_cuda_last_error();
  throw std::runtime_error(std::string("rlfuse._cuda.") + what + " failed: " +
                           (msg != nullptr ? msg : "unknown error") + " (cudaError " +
                           std::to_string(code) + ")");
}

// Runs a launcher with the GIL released and raises on a nonzero return code.
template <typename F>
inline void launch(const char* what, F&& f) {
  int rc = 0;
  {
    pybind11::gil_scoped_release nogil;
    rc = f();
  }
  if (rc != 0) raise_cuda_error(what, rc);
}

}  // namespace cuda_api
}  // namespace rlfuse
