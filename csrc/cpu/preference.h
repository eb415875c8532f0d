// DPO-family preference losses over P (chosen, rejected) pairs: the argument layout shared
// by the CPU kernel (csrc/cpu/preference.cpp), the CUDA kernel (csrc/cuda/preference.cu) and
// python/rlfuse/ops/preference.py (_PI / _PF), and the per-pair math itself, written once for
// the host compiler and nvcc (RLFUSE_PREF_HD).  Keep the layout in sync with the Python side.
//
// A per-pair input is three int64 entries: data pointer (0 = absent), dtype code, stride in
// elements.  Dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 float64; lengths may also be
// 12 int32 or 13 int64.
//
// Outputs (accumulation dtype A: double for float64 chosen_logps, else float):
//   loss            scalar: sum_k w_k mean_i(pw_i l_k(i))
//   grad_c, grad_r  [P]: d loss / d chosen_logps[i], d loss / d rejected_logps[i]
//   stats           [kNumStats, P] contiguous: rewards (chosen, rejected), margin, accuracy
//                   and the per-pair loss sum_k w_k pw_i l_k(i)
// Formulas: docs/ops/preference.md (TRL 1.16 DPOTrainer / CPOTrainer / ORPOTrainer).
#pragma once
#include <cstdint>

#include "isa.h"

#if defined(__CUDACC__)
#define RLFUSE_PREF_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define RLFUSE_PREF_HD inline
#endif

