// Advantage estimation on the CPU: GAE and discounted returns (a reverse recurrence per
// sequence), masked moments and whitening, group advantages (segment reductions over
// prompt groups) and PPO token rewards.  The formulas are in python/rlfuse/ops/advantage.py
// (the reference implementations there are the specification).
//
// Determinism: every sequence, row or group is computed by one thread in a fixed order,
// and the few batch-wide sums (group statistics of the whole batch, whitening) are added
// serially in index order, so results do not depend on the thread count.  Padded GAE
// processes 8 rows side by side (independent recurrences, for instruction-level
// parallelism); each lane runs exactly the same operations as a row processed alone.
//
// Masked elements are never read into the arithmetic: they are replaced by 0 with a select
// (not a multiplication), so NaN padding does not leak into valid outputs.
#include "rlfuse/common.h"
#include "advantage.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

template <typename X>
struct Tag {
  using type = X;
};

inline bool finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }
inline bool finite(double x) { return std::fabs(x) <= std::numeric_limits<double>::max(); }

template <typename F>
void with_mask(int code, F&& f) {
  switch (code) {
    case kMaskU8: f(Tag<uint8_t>{}); break;
    case kMaskI32: f(Tag<int32_t>{}); break;
    case kMaskI64: f(Tag<int64_t>{}); break;
    case kMaskF32: f(Tag<float>{}); break;
    default: f(Tag<double>{}); break;
  }
}

template <typename F>
void with_value(int dtype, F&& f) {
  if (dtype == kFloat64) f(Tag<double>{});
  else f(Tag<float>{});
}

inline int64_t read_index(const void* p, int code, int64_t i) {
  return code == 0 ? int64_t(static_cast<const int32_t*>(p)[i]) : static_cast<const int64_t*>(p)[i];
}

template <typename M>
inline bool mask_ok(M v) {
  return v == M(0) || v == M(1);
}

// Keep the first bad element in (seq, pos) order.
inline void keep_first(AdvStatus& best, int64_t code, int64_t seq, int64_t pos) {
  if (code == 0) return;
  if (best.code == 0 || seq < best.seq || (seq == best.seq && pos < best.pos)) {
    best.code = code;
    best.seq = seq;
    best.pos = pos;
  }
}

// ---------------------------------------------------------------------------------------
// GAE
// ---------------------------------------------------------------------------------------
// One step of the reverse recurrence for one sequence (see gae_reference):
//   m      = mask_t;  r, v = m ? (r_t, v_t) : (0, 0)
//   keep   = m or (zero_masked and some later position is valid)
//   delta  = r + gamma * nv - v
//   A      = keep ? delta + gamma * lam * A : A
//   nv     = keep ? v : nv
//   adv_t  = m ? A : 0,   ret_t = m ? A + v : 0
//
// Contiguous sequences are walked backwards in blocks of W = 32 bytes of values (8 floats,
// 4 doubles), held in GCC vector-extension registers (portable across the ISA builds).
// In a block where every position is kept (all valid; or, with zero_masked, inside the
// valid span) the recurrence has the constant discount c = gamma * lam, and is solved as a
// suffix scan in log2(W) shift-and-multiply-add steps:
//   x = delta;  x_i += c x_{i+1};  x_i += c^2 x_{i+2};  x_i += c^4 x_{i+4};  A_i = x_i + c^(W-i) A_in
// A block where no position is kept leaves the state alone (outputs 0).  Mixed blocks, the
// partial block at the start of a sequence and strided inputs take the scalar steps.  The
// path depends only on the sequence's own data, so results are independent of the batch.
// 32-byte vectors where AVX exists, 16-byte ones on the SSE-only build.
#if defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 4;
};
template <>
struct VecOf<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
  static constexpr int W = kVecBytes / 8;
};

template <typename T>
struct GaeCoef {
  using V = typename VecOf<T>::V;
  T gamma, c, c2, c4;
  V pw;  // pw[i] = c^(W - i)
  GaeCoef(double gamma_, double lam_) {
    constexpr int W = VecOf<T>::W;
    const double cd = gamma_ * lam_;
    gamma = T(gamma_);
    c = T(cd);
    c2 = T(cd * cd);
    c4 = T(cd * cd * cd * cd);
    for (int i = 0; i < W; ++i) pw[i] = T(std::pow(cd, W - i));
  }
};

// x[i] <- x[i + k] (0 beyond the end): lanes move down by k.
template <typename T, int k>
inline typename VecOf<T>::V shift_down(typename VecOf<T>::V x) {
  using V = typename VecOf<T>::V;
  using I = typename VecOf<T>::I;
  constexpr int W = VecOf<T>::W;
  const V z = {};
  I idx;
  for (int i = 0; i < W; ++i) idx[i] = i + k;
  return __builtin_shuffle(x, z, idx);
}

// W mask elements starting at p: `on` (-1 where nonzero, in the value's lane type) and an
// accumulator of "not 0 and not 1", both computed in the mask's own type (exact for every
// mask dtype).
template <typename T, typename M>
struct MaskVec {
  static constexpr int W = VecOf<T>::W;
  typedef M MV __attribute__((vector_size(sizeof(M) * W)));
  typedef decltype(MV{} != MV{}) MB;  // comparison result: signed lanes of sizeof(M)
  static typename VecOf<T>::I load(const M* p, MB& bad) {
    MV mv;
    std::memcpy(&mv, p, sizeof(MV));
    const MV zero = {};
    const MV one = zero + M(1);
    const MB nz = mv != zero;
    bad |= nz & (mv != one);
    return __builtin_convertvector(nz, typename VecOf<T>::I);
  }
};

