// Fused per-pair preference loss (DPO family) on the CPU: forward value, gradients with
// respect to the chosen / rejected sequence log-probs and the statistics, in one call.
//
// The work is O(P) scalar math (P pairs, typically 8..1024), so one thread does it all, in
// pair order: results are bitwise independent of the thread count and of how the batch was
// split among calls with the same pairs.  Two passes:
//   1. only when an "sft" term is listed: sum_i chosen_logps[i], sum_i chosen_len[i] and
//      sum_i pair_weight[i] (the SFT term is a token mean over the whole batch);
//   2. per pair: the f-divergence scores, every listed loss type's value and partial
//      derivatives (csrc/cpu/preference.h, shared with the CUDA kernel), the weighted sums,
//      the statistics; the loss accumulates in pair order.
// Inputs of any float dtype (lengths also int32 / int64) and any stride are read directly.
#include "rlfuse/common.h"
#include "preference.h"

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

using namespace ::rlfuse::cpu::pref;

struct Vec {
  const void* p;
  int dt;
  int64_t st;
};

Vec read_vec(const int64_t* ia, int off) {
  return Vec{reinterpret_cast<const void*>(ia[off]), int(ia[off + 1]), ia[off + 2]};
}

template <typename A>
A load(const Vec& v, int64_t i) {
  const int64_t k = i * v.st;
  switch (v.dt) {
    case kFloat16: return A(to_float(static_cast<const f16*>(v.p)[k]));
    case kBFloat16: return A(to_float(static_cast<const bf16*>(v.p)[k]));
    case kFloat64: return A(static_cast<const double*>(v.p)[k]);
    case kLenI32: return A(static_cast<const int32_t*>(v.p)[k]);
    case kLenI64: return A(static_cast<const int64_t*>(v.p)[k]);
    default: return A(static_cast<const float*>(v.p)[k]);
  }
}

template <typename A>
A clamp1(A x) {
  return x < A(1) ? A(1) : x;  // NaN stays NaN
}

template <typename A>
void preference_typed(const int64_t* ia, const double* fa) {
  const int64_t P = ia[kP];
  const int K = int(ia[kNumTypes]);
  const Vec c = read_vec(ia, kC), r = read_vec(ia, kR), rc = read_vec(ia, kRefC),
            rr = read_vec(ia, kRefR), lc = read_vec(ia, kLenC), lr = read_vec(ia, kLenR),
            pw = read_vec(ia, kPw);
  const bool has_ref = rc.p != nullptr, has_len = lc.p != nullptr, has_pw = pw.p != nullptr;
  A* loss_out = reinterpret_cast<A*>(ia[kLossOut]);
  A* grad_c = reinterpret_cast<A*>(ia[kGradC]);
  A* grad_r = reinterpret_cast<A*>(ia[kGradR]);
  A* stats = reinterpret_cast<A*>(ia[kStatsOut]);
  Params<A> prm{A(fa[kBeta]), A(fa[kEps]), A(fa[kGamma]), A(fa[kTau]), A(fa[kFAlpha]),
                int(ia[kFDiv]), int(ia[kIpoNorm])};

  // Pass 1: batch sums of the SFT term (token mean of the chosen completions).
  A w_sft = A(0);
  bool has_sft = false;
  for (int k = 0; k < K; ++k)
    if (ia[kTypes + k] == kSft) {
      w_sft += A(fa[kWeights + k]);
      has_sft = true;
    }
  A sft_val = A(0), sft_grad = A(0);
  if (has_sft) {
    A sum_c = A(0), sum_l = A(0), sum_pw = A(0);
    for (int64_t i = 0; i < P; ++i) {
      sum_c += load<A>(c, i);
      sum_l += has_len ? load<A>(lc, i) : A(1);
      sum_pw += has_pw ? load<A>(pw, i) : A(1);
    }
    const A denom = clamp1(sum_l);
    sft_val = -sum_c / denom;
    sft_grad = -w_sft * (sum_pw / A(P)) / denom;
  }

  // Pass 2: per pair.
  const A invP = A(1) / A(P);
  A loss = A(0);
  for (int64_t i = 0; i < P; ++i) {
    Pair<A> x;
    x.c = load<A>(c, i);
    x.r = load<A>(r, i);
    x.uc = has_ref ? x.c - load<A>(rc, i) : x.c;
    x.ur = has_ref ? x.r - load<A>(rr, i) : x.r;
    x.lc = has_len ? clamp1(load<A>(lc, i)) : A(1);
    x.lr = has_len ? clamp1(load<A>(lr, i)) : A(1);
    f_score(x.uc, prm, x.sc, x.dsc);
    f_score(x.ur, prm, x.sr, x.dsr);
    A v = A(0), gc = A(0), gr = A(0);
    for (int k = 0; k < K; ++k) {
      const int code = int(ia[kTypes + k]);
      const A w = A(fa[kWeights + k]);
      A dc, dr;
      const A t = code == kSft ? sft_val : pair_term(code, x, prm, dc, dr);
      v += w * t;
      if (code != kSft) {
        gc += w * dc;
        gr += w * dr;
      }
    }
    const A wi = has_pw ? load<A>(pw, i) : A(1);
    const A li = wi * v;
    loss += li;
    grad_c[i] = wi * gc * invP + sft_grad;
    grad_r[i] = wi * gr * invP;
    const A rew_c = has_ref ? prm.beta * x.uc : prm.beta * (x.c / x.lc);
    const A rew_r = has_ref ? prm.beta * x.ur : prm.beta * (x.r / x.lr);
    stats[kSRewC * P + i] = rew_c;
    stats[kSRewR * P + i] = rew_r;
    stats[kSMargin * P + i] = rew_c - rew_r;
    stats[kSAcc * P + i] = rew_c > rew_r ? A(1) : A(0);
    stats[kSLoss * P + i] = li;
  }
  *loss_out = loss * invP;
}

}  // namespace

void preference_loss_fwd(const int64_t* iargs, const double* fargs) {
  if (iargs[kP] <= 0) return;
  if (iargs[kC + 1] == kFloat64)
    preference_typed<double>(iargs, fargs);
  else
    preference_typed<float>(iargs, fargs);
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
