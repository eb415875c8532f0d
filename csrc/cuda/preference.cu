// rlfuse CUDA backend of the preference family: the per-pair DPO-family loss.
//
// Exported (extern "C", no pybind11 here; see csrc/cuda/preference_api.cpp):
//   int rlfuse_preference_loss(const int64_t* ia, const double* fa, void* stream);
// `ia` / `fa` are host arrays in the layout of csrc/cpu/preference.h (shared with the CPU
// kernel); pointers in them are device addresses.  Returns 0 or a cudaError_t value (message
// via rlfuse_cuda_last_error()).
//
// P is small (a batch of pairs), so one block of 256 threads does everything: thread j owns
// pairs j, j + 256, ... in increasing order; the sums (the SFT term's batch sums, the loss)
// are per-thread partial sums combined by the fixed-order block tree of rlfuse/cuda_utils.cuh,
// so results are bitwise reproducible and a pair's gradient and statistics depend on that
// pair (and, through 1/P and the SFT term, on batch-level sums) only.  The per-pair math is
// the code of csrc/cpu/preference.h, compiled for the device.  Any float input dtype (lengths
// also int32 / int64) and stride are read directly; accumulation in float32 (float64 when
// chosen_logps is float64).

#include <cstdint>

#include <cuda_runtime.h>

#include "rlfuse/cuda_utils.cuh"
#include "../cpu/preference.h"

extern "C" int rlfuse_cuda_fail(int err, const char* msg);