// int64 masks with float values (verl's response_mask): narrowing int64 lanes is slow
// without AVX-512, so read each int64 as its (low, high) int32 halves instead: nonzero iff
// either half is; 0/1 iff high == 0 and low is 0 or 1 (little-endian).
template <>
struct MaskVec<float, int64_t> {
  static constexpr int W = VecOf<float>::W;
  using I = VecOf<float>::I;
  typedef I MB;
  static I load(const int64_t* p, MB& bad) {
    I a, b;
    std::memcpy(&a, p, sizeof(I));
    std::memcpy(&b, reinterpret_cast<const char*>(p) + sizeof(I), sizeof(I));
    I even, odd;
    for (int j = 0; j < W; ++j) {
      even[j] = 2 * j;
      odd[j] = 2 * j + 1;
    }
    const I lo = __builtin_shuffle(a, b, even);
    const I hi = __builtin_shuffle(a, b, odd);
    const I zero = {};
    const I nz = (lo | hi) != zero;
    bad |= nz & ((hi != zero) | (lo != zero + 1));
    return nz;
  }
};

// The scalar step, shared by every path.
template <typename T>
inline void gae_step(T r, T v, bool m, bool zero, bool& started, T& A, T& nv, T gamma, T c) {
  started = started || m;
  const bool keep = m || (zero && started);
  const T delta = (r + gamma * nv) - v;
  const T an = delta + c * A;
  A = keep ? an : A;
  nv = keep ? v : nv;
}

// Validation flags: bit 0 mask not 0/1, bit 1 reward not finite at a valid position,
// bit 2 value not finite at a valid position.
template <typename T, typename M>
inline uint32_t elem_flags(M mv, T rr, T vr) {
  const bool on = mv != M(0);
  return uint32_t(!mask_ok(mv)) | (uint32_t(on && !finite(rr)) << 1) |
         (uint32_t(on && !finite(vr)) << 2);
}

template <typename T, typename M>
uint32_t gae_row_strided(const T* rp, const T* vp, const M* mp, int64_t rs, int64_t vs,
                         int64_t ms, T* oa, T* orr, T lv, int64_t L, const GaeCoef<T>& cf,
                         bool zero) {
  T A = T(0), nv = lv;
  bool started = false;
  uint32_t flags = 0;
  for (int64_t t = L - 1; t >= 0; --t) {
    const M mv = mp[t * ms];
    const T rr = rp[t * rs];
    const T vr = vp[t * vs];
    const bool m = mv != M(0);
    flags |= elem_flags(mv, rr, vr);
    const T v = m ? vr : T(0);
    gae_step(m ? rr : T(0), v, m, zero, started, A, nv, cf.gamma, cf.c);
    oa[t] = m ? A : T(0);
    if (orr) orr[t] = m ? A + v : T(0);
  }
  return flags;
}

template <typename T, typename M>
uint32_t gae_row_contig(const T* rp, const T* vp, const M* mp, T* oa, T* orr, T lv, int64_t L,
                        const GaeCoef<T>& cf, bool zero) {
  using V = typename VecOf<T>::V;
  using I = typename VecOf<T>::I;
  constexpr int W = VecOf<T>::W;
  T A = T(0), nv = lv;
  bool started = false;
  typename MaskVec<T, M>::MB bad_mask = {};
  I bad_r = {}, bad_v = {};
  const V zero_v = {};
  const V big = zero_v + std::numeric_limits<T>::max();
  int64_t hi = L;
  for (; hi >= W; hi -= W) {
    const int64_t t0 = hi - W;
    V r, v;
    std::memcpy(&r, rp + t0, sizeof(V));
    std::memcpy(&v, vp + t0, sizeof(V));
    const I on = MaskVec<T, M>::load(mp + t0, bad_mask);
    const I fin_r = (r <= big) & (r >= -big);  // false for NaN and +-inf
    const I fin_v = (v <= big) & (v >= -big);
    bad_r |= on & ~fin_r;
    bad_v |= on & ~fin_v;
    r = on ? r : zero_v;
    v = on ? v : zero_v;
    bool all_on = true, any_on = false;
    for (int i = 0; i < W; ++i) {
      all_on = all_on && on[i];
      any_on = any_on || on[i];
    }
    const bool keep_all = all_on || (zero && (started || on[W - 1]));
    const bool keep_none = !any_on && !(zero && started);
    V a_out = zero_v, r_out = zero_v;
    if (keep_all) {
      V nvv = shift_down<T, 1>(v);
      nvv[W - 1] = nv;
      V x = (r + cf.gamma * nvv) - v;
      x = x + cf.c * shift_down<T, 1>(x);
      if constexpr (W > 2) x = x + cf.c2 * shift_down<T, 2>(x);
      if constexpr (W > 4) x = x + cf.c4 * shift_down<T, 4>(x);
      x = x + cf.pw * A;
      A = x[0];
      nv = v[0];
      started = true;
      a_out = on ? x : zero_v;
      r_out = on ? x + v : zero_v;
    } else if (keep_none) {
      a_out = zero_v;
      r_out = zero_v;
    } else {
      for (int i = W - 1; i >= 0; --i) {
        gae_step(r[i], v[i], bool(on[i]), zero, started, A, nv, cf.gamma, cf.c);
        a_out[i] = on[i] ? A : T(0);
        r_out[i] = on[i] ? A + v[i] : T(0);
      }
    }
    std::memcpy(oa + t0, &a_out, sizeof(V));
    if (orr) std::memcpy(orr + t0, &r_out, sizeof(V));
  }
  uint32_t flags = 0;
  for (int i = 0; i < W; ++i)
    flags |= uint32_t(bad_mask[i] != 0) | (uint32_t(bad_r[i] != 0) << 1) |
             (uint32_t(bad_v[i] != 0) << 2);
  for (int64_t t = hi - 1; t >= 0; --t) {
    const M mv = mp[t];
    const bool m = mv != M(0);
    flags |= elem_flags(mv, rp[t], vp[t]);
    const T v = m ? vp[t] : T(0);
    gae_step(m ? rp[t] : T(0), v, m, zero, started, A, nv, cf.gamma, cf.c);
    oa[t] = m ? A : T(0);
    if (orr) orr[t] = m ? A + v : T(0);
  }
  return flags;
}

