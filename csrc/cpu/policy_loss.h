// KL estimators, fused PPO / GRPO policy losses and the clipped value loss
// (csrc/cpu/policy_loss.cpp), declared for every ISA level.
//
// The kernels take two small argument arrays instead of dozens of scalars: `iargs` (int64:
// sizes, pointers, dtype codes, strides, switches) and `fargs` (double: clip ranges,
// coefficients).  The index layout below is mirrored in python/rlfuse/ops/policy_loss.py
// (_PL_I / _PL_F / _VL_I / _VL_F / _KL_I / _KL_F); keep the two in sync.
//
// A tensor argument is four int64 entries: data pointer (0 = absent), dtype code, stride of
// the row (batch) dimension and stride of the token dimension, in elements.  Dtype codes:
// 0 float32, 1 float16, 2 bfloat16, 3 float64 (rlfuse/common.h), and for masks also
// 10 bool/uint8, 11 int8, 12 int32, 13 int64.
#pragma once
#include <cstdint>

#include "isa.h"

namespace rlfuse {
namespace cpu {
namespace pl {

// Extra dtype codes for masks (integer and boolean tensors).
enum MaskCode : int { kU8 = 10, kI8 = 11, kI32 = 12, kI64 = 13 };

// ---------------------------------------------------------------------------- policy_loss
// iargs
enum PolicyI : int {
  kB = 0, kT, kThreads,
  kLp, kOld = kLp + 4, kAdv = kOld + 4, kMask = kAdv + 4, kRef = kMask + 4, kEnt = kRef + 4,
  kIsw = kEnt + 4,
  // Gradients: d loss / d logp[i, t] = grad_lp[i, t] * gscale[i] and
  //            d loss / d entropy[i, t] = escale[i] * [mask[i, t] != 0].
  kGradLp = kIsw + 4,  // out: [B, T] contiguous, accumulation dtype (0 = do not write);
                       //      the CUDA kernel scales it by the c_i it is given; the CPU
                       //      kernel scales it by c_i when kGScale is 0, else leaves it
                       //      unscaled and writes gscale[i] = c_i
  kGScale,             // out: [B] (CPU only; 0 = do not write: grad_lp is scaled instead)
  kEScale,             // out: [B] = -entropy_coef * e_i (CPU only; 0 = do not write)
  kLossOut,            // out: scalar loss (accumulation dtype)
  kStatsOut,           // out: kNumStats values (accumulation dtype)
  kVariant,            // Variant
  kKlMode,             // 0 no KL term, 1 k1/abs/k2 (selected by kKlKind), 2 k3
  kKlKind,             // KlKind
  kKlStraight,         // "+" kinds: value of the kind, gradient of k2
  kKlRatioWeighted,    // KL term multiplied by the (gradient-carrying) ratio
  kSeqGrad,            // GSPO: gradient through the sequence mean (TRL/OpenRLHF) instead of sg
  kStatClampedX,       // approx_kl statistic from the clamped log-ratio (verl)
  kPgDenomKind, kPgLenKind, kEntDenomKind, kEntLenKind,  // aggregation (see AggSpec)
  kNumPolicyI
};
// fargs
enum PolicyF : int {
  kLrClamp = 0,   // |log ratio| clamp (inf = off)
  kSeqLrMax,      // GSPO: upper clamp of the log sequence ratio (inf = off)
  kClipLo, kClipHi,  // ratio clip range [lo, hi] (lo may be -inf)
  kDualC,         // dual-clip constant for A < 0 (inf = off)
  kDelta,         // TRL delta: unclipped ratio capped at delta (inf = off)
  kTauPos, kTauNeg,  // SAPO temperatures
  kBeta,          // KL coefficient
  kKlLrClamp,     // k3: clamp of ref - logp before exp (inf = off)
  kKlOutClamp,    // KL value clamp (inf = off)
  kEntCoef,       // entropy bonus coefficient
  kPgNum, kPgDenomConst, kEntNum, kEntDenomConst,
  kNumPolicyF
};
enum Variant : int { kPPO = 0, kGSPO = 1, kCISPO = 2, kSAPO = 3, kGPG = 4, kReinforce = 5 };
enum KlKind : int { kK1 = 0, kAbs = 1, kK2 = 2, kK3 = 3 };
// Output statistics (after the loss).
enum Stat : int {
  kSPg = 0, kSKl, kSEnt, kSClip, kSClipLow, kSClipHigh, kSDual, kSApproxKl, kSRatio,
  kSKlMean, kSEntMean, kSTokens, kSSeqs, kNumStats
};

// Aggregation: loss = sum_i c_i sum_t m_it l_it with the per-row coefficient
//   c_i = num / (denom_const * D) * len(L_i),   D = 1 | N (tokens) | G (non-empty rows)
//   len = 1 | 1/L_i (0 if L_i = 0) | 1/(L_i + 1e-8) | 1/max(L_i, 1)
// and c_i = 0 when the denominator is 0 (no tokens / no sequences: the loss is 0).
enum DenomKind : int { kDenConst = 0, kDenTokens = 1, kDenSeqs = 2 };
enum LenKind : int { kLenNone = 0, kLenInv = 1, kLenInvEps = 2, kLenInvClamp = 3 };

// Error codes returned in err[0] (err[1], err[2] = row, token of the first offence).
// The mask is checked in the main pass (m (m - 1) != 0 flags anything but 0 and 1, NaN and
// inf included), the advantages through the row's policy-term sum (a non-finite A makes it
// non-finite); the offending row is then scanned for the first position.
enum Error : int { kOk = 0, kBadMask = 1, kBadAdvantage = 2 };

// ---------------------------------------------------------------------------- value_loss
enum ValueI : int {
  kVB = 0, kVT, kVThreads,
  kVVal, kVOld = kVVal + 4, kVRet = kVOld + 4, kVMask = kVRet + 4,
  kVGrad = kVMask + 4, kVLossOut, kVStatsOut,
  kVClipForm,  // 0: clamp(v, old - c, old + c) (verl/TRL); 1: old + clamp(v - old, -c, c) (OpenRLHF)
  kVDenomKind, kVLenKind,
  kNumValueI
};
enum ValueF : int { kVClip = 0, kVNum, kVDenomConst, kNumValueF };
enum ValueStat : int { kVSClip = 0, kVSValMean, kVSTokens, kVSSeqs, kNumValueStats };

// ---------------------------------------------------------------------------- kl_penalty
// Elementwise over [R, C] (two strides per input); the output is contiguous [R, C].
enum KlI : int {
  kKR = 0, kKC, kKThreads,
  kKLp, kKRef = kKLp + 4, kKGradOut = kKRef + 4,
  kKOut = kKGradOut + 4,  // forward: the estimate; backward: grad_out * d(estimate)/d(logp)
  kKBackward, kKKind, kKStraight,
  kNumKlI
};
enum KlF : int { kKLrClamp = 0, kKOutClamp, kNumKlF };

}  // namespace pl
}  // namespace cpu
}  // namespace rlfuse

#define RLFUSE_POLICY_LOSS_DECLS(NS)                                                          \
  namespace rlfuse { namespace cpu { namespace NS {                                           \
  /* Fused policy loss: loss, statistics and d(loss)/d(logp), d(loss)/d(entropy). */         \
  void policy_loss_fwd(const int64_t* iargs, const double* fargs, int64_t* err);              \
  /* Clipped value loss: loss, statistics and d(loss)/d(values). */                           \
  void value_loss_fwd(const int64_t* iargs, const double* fargs, int64_t* err);               \
  /* KL estimate (forward) or grad_out * its derivative w.r.t. logp (backward). */           \
  void kl_penalty_run(const int64_t* iargs, const double* fargs);                             \
  } } }

RLFUSE_FOR_EACH_ISA(RLFUSE_POLICY_LOSS_DECLS)