namespace rlfuse {
namespace cpu {
namespace pref {

enum PrefI : int {
  kP = 0, kThreads,
  kC, kR = kC + 3, kRefC = kR + 3, kRefR = kRefC + 3, kLenC = kRefR + 3, kLenR = kLenC + 3,
  kPw = kLenR + 3,
  kLossOut = kPw + 3, kGradC, kGradR, kStatsOut,
  kFDiv,        // FDiv
  kIpoNorm,     // ipo: 1 length-averaged (TRL), 0 sums (OpenRLHF)
  kNumTypes,    // K; the K loss-type codes follow at kTypes
  kTypes,
  kNumPrefIFixed = kTypes  // iargs has kNumPrefIFixed + K entries
};
enum PrefF : int {
  kBeta = 0, kEps, kGamma, kTau, kFAlpha,
  kWeights,  // K loss weights follow
  kNumPrefFFixed = kWeights
};
enum LossType : int {
  kSigmoid = 0, kHinge, kIpo, kExoPair, kNcaPair, kRobust, kBcoPair, kSppoHard, kApoZero,
  kApoDown, kDiscopop, kSigmoidNorm, kSft, kSimpo, kOrpo, kNumLossTypes
};
enum FDiv : int { kReverseKl = 0, kForwardKl, kJs, kAlphaDiv };
enum Stat : int { kSRewC = 0, kSRewR, kSMargin, kSAcc, kSLoss, kNumStats };
// Length codes beyond the float dtype codes.
enum LenCode : int { kLenI32 = 12, kLenI64 = 13 };

// The math below has internal linkage (unnamed namespace): every ISA build of preference.cpp
// gets its own copy, so the linker can never hand an AVX-512 copy to the x86-64-v2 build.
namespace {

// ------------------------------------------------------------------------- scalar helpers
RLFUSE_PREF_HD float p_exp(float x) { return expf(x); }
RLFUSE_PREF_HD double p_exp(double x) { return exp(x); }
RLFUSE_PREF_HD float p_log(float x) { return logf(x); }
RLFUSE_PREF_HD double p_log(double x) { return log(x); }
RLFUSE_PREF_HD float p_log1p(float x) { return log1pf(x); }
RLFUSE_PREF_HD double p_log1p(double x) { return log1p(x); }
RLFUSE_PREF_HD float p_expm1(float x) { return expm1f(x); }
RLFUSE_PREF_HD double p_expm1(double x) { return expm1(x); }

// softplus(x) = log(1 + e^x) = -logsigmoid(-x), stable for any x (NaN propagates).
template <typename A>
RLFUSE_PREF_HD A softplus(A x) {
  const A ax = x < A(0) ? -x : x;
  return (x > A(0) ? x : A(0)) + p_log1p(p_exp(-ax));
}
// sigmoid(x), stable for any x.
template <typename A>
RLFUSE_PREF_HD A sigmoid(A x) {
  if (x >= A(0)) return A(1) / (A(1) + p_exp(-x));
  const A e = p_exp(x);
  return e / (A(1) + e);
}
// log(1 - e^x) for x < 0 (TRL's log1mexp, branch at -ln 2).
template <typename A>
RLFUSE_PREF_HD A log1mexp(A x) {
  return x < A(-0.6931471805599453) ? p_log1p(-p_exp(x)) : p_log(-p_expm1(x));
}

template <typename A>
struct Params {
  A beta, eps, gamma, tau, falpha;
  int fdiv, ipo_norm;
};

// One pair's inputs: policy log-probs c, r; log-ratios uc, ur (= c, r without a reference);
// lengths clamped to >= 1; f-divergence scores sc, sr and their derivatives dsc, dsr.
template <typename A>
struct Pair {
  A c, r, uc, ur, lc, lr, sc, sr, dsc, dsr;
};

// Score transform of TRL's f_divergence_type: s(u) and ds/du.
template <typename A>
RLFUSE_PREF_HD void f_score(A u, const Params<A>& p, A& s, A& ds) {
  switch (p.fdiv) {
    case kForwardKl: {  // 1 - e^-u
      const A e = p_exp(-u);
      s = A(1) - e;
      ds = e;
      return;
    }
    case kJs:  // log 2 + logsigmoid(u)
      s = A(0.6931471805599453) - softplus(-u);
      ds = sigmoid(-u);
      return;
    case kAlphaDiv: {  // (e^{(a-1)u} - 1) / (a - 1), exponent clamped at 80 (TRL)
      const A am1 = p.falpha - A(1);
      const A t = am1 * u;
      const bool clamped = t > A(80);
      const A e = p_exp(clamped ? A(80) : t);
      s = (e - A(1)) / am1;
      ds = clamped ? A(0) : e;
      return;
    }
    default:
      s = u;
      ds = A(1);
  }
}

// Value of loss type `code` for one pair, and its partial derivatives dc, dr with respect to
// the policy log-probs c and r.  kSft is a batch term handled by the caller (0 here).
template <typename A>
RLFUSE_PREF_HD A pair_term(int code, const Pair<A>& x, const Params<A>& p, A& dc, A& dr) {
  const A beta = p.beta, eps = p.eps;
  dc = A(0);
  dr = A(0);
  switch (code) {
    case kSigmoid: case kHinge: case kExoPair: case kRobust: case kDiscopop: {
      const A z = beta * (x.sc - x.sr);
      A v, dz;
      if (code == kSigmoid) {  // cDPO: -(1-e) logsig(z) - e logsig(-z)
        v = (A(1) - eps) * softplus(-z) + eps * softplus(z);
        dz = -(A(1) - eps) * sigmoid(-z) + eps * sigmoid(z);
      } else if (code == kHinge) {  // relu(1 - z); a NaN z gives a NaN value and slope
        const A h = A(1) - z;
        const bool off = h <= A(0);  // false for NaN
        v = off ? A(0) : h;
        dz = off ? A(0) : (h != h ? h : A(-1));
      } else if (code == kExoPair) {  // q_w (log q_w - log(1-e)) + q_l (log q_l - log e)
        const A qw = sigmoid(z), ql = sigmoid(-z);
        const A lp = p_log1p(-eps), ln = p_log(eps);
        v = qw * (-softplus(-z) - lp) + ql * (-softplus(z) - ln);
        dz = qw * ql * (z + ln - lp);
      } else if (code == kRobust) {
        const A k = A(1) / (A(1) - A(2) * eps);
        v = ((A(1) - eps) * softplus(-z) - eps * softplus(z)) * k;
        dz = (-(A(1) - eps) * sigmoid(-z) - eps * sigmoid(z)) * k;
      } else {  // discopop: logistic (1 - m) + e^-z m,  m = sigmoid(z / tau)
        // e^-z m = exp(-z - softplus(-z / tau)): finite where e^-z alone overflows and m
        // underflows (large negative z)
        const A m = sigmoid(z / p.tau), mn = sigmoid(-z / p.tau);
        const A dm = m * mn / p.tau;
        const A lg = softplus(-z), exm = p_exp(-z - softplus(-z / p.tau));
        v = lg * (A(1) - m) + exm;
        dz = -sigmoid(-z) * (A(1) - m) - lg * dm - exm + exm * mn / p.tau;
      }
      dc = dz * beta * x.dsc;
      dr = -dz * beta * x.dsr;
      return v;
    }
    case kIpo: case kSigmoidNorm: {
      const bool avg = code == kSigmoidNorm || p.ipo_norm != 0;
      const A ic = avg ? A(1) / x.lc : A(1), ir = avg ? A(1) / x.lr : A(1);
      const A d = x.sc * ic - x.sr * ir;
      A v, dd;
      if (code == kIpo) {
        const A e = d - A(1) / (A(2) * beta);
        v = e * e;
        dd = A(2) * e;
      } else {
        v = softplus(-beta * d);
        dd = -beta * sigmoid(-beta * d);
      }
      dc = dd * ic * x.dsc;
      dr = -dd * ir * x.dsr;
      return v;
    }
    case kNcaPair: {
      const A a = beta * x.uc, b = beta * x.ur;
      dc = beta * (-sigmoid(-a) + A(0.5) * sigmoid(a));
      dr = beta * A(0.5) * sigmoid(b);
      return softplus(-a) + A(0.5) * softplus(a) + A(0.5) * softplus(b);
    }
    case kBcoPair: {
      const A a = beta * x.uc, b = beta * x.ur;
      dc = -beta * sigmoid(-a);
      dr = beta * sigmoid(b);
      return softplus(-a) + softplus(b);
    }
    case kSppoHard: {
      const A h = A(0.5) / beta;
      const A ec = x.uc - h, er = x.ur + h;
      dc = A(2) * ec;
      dr = A(2) * er;
      return ec * ec + er * er;
    }
    case kApoZero: {
      const A a = beta * x.uc, b = beta * x.ur;
      const A sa = sigmoid(a), sb = sigmoid(b);
      dc = -beta * sa * sigmoid(-a);
      dr = beta * sb * sigmoid(-b);
      return (A(1) - sa) + sb;
    }
    case kApoDown: {
      const A a = beta * x.uc, m = beta * (x.uc - x.ur);
      const A sa = sigmoid(a), sm = sigmoid(m);
      const A gm = beta * sm * sigmoid(-m);
      dc = beta * sa * sigmoid(-a) - gm;
      dr = gm;
      return sa + (A(1) - sm);
    }
    case kSimpo: {  // reference-free, length-averaged, margin gamma; cDPO smoothing
      const A z = beta * (x.c / x.lc - x.r / x.lr) - p.gamma;
      const A v = (A(1) - eps) * softplus(-z) + eps * softplus(z);
      const A dz = -(A(1) - eps) * sigmoid(-z) + eps * sigmoid(z);
      dc = dz * beta / x.lc;
      dr = -dz * beta / x.lr;
      return v;
    }
    case kOrpo: {  // -beta logsigmoid(log odds ratio) of the length-averaged log-probs
      const A ac = x.c / x.lc, ar = x.r / x.lr;
      const A lo = (ac - ar) - (log1mexp(ac) - log1mexp(ar));
      const A g = -beta * sigmoid(-lo);
      // d lo / d ac = 1 / (1 - e^ac) = -1 / expm1(ac)
      dc = g * (A(-1) / p_expm1(ac)) / x.lc;
      dr = g * (A(1) / p_expm1(ar)) / x.lr;
      return beta * softplus(-lo);
    }
    default:
      return A(0);
  }
}

}  // namespace
}  // namespace pref
}  // namespace cpu
}  // namespace rlfuse

#if !defined(__CUDACC__)
#define RLFUSE_PREFERENCE_DECLS(NS)                                                           \
  namespace rlfuse { namespace cpu { namespace NS {                                           \
  /* Per-pair preference loss: loss, gradients w.r.t. chosen / rejected, statistics. */      \
  void preference_loss_fwd(const int64_t* iargs, const double* fargs);                        \
  } } }

RLFUSE_FOR_EACH_ISA(RLFUSE_PREFERENCE_DECLS)
#endif