// Count, mean and centred sum of squares of a just-written advantage row (0 at masked
// positions, so sums over the row are sums over the valid positions): float64 lanes over
// the contiguous output, which is still in cache.  M2 = sum x^2 - n mean^2, clamped at 0.
template <typename T, typename M>
void out_row_moments(const T* o, const M* m, int64_t ms, int64_t L, double* st) {
  using DV = VecOf<double>::V;
  constexpr int W = VecOf<double>::W;
  typedef T TV __attribute__((vector_size(sizeof(T) * W)));
  DV s = {}, s2 = {};
  int64_t t = 0;
  for (; t + W <= L; t += W) {
    TV tv;
    std::memcpy(&tv, o + t, sizeof(TV));
    const DV x = __builtin_convertvector(tv, DV);
    s += x;
    s2 += x * x;
  }
  double sum = 0, sq = 0;
  for (int j = 0; j < W; ++j) {
    sum += s[j];
    sq += s2[j];
  }
  for (; t < L; ++t) {
    const double x = double(o[t]);
    sum += x;
    sq += x * x;
  }
  int64_t n = 0;
  for (int64_t k = 0; k < L; ++k) n += m[k * ms] != M(0);
  const double mean = n > 0 ? sum / double(n) : 0.0;
  st[0] = double(n);
  st[1] = mean;
  st[2] = std::max(sq - double(n) * mean * mean, 0.0);
}

// First bad element of a flagged sequence, scanning forward (slow path, errors only).
template <typename T, typename M>
void gae_find_bad(const T* r, const T* v, const M* m, int64_t rs, int64_t vs, int64_t ms,
                  int64_t L, int64_t seq, AdvStatus& st) {
  for (int64_t t = 0; t < L; ++t) {
    const M mv = m[t * ms];
    int64_t code = 0;
    if (!mask_ok(mv)) code = 1;
    else if (mv != M(0) && !finite(r[t * rs])) code = 2;
    else if (mv != M(0) && !finite(v[t * vs])) code = 3;
    if (code) {
      keep_first(st, code, seq, t);
      return;
    }
  }
}

template <typename T, typename M>
void gae_typed(const GaeArgs& a, AdvStatus* st) {
  const int64_t S = a.lay.n_seq;
  const T* rew = static_cast<const T*>(a.rewards.p);
  const T* val = static_cast<const T*>(a.values.p);
  const M* msk = static_cast<const M*>(a.mask.p);
  const T* lvp = static_cast<const T*>(a.last_values.p);
  T* out_a = static_cast<T*>(a.out_adv);
  T* out_r = static_cast<T*>(a.out_ret);
  const GaeCoef<T> cf(a.gamma, a.lam);
  const bool zero = a.zero_masked != 0;
  const bool packed = a.lay.cu != nullptr;
  const int64_t rs = a.rewards.s1, vs = a.values.s1, ms = a.mask.s1;
  const bool contig = rs == 1 && vs == 1 && ms == 1;
  std::vector<uint32_t> bad(S, 0);

  // Where sequence s starts in each input (element offsets) and in the outputs, its length.
  auto seq_geom = [&](int64_t s, int64_t& ro, int64_t& vo, int64_t& mo, int64_t& oo,
                      int64_t& L) {
    if (packed) {
      const int64_t lo = read_index(a.lay.cu, a.lay.cu_code, s);
      L = read_index(a.lay.cu, a.lay.cu_code, s + 1) - lo;
      ro = lo * rs;
      vo = lo * vs;
      mo = lo * ms;
      oo = lo;
    } else {
      L = a.lay.T;
      ro = s * a.rewards.s0;
      vo = s * a.values.s0;
      mo = s * a.mask.s0;
      oo = s * L;
    }
  };

#pragma omp parallel for schedule(dynamic, 4) num_threads(a.num_threads)
  for (int64_t s = 0; s < S; ++s) {
    int64_t ro, vo, mo, oo, L;
    seq_geom(s, ro, vo, mo, oo, L);
    const T lv = lvp[s * a.last_values.s1];
    T* oa = out_a + oo;
    T* orr = out_r ? out_r + oo : nullptr;
    uint32_t fl = contig ? gae_row_contig<T, M>(rew + ro, val + vo, msk + mo, oa, orr, lv, L,
                                                cf, zero)
                         : gae_row_strided<T, M>(rew + ro, val + vo, msk + mo, rs, vs, ms, oa,
                                                 orr, lv, L, cf, zero);
    if (!finite(lv)) fl |= 8u;
    bad[s] = fl;
    if (a.row_stats) out_row_moments<T, M>(oa, msk + mo, ms, L, a.row_stats + 3 * s);
  }

  AdvStatus best{0, 0, 0};
  for (int64_t s = 0; s < S; ++s) {
    if (!bad[s]) continue;
    if (bad[s] & 7u) {
      int64_t ro, vo, mo, oo, L;
      seq_geom(s, ro, vo, mo, oo, L);
      gae_find_bad(rew + ro, val + vo, msk + mo, rs, vs, ms, L, s, best);
    } else {
      keep_first(best, 4, s, 0);
    }
    break;
  }
  *st = best;
}

// ---------------------------------------------------------------------------------------
// Masked row statistics and whitening
// ---------------------------------------------------------------------------------------
// Count, sum and centred sum of squares of the valid elements of one row, in float64 with
// kLanes explicit accumulators (element c goes to lane c % kLanes; lanes are added in
// order), so the loops vectorise and the result does not depend on the thread count.
constexpr int kLanes = 8;

