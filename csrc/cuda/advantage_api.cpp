// pybind11 entry points of the advantage family in rlfuse._cuda (host compiler).  Kernels and
// launchers are in csrc/cuda/advantage.cu; device pointers and the stream arrive as uint64
// (0 = absent).  The Python side (rlfuse/ops/advantage.py) validates every input first.
#include <cstdint>

#include "api.h"

namespace py = pybind11;
using rlfuse::cuda_api::as_ptr;
using rlfuse::cuda_api::launch;
using u64 = std::uint64_t;
using i64 = std::int64_t;

extern "C" {
int rlfuse_gae_fwd(int dtype, int64_t S, int64_t T, const void* cu, const void* r, int64_t r_s0,
                   int64_t r_s1, const void* v, int64_t v_s0, int64_t v_s1, const void* m,
                   int64_t m_s0, int64_t m_s1, const void* lv, int64_t lv_s, double gamma,
                   double lam, int zero, void* adv, void* ret, void* stream);
int rlfuse_masked_row_stats(int dtype, int64_t R, int64_t C, const void* x, int64_t x_s0,
                            int64_t x_s1, const void* m, int64_t m_s0, int64_t m_s1,
                            int64_t* cnt, double* mean, double* m2, void* stream);
int rlfuse_masked_whiten_apply(int dtype, int64_t R, int64_t C, const void* x, int64_t x_s0,
                               int64_t x_s1, const void* m, int64_t m_s0, int64_t m_s1,
                               double mean, double scale, double add_back, void* out,
                               void* stream);
int rlfuse_group_stats(int64_t B, const double* s, const int64_t* order, const int64_t* seg,
                       int64_t G, const double* lens, int method, int size_one, double eps,
                       double std_floor, int norm_by_std, double f_norm, double batch_std,
                       double alpha, double* x, void* stream);
int rlfuse_broadcast_rows(int dtype, int64_t B, int64_t T, const void* a, const void* m,
                          int64_t m_s0, int64_t m_s1, void* out, void* stream);
int rlfuse_adv_token_rewards(int dtype, int64_t S, int64_t T, const void* cu, const void* scores,
                             int64_t sc_s, const void* kl, int64_t k_s0, int64_t k_s1,
                             const void* m, int64_t m_s0, int64_t m_s1, double kl_coef,
                             void* out, void* stream);
}

void rlfuse_bind_cuda_advantage(py::module_& m) {
  m.def(
      "gae_fwd",
      [](int dtype, i64 S, i64 T, u64 cu, u64 r, i64 r_s0, i64 r_s1, u64 v, i64 v_s0, i64 v_s1,
         u64 mask, i64 m_s0, i64 m_s1, u64 lv, i64 lv_s, double gamma, double lam, int zero,
         u64 adv, u64 ret, u64 stream) {
        launch("gae_fwd", [&] {
          return rlfuse_gae_fwd(dtype, S, T, as_ptr(cu), as_ptr(r), r_s0, r_s1, as_ptr(v), v_s0,
                                v_s1, as_ptr(mask), m_s0, m_s1, as_ptr(lv), lv_s, gamma, lam,
                                zero, as_ptr(adv), as_ptr(ret), as_ptr(stream));
        });
      },
      "GAE (values 0 when v == 0) over padded rows or packed segments (cu = int64 "
      "cu_seqlens); mask = uint8 0/1 or 0 (all valid). Writes adv (and ret when != 0), "
      "contiguous in the layout.");
  m.def(
      "masked_row_stats",
      [](int dtype, i64 R, i64 C, u64 x, i64 x_s0, i64 x_s1, u64 mask, i64 m_s0, i64 m_s1,
         u64 cnt, u64 mean, u64 m2, u64 stream) {
        launch("masked_row_stats", [&] {
          return rlfuse_masked_row_stats(dtype, R, C, as_ptr(x), x_s0, x_s1, as_ptr(mask), m_s0,
                                         m_s1, static_cast<int64_t*>(as_ptr(cnt)),
                                         static_cast<double*>(as_ptr(mean)),
                                         static_cast<double*>(as_ptr(m2)), as_ptr(stream));
        });
      },
      "Per-row count (int64), mean and centred sum of squares (float64) of the valid elements.");
  m.def(
      "masked_whiten_apply",
      [](int dtype, i64 R, i64 C, u64 x, i64 x_s0, i64 x_s1, u64 mask, i64 m_s0, i64 m_s1,
         double mean, double scale, double add_back, u64 out, u64 stream) {
        launch("masked_whiten_apply", [&] {
          return rlfuse_masked_whiten_apply(dtype, R, C, as_ptr(x), x_s0, x_s1, as_ptr(mask),
                                            m_s0, m_s1, mean, scale, add_back, as_ptr(out),
                                            as_ptr(stream));
        });
      },
      "out = mask ? (x - mean) * scale + add_back : 0 (contiguous [R, C]).");
  m.def(
      "group_stats",
      [](i64 B, u64 s, u64 order, u64 seg, i64 G, u64 lens, int method, int size_one,
         double eps, double std_floor, int norm_by_std, double f_norm, double batch_std,
         double alpha, u64 x, u64 stream) {
        launch("group_stats", [&] {
          return rlfuse_group_stats(B, static_cast<const double*>(as_ptr(s)),
                                    static_cast<const int64_t*>(as_ptr(order)),
                                    static_cast<const int64_t*>(as_ptr(seg)), G,
                                    static_cast<const double*>(as_ptr(lens)), method, size_one,
                                    eps, std_floor, norm_by_std, f_norm, batch_std, alpha,
                                    static_cast<double*>(as_ptr(x)), as_ptr(stream));
        });
      },
      "Per-sample group advantages before batch whitening (float64), one warp per group.");
  m.def(
      "broadcast_rows",
      [](int dtype, i64 B, i64 T, u64 a, u64 mask, i64 m_s0, i64 m_s1, u64 out, u64 stream) {
        launch("broadcast_rows", [&] {
          return rlfuse_broadcast_rows(dtype, B, T, as_ptr(a), as_ptr(mask), m_s0, m_s1,
                                       as_ptr(out), as_ptr(stream));
        });
      },
      "out[b, t] = mask[b, t] ? a[b] : 0 (contiguous [B, T]).");
  m.def(
      "token_rewards",
      [](int dtype, i64 S, i64 T, u64 cu, u64 scores, i64 sc_s, u64 kl, i64 k_s0, i64 k_s1,
         u64 mask, i64 m_s0, i64 m_s1, double kl_coef, u64 out, u64 stream) {
        launch("token_rewards", [&] {
          return rlfuse_adv_token_rewards(dtype, S, T, as_ptr(cu), as_ptr(scores), sc_s,
                                          as_ptr(kl), k_s0, k_s1, as_ptr(mask), m_s0, m_s1,
                                          kl_coef, as_ptr(out), as_ptr(stream));
        });
      },
      "Score on the last valid token minus kl_coef * kl on every valid token.");
}
