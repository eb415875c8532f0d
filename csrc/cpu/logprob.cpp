// Token log-probabilities and entropy of softmax(logits / T), per row.
//
// Forward, per row (one thread owns a row, so results do not depend on the
// number of rows or threads):
//   the row is read once, in blocks of kBlock elements that stay in L1; each
//   block's max is found first, then its exp-sums are added to 16 explicit
//   lanes (S = sum e^{z-m}, W = sum e^{z-m} (z-m)), rescaled when the running
//   max m grows.  lse = m + log S, logp = z_y - lse, entropy = log S - W / S.
// Backward, per row:
//   d_v = (g_lp ([v == y] - p_v) - g_ent p_v (log p_v + H)) / T.
//   dlogits may alias a contiguous logits buffer (each element is read before it is
//   written), which the fused linear op uses to compute gradients in place.
//
// Compiled once per ISA level (see CMakeLists.txt); the lane arrays make the
// summation order explicit so that the vectoriser cannot change it.
#include "rlfuse/common.h"
#include "logprob.h"

#include <algorithm>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 2048;

struct RowGeom {
  int64_t n_inner, stride_outer, stride_inner;
  int64_t offset(int64_t r) const {
    return (r / n_inner) * stride_outer + (r % n_inner) * stride_inner;
  }
};

inline int64_t read_id(const void* ids, int ids_dtype, int64_t r) {
  return ids_dtype == kInt32 ? int64_t(static_cast<const int32_t*>(ids)[r])
                             : static_cast<const int64_t*>(ids)[r];
}

template <typename Acc>
inline Acc neg_inf() { return -std::numeric_limits<Acc>::infinity(); }

// Max of z over x[0:n] (z = x * inv_t).  NaN is ignored here; it reaches the
// sums below and propagates from there.
template <typename T, typename Acc>
inline Acc block_max(const T* x, int64_t n, Acc inv_t) {
  Acc lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = neg_inf<Acc>();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      Acc z = Acc(to_float(x[i + j])) * inv_t;
      lane[j] = z > lane[j] ? z : lane[j];
    }
  Acc m = neg_inf<Acc>();
  for (int j = 0; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
  for (; i < n; ++i) {
    Acc z = Acc(to_float(x[i])) * inv_t;
    m = z > m ? z : m;
  }
  return m;
}

// Adds e^{z-m} (and e^{z-m}(z-m) when WithEnt) over x[0:n] into the lanes.  z <= m
// here, so t = z - m <= 0; t is clamped at -87.3 inside vexp_nonpos, which keeps
// e * t finite (and ~0) for -inf entries.
template <bool WithEnt, typename T, typename Acc>
inline void block_sums(const T* __restrict__ x, int64_t n, Acc inv_t, Acc m,
                       Acc* __restrict__ s_out, Acc* __restrict__ w_out) {
  const Acc tmin = Acc(-87.3365478515625);
  // Local lanes (registers), written back once: the compiler cannot keep
  // accumulators that might alias the input in registers otherwise.
  Acc s[kLanes], w[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    s[j] = s_out[j];
    w[j] = w_out[j];
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      Acc t = Acc(to_float(x[i + j])) * inv_t - m;
      t = t < tmin ? tmin : t;
      Acc e = vexp_nonpos(t);
      s[j] += e;
      if (WithEnt) w[j] += e * t;
    }
  for (int j = 0; i < n; ++i, ++j) {
    Acc t = Acc(to_float(x[i])) * inv_t - m;
    t = t < tmin ? tmin : t;
    Acc e = vexp_nonpos(t);
    s[j] += e;
    if (WithEnt) w[j] += e * t;
  }
  for (int j = 0; j < kLanes; ++j) {
    s_out[j] = s[j];
    w_out[j] = w[j];
  }
}

template <bool WithEnt, typename T, typename Acc>
void forward_rows(const T* logits, RowGeom g, int64_t rows, int64_t V, const void* ids,
                  int ids_dtype, Acc* out_lp, Acc* out_ent, Acc* out_lse, Acc inv_t,
                  int64_t ignore_index, int num_threads, int64_t* bad_row) {
  int64_t first_bad = rows;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(min : first_bad)
  for (int64_t r = 0; r < rows; ++r) {
    int64_t y = read_id(ids, ids_dtype, r);
    if (y == ignore_index) {
      out_lp[r] = 0;
      if (WithEnt) out_ent[r] = 0;
      out_lse[r] = 0;
      continue;
    }
    if (y < 0 || y >= V) {
      first_bad = std::min(first_bad, r);
      continue;
    }
    const T* x = logits + g.offset(r);
    Acc s[kLanes], w[kLanes];
    for (int j = 0; j < kLanes; ++j) s[j] = w[j] = 0;
    Acc m = neg_inf<Acc>();
    for (int64_t b = 0; b < V; b += kBlock) {
      int64_t n = std::min(kBlock, V - b);
      Acc bm = block_max(x + b, n, inv_t);
      if (bm > m) {
        if (m != neg_inf<Acc>()) {
          Acc d = bm - m;
          Acc c = vexp(-d);
          for (int j = 0; j < kLanes; ++j) {
            if (WithEnt) w[j] = c * (w[j] - d * s[j]);
            s[j] = c * s[j];
          }
        }
        m = bm;
      }
      if (m == neg_inf<Acc>()) continue;  // everything so far is -inf (or NaN-only)
      block_sums<WithEnt>(x + b, n, inv_t, m, s, w);
    }
    Acc S = 0, W = 0;
    for (int j = 0; j < kLanes; ++j) {
      S += s[j];
      W += w[j];
    }
    if (m == neg_inf<Acc>()) {
      // No finite maximum: every entry is -inf or NaN; softmax is undefined.
      m = S = std::numeric_limits<Acc>::quiet_NaN();
    }
    Acc log_s = std::log(S);
    Acc lse = m + log_s;
    out_lse[r] = lse;
    out_lp[r] = Acc(to_float(x[y])) * inv_t - lse;
    if (WithEnt) out_ent[r] = log_s - W / S;
  }
  *bad_row = first_bad < rows ? first_bad : -1;
}