template <typename T, typename M, bool kContig>
uint32_t row_moments(const T* x, const M* m, int64_t xs_, int64_t ms_, int64_t C, int64_t& n_out,
                     double& mean_out, double& m2_out) {
  const int64_t xs = kContig ? 1 : xs_, ms = kContig ? 1 : ms_;
  double cnt[kLanes] = {}, sum[kLanes] = {};
  int32_t badm[kLanes] = {}, badx[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const M mv = m[(c + j) * ms];
      const double xv = double(x[(c + j) * xs]);
      const int32_t on = mv != M(0);
      badm[j] |= on & int32_t(mv != M(1));
      badx[j] |= on & int32_t(!(std::fabs(xv) <= double(std::numeric_limits<T>::max())));
      cnt[j] += on ? 1.0 : 0.0;
      sum[j] += on ? xv : 0.0;
    }
  for (int j = 0; c < C; ++c, ++j) {
    const M mv = m[c * ms];
    const double xv = double(x[c * xs]);
    const int32_t on = mv != M(0);
    badm[j] |= on & int32_t(mv != M(1));
    badx[j] |= on & int32_t(!(std::fabs(xv) <= double(std::numeric_limits<T>::max())));
    cnt[j] += on ? 1.0 : 0.0;
    sum[j] += on ? xv : 0.0;
  }
  uint32_t fl = 0;
  double nd = 0, total = 0;
  for (int j = 0; j < kLanes; ++j) {
    fl |= uint32_t(badm[j] != 0) | (uint32_t(badx[j] != 0) << 1);
    nd += cnt[j];
    total += sum[j];
  }
  const int64_t n = int64_t(nd);
  const double mean = n > 0 ? total / double(n) : 0.0;
  double sq[kLanes] = {};
  c = 0;
  for (; c + kLanes <= C; c += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const bool on = m[(c + j) * ms] != M(0);
      const double d = on ? double(x[(c + j) * xs]) - mean : 0.0;
      sq[j] += d * d;
    }
  for (int j = 0; c < C; ++c, ++j) {
    const bool on = m[c * ms] != M(0);
    const double d = on ? double(x[c * xs]) - mean : 0.0;
    sq[j] += d * d;
  }
  double m2 = 0;
  for (int j = 0; j < kLanes; ++j) m2 += sq[j];
  n_out = n;
  mean_out = mean;
  m2_out = m2;
  return fl;
}

// Contiguous rows: the same sums in GCC vector registers of W float64 lanes (two sets of
// accumulators; element c goes to a fixed lane), then the lanes in order.
template <typename T, typename M>
uint32_t row_moments_contig(const T* x, const M* m, int64_t C, int64_t& n_out, double& mean_out,
                            double& m2_out) {
  using DV = VecOf<double>::V;
  using DI = VecOf<double>::I;
  constexpr int W = VecOf<double>::W;
  typedef T TV __attribute__((vector_size(sizeof(T) * W)));
  typename MaskVec<double, M>::MB badm = {};
  DI badx = {};
  const DV zero = {};
  const DV one = zero + 1.0;
  const DV big = zero + double(std::numeric_limits<T>::max());
  DV cnt[2] = {zero, zero}, sum[2] = {zero, zero};
  auto load = [&](int64_t off, DI& on) {
    TV tv;
    std::memcpy(&tv, x + off, sizeof(TV));
    on = MaskVec<double, M>::load(m + off, badm);
    return __builtin_convertvector(tv, DV);
  };
  int64_t c = 0;
  for (; c + 2 * W <= C; c += 2 * W)
    for (int k = 0; k < 2; ++k) {
      DI on;
      const DV xv = load(c + k * W, on);
      badx |= on & ~((xv <= big) & (xv >= -big));
      cnt[k] += on ? one : zero;
      sum[k] += on ? xv : zero;
    }
  const int64_t c_vec = c;
  double tail_n = 0, tail_sum = 0;
  uint32_t fl = 0;
  for (; c < C; ++c) {
    const M mv = m[c];
    const double xv = double(x[c]);
    const bool on = mv != M(0);
    fl |= uint32_t(!mask_ok(mv)) | (uint32_t(on && !(std::fabs(xv) <= big[0])) << 1);
    tail_n += on ? 1.0 : 0.0;
    tail_sum += on ? xv : 0.0;
  }
  double nd = 0, total = 0;
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < W; ++j) {
      nd += cnt[k][j];
      total += sum[k][j];
    }
  nd += tail_n;
  total += tail_sum;
  for (int j = 0; j < W; ++j) fl |= uint32_t(badx[j] != 0) << 1;
  for (size_t j = 0; j < sizeof(badm) / sizeof(badm[0]); ++j) fl |= uint32_t(badm[j] != 0);
  const double mean = nd > 0 ? total / nd : 0.0;
  DV sq[2] = {zero, zero};
  const DV meanv = zero + mean;
  for (c = 0; c < c_vec; c += 2 * W)
    for (int k = 0; k < 2; ++k) {
      DI on;
      const DV xv = load(c + k * W, on);
      const DV d = on ? xv - meanv : zero;
      sq[k] += d * d;
    }
  double tail_sq = 0;
  for (c = c_vec; c < C; ++c) {
    const double d = m[c] != M(0) ? double(x[c]) - mean : 0.0;
    tail_sq += d * d;
  }
  double m2 = 0;
  for (int k = 0; k < 2; ++k)
    for (int j = 0; j < W; ++j) m2 += sq[k][j];
  m2 += tail_sq;
  n_out = int64_t(nd);
  mean_out = mean;
  m2_out = m2;
  return fl;
}

template <typename T, typename M>
void row_stats_typed(const RowStatsArgs& a, AdvStatus* st) {
  const T* x0 = static_cast<const T*>(a.x.p);
  const M* m0 = static_cast<const M*>(a.mask.p);
  const int64_t C = a.n_cols;
  const bool contig = a.x.s1 == 1 && a.mask.s1 == 1;
  std::vector<uint32_t> bad(a.n_rows, 0);
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const T* x = x0 + r * a.x.s0;
    const M* m = m0 + r * a.mask.s0;
    bad[r] = contig ? row_moments_contig<T, M>(x, m, C, a.out_count[r], a.out_mean[r],
                                               a.out_m2[r])
                    : row_moments<T, M, false>(x, m, a.x.s1, a.mask.s1, C, a.out_count[r],
                                               a.out_mean[r], a.out_m2[r]);
  }
  AdvStatus best{0, 0, 0};
  for (int64_t r = 0; r < a.n_rows && best.code == 0; ++r) {
    if (!bad[r]) continue;
    const T* x = x0 + r * a.x.s0;
    const M* m = m0 + r * a.mask.s0;
    for (int64_t c = 0; c < C; ++c) {
      const M mv = m[c * a.mask.s1];
      if (!mask_ok(mv)) { keep_first(best, 1, r, c); break; }
      if (mv != M(0) && !finite(x[c * a.x.s1])) { keep_first(best, 2, r, c); break; }
    }
  }
  *st = best;
}

