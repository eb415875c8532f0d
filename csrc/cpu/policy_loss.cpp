// Fused PPO / GRPO policy loss, clipped value loss and KL estimators over [B, T] tokens.
//
// policy_loss_fwd, in one call:
//   rows in parallel: one thread owns a row.  It stages the row's inputs (below), and for GSPO
//     first sums the row's masked log-ratios; then one pass over the tokens computes the
//     policy-gradient term, the KL term, the per-token gradient d(l_t)/d(logp_t) (stored
//     *without* the aggregation coefficient c_i, which needs every row's token count), the
//     row's token count, the mask check, and the row's partial sums for the loss and the
//     statistics; GSPO with the sequence-mean gradient sweeps the row a second time to add the
//     coupling term;
//   then serially, in row order (in double): N = sum L_i, G = #{L_i > 0}, the coefficients
//     c_i (policy / KL) and e_i (entropy), the loss, the statistics, and escale[i] =
//     -entropy_coef * e_i; the gradient gets c_i either in place (each thread rescales the rows
//     it wrote while they are still in its cache) or, when a gscale output is given, as
//     gscale[i] = c_i for the caller to apply.
// A row's work depends only on that row, and the final sums run in a fixed order, so every
// result is bitwise independent of the number of threads.
//
// SIMD.  The per-token math is written once, generically over a "lane vector" type: for
// float it is a GCC vector of W floats (vector extensions, so the SIMD code does not depend on
// the auto-vectoriser; W = 16 for AVX-512, 8 for AVX2, 4 for SSE), for the float64 path a plain
// double.  Lane j of a row's accumulators sums the tokens t = j (mod W), and the W lanes are
// added in order at the end of the row: a fixed summation order for a given ISA build.  A
// row's last partial group is padded (mask 0) so the same vector code handles it.
//
// Inputs of any dtype and strides are read through per-thread row buffers ("staging"): a row
// that is already contiguous in the accumulation dtype is used in place; any other row (bf16,
// a strided view, a broadcast [B] advantage with token stride 0, a bool mask) is converted
// into the buffer first.
//
// Masked tokens (m = 0) contribute exactly 0 to every sum and get a zero gradient, whatever
// their values (NaN or inf there never reaches the results).
#include "rlfuse/common.h"
#include "policy_loss.h"

#include <algorithm>
#include <cmath>
#include <memory>

// Vector arguments of the (inlined, internal-linkage) helpers below never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

using namespace ::rlfuse::cpu::pl;

#define RLFUSE_INLINE inline __attribute__((always_inline))

// ------------------------------------------------------------------------------ lane vectors
// Lanes per float vector: one register of the ISA level this file is compiled for.
#if defined(__AVX512F__)
constexpr int kVW = 16;
#elif defined(__AVX2__)
constexpr int kVW = 8;
#else
constexpr int kVW = 4;
#endif
typedef float v16f __attribute__((vector_size(4 * kVW)));
typedef int32_t v16i __attribute__((vector_size(4 * kVW)));
typedef float v16f_u __attribute__((vector_size(4 * kVW), aligned(4)));  // unaligned access

template <typename E>
struct Lane;
template <>
struct Lane<float> {
  using V = v16f;
  static constexpr int W = kVW;
};
template <>
struct Lane<double> {
  using V = double;
  static constexpr int W = 1;
};

template <typename VF>
struct ElemOf;
template <>
struct ElemOf<v16f> {
  using type = float;
};
template <>
struct ElemOf<double> {
  using type = double;
};

template <typename VF>
RLFUSE_INLINE VF splat(typename ElemOf<VF>::type c);
template <>
RLFUSE_INLINE v16f splat<v16f>(float c) {
  return v16f{} + c;
}
template <>
RLFUSE_INLINE double splat<double>(double c) {
  return c;
}

RLFUSE_INLINE v16f sel(v16i c, v16f a, v16f b) { return c ? a : b; }
RLFUSE_INLINE double sel(bool c, double a, double b) { return c ? a : b; }
RLFUSE_INLINE v16i mand(v16i a, v16i b) { return a & b; }
RLFUSE_INLINE bool mand(bool a, bool b) { return a && b; }
RLFUSE_INLINE v16i mor(v16i a, v16i b) { return a | b; }
RLFUSE_INLINE bool mor(bool a, bool b) { return a || b; }
RLFUSE_INLINE v16i mnot(v16i a) { return ~a; }
RLFUSE_INLINE bool mnot(bool a) { return !a; }

RLFUSE_INLINE v16f vabs(v16f x) { return (v16f)((v16i)x & 0x7fffffff); }
RLFUSE_INLINE double vabs(double x) { return std::fabs(x); }

RLFUSE_INLINE v16f vload(const float* p) { return *reinterpret_cast<const v16f_u*>(p); }
RLFUSE_INLINE double vload(const double* p) { return *p; }
RLFUSE_INLINE void vstore(float* p, v16f v) { *reinterpret_cast<v16f_u*>(p) = v; }
RLFUSE_INLINE void vstore(double* p, double v) { *p = v; }

RLFUSE_INLINE float hsum(v16f v) {  // lanes in order
  float s = 0;
  for (int j = 0; j < kVW; ++j) s += v[j];
  return s;
}
RLFUSE_INLINE double hsum(double v) { return v; }

// min/max with torch's NaN semantics (a NaN x is returned): x86 minps/maxps return their
// second operand when either is NaN, and GCC maps these selects onto them.
template <typename VF>
RLFUSE_INLINE VF vmin(VF x, VF hi) {
  return sel(hi < x, hi, x);
}
template <typename VF>
RLFUSE_INLINE VF vmax(VF x, VF lo) {
  return sel(lo > x, lo, x);
}
// clamp(x, lo, hi) with torch semantics (NaN stays NaN).  Its gradient indicator (x inside
// [lo, hi], bounds included, as torch.clamp) is simply clampv(x, lo, hi) == x.
template <typename VF>
RLFUSE_INLINE VF clampv(VF x, VF lo, VF hi) {
  return vmax(vmin(x, hi), lo);
}