template <typename T, typename Acc>
void backward_rows(const T* logits, RowGeom g, int64_t rows, int64_t V, const void* ids,
                   int ids_dtype, const Acc* lse, const Acc* ent, const Acc* g_lp,
                   const Acc* g_ent, T* dlogits, Acc inv_t, int64_t ignore_index,
                   int num_threads) {
  const Acc tmin = Acc(-200);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t r = 0; r < rows; ++r) {
    T* d = dlogits + r * V;
    int64_t y = read_id(ids, ids_dtype, r);
    if (y == ignore_index || y < 0 || y >= V) {
      const T zero = from_float<T>(0.0f);
      for (int64_t v = 0; v < V; ++v) d[v] = zero;
      continue;
    }
    const T* x = logits + g.offset(r);
    const Acc a = g_lp ? g_lp[r] * inv_t : Acc(0);   // coefficient of -p
    const Acc b = g_ent ? g_ent[r] * inv_t : Acc(0); // coefficient of -p (log p + H)
    const Acc H = g_ent ? ent[r] : Acc(0);
    const Acc L = lse[r];
    // The target element: g_lp (1 - p_y) computed directly, no cancellation.  Read
    // before the loop so that dlogits may alias the logits (in-place use).
    Acc ty = Acc(to_float(x[y])) * inv_t - L;
    ty = ty < tmin ? tmin : ty;
    const Acc py = vexp(ty);
    const Acc dy = a * (Acc(1) - py) - b * py * (ty + H);
    for (int64_t v = 0; v < V; ++v) {
      Acc t = Acc(to_float(x[v])) * inv_t - L;
      t = t < tmin ? tmin : t;
      Acc p = vexp(t);
      Acc dv = -p * (a + b * (t + H));
      if constexpr (sizeof(Acc) == 8) d[v] = T(dv);
      else d[v] = from_float<T>(float(dv));
    }
    if constexpr (sizeof(Acc) == 8) d[y] = T(dy);
    else d[y] = from_float<T>(float(dy));
  }
}

template <typename T, typename Acc>
int64_t forward_typed(const void* logits, RowGeom g, int64_t rows, int64_t V, const void* ids,
                      int ids_dtype, void* lp, void* ent, void* lse, double inv_t,
                      int64_t ignore_index, int num_threads) {
  int64_t bad = -1;
  const T* x = static_cast<const T*>(logits);
  if (ent)
    forward_rows<true>(x, g, rows, V, ids, ids_dtype, static_cast<Acc*>(lp),
                       static_cast<Acc*>(ent), static_cast<Acc*>(lse), Acc(inv_t),
                       ignore_index, num_threads, &bad);
  else
    forward_rows<false>(x, g, rows, V, ids, ids_dtype, static_cast<Acc*>(lp),
                        static_cast<Acc*>(nullptr), static_cast<Acc*>(lse), Acc(inv_t),
                        ignore_index, num_threads, &bad);
  return bad;
}

}  // namespace

int64_t token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                           int64_t stride_outer, int64_t stride_inner, int64_t V,
                           const void* ids, int ids_dtype, void* out_lp, void* out_ent,
                           void* out_lse, double inv_temp, int64_t ignore_index,
                           int num_threads) {
  RowGeom g{n_inner, stride_outer, stride_inner};
  int64_t rows = n_outer * n_inner;
  switch (dtype) {
    case kFloat32:
      return forward_typed<float, float>(logits, g, rows, V, ids, ids_dtype, out_lp, out_ent,
                                         out_lse, inv_temp, ignore_index, num_threads);
    case kFloat16:
      return forward_typed<f16, float>(logits, g, rows, V, ids, ids_dtype, out_lp, out_ent,
                                       out_lse, inv_temp, ignore_index, num_threads);
    case kBFloat16:
      return forward_typed<bf16, float>(logits, g, rows, V, ids, ids_dtype, out_lp, out_ent,
                                        out_lse, inv_temp, ignore_index, num_threads);
    default:
      return forward_typed<double, double>(logits, g, rows, V, ids, ids_dtype, out_lp,
                                           out_ent, out_lse, inv_temp, ignore_index,
                                           num_threads);
  }
}

void token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                        int64_t stride_outer, int64_t stride_inner, int64_t V, const void* ids,
                        int ids_dtype, const void* lse, const void* ent, const void* g_lp,
                        const void* g_ent, void* dlogits, double inv_temp,
                        int64_t ignore_index, int num_threads) {
  RowGeom g{n_inner, stride_outer, stride_inner};
  int64_t rows = n_outer * n_inner;
#define RLFUSE_BWD(T, Acc)                                                                  \
  backward_rows<T, Acc>(static_cast<const T*>(logits), g, rows, V, ids, ids_dtype,          \
                        static_cast<const Acc*>(lse), static_cast<const Acc*>(ent),         \
                        static_cast<const Acc*>(g_lp), static_cast<const Acc*>(g_ent),      \
                        static_cast<T*>(dlogits), Acc(inv_temp), ignore_index, num_threads)
  switch (dtype) {
    case kFloat32: RLFUSE_BWD(float, float); break;
    case kFloat16: RLFUSE_BWD(f16, float); break;
    case kBFloat16: RLFUSE_BWD(bf16, float); break;
    default: RLFUSE_BWD(double, double); break;
  }
#undef RLFUSE_BWD
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