namespace rlfuse {
namespace prefcu {

using namespace ::rlfuse::cpu::pref;

constexpr int kThreads = 256;
constexpr int kMaxTypes = 32;

struct Vec {
  const void* p;
  int dt;
  int64_t st;
};

inline Vec read_vec(const int64_t* a, int off) {
  return Vec{reinterpret_cast<const void*>(a[off]), int(a[off + 1]), a[off + 2]};
}

template <typename A>
__device__ __forceinline__ A ld(const Vec& x, int64_t i) {
  const int64_t k = i * x.st;
  switch (x.dt) {
    case 0: return A(cu::ld_ro(static_cast<const float*>(x.p) + k));
    case 1: return A(__half2float(cu::ld_ro(static_cast<const __half*>(x.p) + k)));
    case 2: return A(__bfloat162float(cu::ld_ro(static_cast<const __nv_bfloat16*>(x.p) + k)));
    case 3: return A(cu::ld_ro(static_cast<const double*>(x.p) + k));
    case kLenI32: return A(cu::ld_ro(static_cast<const int32_t*>(x.p) + k));
    default: return A(cu::ld_ro(static_cast<const int64_t*>(x.p) + k));
  }
}

template <typename A>
struct Args {
  int64_t P;
  Vec c, r, rc, rr, lc, lr, pw;
  A* loss;
  A* grad_c;
  A* grad_r;
  A* stats;
  Params<A> prm;
  int K;
  int codes[kMaxTypes];
  A weights[kMaxTypes];
};

struct Add {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const {
    return a + b;
  }
};

template <typename A>
__device__ __forceinline__ A clamp1(A x) {
  return x < A(1) ? A(1) : x;
}

template <typename A>
__global__ void __launch_bounds__(kThreads) preference_kernel(const Args<A> p) {
  __shared__ A smem[32];
  const int64_t P = p.P;
  const bool has_ref = p.rc.p != nullptr, has_len = p.lc.p != nullptr,
             has_pw = p.pw.p != nullptr;
  A w_sft = A(0);
  bool has_sft = false;
  for (int k = 0; k < p.K; ++k)
    if (p.codes[k] == kSft) {
      w_sft += p.weights[k];
      has_sft = true;
    }
  A sft_val = A(0), sft_grad = A(0);
  if (has_sft) {  // uniform across the block: every thread takes this branch or none
    A sum_c = A(0), sum_l = A(0), sum_pw = A(0);
    for (int64_t i = threadIdx.x; i < P; i += kThreads) {
      sum_c += ld<A>(p.c, i);
      sum_l += has_len ? ld<A>(p.lc, i) : A(1);
      sum_pw += has_pw ? ld<A>(p.pw, i) : A(1);
    }
    sum_c = cu::block_reduce(sum_c, Add{}, A(0), smem);
    sum_l = cu::block_reduce(sum_l, Add{}, A(0), smem);
    sum_pw = cu::block_reduce(sum_pw, Add{}, A(0), smem);
    const A denom = clamp1(sum_l);
    sft_val = -sum_c / denom;
    sft_grad = -w_sft * (sum_pw / A(P)) / denom;
  }
  const A invP = A(1) / A(P);
  A loss = A(0);
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
    Pair<A> x;
    x.c = ld<A>(p.c, i);
    x.r = ld<A>(p.r, i);
    x.uc = has_ref ? x.c - ld<A>(p.rc, i) : x.c;
    x.ur = has_ref ? x.r - ld<A>(p.rr, i) : x.r;
    x.lc = has_len ? clamp1(ld<A>(p.lc, i)) : A(1);
    x.lr = has_len ? clamp1(ld<A>(p.lr, i)) : A(1);
    f_score(x.uc, p.prm, x.sc, x.dsc);
    f_score(x.ur, p.prm, x.sr, x.dsr);
    A v = A(0), gc = A(0), gr = A(0);
    for (int k = 0; k < p.K; ++k) {
      const int code = p.codes[k];
      const A w = p.weights[k];
      A dc, dr;
      const A t = code == kSft ? sft_val : pair_term(code, x, p.prm, dc, dr);
      v += w * t;
      if (code != kSft) {
        gc += w * dc;
        gr += w * dr;
      }
    }
    const A wi = has_pw ? ld<A>(p.pw, i) : A(1);
    const A li = wi * v;
    loss += li;
    p.grad_c[i] = wi * gc * invP + sft_grad;
    p.grad_r[i] = wi * gr * invP;
    const A rew_c = has_ref ? p.prm.beta * x.uc : p.prm.beta * (x.c / x.lc);
    const A rew_r = has_ref ? p.prm.beta * x.ur : p.prm.beta * (x.r / x.lr);
    p.stats[kSRewC * P + i] = rew_c;
    p.stats[kSRewR * P + i] = rew_r;
    p.stats[kSMargin * P + i] = rew_c - rew_r;
    p.stats[kSAcc * P + i] = rew_c > rew_r ? A(1) : A(0);
    p.stats[kSLoss * P + i] = li;
  }
  loss = cu::block_reduce(loss, Add{}, A(0), smem);
  if (threadIdx.x == 0) *p.loss = loss * invP;
}

template <typename A>
int preference_typed(const int64_t* ia, const double* fa, cudaStream_t s) {
  Args<A> p;
  p.P = ia[kP];
  p.c = read_vec(ia, kC);
  p.r = read_vec(ia, kR);
  p.rc = read_vec(ia, kRefC);
  p.rr = read_vec(ia, kRefR);
  p.lc = read_vec(ia, kLenC);
  p.lr = read_vec(ia, kLenR);
  p.pw = read_vec(ia, kPw);
  p.loss = reinterpret_cast<A*>(ia[kLossOut]);
  p.grad_c = reinterpret_cast<A*>(ia[kGradC]);
  p.grad_r = reinterpret_cast<A*>(ia[kGradR]);
  p.stats = reinterpret_cast<A*>(ia[kStatsOut]);
  p.prm = Params<A>{A(fa[kBeta]), A(fa[kEps]), A(fa[kGamma]), A(fa[kTau]), A(fa[kFAlpha]),
                    int(ia[kFDiv]), int(ia[kIpoNorm])};
  p.K = int(ia[kNumTypes]);
  for (int k = 0; k < p.K; ++k) {
    p.codes[k] = int(ia[kTypes + k]);
    p.weights[k] = A(fa[kWeights + k]);
  }
  preference_kernel<A><<<1, kThreads, 0, s>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return rlfuse_cuda_fail(static_cast<int>(err), cudaGetErrorString(err));
  return 0;
}

}  // namespace prefcu
}  // namespace rlfuse

extern "C" int rlfuse_preference_loss(const int64_t* ia, const double* fa, void* stream) {
  using namespace rlfuse::prefcu;
  if (ia[kP] <= 0) return 0;
  if (ia[kNumTypes] < 0 || ia[kNumTypes] > kMaxTypes)
    return rlfuse_cuda_fail(cudaErrorInvalidValue, "preference_loss: at most 32 loss types");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ia[kC + 1] == 3) return preference_typed<double>(ia, fa, s);
  return preference_typed<float>(ia, fa, s);
}