// exp(x), ~1 ulp (vexp of rlfuse/common.h on a lane vector).  x is clamped to [-87.34, 89]
// first, so exp(x >= 88.38) = +inf (the scale 2^128 is inf; the exact overflow point is 88.72)
// and exp(x <= -87.34) = ~1e-38 instead of 0; NaN propagates.  Also returns, for k3, the part
// em1s = e^x - 1 - x computed from the polynomial without cancellation, valid where n == 0
// (|x| < ln2 / 2), and that condition.
struct ExpParts {
  v16f e, em1s;
  v16i small;
};
RLFUSE_INLINE ExpParts exp_parts(v16f x) {
  const v16f xc = clampv(x, splat<v16f>(-87.3365478515625f), splat<v16f>(89.0f));
  const float shifter = 12582912.0f;
  const v16f t = xc * 1.44269504088896341f + shifter;
  const v16f n = t - shifter;
  v16f r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const v16f r2 = r * r;
  v16f p = splat<v16f>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v16f em1s = p * r2;  // e^r - 1 - r
  const v16i ni = (v16i)t - int32_t(float_to_bits(shifter));
  const v16i sbits = (ni + 127) << 23;
  ExpParts o;
  o.e = (em1s + r + 1.0f) * (v16f)sbits;
  o.em1s = em1s;
  o.small = n == splat<v16f>(0.0f);
  return o;
}
RLFUSE_INLINE v16f exp_full(v16f x) { return exp_parts(x).e; }
RLFUSE_INLINE double exp_full(double x) { return std::exp(x); }

// k3 terms for q = ref - logp:  v = e^q - q - 1  and  em1 = e^q - 1, accurate near q = 0
// (where e^q - q - 1 cancels).  float: from the exp polynomial (n == 0 means r == q);
// double: a series for |q| < 1/2, v = q^2 sum_k q^k / (k + 2)!.
RLFUSE_INLINE void k3_terms(v16f q, v16f& v, v16f& em1) {
  const ExpParts x = exp_parts(q);
  v = sel(x.small, x.em1s, (x.e - q) - 1.0f);
  em1 = sel(x.small, x.em1s + q, x.e - 1.0f);
}
RLFUSE_INLINE void k3_terms(double q, double& v, double& em1) {
  static constexpr double c[15] = {
      1.0 / 2,           1.0 / 6,             1.0 / 24,          1.0 / 120,
      1.0 / 720,         1.0 / 5040,          1.0 / 40320,       1.0 / 362880,
      1.0 / 3628800,     1.0 / 39916800,      1.0 / 479001600,   1.0 / 6227020800,
      1.0 / 87178291200, 1.0 / 1307674368000, 1.0 / 20922789888000};
  double p = c[14];
  for (int k = 13; k >= 0; --k) p = p * q + c[k];
  const double v_small = q * q * p;
  const double e = std::exp(q);
  const bool small = q > -0.5 && q < 0.5;
  v = small ? v_small : (e - q) - 1.0;
  em1 = small ? q + v_small : e - 1.0;
}

// ------------------------------------------------------------------------------ staging
struct In {
  const void* p;
  int dt;
  int64_t sb, st;
};

inline In read_in(const int64_t* a, int off) {
  return In{reinterpret_cast<const void*>(a[off]), int(a[off + 1]), a[off + 2], a[off + 3]};
}

template <typename S>
RLFUSE_INLINE float conv(S x) { return to_float(x); }
template <>
RLFUSE_INLINE float conv<uint8_t>(uint8_t x) { return float(x); }
template <>
RLFUSE_INLINE float conv<int8_t>(int8_t x) { return float(x); }
template <>
RLFUSE_INLINE float conv<int32_t>(int32_t x) { return float(x); }
template <>
RLFUSE_INLINE float conv<int64_t>(int64_t x) { return float(x); }

template <typename E, typename S>
void copy_row(const S* p, int64_t st, int64_t n, E* buf) {
  if (st == 1) {
    for (int64_t t = 0; t < n; ++t) buf[t] = E(conv(p[t]));
  } else {
    for (int64_t t = 0; t < n; ++t) buf[t] = E(conv(p[t * st]));
  }
}
template <typename E>
void copy_row_f64(const double* p, int64_t st, int64_t n, E* buf) {
  for (int64_t t = 0; t < n; ++t) buf[t] = E(p[t * st]);
}

// Elements [c0, c0 + n) of row b of `in` as a unit-stride array of E (in place when possible).
template <typename E>
const E* stage(const In& in, int64_t b, int64_t c0, int64_t n, E* buf) {
  constexpr int acc_code = sizeof(E) == 8 ? kFloat64 : kFloat32;
  const int64_t off = b * in.sb + c0 * in.st;
  if (in.dt == acc_code && (in.st == 1 || n <= 1)) return static_cast<const E*>(in.p) + off;
  switch (in.dt) {
    case kFloat32: copy_row(static_cast<const float*>(in.p) + off, in.st, n, buf); break;
    case kFloat16: copy_row(static_cast<const f16*>(in.p) + off, in.st, n, buf); break;
    case kBFloat16: copy_row(static_cast<const bf16*>(in.p) + off, in.st, n, buf); break;
    case kFloat64: copy_row_f64(static_cast<const double*>(in.p) + off, in.st, n, buf); break;
    case kU8: copy_row(static_cast<const uint8_t*>(in.p) + off, in.st, n, buf); break;
    case kI8: copy_row(static_cast<const int8_t*>(in.p) + off, in.st, n, buf); break;
    case kI32: copy_row(static_cast<const int32_t*>(in.p) + off, in.st, n, buf); break;
    default: copy_row(static_cast<const int64_t*>(in.p) + off, in.st, n, buf); break;
  }
  return buf;
}

// Per-thread row buffers: k slots of n elements.  The storage is thread_local and only grows,
// so repeated calls neither allocate (a fresh 160 KB block would be mmap'ed and page-faulted
// on every call) nor touch new pages.  OpenMP keeps its worker threads between calls.
template <typename E>
struct Buffers {
  Buffers(int64_t T, int k) : n(T > 0 ? T : 1) {
    thread_local std::unique_ptr<E[]> storage;
    thread_local size_t capacity = 0;
    const size_t need = size_t(n) * size_t(k);
    if (need > capacity) {
      storage.reset(new E[need]);
      capacity = need;
    }
    data = storage.get();
  }
  E* operator[](int i) { return data + size_t(i) * n; }
  int64_t n;
  E* data;
};

// ------------------------------------------------------------------------------ aggregation
struct AggSpec {
  int denom_kind, len_kind;
  double num, denom_const;
};

