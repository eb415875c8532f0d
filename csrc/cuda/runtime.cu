// Process-wide pieces of rlfuse._cuda shared by every op family: device count and the
// per-thread message of the last failed launcher call.
#include <cuda_runtime.h>

#include "rlfuse/cuda_utils.cuh"

namespace {
// A GNU __thread variable with the global-dynamic TLS model keeps this object linkable
// into a shared library even when compiled as PIE without -fPIC; nvcc's front end
// accepts the tls_model attribute only on __thread.
#if defined(__GNUC__) && !defined(__CUDA_ARCH__)
__thread const char* tls_last_error __attribute__((tls_model("global-dynamic"))) = "no error";
#else
thread_local const char* tls_last_error = "no error";
#endif
}  // namespace

extern "C" {

int rlfuse_cuda_fail(int err, const char* msg) {
  tls_last_error = msg != nullptr ? msg : cudaGetErrorString(static_cast<cudaError_t>(err));
  return err;
}

// Number of visible CUDA devices; 0 when there is no device or no (sufficient) driver; a
// negative cudaError_t value on any other failure.
int rlfuse_cuda_device_count() {
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess) return n;
  (void)cudaGetLastError();  // do not leave the error behind for the next launch
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) return 0;
  rlfuse_cuda_fail(static_cast<int>(err), cudaGetErrorString(err));
  return -static_cast<int>(err);
}

// Message for the calling thread's last failed rlfuse launcher call (static storage).
const char* rlfuse_cuda_last_error() { return tls_last_error; }

}  // extern "C"
