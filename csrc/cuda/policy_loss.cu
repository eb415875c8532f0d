// rlfuse CUDA backend of the policy_loss family: fused policy-loss rows, value-loss rows and
// the elementwise KL estimators.
//
// Exported (extern "C", no pybind11 here; see csrc/cuda/policy_loss_api.cpp):
//   int rlfuse_policy_loss_rows(const int64_t* ia, const double* fa, const void* cpg,
//                               const void* xs, void* rows, void* stream);
//   int rlfuse_value_loss_rows(const int64_t* ia, const double* fa, const void* coef,
//                              void* rows, void* stream);
//   int rlfuse_kl_penalty(const int64_t* ia, const double* fa, void* stream);
// `ia` / `fa` are host arrays in the layout of csrc/cpu/policy_loss.h (the CPU kernels use the
// same one); pointers in them are device addresses.  Launchers return 0 or a cudaError_t
// value (message via rlfuse_cuda_last_error()).
//
// The host (python/rlfuse/ops/policy_loss.py) computes the token counts L_i, the GSPO mean
// log-ratios xs_i and the aggregation coefficients c_i (cpg) / e_i (cen) with torch, and adds
// the GSPO sequence-gradient coupling term and the final sums afterwards.  The row kernels
// run one block per row (grid-stride past the grid limit); thread j owns tokens j, j + 256,
// ... in increasing order and the per-thread partial sums are combined by the fixed-order
// tree of rlfuse/cuda_utils.cuh, so a row's results depend only on that row and T.
//
// Per-token formulas: those of csrc/cpu/policy_loss.cpp (see docs/ops/policy_loss.md).  Any
// input dtype (float32 / float16 / bfloat16 / float64, masks also bool / int) and any (row,
// token) strides are read directly.  Accumulation is float32, float64 when logp is float64.
// Masked tokens are selected away, never multiplied, so NaN or inf there cannot leak.

#include <cstdint>

#include <cuda_runtime.h>

#include "../cpu/policy_loss.h"
#include "rlfuse/cuda_utils.cuh"

extern "C" int rlfuse_cuda_fail(int err, const char* msg);