template <typename T, typename M>
void whiten_typed(const WhitenArgs& a) {
  const T* x0 = static_cast<const T*>(a.x.p);
  const M* m0 = static_cast<const M*>(a.mask.p);
  T* out = static_cast<T*>(a.out);
  const int64_t C = a.n_cols;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t r = 0; r < a.n_rows; ++r) {
    const T* x = x0 + r * a.x.s0;
    const M* m = m0 + r * a.mask.s0;
    T* o = out + r * C;
    for (int64_t c = 0; c < C; ++c) {
      const bool on = m[c * a.mask.s1] != M(0);
      const double w = (double(x[c * a.x.s1]) - a.mean) * a.scale + a.add_back;
      o[c] = on ? T(w) : T(0);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Group advantages
// ---------------------------------------------------------------------------------------
template <typename T, typename M>
void broadcast_rows(const GroupArgs& a, const T* per_sample, std::vector<uint8_t>& mask_bad) {
  const M* m0 = static_cast<const M*>(a.mask.p);
  T* out = static_cast<T*>(a.out_tok);
  const int64_t L = a.T;
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t b = 0; b < a.B; ++b) {
    const M* m = m0 + b * a.mask.s0;
    T* o = out + b * L;
    const T v = per_sample[b];
    bool ok = true;
    int64_t t = 0;
    if (a.mask.s1 == 1) {
      // a plain loop: the compiler vectorises the mixed-width select itself
      int bad = 0;
      for (; t < L; ++t) {
        const M mv = m[t];
        bad |= int(mv != M(0)) & int(mv != M(1));
        o[t] = mv != M(0) ? v : T(0);
      }
      ok = bad == 0;
    }
    for (; t < L; ++t) {
      const M mv = m[t * a.mask.s1];
      ok &= mask_ok(mv);
      o[t] = mv != M(0) ? v : T(0);
    }
    mask_bad[b] = !ok;
  }
}

// Sum of a contiguous row: 4 * W lanes in the value type (element c goes to a fixed lane),
// the lanes then added in float64 in order (float32 lanes, as torch.sum: each lane adds
// C / (4 W) elements).  Only when the result is not finite is the row scanned again: for
// its first infinite element (*inf_at), or, when there is none and the lanes overflowed,
// for an exact float64 sum.
template <typename T>
double row_sum_contig(const T* x, int64_t C, int64_t* inf_at) {
  using V = typename VecOf<T>::V;
  constexpr int W = VecOf<T>::W;
  constexpr int U = 4;
  V acc[U] = {};
  int64_t c = 0;
  for (; c + U * W <= C; c += U * W)
    for (int k = 0; k < U; ++k) {
      V xv;
      std::memcpy(&xv, x + c + k * W, sizeof(V));
      acc[k] += xv;
    }
  // lanes: a fixed tree (short dependency chains; the row is short)
  const V v4 = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  double lane[W];
  for (int j = 0; j < W; ++j) lane[j] = double(v4[j]);
  for (int h = W / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) lane[j] += lane[j + h];
  double total = lane[0];
  for (; c < C; ++c) total += double(x[c]);
  if (!std::isfinite(total)) {
    bool has_nan = false;
    for (int64_t i = 0; i < C; ++i) {
      if (std::isinf(x[i])) {
        *inf_at = i;
        return total;
      }
      has_nan |= std::isnan(x[i]);
    }
    if (!has_nan) {  // float32 lanes overflowed: the float64 sum
      total = 0;
      for (int64_t i = 0; i < C; ++i) total += double(x[i]);
    }
  }
  return total;
}

// row_sum_contig of the row with 0 at the positions where keep[c] == 0: the same lanes, the
// same order of additions and the same handling of a non-finite total, so the result is
// bitwise that of row_sum_contig on a copy zeroed at those positions (and of the unmasked
// sum where the values there are 0).  Values at dropped positions never enter the sum.
template <typename T>
double row_sum_kept(const T* x, const uint8_t* keep, int64_t C, int64_t* inf_at) {
  constexpr int W = VecOf<T>::W;
  constexpr int U = 4;
  T acc[U * W] = {};  // acc[k * W + j]: lane j of row_sum_contig's accumulator k
  int64_t c = 0;
  for (; c + U * W <= C; c += U * W)
    for (int j = 0; j < U * W; ++j) {
      const T v = x[c + j];  // loaded unconditionally: a blend, not a masked load
      acc[j] += keep[c + j] ? v : T(0);
    }
  double lane[W];
  for (int j = 0; j < W; ++j)
    lane[j] = double((acc[j] + acc[W + j]) + (acc[2 * W + j] + acc[3 * W + j]));
  for (int h = W / 2; h >= 1; h /= 2)
    for (int j = 0; j < h; ++j) lane[j] += lane[j + h];
  double total = lane[0];
  for (; c < C; ++c) total += keep[c] ? double(x[c]) : 0.0;
  if (!std::isfinite(total)) {
    bool has_nan = false;
    for (int64_t i = 0; i < C; ++i) {
      if (!keep[i]) continue;
      if (std::isinf(x[i])) {
        *inf_at = i;
        return total;
      }
      has_nan |= std::isnan(x[i]);
    }
    if (!has_nan) {  // float32 lanes overflowed: the float64 sum
      total = 0;
      for (int64_t i = 0; i < C; ++i) total += keep[i] ? double(x[i]) : 0.0;
    }
  }
  return total;
}

// Row sums of [B, C] token rewards over the positions the mask keeps (values at masked
// positions are never read into the sum, so NaN or inf there is ignored).  First the mask
// is read once, for every row, into `keep` ([B, C] contiguous 0/1 bytes, which the
// broadcast then reads instead of the mask), `count` (kept positions) and `bad` (a value
// other than 0/1); then the sums: row_sum_kept for contiguous rows (bitwise the unmasked
// sum where the masked values are 0), a float64 running sum for strided ones.  (Two loops:
// summing a row right after writing its kept bytes stalls on store-to-load forwarding.)
template <typename T, typename M>
void masked_row_sums(const GroupArgs& a, std::vector<double>& s, std::vector<int64_t>& inf_at,
                     uint8_t* keep, std::vector<double>& count, std::vector<uint8_t>& bad) {
  const T* sp = static_cast<const T*>(a.scores.p);
  const M* m0 = static_cast<const M*>(a.mask.p);
  const int64_t C = a.n_score_cols;
  const int64_t ms1 = a.mask.s1;
#pragma omp parallel num_threads(a.num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      const M* m = m0 + b * a.mask.s0;
      uint8_t* k = keep + b * C;
      int64_t n = 0;
      int not01 = 0;
      if (ms1 == 1) {  // a plain loop: the compiler vectorises the mixed-width compares
        for (int64_t c = 0; c < C; ++c) {
          const M mv = m[c];
          const bool on = mv != M(0);
          not01 |= int(on) & int(mv != M(1));
          k[c] = uint8_t(on);
          n += on;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const M mv = m[c * ms1];
          not01 |= int(!mask_ok(mv));
          k[c] = uint8_t(mv != M(0));
          n += mv != M(0);
        }
      }
      count[b] = double(n);
      bad[b] = uint8_t(not01 != 0);
    }
    // (the implicit barrier: every row's bytes are written; each thread then sums the
    // rows whose bytes it wrote itself, the same static schedule)
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      const T* row = sp + b * a.scores.s0;
      const uint8_t* k = keep + b * C;
      if (a.scores.s1 == 1) {
        s[b] = row_sum_kept(row, k, C, &inf_at[b]);
      } else {
        double acc = 0;
        for (int64_t c = 0; c < C; ++c) {
          if (!k[c]) continue;
          const T v = row[c * a.scores.s1];
          if (std::isinf(v) && inf_at[b] < 0) inf_at[b] = c;
          acc += double(v);
        }
        s[b] = acc;
      }
    }
  }
}

