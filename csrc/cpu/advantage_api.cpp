// pybind11 entry points of the advantage family in rlfuse._C (compiled once; the kernels
// behind them are per-ISA, see isa.h).  Pointers arrive as integers; 0 marks an absent
// optional input, which is replaced here by a constant (0 for values / last_values / kl,
// 1 for the mask) read with strides 0.  Each validating entry point returns
// (code, seq, pos): code 0 when the input was fine, else the first bad element (codes in
// advantage.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "cpu/advantage.h"
#include "cpu/api_checks.h"

namespace py = pybind11;
using rlfuse::cpu::AdvStatus;
using rlfuse::cpu::require_data;
using rlfuse::cpu::Strided;

namespace {

const double kZeroF64 = 0.0;
const float kZeroF32 = 0.0f;
const uint8_t kOneU8 = 1;

inline const void* cptr(uint64_t p) { return reinterpret_cast<const void*>(p); }
inline void* mptr(uint64_t p) { return reinterpret_cast<void*>(p); }

// A value input: the tensor, or a constant zero of the value dtype (dtype 3 = float64).
inline Strided value_or_zero(uint64_t p, int64_t s0, int64_t s1, int dtype) {
  if (p != 0) return Strided{cptr(p), s0, s1};
  return Strided{dtype == 3 ? static_cast<const void*>(&kZeroF64)
                            : static_cast<const void*>(&kZeroF32),
                 0, 0};
}

// The mask, or a constant 1 (uint8) when absent.
inline Strided mask_or_one(uint64_t p, int64_t s0, int64_t s1, int* code) {
  if (p != 0) return Strided{cptr(p), s0, s1};
  *code = rlfuse::cpu::kMaskU8;
  return Strided{&kOneU8, 0, 0};
}

inline py::tuple status(const AdvStatus& st) { return py::make_tuple(st.code, st.seq, st.pos); }

}  // namespace