namespace rlfuse {
namespace plcu {

using namespace ::rlfuse::cpu::pl;
using cu::exp_acc;

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 1 << 20;
constexpr int kRowCols = 12;  // the 10 row sums, the GSPO coupling sum, the bad-advantage count
// Columns of a row's sums (the order of RowVal in csrc/cpu/policy_loss.cpp).
enum RowCol : int { kRPgC = 0, kRKC, kRHC, kRClipC, kRLoC, kRHiC, kRDualC, kRNegXC, kRRatioC,
                    kRKvC, kRCpC, kRBadC };

struct In {
  const void* p;
  int dt;
  int64_t sb, st;
};

inline In read_in(const int64_t* a, int off) {
  return In{reinterpret_cast<const void*>(a[off]), int(a[off + 1]), a[off + 2], a[off + 3]};
}

template <typename A>
__device__ __forceinline__ A ld(const In& x, int64_t b, int64_t t) {
  const int64_t i = b * x.sb + t * x.st;
  switch (x.dt) {
    case 0: return A(cu::ld_ro(static_cast<const float*>(x.p) + i));
    case 1: return A(__half2float(cu::ld_ro(static_cast<const __half*>(x.p) + i)));
    case 2: return A(__bfloat162float(cu::ld_ro(static_cast<const __nv_bfloat16*>(x.p) + i)));
    case 3: return A(cu::ld_ro(static_cast<const double*>(x.p) + i));
    case kU8: return A(cu::ld_ro(static_cast<const uint8_t*>(x.p) + i));
    case kI8: return A(cu::ld_ro(static_cast<const int8_t*>(x.p) + i));
    case kI32: return A(cu::ld_ro(static_cast<const int32_t*>(x.p) + i));
    default: return A(cu::ld_ro(static_cast<const int64_t*>(x.p) + i));
  }
}

// clamp with torch semantics (NaN stays NaN)
template <typename A>
__device__ __forceinline__ A clampa(A x, A lo, A hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// k3: v = e^q - q - 1, em1 = e^q - 1, accurate near q = 0 (series for |q| < 1/2).
template <typename A>
__device__ __forceinline__ void k3_terms(A q, A& v, A& em1) {
  A p = A(1.0 / 20922789888000.0);
  const A c[14] = {A(1.0 / 2),           A(1.0 / 6),           A(1.0 / 24),
                   A(1.0 / 120),         A(1.0 / 720),         A(1.0 / 5040),
                   A(1.0 / 40320),       A(1.0 / 362880),      A(1.0 / 3628800),
                   A(1.0 / 39916800),    A(1.0 / 479001600),   A(1.0 / 6227020800),
                   A(1.0 / 87178291200), A(1.0 / 1307674368000)};
#pragma unroll
  for (int k = 13; k >= 0; --k) p = p * q + c[k];
  const A v_small = q * q * p;
  const A e = exp_acc(q);
  const bool small = q > A(-0.5) && q < A(0.5);
  v = small ? v_small : (e - q) - A(1);
  em1 = small ? q + v_small : e - A(1);
}

// KL estimate of d = logp - ref: the clamped value vc, and its gradient g (before the
// straight-through replacement).
template <typename A, int KM>
__device__ __forceinline__ void kl_value_grad(A d, int kind, A lrc, A oc, A& vc, A& g) {
  A v;
  if (KM == 2) {
    const A q = -d;
    const A qc = clampa(q, -lrc, lrc);
    A em1;
    k3_terms(qc, v, em1);
    g = qc == q ? -em1 : A(0);
  } else {
    const A ad = d < A(0) ? -d : d;
    const A sg = d > A(0) ? A(1) : (d < A(0) ? A(-1) : A(0));
    v = kind == kK1 ? d : (kind == kAbs ? ad : A(0.5) * d * d);
    g = kind == kK1 ? A(1) : (kind == kAbs ? sg : d);
  }
  vc = clampa(v, -oc, oc);
  if (!(vc == v)) g = A(0);
}

template <typename A>
struct Sums {
  static constexpr int n = kRowCols;
  A v[kRowCols];
};

// Elementwise sum of two partial-sum records (combined by cu::block_reduce in a fixed order).
struct SumOp {
  template <typename S>
  __device__ S operator()(const S& a, const S& b) const {
    S r;
#pragma unroll
    for (int k = 0; k < S::n; ++k) r.v[k] = a.v[k] + b.v[k];
    return r;
  }
};

template <typename A>
struct PolicyParams {
  int64_t B, T;
  In lp, old, adv, mask, ref, ent, isw;
  A* glp;
  const A* cpg;
  const A* xs;
  A* rows;
  int kind;
  bool kl_st, kl_rw, seq_grad, statx;
  A lrc, seq_lr_max, clo, chi, dual_c, delta, tp, tn, q4p, q4n, beta, kl_lrc, kl_oc, ent_coef;
};

template <typename A, int V, int KM>
__global__ void __launch_bounds__(kThreads) policy_rows_kernel(PolicyParams<A> p) {
  __shared__ Sums<A> smem[32];
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const A cb = p.cpg[b];
    A s_row = A(1), ds_tok = A(0);
    if (V == kGSPO) {
      const A xs = p.xs[b];
      s_row = exp_acc(xs > p.seq_lr_max ? p.seq_lr_max : xs);
      if (!p.seq_grad && xs <= p.seq_lr_max) ds_tok = s_row;
    }
    Sums<A> acc;
#pragma unroll
    for (int k = 0; k < kRowCols; ++k) acc.v[k] = A(0);
    for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
      const A m = ld<A>(p.mask, b, t);
      const bool on = m != A(0);
      A g = A(0);
      if (on) {
        const A lp = ld<A>(p.lp, b, t);
        const A old = p.old.p ? ld<A>(p.old, b, t) : lp;
        const A a = ld<A>(p.adv, b, t);
        const A w = p.isw.p ? ld<A>(p.isw, b, t) : A(1);
        const A xr = lp - old;
        A r, drdl, xstat;
        if (V == kGSPO) {
          r = s_row;
          drdl = ds_tok;
          xstat = xr;
        } else {
          const A x = clampa(xr, -p.lrc, p.lrc);
          r = exp_acc(x);
          drdl = x == xr ? r : A(0);
          xstat = p.statx ? x : xr;
        }
        const bool neg = a < A(0), pos = a > A(0);
        A P, dPdl = A(0), dPdr = A(0);
        if (V == kPPO || V == kGSPO) {
          const A c1 = r > p.delta ? p.delta : r;
          const A c2 = clampa(r, p.clo, p.chi);
          const A u1 = a * c1, u2 = a * c2;
          const bool clipped = u2 < u1;
          const A lc = -(clipped ? u2 : u1);
          const A dlc = -(clipped ? (c2 == r ? a : A(0)) : (c1 == r ? a : A(0)));
          acc.v[kRClipC] += clipped ? A(1) : A(0);
          const A cap = -p.dual_c * a;
          const bool dual_on = neg && lc > cap;  // cap is +inf when dual-clip is off
          P = dual_on ? cap : lc;
          dPdr = dual_on ? A(0) : dlc;
          acc.v[kRDualC] += dual_on ? A(1) : A(0);
        } else if (V == kCISPO) {
          const A cr = clampa(r, p.clo, p.chi);
          P = -cr * a * lp;
          dPdl = -cr * a;
          acc.v[kRClipC] += cr == r ? A(0) : A(1);
        } else if (V == kSAPO) {
          const A tau = pos ? p.tp : p.tn;
          const A e = exp_acc(-(tau * (r - A(1))));
          const A sig = A(1) / (A(1) + e);
          P = -(pos ? p.q4p : p.q4n) * sig * a;
          // 1 - sig = e sig where sig >= 1/2 (no cancellation; e <= 1 there)
          dPdr = A(-4) * sig * (sig < A(0.5) ? A(1) - sig : e * sig) * a;
        } else {
          P = -a * lp;
          dPdl = -a;
        }
        acc.v[kRLoC] += (r < p.clo && neg) ? A(1) : A(0);
        acc.v[kRHiC] += (r > p.chi && pos) ? A(1) : A(0);
        A dl = w * (dPdl + dPdr * drdl);
        A cpl = w * dPdr;
        if (KM != 0) {
          const A d = lp - ld<A>(p.ref, b, t);
          A vc, kg;
          kl_value_grad<A, KM>(d, p.kind, p.kl_lrc, p.kl_oc, vc, kg);
          if (p.kl_st) kg = d;
          A K = vc;
          if (p.kl_rw) {
            K = r * vc;
            dl += p.beta * (r * kg + vc * drdl);
            cpl += p.beta * vc;
          } else {
            dl += p.beta * kg;
          }
          acc.v[kRKC] += K;
          acc.v[kRKvC] += vc;
        }
        acc.v[kRPgC] += P * w;
        if (p.ent.p) acc.v[kRHC] += ld<A>(p.ent, b, t);
        acc.v[kRNegXC] += -xstat;
        acc.v[kRRatioC] += r;
        acc.v[kRCpC] += cpl;
        acc.v[kRBadC] += (a - a == A(0)) ? A(0) : A(1);
        g = cb * dl;
      }
      if (p.glp) p.glp[b * p.T + t] = g;
    }
    Sums<A> zero;
#pragma unroll
    for (int k = 0; k < kRowCols; ++k) zero.v[k] = A(0);
    const Sums<A> tot = cu::block_reduce(acc, SumOp{}, zero, smem);
    if (threadIdx.x < kRowCols) p.rows[b * kRowCols + threadIdx.x] = tot.v[threadIdx.x];
  }
}

template <typename A>
struct ValueParams {
  int64_t B, T;
  In val, old, ret, mask;
  A* grad;
  const A* coef;
  A* rows;
  A clip;
};

template <typename A>
struct VSums {
  static constexpr int n = 3;
  A v[3];
};

template <typename A, int Form>
__global__ void __launch_bounds__(kThreads) value_rows_kernel(ValueParams<A> p) {
  __shared__ VSums<A> smem[32];
  for (int64_t b = blockIdx.x; b < p.B; b += gridDim.x) {
    const A cb = p.coef[b];
    VSums<A> acc{{A(0), A(0), A(0)}};
    for (int64_t t = threadIdx.x; t < p.T; t += blockDim.x) {
      const A m = ld<A>(p.mask, b, t);
      A g = A(0);
      if (m != A(0)) {
        const A v = ld<A>(p.val, b, t);
        const A o = p.old.p ? ld<A>(p.old, b, t) : v;
        const A y = ld<A>(p.ret, b, t);
        A vc, ind;
        if (Form == 0) {
          vc = clampa(v, o - p.clip, o + p.clip);
          ind = vc == v ? A(1) : A(0);
        } else {
          const A dv = v - o;
          const A dc = clampa(dv, -p.clip, p.clip);
          vc = o + dc;
          ind = dc == dv ? A(1) : A(0);
        }
        const A e1 = v - y, e2 = vc - y;
        const A l1 = e1 * e1, l2 = e2 * e2;
        const A g1 = A(2) * e1, g2 = A(2) * e2 * ind;
        const bool second = l2 > l1;
        acc.v[0] += second ? l2 : l1;
        acc.v[1] += second ? A(1) : A(0);
        acc.v[2] += v;
        g = cb * A(0.5) * (second ? g2 : (l1 > l2 ? g1 : A(0.5) * (g1 + g2)));
      }
      if (p.grad) p.grad[b * p.T + t] = g;
    }
    const VSums<A> zero{{A(0), A(0), A(0)}};
    const VSums<A> tot = cu::block_reduce(acc, SumOp{}, zero, smem);
    if (threadIdx.x < 3) p.rows[b * 3 + threadIdx.x] = tot.v[threadIdx.x];
  }
}

template <typename A, int KM>
__global__ void __launch_bounds__(kThreads) kl_kernel(In lp, In ref, In go, A* out, int64_t R,
                                                      int64_t C, bool backward, int kind,
                                                      bool st, A lrc, A oc) {
  const int64_t n = R * C;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / C, c = i - r * C;
    const A d = ld<A>(lp, r, c) - ld<A>(ref, r, c);
    A vc, g;
    kl_value_grad<A, KM>(d, kind, lrc, oc, vc, g);
    if (backward) {
      if (st) g = d;
      out[i] = ld<A>(go, r, c) * g;
    } else {
      out[i] = vc;
    }
  }
}