template <typename M>
void mask_row_counts(const GroupArgs& a, std::vector<double>& len, std::vector<uint8_t>& mask_bad) {
  const M* m0 = static_cast<const M*>(a.mask.p);
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t b = 0; b < a.B; ++b) {
    const M* m = m0 + b * a.mask.s0;
    int64_t n = 0;
    bool ok = true;
    for (int64_t t = 0; t < a.T; ++t) {
      const M mv = m[t * a.mask.s1];
      ok &= mask_ok(mv);
      n += mv != M(0);
    }
    len[b] = double(n);
    mask_bad[b] = !ok;
  }
}

template <typename M>
int64_t first_bad_in_row(const GroupArgs& a, int64_t b) {
  const M* m = static_cast<const M*>(a.mask.p) + b * a.mask.s0;
  for (int64_t t = 0; t < a.T; ++t)
    if (!mask_ok(m[t * a.mask.s1])) return t;
  return 0;
}

template <typename T>
void group_typed(const GroupArgs& a, AdvStatus* st) {
  const int64_t B = a.B;
  const T* sp = static_cast<const T*>(a.scores.p);
  AdvStatus best{0, 0, 0};

  // 1. Sequence scores (a row sum for token-level rewards, over the positions the mask
  // keeps when there is a mask), in double.
  std::vector<double> s(B);
  std::vector<int64_t> inf_at(B, -1);
  // [B, T] rewards with a mask: the mask is read here once (kept bytes, counts, bad rows)
  const bool tok_mask = a.n_score_cols > 0 && a.mask.p != nullptr;
  // The kept bytes live in a per-thread buffer reused across calls: a fresh B x T
  // allocation page-faulted on every call (~2x the time of the whole op at 4096 x 512).
  static thread_local std::vector<uint8_t> keep_buf;
  uint8_t* keep = nullptr;
  std::vector<double> keep_count;
  std::vector<uint8_t> keep_bad;
  if (tok_mask) {
    const size_t need = size_t(B) * size_t(a.n_score_cols);
    if (keep_buf.size() < need || keep_buf.size() > 4 * need + (size_t(1) << 20))
      std::vector<uint8_t>(need).swap(keep_buf);  // grow, or shrink a much larger one
    keep = keep_buf.data();
    keep_count.assign(B, 0.0);
    keep_bad.assign(B, 0);
    with_mask(a.mask_code, [&](auto tag) {
      using M = typename decltype(tag)::type;
      masked_row_sums<T, M>(a, s, inf_at, keep, keep_count, keep_bad);
    });
  } else {
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t b = 0; b < B; ++b) {
      if (a.n_score_cols == 0) {
        const T v = sp[b * a.scores.s0];
        s[b] = double(v);
        if (std::isinf(v)) inf_at[b] = 0;
      } else {
        const T* row = sp + b * a.scores.s0;
        if (a.scores.s1 == 1) {
          s[b] = row_sum_contig(row, a.n_score_cols, &inf_at[b]);
        } else {
          double acc = 0;
          for (int64_t c = 0; c < a.n_score_cols; ++c) {
            const T v = row[c * a.scores.s1];
            if (std::isinf(v) && inf_at[b] < 0) inf_at[b] = c;
            acc += double(v);
          }
          s[b] = acc;
        }
      }
    }
  }
  for (int64_t b = 0; b < B; ++b)
    if (inf_at[b] >= 0) {
      *st = AdvStatus{4, b, inf_at[b]};
      return;
    }
  std::vector<uint8_t> valid(B);
  for (int64_t b = 0; b < B; ++b) valid[b] = !std::isnan(s[b]);

  // 2. Lengths (OPO baseline weights, token weights of the whitening).
  const bool has_mask = a.mask.p != nullptr;
  std::vector<double> len;
  std::vector<uint8_t> mask_bad(B, 0);
  const bool need_len = a.method == kOpo || (a.method == kRfppBaseline && (has_mask || a.lengths));
  if (need_len) {
    len.assign(B, 1.0);
    if (a.lengths) {
      for (int64_t b = 0; b < B; ++b) len[b] = a.lengths[b];
    } else if (tok_mask) {  // counted in step 1
      len = keep_count;
      mask_bad = keep_bad;
    } else if (has_mask) {
      with_mask(a.mask_code, [&](auto tag) {
        using M = typename decltype(tag)::type;
        mask_row_counts<M>(a, len, mask_bad);
      });
    }
  }

  // 3. Groups: `order` lists the members of each group (in index order) back to back,
  // group g being order[seg[g] .. seg[g + 1]).
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), int64_t(0));
  std::vector<int64_t> seg;
  if (a.ids == nullptr) {
    const int64_t k = a.group_size;
    for (int64_t g = 0; g * k < B; ++g) seg.push_back(g * k);
    seg.push_back(B);
  } else {
    std::vector<int64_t> id(B);
    bool sorted = true;
    for (int64_t b = 0; b < B; ++b) {
      id[b] = read_index(a.ids, a.ids_code, b * a.ids_stride);
      sorted = sorted && (b == 0 || id[b - 1] <= id[b]);
    }
    if (!sorted)  // stable: members stay in sample order within each group
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t x, int64_t y) { return id[x] < id[y]; });
    for (int64_t k = 0; k < B; ++k)
      if (k == 0 || id[order[k]] != id[order[k - 1]]) seg.push_back(k);
    seg.push_back(B);
  }
  const int64_t G = int64_t(seg.size()) - 1;

  // 4. Batch-wide quantities, serially in index order.
  int64_t n_valid = 0, n_nonzero = 0;
  double batch_std = 0;
  {
    double K = 0, sum = 0;
    bool have_k = false;
    for (int64_t b = 0; b < B; ++b) {
      if (!valid[b]) continue;
      if (!have_k) { K = s[b]; have_k = true; }
      ++n_valid;
      n_nonzero += s[b] != 0.0;
      sum += s[b] - K;
    }
    if (a.method == kBatchStd && n_valid >= 2) {
      const double md = sum / double(n_valid);
      double m2 = 0;
      for (int64_t b = 0; b < B; ++b)
        if (valid[b]) {
          const double d = s[b] - K - md;
          m2 += d * d;
        }
      batch_std = std::sqrt(m2 / double(n_valid - 1));
    }
  }
  const double alpha = double(n_valid) / double(std::max<int64_t>(n_nonzero, 1));
  auto floored = [&](double sd) { return a.std_floor >= 0 ? std::max(sd, a.std_floor) : sd; };

  // 5. Per group.
  std::vector<double> x(B, 0.0);
  std::vector<int64_t> size_one_err(G, -1);
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t g = 0; g < G; ++g) {
    const int64_t lo = seg[g], hi = seg[g + 1];
    int64_t n = 0, first = -1;
    double sumd = 0;
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i = order[k];
      if (!valid[i]) continue;
      if (first < 0) first = i;
      ++n;
      sumd += s[i] - s[first];
    }
    if (n == 0) continue;
    const double K = s[first];
    if (n == 1) {
      const double r = s[first];
      double v = 0;
      if (a.size_one == kSizeOneSelf) {
        switch (a.method) {
          case kGrpo: v = r / (floored(1.0) + a.eps); break;
          case kBatchStd: v = r / (floored(batch_std) + a.eps); break;
          case kGpg: v = alpha * r / a.f_norm; break;
          case kGrpoPassk: size_one_err[g] = first; break;
          default: v = r; break;  // dr_grpo, rloo, reinforce_pp_baseline, opo: baseline 0
        }
      } else if (a.size_one == kSizeOneError) {
        if (a.method == kGrpo || a.method == kRloo || a.method == kGrpoPassk) size_one_err[g] = first;
      }
      x[first] = v;
      continue;
    }
    const double md = sumd / double(n);
    double m2 = 0;
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t i = order[k];
      if (!valid[i]) continue;
      const double d = s[i] - K - md;
      m2 += d * d;
    }
    const double sd = std::sqrt(m2 / double(n - 1));
    switch (a.method) {
      case kGrpo: {
        const double den = floored(sd) + a.eps;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = (s[i] - K - md) / den;
        }
        break;
      }
      case kBatchStd: {
        const double den = floored(batch_std) + a.eps;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = (s[i] - K - md) / den;
        }
        break;
      }
      case kRloo: {
        const double f = double(n) / double(n - 1);
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = (s[i] - K - md) * f;
        }
        break;
      }
      case kOpo: {
        double w = 0, ws = 0;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (!valid[i]) continue;
          w += len[i];
          ws += len[i] * (s[i] - K);
        }
        const double base = w > 0 ? ws / w : md;  // all lengths 0: the plain mean
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = (s[i] - K) - base;
        }
        break;
      }
      case kGrpoPassk: {
        int64_t best_i = -1;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i] && (best_i < 0 || s[i] > s[best_i])) best_i = i;
        }
        double second = -std::numeric_limits<double>::infinity();
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i] && i != best_i) second = std::max(second, s[i]);
        }
        double adv = s[best_i] - second;
        if (a.norm_by_std) adv /= floored(sd) + a.eps;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = i == best_i ? adv : 0.0;
        }
        break;
      }
      case kGpg: {
        const double f = alpha / a.f_norm;
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = f * (s[i] - K - md);
        }
        break;
      }
      default: {  // dr_grpo, reinforce_pp_baseline (whitened below)
        for (int64_t k = lo; k < hi; ++k) {
          const int64_t i = order[k];
          if (valid[i]) x[i] = s[i] - K - md;
        }
        break;
      }
    }
  }
  for (int64_t g = 0; g < G; ++g)
    if (size_one_err[g] >= 0) keep_first(best, 5, size_one_err[g], 0);
  for (int64_t b = 0; b < B; ++b)
    if (mask_bad[b]) {
      with_mask(a.mask_code, [&](auto tag) {
        using M = typename decltype(tag)::type;
        keep_first(best, 1, b, first_bad_in_row<M>(a, b));
      });
      break;
    }
  if (best.code != 0) {
    *st = best;
    return;
  }

  // 6. REINFORCE++-baseline: whiten over the batch (token-weighted when lengths are known).
  if (a.method == kRfppBaseline) {
    double W = 0, wsum = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (!valid[b]) continue;
      const double w = len.empty() ? 1.0 : len[b];
      W += w;
      wsum += w * x[b];
    }
    const bool enough = a.whiten_biased ? W > 0 : W > 1;
    if (!enough) {
      *st = AdvStatus{6, 0, 0};
      return;
    }
    const double mean = wsum / W;
    double m2 = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (!valid[b]) continue;
      const double w = len.empty() ? 1.0 : len[b];
      const double d = x[b] - mean;
      m2 += w * d * d;
    }
    const double rstd = a.whiten_biased ? 1.0 / std::sqrt(std::max(m2 / W, 1e-8))
                                        : 1.0 / std::sqrt(m2 / (W - 1) + 1e-8);
    for (int64_t b = 0; b < B; ++b)
      if (valid[b]) x[b] = (x[b] - mean) * rstd;
  }

  // 7. Outputs.
  T* out = static_cast<T*>(a.out_sample);
  for (int64_t b = 0; b < B; ++b) out[b] = valid[b] ? T(x[b]) : T(0);
  if (a.out_tok != nullptr) {
    std::vector<uint8_t> bad_rows(B, 0);
    if (tok_mask) {  // broadcast over the kept bytes of step 1 (the same 0/1 pattern)
      GroupArgs kb = a;
      kb.mask = Strided{keep, a.n_score_cols, 1};
      std::vector<uint8_t> unused(B, 0);
      broadcast_rows<T, uint8_t>(kb, out, unused);
      bad_rows = keep_bad;
    } else {
      with_mask(a.mask_code, [&](auto tag) {
        using M = typename decltype(tag)::type;
        broadcast_rows<T, M>(a, out, bad_rows);
      });
    }
    for (int64_t b = 0; b < B; ++b)
      if (bad_rows[b]) {
        with_mask(a.mask_code, [&](auto tag) {
          using M = typename decltype(tag)::type;
          keep_first(best, 1, b, first_bad_in_row<M>(a, b));
        });
        break;
      }
  }
  *st = best;
}

