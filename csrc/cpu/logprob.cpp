// Token log-probabilities and entropy of softmax(logits / T), per row.
//
// Forward, per row (one thread owns a row, so results do not depend on the
// number of rows or threads):
//   the row is read once, in blocks of kBlock elements that stay in L1; each
//   block's max is found first, then its exp-sums are added to 16 explicit
//   lanes (S = sum e^{z-m}, W = sum e^{z-m} (z-m)), rescaled when the running
//   max m grows.  lse = m + log S, logp = z_y - lse, entropy = log S - W / S.
//   The exponentials are 2^u with u = (z - m) log2(e) = x c - m log2(e): one FMA
//   and a short polynomial per element (vexp2_nonpos in common.h).
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
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

constexpr int kLanes = 16;  // lane_max16 in common.h assumes 16
constexpr int64_t kBlock = 2048;
constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

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

// Products a * s rounded to Acc on their own.  -std=gnu++17 implies -ffp-contract=fast,
// so on the FMA builds (x86-64-v3/v4, any aarch64) GCC would fuse `x * inv_t - lse` into
// one FMA, i.e. subtract lse from the exact product, while the forward rounded m * inv_t
// before adding log S into lse.  At low temperature the two then disagree by up to half
// an ulp of lse in log p, which the 1/T of the gradient turns into errors of ~0.1 where
// p = 1 (T = 1e-3).  Rounding x / T first on both sides (as the CUDA kernels' mul_rn and
// torch's x / T do) makes log p exactly 0 at the maximum when S rounds to 1.  An empty asm
// that takes the product as a register operand hides it from the contraction and costs
// no instruction; the vector form keeps the backward loop vectorised.
template <typename Acc>
inline Acc mul_rounded(Acc a, Acc s) {
  Acc p = a * s;
#if defined(__GNUC__) && defined(__SSE2__)
  asm("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(p));
#else
  volatile Acc q = p;
  p = q;
#endif
  return p;
}

// z[j] = mul_rounded(x[j], s) for kLanes (16) elements.
template <typename Acc>
inline void mul_rounded16(const Acc* __restrict x, Acc s, Acc* __restrict z) {
  for (int j = 0; j < kLanes; ++j) z[j] = x[j] * s;
#if defined(__GNUC__) && defined(__AVX512F__)
  if constexpr (sizeof(Acc) == 4) {
    __m512 v = _mm512_loadu_ps(z);
    asm("" : "+v"(v));
    _mm512_storeu_ps(z, v);
  } else {
    for (int k = 0; k < kLanes; k += 8) {
      __m512d v = _mm512_loadu_pd(z + k);
      asm("" : "+v"(v));
      _mm512_storeu_pd(z + k, v);
    }
  }
#elif defined(__GNUC__) && defined(__AVX__)
  if constexpr (sizeof(Acc) == 4) {
    for (int k = 0; k < kLanes; k += 8) {
      __m256 v = _mm256_loadu_ps(z + k);
      asm("" : "+x"(v));
      _mm256_storeu_ps(z + k, v);
    }
  } else {
    for (int k = 0; k < kLanes; k += 4) {
      __m256d v = _mm256_loadu_pd(z + k);
      asm("" : "+x"(v));
      _mm256_storeu_pd(z + k, v);
    }
  }
#elif defined(__x86_64__) || defined(__i386__)
  // SSE-only builds (x86-64-v2): no FMA instruction, nothing can be fused.
#elif defined(__GNUC__)
  // Other targets: the products must be in memory before the barrier and are read
  // back after it.
  asm volatile("" : : "r"(z) : "memory");
#endif
}

// p = 2^u and the u to use with it, for the backward.  float: vexp2_nonpos's polynomial
// with u clamped at -127 instead of -126: the scale 2^n then has a zero exponent field
// for n = -127, so p is exactly 0 for u < -126.5 (p < 2^-126.5, and -inf logits) with no
// compare and select.  double: std::exp2, 0 below 2^-126 by a select.  u comes back
// clamped (finite for -inf logits, so p u = 0); NaN propagates.
inline float bwd_exp2(float& u) {
  u = u < -127.0f ? -127.0f : u;
  return vexp2_clamped(u, -127.0f);
}
inline double bwd_exp2(double& u) {
  u = u < -126.0 ? -126.0 : u;
  return u <= -126.0 ? 0.0 : std::exp2(u);
}

// Whether x[0:n] holds a NaN, in 16 lanes so that the loop vectorises.  Called only for
// blocks without a finite value (see forward_rows), off the hot path: rows whose
// vocabulary is masked with -inf up to late in the row go through it block after block.
template <typename T, typename Acc>
inline bool block_has_nan(const T* x, int64_t n) {
  int32_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    Acc staged[kLanes];
    const Acc* v = staged;
    if constexpr (std::is_same_v<T, Acc>) {
      v = x + i;
    } else {
      load16(x + i, staged);
    }
    for (int j = 0; j < kLanes; ++j) lane[j] |= v[j] != v[j] ? 1 : 0;
  }
  int32_t nan = 0;
  for (int j = 0; j < kLanes; ++j) nan |= lane[j];
  for (; i < n; ++i) {
    const Acc v = Acc(to_float(x[i]));
    nan |= v != v ? 1 : 0;
  }
  return nan != 0;
}