inline int launch_error(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return rlfuse_cuda_fail(static_cast<int>(err), cudaGetErrorString(err));
  return 0;
}

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < kMaxGrid ? (rows > 0 ? rows : 1) : kMaxGrid);
}

template <typename A, int V>
void launch_policy_km(const PolicyParams<A>& p, int km, cudaStream_t s) {
  const unsigned grid = grid_for(p.B);
  if (km == 2)
    policy_rows_kernel<A, V, 2><<<grid, kThreads, 0, s>>>(p);
  else if (km == 1)
    policy_rows_kernel<A, V, 1><<<grid, kThreads, 0, s>>>(p);
  else
    policy_rows_kernel<A, V, 0><<<grid, kThreads, 0, s>>>(p);
}

template <typename A>
int policy_rows_typed(const int64_t* ia, const double* fa, const void* cpg, const void* xs,
                      void* rows, cudaStream_t s) {
  PolicyParams<A> p;
  p.B = ia[kB];
  p.T = ia[kT];
  p.lp = read_in(ia, kLp);
  p.old = read_in(ia, kOld);
  p.adv = read_in(ia, kAdv);
  p.mask = read_in(ia, kMask);
  p.ref = read_in(ia, kRef);
  p.ent = read_in(ia, kEnt);
  p.isw = read_in(ia, kIsw);
  p.glp = reinterpret_cast<A*>(ia[kGradLp]);
  p.cpg = static_cast<const A*>(cpg);
  p.xs = static_cast<const A*>(xs);
  p.rows = static_cast<A*>(rows);
  p.kind = int(ia[kKlKind]);
  p.kl_st = ia[kKlStraight] != 0;
  p.kl_rw = ia[kKlRatioWeighted] != 0;
  p.seq_grad = ia[kSeqGrad] != 0;
  p.statx = ia[kStatClampedX] != 0;
  p.lrc = A(fa[kLrClamp]);
  p.seq_lr_max = A(fa[kSeqLrMax]);
  p.clo = A(fa[kClipLo]);
  p.chi = A(fa[kClipHi]);
  p.dual_c = A(fa[kDualC]);
  p.delta = A(fa[kDelta]);
  p.tp = A(fa[kTauPos]);
  p.tn = A(fa[kTauNeg]);
  p.q4p = A(4.0 / fa[kTauPos]);
  p.q4n = A(4.0 / fa[kTauNeg]);
  p.beta = A(fa[kBeta]);
  p.kl_lrc = A(fa[kKlLrClamp]);
  p.kl_oc = A(fa[kKlOutClamp]);
  p.ent_coef = A(fa[kEntCoef]);
  const int km = int(ia[kKlMode]);
  switch (int(ia[kVariant])) {
    case kGSPO: launch_policy_km<A, kGSPO>(p, km, s); break;
    case kCISPO: launch_policy_km<A, kCISPO>(p, km, s); break;
    case kSAPO: launch_policy_km<A, kSAPO>(p, km, s); break;
    case kGPG:
    case kReinforce: launch_policy_km<A, kGPG>(p, km, s); break;
    default: launch_policy_km<A, kPPO>(p, km, s); break;
  }
  return launch_error("policy_loss_rows");
}

