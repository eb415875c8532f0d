// pybind11 entry points of the decode-step kernels in rlfuse._C (compiled once; the
// kernels are per-ISA, see decode.h).  Pointers arrive as integers; the caller
// (python/rlfuse/models/decode.py) has validated shapes, strides and dtypes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/decode.h"

namespace py = pybind11;

namespace {
template <class T>
inline T* ptr(uint64_t p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }
}  // namespace

void rlfuse_bind_decode(py::module_& m) {
  m.def(
      "decode_attention",
      [](uint64_t q, uint64_t k, uint64_t v, int64_t q_stride, int64_t k_stride,
         int64_t v_stride, uint64_t cos, uint64_t sin, int64_t cs_stride, uint64_t pos,
         uint64_t q_norm, uint64_t k_norm, double norm_eps, int64_t table_rows, uint64_t kbuf,
         uint64_t vbuf, uint64_t mask, int64_t mask_stride, uint64_t out, int64_t out_stride, int64_t B, int64_t nh, int64_t nkv, int64_t hd, int64_t C,
         int64_t L, double scale, int num_threads) {
        rlfuse::cpu::DecodeAttnArgs a{ptr<const float>(q), ptr<const float>(k),
                                      ptr<const float>(v), q_stride, k_stride, v_stride,
                                      ptr<const float>(cos), ptr<const float>(sin), cs_stride,
                                      ptr<const int64_t>(pos), ptr<const float>(q_norm),
                                      ptr<const float>(k_norm), static_cast<float>(norm_eps),
                                      ptr<float>(kbuf),
                                      ptr<float>(vbuf), ptr<const uint8_t>(mask), mask_stride,
                                      ptr<float>(out), out_stride, B, nh, nkv, hd, C, L,
                                      static_cast<float>(scale), num_threads};
        if (C % 64 != 0 || L < 0 || L >= C || nkv < 1 || nh % nkv != 0 || hd < 2 || hd % 2)
          throw std::invalid_argument("decode_attention: bad sizes");
        const int64_t* p = ptr<const int64_t>(pos);
        for (int64_t b = 0; b < B; ++b)
          if (p[b] < 0 || p[b] >= table_rows)
            throw std::invalid_argument("decode_attention: position " + std::to_string(p[b]) +
                                        " of row " + std::to_string(b) +
                                        " is outside the rotary table (" +
                                        std::to_string(table_rows) + " rows)");
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(decode_attention, a);
      },
      "One-token attention step with rotary and KV-buffer write (float32; validated in "
      "rlfuse.models.decode).");
  m.def(
      "silu_mul",
      [](uint64_t g, uint64_t u, int64_t g_stride, int64_t u_stride, uint64_t out,
         int64_t out_stride, int64_t B, int64_t n, int num_threads) {
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(silu_mul, ptr<const float>(g), ptr<const float>(u), g_stride, u_stride,
                        ptr<float>(out), out_stride, B, n, num_threads);
      },
      "out = silu(g) * u over [B, n] float32 rows.");
  m.def(
      "rms_norm",
      [](uint64_t x, int64_t x_stride, uint64_t w, double eps, uint64_t out, int64_t out_stride,
         int64_t B, int64_t n, int num_threads) {
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(rms_norm, ptr<const float>(x), x_stride, ptr<const float>(w),
                        static_cast<float>(eps), ptr<float>(out), out_stride, B, n, num_threads);
      },
      "out = w * (x / sqrt(mean(x^2) + eps)) over [B, n] float32 rows.");
}