// ---------------------------------------------------------------------------------------
// Token rewards
// ---------------------------------------------------------------------------------------
template <typename T, typename M>
void token_rewards_typed(const TokenRewardArgs& a, AdvStatus* st) {
  const int64_t S = a.lay.n_seq;
  const T* sc = static_cast<const T*>(a.scores.p);
  const T* kl0 = static_cast<const T*>(a.kl.p);
  const M* m0 = static_cast<const M*>(a.mask.p);
  T* out0 = static_cast<T*>(a.out);
  const T coef = T(a.kl_coef);
  std::vector<AdvStatus> bad(S, AdvStatus{0, 0, 0});
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
  for (int64_t s = 0; s < S; ++s) {
    int64_t lo = 0, L = a.lay.T;
    const T* kl;
    const M* m;
    T* o;
    if (a.lay.cu == nullptr) {
      kl = kl0 + s * a.kl.s0;
      m = m0 + s * a.mask.s0;
      o = out0 + s * L;
    } else {
      lo = read_index(a.lay.cu, a.lay.cu_code, s);
      L = read_index(a.lay.cu, a.lay.cu_code, s + 1) - lo;
      kl = kl0 + lo * a.kl.s1;
      m = m0 + lo * a.mask.s1;
      o = out0 + lo;
    }
    const T score = sc[s * a.scores.s1];
    int64_t last = -1;
    for (int64_t t = L - 1; t >= 0; --t)
      if (m[t * a.mask.s1] != M(0)) {
        last = t;
        break;
      }
    AdvStatus b{0, s, 0};
    if (!finite(score)) b = AdvStatus{4, s, 0};
    for (int64_t t = 0; t < L; ++t) {
      const M mv = m[t * a.mask.s1];
      const T k = kl[t * a.kl.s1];
      const bool on = mv != M(0);
      if (b.code == 0) {
        if (!mask_ok(mv)) b = AdvStatus{1, s, t};
        else if (on && !finite(k)) b = AdvStatus{2, s, t};
      }
      const T pen = on ? coef * k : T(0);
      o[t] = t == last ? score - pen : (on ? T(0) - pen : T(0));
    }
    bad[s] = b;
  }
  AdvStatus best{0, 0, 0};
  for (int64_t s = 0; s < S; ++s)
    if (bad[s].code) {
      best = bad[s];
      break;
    }
  *st = best;
}

}  // namespace