template <typename A>
int value_rows_typed(const int64_t* ia, const double* fa, const void* coef, void* rows,
                     cudaStream_t s) {
  ValueParams<A> p;
  p.B = ia[kVB];
  p.T = ia[kVT];
  p.val = read_in(ia, kVVal);
  p.old = read_in(ia, kVOld);
  p.ret = read_in(ia, kVRet);
  p.mask = read_in(ia, kVMask);
  p.grad = reinterpret_cast<A*>(ia[kVGrad]);
  p.coef = static_cast<const A*>(coef);
  p.rows = static_cast<A*>(rows);
  p.clip = A(fa[kVClip]);
  const unsigned grid = grid_for(p.B);
  if (ia[kVClipForm] == 0)
    value_rows_kernel<A, 0><<<grid, kThreads, 0, s>>>(p);
  else
    value_rows_kernel<A, 1><<<grid, kThreads, 0, s>>>(p);
  return launch_error("value_loss_rows");
}

template <typename A>
int kl_typed(const int64_t* ia, const double* fa, cudaStream_t s) {
  const int64_t R = ia[kKR], C = ia[kKC];
  const int64_t n = R * C;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = grid_for(blocks);
  const bool bwd = ia[kKBackward] != 0;
  const int kind = int(ia[kKKind]);
  A* out = reinterpret_cast<A*>(ia[kKOut]);
  const In lp = read_in(ia, kKLp), ref = read_in(ia, kKRef), go = read_in(ia, kKGradOut);
  if (kind == kK3)
    kl_kernel<A, 2><<<grid, kThreads, 0, s>>>(lp, ref, go, out, R, C, bwd, kind,
                                              ia[kKStraight] != 0, A(fa[kKLrClamp]),
                                              A(fa[kKOutClamp]));
  else
    kl_kernel<A, 1><<<grid, kThreads, 0, s>>>(lp, ref, go, out, R, C, bwd, kind,
                                              ia[kKStraight] != 0, A(fa[kKLrClamp]),
                                              A(fa[kKOutClamp]));
  return launch_error("kl_penalty");
}

}  // namespace plcu
}  // namespace rlfuse