// Max of the raw logits x[0:n] (temperature > 0, so max(x / T) = max(x) / T).  NaN is
// ignored here; it reaches the sums below and propagates from there.
template <typename T, typename Acc>
inline Acc block_max(const T* x, int64_t n) {
  Acc lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = neg_inf<Acc>();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    if constexpr (std::is_same_v<T, Acc>) {
      lane_max16(lane, x + i);
    } else {
      Acc v[kLanes];
      load16(x + i, v);
      lane_max16(lane, v);
    }
  }
  Acc m = neg_inf<Acc>();
  for (int j = 0; j < kLanes; ++j) m = lane[j] > m ? lane[j] : m;
  for (; i < n; ++i) {
    Acc v = Acc(to_float(x[i]));
    m = v > m ? v : m;
  }
  return m;
}

// Adds e = 2^u, u = (x - mx) c <= 0 with c = log2(e) / T, into the lanes s, and e * u
// into w when WithEnt (w is kept in log2 units; the caller scales by ln 2).  The
// difference is formed in logit units first, so u is exactly 0 at the maximum and
// large logits keep their precision.  -inf entries give u clamped at -126 inside
// vexp2_nonpos, so e * u stays finite and negligible.
template <bool WithEnt, typename T, typename Acc>
inline void block_sums(const T* __restrict__ x, int64_t n, Acc c, Acc mx,
                       Acc* __restrict__ s_out, Acc* __restrict__ w_out) {
  const Acc umin = Acc(-126);
  // Local lanes (registers), written back once.
  Acc s[kLanes], w[kLanes];
  for (int j = 0; j < kLanes; ++j) {
    s[j] = s_out[j];
    w[j] = w_out[j];
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // float rows are read in place; 16-bit rows are widened into a local chunk first.
    Acc staged[kLanes];
    const Acc* xs = staged;
    if constexpr (std::is_same_v<T, Acc>) {
      xs = x + i;
    } else {
      load16(x + i, staged);
    }
    for (int j = 0; j < kLanes; ++j) {
      Acc u = (xs[j] - mx) * c;
      u = u < umin ? umin : u;
      Acc e = vexp2_nonpos(u);
      s[j] += e;
      if (WithEnt) w[j] += e * u;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    Acc u = (Acc(to_float(x[i])) - mx) * c;
    u = u < umin ? umin : u;
    Acc e = vexp2_nonpos(u);
    s[j] += e;
    if (WithEnt) w[j] += e * u;
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
  const Acc c = inv_t * Acc(kLog2e);
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
    // Lanes: s = sum 2^u, w = sum 2^u u, relative to the running max m of the raw
    // logits (z = x / T, so the max of z is m / T).
    Acc s[kLanes], w[kLanes];
    for (int j = 0; j < kLanes; ++j) s[j] = w[j] = 0;
    Acc m = neg_inf<Acc>();
    for (int64_t b = 0; b < V; b += kBlock) {
      int64_t n = std::min(kBlock, V - b);
      Acc bm = block_max<T, Acc>(x + b, n);
      if (bm > m) {
        if (m != neg_inf<Acc>()) {
          // Rescale the lanes to the new max: du = (bm - m) c in log2 units.
          Acc du = (bm - m) * c;
          Acc scale = vexp2_nonpos(-du);
          for (int j = 0; j < kLanes; ++j) {
            if (WithEnt) w[j] = scale * (w[j] - du * s[j]);
            s[j] = scale * s[j];
          }
        }
        m = bm;
      }
      if (m == neg_inf<Acc>()) {
        // Everything so far is -inf or NaN: no sums to add, but a NaN must still reach
        // them (the lanes are not rescaled when the first finite max appears, so a NaN
        // lane stays NaN).
        if (block_has_nan<T, Acc>(x + b, n)) s[0] = std::numeric_limits<Acc>::quiet_NaN();
        continue;
      }
      block_sums<WithEnt>(x + b, n, c, m, s, w);
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
    // m / T rounded before log S is added: the backward forms x / T - lse the same way.
    out_lse[r] = mul_rounded(m, inv_t) + log_s;
    out_lp[r] = (Acc(to_float(x[y])) - m) * inv_t - log_s;
    if (WithEnt) out_ent[r] = log_s - Acc(kLn2) * (W / S);
  }
  *bad_row = first_bad < rows ? first_bad : -1;
}

// Copies of kLanes elements between the row and a local chunk; __restrict__ here (the
// chunk is local) lets them vectorise even though dlogits may alias the logits.
template <typename T, typename Acc>
inline void load_chunk(const T* __restrict__ src, Acc* __restrict__ dst) {
  load16(src, dst);
}
template <typename T>
inline void store_chunk(const T* __restrict__ src, T* __restrict__ dst) {
  std::memcpy(dst, src, sizeof(T) * kLanes);
}

template <typename T, typename Acc>
inline void store(T* d, Acc v) {
  if constexpr (sizeof(Acc) == 8) *d = T(v);
  else *d = from_float<T>(float(v));
}

// d_v = -p_v (a + b (log p_v + H)), a = g_lp / T, b = g_ent / T, in log2 units:
// u = (x / T - lse) log2(e) = log2 p, d_v = -2^u (A0 + B1 u), A0 = a + b H, B1 = b ln 2.
// x / T is rounded before lse is subtracted (mul_rounded), as the forward rounded m / T
// into lse, so log p is exactly 0 at the maximum of a row whose S rounds to 1; the
// difference x / T - lse is then exact wherever p is not negligible.
// The row is processed in chunks of kLanes that are loaded whole before any store,
// so dlogits may alias the logits and the loops still vectorise.
template <typename T, typename Acc>
void backward_rows(const T* logits, RowGeom g, int64_t rows, int64_t V, const void* ids,
                   int ids_dtype, const Acc* lse, const Acc* ent, const Acc* g_lp,
                   const Acc* g_ent, T* dlogits, Acc inv_t, int64_t ignore_index,
                   int num_threads) {
  const Acc log2e = Acc(kLog2e);
  const Acc umin = Acc(-126);
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
    const Acc a = g_lp ? g_lp[r] * inv_t : Acc(0);
    const Acc b = g_ent ? g_ent[r] * inv_t : Acc(0);
    const Acc H = g_ent ? ent[r] : Acc(0);
    const Acc L = lse[r];
    const Acc A0 = a + b * H;
    const Acc B1 = b * Acc(kLn2);
    // The target element: g_lp (1 - p_y) formed directly (no cancellation), read before
    // the row is overwritten.
    Acc uy = (mul_rounded(Acc(to_float(x[y])), inv_t) - L) * log2e;
    uy = uy < umin ? umin : uy;
    const Acc py = uy <= umin ? Acc(0) : vexp2_nonpos(uy);
    const Acc dy = a * (Acc(1) - py) - py * B1 * uy - py * b * H;
    int64_t v = 0;
    for (; v + kLanes <= V; v += kLanes) {
      Acc staged[kLanes], z[kLanes];
      T out[kLanes];
      const Acc* xs = staged;
      if constexpr (std::is_same_v<T, Acc>) {
        xs = x + v;  // read in place: out[] is written back only after the whole chunk
      } else {
        load_chunk(x + v, staged);
      }
      mul_rounded16(xs, inv_t, z);
      for (int j = 0; j < kLanes; ++j) {
        Acc u = (z[j] - L) * log2e;
        const Acc p = bwd_exp2(u);
        store(&out[j], -p * (A0 + B1 * u));
      }
      store_chunk(out, d + v);
    }
    for (; v < V; ++v) {
      Acc u = (mul_rounded(Acc(to_float(x[v])), inv_t) - L) * log2e;
      const Acc p = bwd_exp2(u);
      store(&d[v], -p * (A0 + B1 * u));
    }
    store(&d[y], dy);
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