inline double row_coef(const AggSpec& a, double L, double N, double G) {
  const double D = a.denom_kind == kDenTokens ? N : (a.denom_kind == kDenSeqs ? G : 1.0);
  const double denom = a.denom_const * D;
  if (!(denom > 0)) return 0.0;  // no tokens / no sequences: every term is 0 anyway
  double c = a.num / denom;
  switch (a.len_kind) {
    case kLenInv: c = L > 0 ? c / L : 0.0; break;
    case kLenInvEps: c = c / (L + 1e-8); break;
    case kLenInvClamp: c = c / std::max(L, 1.0); break;
    default: break;
  }
  return c;
}

constexpr int kL = 16;  // lanes of the scalar reductions below

// Mask row: number of tokens (m != 0) and of values other than 0 and 1.
template <typename E>
void mask_counts(const E* M, int64_t T, int64_t& tokens, int64_t& bad) {
  int32_t nt[kL] = {0}, nb[kL] = {0};
  int64_t t = 0;
  for (; t + kL <= T; t += kL)
    for (int j = 0; j < kL; ++j) {
      const E m = M[t + j];
      nt[j] += m != E(0);
      nb[j] += !((m == E(0)) | (m == E(1)));
    }
  int64_t a = 0, c = 0;
  for (int j = 0; j < kL; ++j) {
    a += nt[j];
    c += nb[j];
  }
  for (; t < T; ++t) {
    a += M[t] != E(0);
    c += !((M[t] == E(0)) | (M[t] == E(1)));
  }
  tokens = a;
  bad = c;
}

template <typename E>
int64_t first_bad_mask(const E* M, int64_t T) {
  for (int64_t t = 0; t < T; ++t)
    if (!((M[t] == E(0)) | (M[t] == E(1)))) return t;
  return -1;
}

// Masked sum of logp - old over a row (GSPO), in lanes.
template <typename E>
E masked_diff_sum(const E* M, const E* LP, const E* OLD, int64_t T) {
  E s[kL];
  for (int j = 0; j < kL; ++j) s[j] = E(0);
  int64_t t = 0;
  for (; t + kL <= T; t += kL)
    for (int j = 0; j < kL; ++j) {
      const E d = LP[t + j] - OLD[t + j];
      s[j] += M[t + j] != E(0) ? d : E(0);
    }
  for (int j = 0; t < T; ++t, ++j) {
    const E d = LP[t] - OLD[t];
    s[j] += M[t] != E(0) ? d : E(0);
  }
  E r = 0;
  for (int j = 0; j < kL; ++j) r += s[j];
  return r;
}

// ------------------------------------------------------------------------------ policy loss
// Per-row sums (the first kNumRowSums are kept per row; cp and bad are row-internal).
enum RowVal : int { kRPg = 0, kRK, kRH, kRClip, kRLo, kRHi, kRDual, kRNegX, kRRatio, kRKv,
                    kNumRowSums, kRCp = kNumRowSums, kRTok, kRBadMask, kNumRowVals };

template <typename E>
struct TokParams {
  E lrc, clo, chi, dual_c, delta, q4p, q4n, tp, tn, beta, kl_lrc, kl_oc;
  E s_row, ds_tok;  // GSPO: the row's ratio and its token-local derivative
  int kind;
  bool kl_st, kl_rw, statx;
};

