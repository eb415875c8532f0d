// pybind11 module rlfuse._cuda.  Each op family registers its launchers from its own
// csrc/cuda/<family>_api.cpp (host compiler); kernels and extern "C" launchers are in
// csrc/cuda/<family>.cu.  Device pointers and streams travel as uint64 integers; all CUDA
// runtime calls stay in the .cu files.
#include "cuda/api.h"

namespace py = pybind11;

// One line per op family.
void rlfuse_bind_cuda_logprob(py::module_& m);
void rlfuse_bind_cuda_advantage(py::module_& m);
void rlfuse_bind_cuda_policy_loss(py::module_& m);
void rlfuse_bind_cuda_tree(py::module_& m);
void rlfuse_bind_cuda_preference(py::module_& m);

PYBIND11_MODULE(_cuda, m) {
  m.doc() =
      "rlfuse CUDA backend (raw-pointer launchers; use rlfuse.ops instead).\n"
      "Tensors travel as device addresses (uint64, 0 for an absent optional tensor) and the "
      "stream as a uint64 handle. Launches are asynchronous on that stream and run on the "
      "calling thread's current CUDA device. The caller validates shapes, dtypes, devices "
      "and ids. Errors raise RuntimeError. Dtype codes: 0=float32, 1=float16, 2=bfloat16, "
      "3=float64; id codes: 0=int32, 1=int64.";

  m.def(
      "device_count",
      [] {
        const int n = rlfuse_cuda_device_count();
        if (n < 0) rlfuse::cuda_api::raise_cuda_error("device_count", -n);
        return n;
      },
      "Number of visible CUDA devices (0 when there is no device or no driver).");

  rlfuse_bind_cuda_logprob(m);
  rlfuse_bind_cuda_advantage(m);
  rlfuse_bind_cuda_policy_loss(m);
  rlfuse_bind_cuda_tree(m);
  rlfuse_bind_cuda_preference(m);
}
