// Checks shared by the pybind11 entry points (csrc/cpu/*_api.cpp).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rlfuse {
namespace cpu {

// A tensor without storage (a 'meta' tensor, a FakeTensor under FakeTensorMode) hands
// data_ptr() == 0 to the kernels.  The Python layer routes such inputs to the registered
// torch.library ops; this is the last line: raise (ValueError in Python, pybind11 maps
// std::invalid_argument) instead of reading or writing through a null pointer.  `needed`
// is false where the tensor is legitimately empty (data_ptr() of an empty tensor is 0).
inline void require_data(const char* fn, const char* what, uint64_t p, bool needed = true) {
  if (p == 0 && needed)
    throw std::invalid_argument(std::string("rlfuse._C.") + fn + ": " + what +
                                " has no data (data_ptr() == 0: a meta or fake tensor?); the "
                                "CPU kernels need tensors with storage");
}

}  // namespace cpu
}  // namespace rlfuse