// One group of tokens (one lane vector): the loss terms, c_i * d(loss)/d(logp) (returned),
// and the statistics, added into acc.  The mask m holds exactly 0 or 1 (checked in phase 1),
// so a count is a sum of m where the condition holds; values under m = 0 are selected away,
// never multiplied, so NaN or inf there cannot leak.  Comparisons appear only inside sel():
// GCC 12 otherwise materialises AVX-512 masks lane by lane.
//
// Gradient conventions follow torch autograd of the reference, except on exact ties between
// two branches of a min/max (measure zero): torch.minimum splits the gradient there, here one
// branch takes it.  Inside the clip range both PPO terms have the same gradient, so the
// ubiquitous tie r == 1 agrees exactly.
template <typename VF, int V, int KM, int Plain>
RLFUSE_INLINE VF token(const TokParams<typename ElemOf<VF>::type>& p, VF m, VF lp, VF old,
                       VF a, VF w, VF h, VF ref, VF (&acc)[kNumRowVals]) {
  using E = typename ElemOf<VF>::type;
  const VF zero = splat<VF>(E(0)), one = splat<VF>(E(1));
  const VF xr = lp - old;
  VF r, drdl, xstat;
  if constexpr (V == kGSPO) {
    r = splat<VF>(p.s_row);
    drdl = splat<VF>(p.ds_tok);
    xstat = xr;
  } else if constexpr (Plain >= 1) {  // no log-ratio clamp
    r = exp_full(xr);
    drdl = r;
    xstat = xr;
  } else {
    const VF x = clampv(xr, splat<VF>(-p.lrc), splat<VF>(p.lrc));
    r = exp_full(x);
    drdl = sel(x == xr, r, zero);
    xstat = p.statx ? x : xr;
  }
  const VF clo = splat<VF>(p.clo), chi = splat<VF>(p.chi);
  const VF mneg = sel(a < zero, m, zero);  // m where A < 0
  const VF mpos = sel(a > zero, m, zero);  // m where A > 0
  VF P, dPdl = zero, dPdr = zero;
  if constexpr ((V == kPPO || V == kGSPO) && Plain >= 1) {  // no delta, no dual-clip
    const VF c2 = clampv(r, clo, chi);
    const VF u1 = a * r, u2 = a * c2;
    P = -vmin(u1, u2);
    dPdr = -sel(u2 < u1, sel(c2 == r, a, zero), a);
    acc[kRClip] += sel(u2 < u1, m, zero);
  } else if constexpr (V == kPPO || V == kGSPO) {
    const VF c1 = vmin(r, splat<VF>(p.delta));
    const VF c2 = clampv(r, clo, chi);
    const VF u1 = a * c1, u2 = a * c2;
    const VF lc = -vmin(u1, u2);
    const VF ad1 = sel(c1 == r, a, zero), ad2 = sel(c2 == r, a, zero);
    const VF dlc = -sel(u2 < u1, ad2, ad1);
    acc[kRClip] += sel(u2 < u1, m, zero);
    const VF cap = -p.dual_c * a;  // dual-clip bound, used only where A < 0
    const VF lc_dual = sel(lc > cap, cap, lc);
    const VF dlc_dual = sel(lc > cap, zero, dlc);
    P = sel(a < zero, lc_dual, lc);
    dPdr = sel(a < zero, dlc_dual, dlc);
    acc[kRDual] += sel(lc > cap, mneg, zero);
  } else if constexpr (V == kCISPO) {
    const VF cr = clampv(r, clo, chi);  // a constant (stop-gradient)
    P = -cr * a * lp;
    dPdl = -cr * a;
    acc[kRClip] += sel(cr == r, zero, m);
  } else if constexpr (V == kSAPO) {
    const VF tau = sel(a > zero, splat<VF>(p.tp), splat<VF>(p.tn));
    const VF q4 = sel(a > zero, splat<VF>(p.q4p), splat<VF>(p.q4n));
    const VF e = exp_full(-(tau * (r - one)));
    const VF sig = one / (one + e);
    P = -q4 * sig * a;
    // sig (1 - sig) with 1 - sig = e sig where sig >= 1/2 (1 - sig cancels there: it is 0
    // in float32 once sig rounds to 1, though the slope is e); e <= 1 on that side
    const VF rest = sel(sig < splat<VF>(E(0.5)), one - sig, e * sig);
    dPdr = E(-4) * sig * rest * a;
  } else {  // GPG / REINFORCE: -A log pi
    P = -a * lp;
    dPdl = -a;
  }
  acc[kRLo] += sel(r < clo, mneg, zero);
  acc[kRHi] += sel(r > chi, mpos, zero);
  constexpr bool lean = Plain >= 2;  // no weights, no entropy, no "+" kinds, no ratio weighting
  VF dl = lean ? dPdl + dPdr * drdl : w * (dPdl + dPdr * drdl);
  VF cpl = lean ? dPdr : w * dPdr;
  if constexpr (KM != 0) {
    const VF d = lp - ref;
    VF v, g;
    if constexpr (KM == 2 && Plain >= 1) {
      VF em1;
      k3_terms(-d, v, em1);
      g = -em1;
    } else if constexpr (KM == 2) {
      const VF q = -d;
      const VF qc = clampv(q, splat<VF>(-p.kl_lrc), splat<VF>(p.kl_lrc));
      VF em1;
      k3_terms(qc, v, em1);
      g = sel(qc == q, -em1, zero);
    } else {
      const VF ad = sel(d < zero, -d, d);
      const VF sg = sel(d > zero, one, sel(d < zero, -one, zero));
      v = p.kind == kK1 ? d : (p.kind == kAbs ? ad : E(0.5) * d * d);
      g = p.kind == kK1 ? one : (p.kind == kAbs ? sg : d);
    }
    VF vc = v;
    if constexpr (Plain == 0) {
      vc = clampv(v, splat<VF>(-p.kl_oc), splat<VF>(p.kl_oc));
      g = sel(vc == v, g, zero);
    }
    if (!lean && p.kl_st) g = d;
    VF K = vc;
    if (!lean && p.kl_rw) {
      K = r * vc;
      dl += p.beta * (r * g + vc * drdl);
      cpl += p.beta * vc;
    } else {
      dl += p.beta * g;
    }
    acc[kRK] += sel(m != zero, K, zero);
    if constexpr (!lean) acc[kRKv] += sel(m != zero, vc, zero);  // lean: K == vc
  }
  if constexpr (lean) {
    acc[kRPg] += sel(m != zero, P, zero);
  } else {
    acc[kRPg] += sel(m != zero, P * w, zero);
    acc[kRH] += sel(m != zero, h, zero);
  }
  acc[kRNegX] += sel(m != zero, -xstat, zero);
  acc[kRRatio] += sel(m != zero, r, zero);
  if constexpr (V == kGSPO) acc[kRCp] += sel(m != zero, cpl, zero);
  // Mask check: sum |m^2 - m| is 0 exactly when every m is 0 or 1 (NaN / inf make it NaN /
  // inf); then sum m is the token count.
  acc[kRTok] += m;
  acc[kRBadMask] += vabs(m * m - m);
  return sel(m != zero, dl, zero);
}

// All tokens of a row; writes G[0:T] and the row's sums (lanes added in order).
template <typename E, int V, int KM, int Plain>
void policy_loop(const E* M, const E* LP, const E* OLD, const E* A, const E* W, const E* H,
                 const E* REF, E* G, int64_t T, const TokParams<E> p, E tot[kNumRowVals]) {
  using VF = typename Lane<E>::V;
  constexpr int Wd = Lane<E>::W;
  VF acc[kNumRowVals];
  for (int k = 0; k < kNumRowVals; ++k) acc[k] = splat<VF>(E(0));
  int64_t t = 0;
  for (; t + Wd <= T; t += Wd) {
    const VF g = token<VF, V, KM, Plain>(p, vload(M + t), vload(LP + t), vload(OLD + t),
                                         vload(A + t), vload(W + t), vload(H + t),
                                         KM != 0 ? vload(REF + t) : splat<VF>(E(0)), acc);
    if constexpr (Plain != 3) vstore(G + t, g);  // 3: no gradient wanted (and none computed)
  }
  if (t < T) {  // last partial group (float only): pad with masked, finite tokens
    alignas(64) E bm[Wd], blp[Wd], bold[Wd], ba[Wd], bw[Wd], bh[Wd], bref[Wd], bg[Wd];
    const int rem = int(T - t);
    for (int j = 0; j < Wd; ++j) {
      const bool in = j < rem;
      bm[j] = in ? M[t + j] : E(0);
      blp[j] = in ? LP[t + j] : E(0);
      bold[j] = in ? OLD[t + j] : E(0);
      ba[j] = in ? A[t + j] : E(0);
      bw[j] = in ? W[t + j] : E(1);
      bh[j] = in ? H[t + j] : E(0);
      bref[j] = (in && KM != 0) ? REF[t + j] : E(0);
    }
    vstore(bg, token<VF, V, KM, Plain>(p, vload(bm), vload(blp), vload(bold), vload(ba), vload(bw),
                                vload(bh), vload(bref), acc));
    if constexpr (Plain != 3)
      for (int j = 0; j < rem; ++j) G[t + j] = bg[j];
  }
  for (int k = 0; k < kNumRowVals; ++k) tot[k] = hsum(acc[k]);
  if constexpr (Plain >= 2 && KM != 0) tot[kRKv] = tot[kRK];
}