void gae_fwd(const GaeArgs& a, AdvStatus* st) {
  *st = AdvStatus{0, 0, 0};
  with_value(a.dtype, [&](auto vt) {
    using T = typename decltype(vt)::type;
    with_mask(a.mask_code, [&](auto mt) {
      using M = typename decltype(mt)::type;
      gae_typed<T, M>(a, st);
    });
  });
}

void masked_row_stats(const RowStatsArgs& a, AdvStatus* st) {
  *st = AdvStatus{0, 0, 0};
  with_value(a.dtype, [&](auto vt) {
    using T = typename decltype(vt)::type;
    with_mask(a.mask_code, [&](auto mt) {
      using M = typename decltype(mt)::type;
      row_stats_typed<T, M>(a, st);
    });
  });
}

void masked_whiten_apply(const WhitenArgs& a) {
  with_value(a.dtype, [&](auto vt) {
    using T = typename decltype(vt)::type;
    with_mask(a.mask_code, [&](auto mt) {
      using M = typename decltype(mt)::type;
      whiten_typed<T, M>(a);
    });
  });
}

void group_advantages(const GroupArgs& a, AdvStatus* st) {
  *st = AdvStatus{0, 0, 0};
  with_value(a.dtype, [&](auto vt) {
    using T = typename decltype(vt)::type;
    group_typed<T>(a, st);
  });
}

void token_rewards(const TokenRewardArgs& a, AdvStatus* st) {
  *st = AdvStatus{0, 0, 0};
  with_value(a.dtype, [&](auto vt) {
    using T = typename decltype(vt)::type;
    with_mask(a.mask_code, [&](auto mt) {
      using M = typename decltype(mt)::type;
      token_rewards_typed<T, M>(a, st);
    });
  });
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