extern "C" {

int rlfuse_policy_loss_rows(const int64_t* ia, const double* fa, const void* cpg,
                            const void* xs, void* rows, void* stream) {
  using namespace rlfuse::plcu;
  if (ia[kB] <= 0) return 0;
  if (ia[kVariant] == kGSPO && xs == nullptr)
    return rlfuse_cuda_fail(cudaErrorInvalidValue, "policy_loss_rows: GSPO needs xs");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ia[kLp + 1] == 3) return policy_rows_typed<double>(ia, fa, cpg, xs, rows, s);
  return policy_rows_typed<float>(ia, fa, cpg, xs, rows, s);
}

int rlfuse_value_loss_rows(const int64_t* ia, const double* fa, const void* coef, void* rows,
                           void* stream) {
  using namespace rlfuse::plcu;
  if (ia[kVB] <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ia[kVVal + 1] == 3) return value_rows_typed<double>(ia, fa, coef, rows, s);
  return value_rows_typed<float>(ia, fa, coef, rows, s);
}

int rlfuse_kl_penalty(const int64_t* ia, const double* fa, void* stream) {
  using namespace rlfuse::plcu;
  if (ia[kKR] * ia[kKC] <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (ia[kKLp + 1] == 3) return kl_typed<double>(ia, fa, s);
  return kl_typed<float>(ia, fa, s);
}

}  // extern "C"