template <typename E>
struct PolicyCtx {
  int64_t B, T;
  In lp, old, adv, mask, ref, ent, isw;
  E* grad_lp;
  E* gscale;
  E* escale;
  int kl_kind;
  bool kl_st, kl_rw, seq_grad, stat_x_clamped;
  E lrc, seq_lr_max, clo, chi, dual_c, delta, q4p, q4n, tau_pos, tau_neg, beta, kl_lrc, kl_oc,
      ent_coef;
};

struct RowState {
  int64_t tokens = 0, bad_mask = 0;
  double sums[kNumRowSums] = {0};
  int64_t bad_adv_t = -1;
};

// Buffer slots of a thread.
enum Slot : int { kBM = 0, kBLp, kBOld, kBAdv, kBIsw, kBEnt, kBRef, kBScratch, kBOnes, kBZeros,
                  kNumSlots };

template <typename E, int V, int KM, int Plain>
void policy_row(const PolicyCtx<E>& c, int64_t b, Buffers<E>& buf, RowState& out) {
  const int64_t T = c.T;
  const E* M = stage(c.mask, b, 0, T, buf[kBM]);
  const E* LP = stage(c.lp, b, 0, T, buf[kBLp]);
  const E* OLD = c.old.p ? stage(c.old, b, 0, T, buf[kBOld]) : LP;
  const E* A = stage(c.adv, b, 0, T, buf[kBAdv]);
  const E* W = c.isw.p ? stage(c.isw, b, 0, T, buf[kBIsw]) : buf[kBOnes];
  const E* H = c.ent.p ? stage(c.ent, b, 0, T, buf[kBEnt]) : buf[kBZeros];
  const E* REF = KM != 0 ? stage(c.ref, b, 0, T, buf[kBRef]) : LP;
  E* G = c.grad_lp ? c.grad_lp + b * T : buf[kBScratch];

  TokParams<E> p;
  p.lrc = c.lrc;
  p.clo = c.clo;
  p.chi = c.chi;
  p.dual_c = c.dual_c;
  p.delta = c.delta;
  p.q4p = c.q4p;
  p.q4n = c.q4n;
  p.tp = c.tau_pos;
  p.tn = c.tau_neg;
  p.beta = c.beta;
  p.kl_lrc = c.kl_lrc;
  p.kl_oc = c.kl_oc;
  p.kind = c.kl_kind;
  p.kl_st = c.kl_st;
  p.kl_rw = c.kl_rw;
  p.statx = c.stat_x_clamped;
  p.s_row = E(1);
  p.ds_tok = E(0);
  // GSPO: the row's ratio s = exp(min(mean log-ratio, seq_lr_max)) and its derivative.
  E ds_seq = 0;
  if constexpr (V == kGSPO) {
    int64_t tokens = 0, bad = 0;
    mask_counts(M, T, tokens, bad);
    const E Lc = E(std::max<int64_t>(tokens, 1));
    const E xs = masked_diff_sum(M, LP, OLD, T) / Lc;
    const bool ind = xs <= c.seq_lr_max;
    p.s_row = E(exp_full(double(xs > c.seq_lr_max ? c.seq_lr_max : xs)));
    if (c.seq_grad)
      ds_seq = ind ? p.s_row / Lc : E(0);
    else
      p.ds_tok = ind ? p.s_row : E(0);
  }

  E tot[kNumRowVals];
  policy_loop<E, V, KM, Plain>(M, LP, OLD, A, W, H, REF, G, T, p, tot);
  for (int k = 0; k < kNumRowSums; ++k) out.sums[k] = double(tot[k]);
  out.bad_mask = !(tot[kRBadMask] == E(0));
  out.tokens = out.bad_mask ? 0 : int64_t(tot[kRTok]);
  // A non-finite advantage under the mask makes that token's policy term non-finite (for
  // every variant), hence the row's sum: only then is the row scanned for the position.
  out.bad_adv_t = -1;
  if (!std::isfinite(tot[kRPg]) && out.bad_mask == 0) {
    for (int64_t u = 0; u < T; ++u)
      if (M[u] != E(0) && !(A[u] - A[u] == E(0))) {
        out.bad_adv_t = u;
        break;
      }
  }
  if constexpr (V == kGSPO) {
    if (c.seq_grad) {
      // d(l)/d(logp_t) += m_t (sum_u m_u d(l_u)/d(s)) * ds/d(logp_t)   (c_i applied later)
      const E add = tot[kRCp] * ds_seq;
      for (int64_t u = 0; u < T; ++u) G[u] += M[u] != E(0) ? add : E(0);
    }
  }
}

template <typename E>
using PolicyRowFn = void (*)(const PolicyCtx<E>&, int64_t, Buffers<E>&, RowState&);

template <typename E, int V, int Plain>
PolicyRowFn<E> pick_km(int km) {
  if (km == 2) return &policy_row<E, V, 2, Plain>;
  if (km == 1) return &policy_row<E, V, 1, Plain>;
  return &policy_row<E, V, 0, Plain>;
}

template <typename E, int Plain>
PolicyRowFn<E> pick_variant(int variant, int km) {
  switch (variant) {
    case kGSPO: return pick_km<E, kGSPO, Plain>(km);
    case kCISPO: return pick_km<E, kCISPO, Plain>(km);
    case kSAPO: return pick_km<E, kSAPO, Plain>(km);
    case kGPG: return pick_km<E, kGPG, Plain>(km);
    case kReinforce: return pick_km<E, kGPG, Plain>(km);  // the same per-token formula
    default: return pick_km<E, kPPO, Plain>(km);
  }
}