void rlfuse_bind_advantage(py::module_& m) {
  m.def(
      "gae_fwd",
      [](int dtype, int64_t n_seq, int64_t T, uint64_t cu, int cu_code, uint64_t r, int64_t r_s0,
         int64_t r_s1, uint64_t v, int64_t v_s0, int64_t v_s1, uint64_t mask, int64_t m_s0,
         int64_t m_s1, int mask_code, uint64_t last_values, int64_t lv_s, double gamma,
         double lam, int zero_masked, uint64_t out_adv, uint64_t out_ret, uint64_t row_stats,
         int num_threads) {
        // (padded rows; a packed stream's size is only known from cu_seqlens)
        require_data("gae_fwd", "rewards", r, cu == 0 && n_seq > 0 && T > 0);
        require_data("gae_fwd", "the advantages output", out_adv, cu == 0 && n_seq > 0 && T > 0);
        rlfuse::cpu::GaeArgs a{};
        a.dtype = dtype;
        a.lay = rlfuse::cpu::SeqLayout{n_seq, T, cu ? cptr(cu) : nullptr, cu_code};
        a.rewards = Strided{cptr(r), r_s0, r_s1};
        a.values = value_or_zero(v, v_s0, v_s1, dtype);
        a.mask_code = mask_code;
        a.mask = mask_or_one(mask, m_s0, m_s1, &a.mask_code);
        a.last_values = value_or_zero(last_values, 0, lv_s, dtype);
        a.gamma = gamma;
        a.lam = lam;
        a.zero_masked = zero_masked;
        a.out_adv = mptr(out_adv);
        a.out_ret = out_ret ? mptr(out_ret) : nullptr;
        a.row_stats = row_stats ? static_cast<double*>(mptr(row_stats)) : nullptr;
        a.num_threads = num_threads;
        AdvStatus st{0, 0, 0};
        double N = 0, mean = 0, M2 = 0;
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(gae_fwd, a, &st);
          if (a.row_stats != nullptr && st.code == 0) {
            // Chan et al. pairwise update over the sequences, serially in order.
            for (int64_t s = 0; s < n_seq; ++s) {
              const double nb = a.row_stats[3 * s];
              if (nb == 0) continue;
              const double n = N + nb;
              const double d = a.row_stats[3 * s + 1] - mean;
              mean += d * (nb / n);
              M2 += a.row_stats[3 * s + 2] + d * d * (N * nb / n);
              N = n;
            }
          }
        }
        return py::make_tuple(st.code, st.seq, st.pos, N, mean, M2);
      },
      "GAE / discounted returns over padded rows or packed segments; with row_stats != 0 also "
      "the moments of the advantages over the valid positions. Returns (code, seq, pos, N, "
      "mean, M2).");

  m.def(
      "masked_row_stats",
      [](int dtype, int64_t n_rows, int64_t n_cols, uint64_t x, int64_t x_s0, int64_t x_s1,
         uint64_t mask, int64_t m_s0, int64_t m_s1, int mask_code, uint64_t out_count,
         uint64_t out_mean, uint64_t out_m2, int num_threads) {
        require_data("masked_row_stats", "x", x, n_rows > 0 && n_cols > 0);
        require_data("masked_row_stats", "the count output", out_count, n_rows > 0);
        require_data("masked_row_stats", "the mean output", out_mean, n_rows > 0);
        require_data("masked_row_stats", "the M2 output", out_m2, n_rows > 0);
        rlfuse::cpu::RowStatsArgs a{};
        a.dtype = dtype;
        a.n_rows = n_rows;
        a.n_cols = n_cols;
        a.x = Strided{cptr(x), x_s0, x_s1};
        a.mask_code = mask_code;
        a.mask = mask_or_one(mask, m_s0, m_s1, &a.mask_code);
        a.out_count = static_cast<int64_t*>(mptr(out_count));
        a.out_mean = static_cast<double*>(mptr(out_mean));
        a.out_m2 = static_cast<double*>(mptr(out_m2));
        a.num_threads = num_threads;
        AdvStatus st{0, 0, 0};
        double N = 0, mean = 0, M2 = 0;
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(masked_row_stats, a, &st);
          // Chan et al. pairwise update, serially in row order (fixed, thread-independent).
          for (int64_t r = 0; r < n_rows; ++r) {
            const double nb = double(a.out_count[r]);
            if (nb == 0) continue;
            const double n = N + nb;
            const double d = a.out_mean[r] - mean;
            mean += d * (nb / n);
            M2 += a.out_m2[r] + d * d * (N * nb / n);
            N = n;
          }
        }
        return py::make_tuple(st.code, st.seq, st.pos, N, mean, M2);
      },
      "Per-row masked count / mean / M2, and their combination over all rows: returns "
      "(code, row, col, N, mean, M2).");

  m.def(
      "masked_whiten_apply",
      [](int dtype, int64_t n_rows, int64_t n_cols, uint64_t x, int64_t x_s0, int64_t x_s1,
         uint64_t mask, int64_t m_s0, int64_t m_s1, int mask_code, double mean, double scale,
         double add_back, uint64_t out, int num_threads) {
        require_data("masked_whiten_apply", "x", x, n_rows > 0 && n_cols > 0);
        require_data("masked_whiten_apply", "the output", out, n_rows > 0 && n_cols > 0);
        rlfuse::cpu::WhitenArgs a{};
        a.dtype = dtype;
        a.n_rows = n_rows;
        a.n_cols = n_cols;
        a.x = Strided{cptr(x), x_s0, x_s1};
        a.mask_code = mask_code;
        a.mask = mask_or_one(mask, m_s0, m_s1, &a.mask_code);
        a.mean = mean;
        a.scale = scale;
        a.add_back = add_back;
        a.out = mptr(out);
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(masked_whiten_apply, a);
      },
      "out = mask ? (x - mean) * scale + add_back : 0 (contiguous [n_rows, n_cols]).");

  m.def(
      "group_advantages",
      [](int dtype, int64_t B, uint64_t s, int64_t s_s0, int64_t s_s1, int64_t n_score_cols,
         uint64_t ids, int ids_code, int64_t ids_stride, int64_t group_size, int method,
         int size_one, double eps, double std_floor, int norm_by_std, double f_norm,
         int whiten_biased, uint64_t lengths, uint64_t mask, int64_t m_s0, int64_t m_s1,
         int mask_code, int64_t T, uint64_t out_sample, uint64_t out_tok, int num_threads) {
        require_data("group_advantages", "scores", s, B > 0);
        require_data("group_advantages", "the output", out_sample, B > 0);
        rlfuse::cpu::GroupArgs a{};
        a.dtype = dtype;
        a.B = B;
        a.scores = Strided{cptr(s), s_s0, s_s1};
        a.n_score_cols = n_score_cols;
        a.ids = ids ? cptr(ids) : nullptr;
        a.ids_code = ids_code;
        a.ids_stride = ids_stride;
        a.group_size = group_size;
        a.method = method;
        a.size_one = size_one;
        a.eps = eps;
        a.std_floor = std_floor;
        a.norm_by_std = norm_by_std;
        a.f_norm = f_norm;
        a.whiten_biased = whiten_biased;
        a.lengths = lengths ? static_cast<const double*>(cptr(lengths)) : nullptr;
        a.mask = Strided{mask ? cptr(mask) : nullptr, m_s0, m_s1};
        a.mask_code = mask_code;
        a.T = T;
        a.out_sample = mptr(out_sample);
        a.out_tok = out_tok ? mptr(out_tok) : nullptr;
        a.num_threads = num_threads;
        AdvStatus st{0, 0, 0};
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(group_advantages, a, &st);
        }
        return status(st);
      },
      "Group advantages per sample, optionally broadcast over a [B, T] mask; returns "
      "(code, sample, pos).");

  m.def(
      "token_rewards",
      [](int dtype, int64_t n_seq, int64_t T, uint64_t cu, int cu_code, uint64_t scores,
         int64_t sc_s, uint64_t kl, int64_t kl_s0, int64_t kl_s1, uint64_t mask, int64_t m_s0,
         int64_t m_s1, int mask_code, double kl_coef, uint64_t out, int num_threads) {
        require_data("token_rewards", "scores", scores, n_seq > 0);
        require_data("token_rewards", "the output", out, cu == 0 && n_seq > 0 && T > 0);
        rlfuse::cpu::TokenRewardArgs a{};
        a.dtype = dtype;
        a.lay = rlfuse::cpu::SeqLayout{n_seq, T, cu ? cptr(cu) : nullptr, cu_code};
        a.scores = Strided{cptr(scores), 0, sc_s};
        a.kl = value_or_zero(kl, kl_s0, kl_s1, dtype);
        a.mask_code = mask_code;
        a.mask = mask_or_one(mask, m_s0, m_s1, &a.mask_code);
        a.kl_coef = kl_coef;
        a.out = mptr(out);
        a.num_threads = num_threads;
        AdvStatus st{0, 0, 0};
        {
          py::gil_scoped_release release;
          RLFUSE_ISA_CALL(token_rewards, a, &st);
        }
        return status(st);
      },
      "Score on the last valid token minus kl_coef * kl on every valid token; returns "
      "(code, seq, pos).");
}