// "Plain" (1): no log-ratio clamp, no KL clamps, no dual-clip, no delta (the rlfuse and TRL
// defaults): an instantiation without the clamp and indicator work.  "Lean" (2): plain PPO
// without importance weights, entropies, "+" KL kinds or ratio weighting (the common case), which
// also drops their loads, multiplies and sums; (3) the same without a gradient output, where
// the compiler also drops the whole gradient chain.
template <typename E>
PolicyRowFn<E> pick_policy_row(int variant, int km, const double* fa, const PolicyCtx<E>& c) {
  const bool plain = std::isinf(fa[kLrClamp]) && std::isinf(fa[kKlLrClamp]) &&
                     std::isinf(fa[kKlOutClamp]) && std::isinf(fa[kDualC]) &&
                     std::isinf(fa[kDelta]);
  const bool lean = plain && variant == kPPO && !c.isw.p && !c.ent.p && !c.kl_st && !c.kl_rw;
  if (lean) return c.grad_lp ? pick_km<E, kPPO, 2>(km) : pick_km<E, kPPO, 3>(km);
  return plain ? pick_variant<E, 1>(variant, km) : pick_variant<E, 0>(variant, km);
}

template <typename E>
void policy_loss_typed(const int64_t* ia, const double* fa, int64_t* err) {
  PolicyCtx<E> c;
  c.B = ia[kB];
  c.T = ia[kT];
  c.lp = read_in(ia, kLp);
  c.old = read_in(ia, kOld);
  c.adv = read_in(ia, kAdv);
  c.mask = read_in(ia, kMask);
  c.ref = read_in(ia, kRef);
  c.ent = read_in(ia, kEnt);
  c.isw = read_in(ia, kIsw);
  c.grad_lp = reinterpret_cast<E*>(ia[kGradLp]);
  c.gscale = reinterpret_cast<E*>(ia[kGScale]);
  c.escale = reinterpret_cast<E*>(ia[kEScale]);
  c.kl_kind = int(ia[kKlKind]);
  c.kl_st = ia[kKlStraight] != 0;
  c.kl_rw = ia[kKlRatioWeighted] != 0;
  c.seq_grad = ia[kSeqGrad] != 0;
  c.stat_x_clamped = ia[kStatClampedX] != 0;
  c.lrc = E(fa[kLrClamp]);
  c.seq_lr_max = E(fa[kSeqLrMax]);
  c.clo = E(fa[kClipLo]);
  c.chi = E(fa[kClipHi]);
  c.dual_c = E(fa[kDualC]);
  c.delta = E(fa[kDelta]);
  c.tau_pos = E(fa[kTauPos]);
  c.tau_neg = E(fa[kTauNeg]);
  c.q4p = E(4.0 / fa[kTauPos]);
  c.q4n = E(4.0 / fa[kTauNeg]);
  c.beta = E(fa[kBeta]);
  c.kl_lrc = E(fa[kKlLrClamp]);
  c.kl_oc = E(fa[kKlOutClamp]);
  c.ent_coef = E(fa[kEntCoef]);
  const AggSpec pg{int(ia[kPgDenomKind]), int(ia[kPgLenKind]), fa[kPgNum], fa[kPgDenomConst]};
  const AggSpec en{int(ia[kEntDenomKind]), int(ia[kEntLenKind]), fa[kEntNum], fa[kEntDenomConst]};
  const int variant = int(ia[kVariant]);
  const int km = int(ia[kKlMode]);
  const int nt = int(std::max<int64_t>(1, ia[kThreads]));
  const int64_t B = c.B, T = c.T;
  E* loss_out = reinterpret_cast<E*>(ia[kLossOut]);
  E* stats_out = reinterpret_cast<E*>(ia[kStatsOut]);
  err[0] = kOk;
  err[1] = err[2] = -1;

  std::unique_ptr<RowState[]> rows(new RowState[size_t(std::max<int64_t>(B, 1))]);
  std::unique_ptr<E[]> coef(new E[size_t(std::max<int64_t>(B, 1))]);
  const PolicyRowFn<E> row_fn = pick_policy_row<E>(variant, km, fa, c);
  // Without a gscale output the coefficients are applied to grad_lp here, each thread on the
  // rows it just wrote (the same static schedule gives every thread the same rows, which are
  // still in its cache), so the backward is a plain multiply by the upstream gradient.
  const bool scale_here = c.grad_lp != nullptr && c.gscale == nullptr;
  double N = 0, G = 0;

#pragma omp parallel num_threads(nt)
  {
    Buffers<E> buf(T, kNumSlots);
    for (int64_t t = 0; t < T; ++t) {
      buf[kBOnes][t] = E(1);
      buf[kBZeros][t] = E(0);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) row_fn(c, b, buf, rows[b]);

#pragma omp single
    {
      for (int64_t b = 0; b < B; ++b) {
        const RowState& rs = rows[b];
        if (rs.bad_mask && err[0] == kOk) {
          err[0] = kBadMask;
          err[1] = b;
          err[2] = first_bad_mask(stage(c.mask, b, 0, T, buf[0]), T);
        }
        N += double(rs.tokens);
        G += rs.tokens > 0 ? 1.0 : 0.0;
      }
      for (int64_t b = 0; b < B; ++b) coef[b] = E(row_coef(pg, double(rows[b].tokens), N, G));
    }
    if (scale_here && err[0] == kOk) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        E* g = c.grad_lp + b * T;
        const E cb = coef[b];
        for (int64_t t = 0; t < T; ++t) g[t] *= cb;
      }
    }
  }
  if (err[0] != kOk) return;
  double s[kNumRowSums] = {0}, pg_loss = 0, kl_loss = 0, ent_loss = 0;
  for (int64_t b = 0; b < B; ++b) {
    const RowState& rs = rows[b];
    if (rs.bad_adv_t >= 0 && err[0] == kOk) {
      err[0] = kBadAdvantage;
      err[1] = b;
      err[2] = rs.bad_adv_t;
    }
    const double L = double(rs.tokens);
    const E cb = coef[b], eb = E(row_coef(en, L, N, G));
    if (c.gscale) c.gscale[b] = cb;
    if (c.escale) c.escale[b] = -c.ent_coef * eb;
    pg_loss += double(cb) * rs.sums[kRPg];
    kl_loss += double(cb) * rs.sums[kRK];
    ent_loss += double(eb) * rs.sums[kRH];
    for (int k = 0; k < kNumRowSums; ++k) s[k] += rs.sums[k];
  }
  const double loss = pg_loss + double(c.beta) * kl_loss - double(c.ent_coef) * ent_loss;
  const double inv_n = N > 0 ? 1.0 / N : 0.0;
  *loss_out = E(loss);
  stats_out[kSPg] = E(pg_loss);
  stats_out[kSKl] = E(kl_loss);
  stats_out[kSEnt] = E(ent_loss);
  stats_out[kSClip] = E(s[kRClip] * inv_n);
  stats_out[kSClipLow] = E(s[kRLo] * inv_n);
  stats_out[kSClipHigh] = E(s[kRHi] * inv_n);
  stats_out[kSDual] = E(s[kRDual] * inv_n);
  stats_out[kSApproxKl] = E(s[kRNegX] * inv_n);
  stats_out[kSRatio] = E(s[kRRatio] * inv_n);
  stats_out[kSKlMean] = E(s[kRKv] * inv_n);
  stats_out[kSEntMean] = E(s[kRH] * inv_n);
  stats_out[kSTokens] = E(N);
  stats_out[kSSeqs] = E(G);
}

// ------------------------------------------------------------------------------ value loss
enum ValVal : int { kVLoss = 0, kVClipN, kVSum, kNumValVals };

template <typename VF, int Form>
RLFUSE_INLINE VF value_token(VF m, VF v, VF o, VF y, VF clipv, VF cb, VF (&acc)[kNumValVals]) {
  using E = typename ElemOf<VF>::type;
  const VF zero = splat<VF>(E(0));
  VF vc, ind;
  if constexpr (Form == 0) {  // clamp(v, o - c, o + c)
    vc = clampv(v, o - clipv, o + clipv);
    ind = sel(vc == v, splat<VF>(E(1)), zero);
  } else {  // o + clamp(v - o, -c, c)
    const VF dv = v - o;
    const VF dc = clampv(dv, -clipv, clipv);
    vc = o + dc;
    ind = sel(dc == dv, splat<VF>(E(1)), zero);
  }
  const VF e1 = v - y, e2 = vc - y;
  const VF l1 = e1 * e1, l2 = e2 * e2;
  // torch.maximum splits the gradient on ties (v inside the clip range: both terms agree).
  const VF g1 = E(2) * e1, g2 = E(2) * e2 * ind;
  const VF l = sel(l2 > l1, l2, l1);
  const VF gg = sel(l2 > l1, g2, sel(l1 > l2, g1, E(0.5) * (g1 + g2)));
  acc[kVLoss] += sel(m != zero, l, zero);
  acc[kVClipN] += sel(l2 > l1, m, zero);
  acc[kVSum] += sel(m != zero, v, zero);
  return sel(m != zero, cb * E(0.5) * gg, zero);
}

template <typename E, int Form>
void value_row(const In& val, const In& old, const In& ret, const In& mask, int64_t b,
               int64_t T, E clip, E cb, E* grad, Buffers<E>& buf, double* sums) {
  using VF = typename Lane<E>::V;
  constexpr int Wd = Lane<E>::W;
  const E* M = stage(mask, b, 0, T, buf[0]);
  const E* Vv = stage(val, b, 0, T, buf[1]);
  const E* O = old.p ? stage(old, b, 0, T, buf[2]) : Vv;
  const E* R = stage(ret, b, 0, T, buf[3]);
  E* G = grad ? grad + b * T : buf[4];
  const VF clipv = splat<VF>(clip), cbv = splat<VF>(cb);
  VF acc[kNumValVals];
  for (int k = 0; k < kNumValVals; ++k) acc[k] = splat<VF>(E(0));
  int64_t t = 0;
  for (; t + Wd <= T; t += Wd)
    vstore(G + t, value_token<VF, Form>(vload(M + t), vload(Vv + t), vload(O + t), vload(R + t),
                                        clipv, cbv, acc));
  if (t < T) {
    alignas(64) E bm[Wd], bv[Wd], bo[Wd], br[Wd], bg[Wd];
    const int rem = int(T - t);
    for (int j = 0; j < Wd; ++j) {
      const bool in = j < rem;
      bm[j] = in ? M[t + j] : E(0);
      bv[j] = in ? Vv[t + j] : E(0);
      bo[j] = in ? O[t + j] : E(0);
      br[j] = in ? R[t + j] : E(0);
    }
    vstore(bg, value_token<VF, Form>(vload(bm), vload(bv), vload(bo), vload(br), clipv, cbv, acc));
    for (int j = 0; j < rem; ++j) G[t + j] = bg[j];
  }
  for (int k = 0; k < kNumValVals; ++k) sums[k] = double(hsum(acc[k]));
}

template <typename E>
void value_loss_typed(const int64_t* ia, const double* fa, int64_t* err) {
  const int64_t B = ia[kVB], T = ia[kVT];
  const In val = read_in(ia, kVVal), old = read_in(ia, kVOld), ret = read_in(ia, kVRet),
           mask = read_in(ia, kVMask);
  E* grad = reinterpret_cast<E*>(ia[kVGrad]);
  E* loss_out = reinterpret_cast<E*>(ia[kVLossOut]);
  E* stats_out = reinterpret_cast<E*>(ia[kVStatsOut]);
  const int form = int(ia[kVClipForm]);
  const AggSpec agg{int(ia[kVDenomKind]), int(ia[kVLenKind]), fa[kVNum], fa[kVDenomConst]};
  const E clipv = E(fa[kVClip]);
  const int nt = int(std::max<int64_t>(1, ia[kVThreads]));
  err[0] = kOk;
  err[1] = err[2] = -1;
  const size_t nb = size_t(std::max<int64_t>(B, 1));
  std::unique_ptr<int64_t[]> tokens(new int64_t[nb]), bad(new int64_t[nb]);
  std::unique_ptr<double[]> sums(new double[nb * kNumValVals]);
  std::unique_ptr<E[]> coef(new E[nb]);
  bool mask_bad = false;
  double N = 0, G = 0;
#pragma omp parallel num_threads(nt)
  {
    Buffers<E> buf(T, 5);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      mask_counts(stage(mask, b, 0, T, buf[0]), T, tokens[b], bad[b]);
#pragma omp single
    {
      for (int64_t b = 0; b < B && !mask_bad; ++b)
        if (bad[b]) {
          mask_bad = true;
          err[0] = kBadMask;
          err[1] = b;
          err[2] = first_bad_mask(stage(mask, b, 0, T, buf[0]), T);
        }
      for (int64_t b = 0; b < B; ++b) {
        N += double(tokens[b]);
        G += tokens[b] > 0 ? 1.0 : 0.0;
      }
      for (int64_t b = 0; b < B; ++b) coef[b] = E(row_coef(agg, double(tokens[b]), N, G));
    }
    if (!mask_bad) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) {
        double* sb = &sums[size_t(b) * kNumValVals];
        if (form == 0)
          value_row<E, 0>(val, old, ret, mask, b, T, clipv, coef[b], grad, buf, sb);
        else
          value_row<E, 1>(val, old, ret, mask, b, T, clipv, coef[b], grad, buf, sb);
      }
    }
  }
  if (mask_bad) return;
  double loss = 0, clip = 0, vs = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double* sb = &sums[size_t(b) * kNumValVals];
    loss += double(coef[b]) * sb[kVLoss];
    clip += sb[kVClipN];
    vs += sb[kVSum];
  }
  const double inv_n = N > 0 ? 1.0 / N : 0.0;
  *loss_out = E(0.5 * loss);
  stats_out[kVSClip] = E(clip * inv_n);
  stats_out[kVSValMean] = E(vs * inv_n);
  stats_out[kVSTokens] = E(N);
  stats_out[kVSSeqs] = E(G);
}

// ------------------------------------------------------------------------------ kl_penalty
template <typename VF, bool Backward, int KM>
RLFUSE_INLINE VF kl_token(VF lp, VF ref, VF go, int kind, bool st, VF lrc, VF oc) {
  using E = typename ElemOf<VF>::type;
  const VF zero = splat<VF>(E(0)), one = splat<VF>(E(1));
  const VF d = lp - ref;
  VF v, g;
  if constexpr (KM == 2) {
    const VF q = -d;
    const VF qc = clampv(q, -lrc, lrc);
    VF em1;
    k3_terms(qc, v, em1);
    g = sel(qc == q, -em1, zero);
  } else {
    const VF ad = sel(d < zero, -d, d);
    const VF sg = sel(d > zero, one, sel(d < zero, -one, zero));
    v = kind == kK1 ? d : (kind == kAbs ? ad : E(0.5) * d * d);
    g = kind == kK1 ? one : (kind == kAbs ? sg : d);
  }
  if constexpr (Backward) {
    g = sel(clampv(v, -oc, oc) == v, g, zero);
    if (st) g = d;
    return go * g;
  } else {
    return clampv(v, -oc, oc);
  }
}

template <typename E, bool Backward, int KM>
void kl_chunk(const E* LP, const E* REF, const E* GO, int64_t n, E* out, int kind, bool st,
              E lrc, E oc) {
  using VF = typename Lane<E>::V;
  constexpr int Wd = Lane<E>::W;
  const VF lrcv = splat<VF>(lrc), ocv = splat<VF>(oc);
  int64_t t = 0;
  for (; t + Wd <= n; t += Wd) {
    VF go = splat<VF>(E(0));
    if constexpr (Backward) go = vload(GO + t);
    vstore(out + t, kl_token<VF, Backward, KM>(vload(LP + t), vload(REF + t), go, kind, st,
                                               lrcv, ocv));
  }
  if (t < n) {
    alignas(64) E a[Wd], r[Wd], g[Wd], o[Wd];
    const int rem = int(n - t);
    for (int j = 0; j < Wd; ++j) {
      a[j] = j < rem ? LP[t + j] : E(0);
      r[j] = j < rem ? REF[t + j] : E(0);
      g[j] = (Backward && j < rem) ? GO[t + j] : E(0);
    }
    vstore(o, kl_token<VF, Backward, KM>(vload(a), vload(r), vload(g), kind, st, lrcv, ocv));
    for (int j = 0; j < rem; ++j) out[t + j] = o[j];
  }
}

template <typename E>
void kl_typed(const int64_t* ia, const double* fa) {
  const int64_t R = ia[kKR], C = ia[kKC];
  const In lp = read_in(ia, kKLp), ref = read_in(ia, kKRef), go = read_in(ia, kKGradOut);
  E* out = reinterpret_cast<E*>(ia[kKOut]);
  const bool bwd = ia[kKBackward] != 0;
  const int kind = int(ia[kKKind]);
  const bool st = ia[kKStraight] != 0;
  const E lrc = E(fa[kKLrClamp]), oc = E(fa[kKOutClamp]);
  const int nt = int(std::max<int64_t>(1, ia[kKThreads]));
  constexpr int64_t kChunk = 4096;
  const int64_t per_row = (C + kChunk - 1) / kChunk;
  const int64_t jobs = R * per_row;
  const int64_t width = std::min(C, kChunk);
#pragma omp parallel num_threads(nt)
  {
    Buffers<E> buf(width, 3);
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) {
      const int64_t r = job / per_row, c0 = (job % per_row) * kChunk;
      const int64_t n = std::min(kChunk, C - c0);
      const E* LP = stage(lp, r, c0, n, buf[0]);
      const E* REF = stage(ref, r, c0, n, buf[1]);
      E* o = out + r * C + c0;
      if (bwd) {
        const E* GO = stage(go, r, c0, n, buf[2]);
        if (kind == kK3)
          kl_chunk<E, true, 2>(LP, REF, GO, n, o, kind, st, lrc, oc);
        else
          kl_chunk<E, true, 1>(LP, REF, GO, n, o, kind, st, lrc, oc);
      } else {
        if (kind == kK3)
          kl_chunk<E, false, 2>(LP, REF, nullptr, n, o, kind, st, lrc, oc);
        else
          kl_chunk<E, false, 1>(LP, REF, nullptr, n, o, kind, st, lrc, oc);
      }
    }
  }
}

}  // namespace

void policy_loss_fwd(const int64_t* iargs, const double* fargs, int64_t* err) {
  if (iargs[kLp + 1] == kFloat64)
    policy_loss_typed<double>(iargs, fargs, err);
  else
    policy_loss_typed<float>(iargs, fargs, err);
}

void value_loss_fwd(const int64_t* iargs, const double* fargs, int64_t* err) {
  if (iargs[kVVal + 1] == kFloat64)
    value_loss_typed<double>(iargs, fargs, err);
  else
    value_loss_typed<float>(iargs, fargs, err);
}

void kl_penalty_run(const int64_t* iargs, const double* fargs) {
  if (iargs[kKLp + 1] == kFloat64)
    kl_typed<double>(iargs, fargs);
  else
    kl_typed<float>(iargs, fargs);
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
