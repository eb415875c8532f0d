// rlfuse CUDA backend: advantage estimation (GAE / discounted returns, masked moments and
// whitening, group statistics, broadcast over a mask, PPO token rewards).  The formulas
// are in python/rlfuse/ops/advantage.py, whose reference implementations are the spec.
//
// Exported (extern "C", no pybind11 here; bindings in csrc/cuda/advantage_api.cpp):
//   rlfuse_gae_fwd, rlfuse_masked_row_stats, rlfuse_masked_whiten_apply,
//   rlfuse_group_stats, rlfuse_broadcast_rows, rlfuse_adv_token_rewards.
// Launchers return 0 on success, else a cudaError_t value (message via
// rlfuse_cuda_last_error(), runtime.cu).  Value dtype codes: 0 float32, 3 float64 (the
// Python side widens bf16/f16).  Masks arrive as uint8 0/1 (validated by the caller), or
// null for "all valid"; optional value inputs may be null (read as 0).  Strides are in
// elements.  Sequences are padded rows (element (s, t) at s * s0 + t * s1) or, with
// cu_seqlens (int64, S + 1 entries), packed segments (element t of s at (cu[s] + t) * s1).
//
// GAE: one warp per sequence.  Walking backwards, position t applies the affine map on the
// state (A, nv):  kept: A <- c A + gamma nv + (r - v), nv <- v;  skipped: identity
// (c = gamma * lam).  A tile of 32 * kGaeK positions is split into lane chunks (lane 0 holds
// the latest kGaeK positions); each lane composes its chunk's maps, a warp inclusive scan
// (shfl_up, fixed order) composes the chunks, each lane applies the maps of the later
// lanes to the carried state and walks its chunk writing outputs, and the state after the
// tile is carried on.  Everything is in a fixed order: results depend only on the
// sequence's data.
//
// Reductions (row moments, group statistics) are per warp, float64, with a lane -> element
// mapping and shuffle tree that are fixed, so they are deterministic.

#include <cstdint>

#include <cuda_runtime.h>

#include "rlfuse/cuda_utils.cuh"

namespace rlfuse {
namespace advantage {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kThreads = kWarp * kWarpsPerBlock;
constexpr int kGaeK = 4;  // positions per lane and tile
constexpr int64_t kMaxBlocks = 65535LL * 16;

inline int fail(cudaError_t err, const char* msg) {
  return rlfuse_cuda_fail(static_cast<int>(err), msg != nullptr ? msg : cudaGetErrorString(err));
}

inline int check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, cudaGetErrorString(err));
  return 0;
}

inline unsigned blocks_for_warps(int64_t n_warps) {
  int64_t b = (n_warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

inline unsigned blocks_for_elems(int64_t n) {
  int64_t b = (n + kThreads - 1) / kThreads;
  if (b < 1) b = 1;
  if (b > kMaxBlocks) b = kMaxBlocks;
  return static_cast<unsigned>(b);
}

#if defined(__CUDACC__)

// ------------------------------------------------------------------------------------------
// warp helpers (full warp active)
// ------------------------------------------------------------------------------------------
template <typename X>
__device__ __forceinline__ X shfl_up(X v, int d) {
  return __shfl_up_sync(0xffffffffu, v, d);
}
template <typename X>
__device__ __forceinline__ X shfl_idx(X v, int src) {
  return __shfl_sync(0xffffffffu, v, src);
}

// Fixed-order tree sum; every lane gets lane 0's result.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return __shfl_sync(0xffffffffu, v, 0);
}
// max / min are exact, so any order gives the same result.
__device__ __forceinline__ double warp_max(double v) {
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ int64_t warp_max_i(int64_t v) {
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o > v ? o : v;
  }
  return v;
}
__device__ __forceinline__ int64_t warp_min_i(int64_t v) {
  for (int off = 16; off > 0; off >>= 1) {
    const int64_t o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o < v ? o : v;
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T load_or(const T* p, int64_t off, T dflt) {
  return p != nullptr ? p[off] : dflt;
}

// ------------------------------------------------------------------------------------------
// GAE
// ------------------------------------------------------------------------------------------
template <typename A>
struct Map {  // A' = a A + b nv + c,  nv' = d nv + e
  A a, b, c, d, e;
};

template <typename A>
__device__ __forceinline__ Map<A> identity_map() {
  return Map<A>{A(1), A(0), A(0), A(1), A(0)};
}

// Apply g, then f.
template <typename A>
__device__ __forceinline__ Map<A> compose(const Map<A>& g, const Map<A>& f) {
  Map<A> r;
  r.a = f.a * g.a;
  r.b = f.a * g.b + f.b * g.d;
  r.c = f.a * g.c + f.b * g.e + f.c;
  r.d = f.d * g.d;
  r.e = f.d * g.e + f.e;
  return r;
}

template <typename A>
__device__ __forceinline__ Map<A> shfl_up_map(const Map<A>& m, int d) {
  return Map<A>{shfl_up(m.a, d), shfl_up(m.b, d), shfl_up(m.c, d), shfl_up(m.d, d),
                shfl_up(m.e, d)};
}

struct SeqArgs {
  int64_t S, T;
  const int64_t* cu;
  int64_t r_s0, r_s1, v_s0, v_s1, m_s0, m_s1, lv_s;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) gae_kernel(
    SeqArgs g, const T* __restrict__ rew, const T* __restrict__ val,
    const uint8_t* __restrict__ msk, const T* __restrict__ lvp, T gamma, T c, int zero,
    T* __restrict__ adv, T* __restrict__ ret) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t s = warp; s < g.S; s += n_warps) {
    int64_t L, ro, vo, mo, oo;
    if (g.cu != nullptr) {
      const int64_t lo = g.cu[s];
      L = g.cu[s + 1] - lo;
      ro = lo * g.r_s1;
      vo = lo * g.v_s1;
      mo = lo * g.m_s1;
      oo = lo;
    } else {
      L = g.T;
      ro = s * g.r_s0;
      vo = s * g.v_s0;
      mo = s * g.m_s0;
      oo = s * g.T;
    }
    const T* r = rew + ro;
    const T* v = val != nullptr ? val + vo : nullptr;
    const uint8_t* m = msk != nullptr ? msk + mo : nullptr;
    T A = T(0);
    T nv = lvp != nullptr ? lvp[s * g.lv_s] : T(0);
    int64_t last = L - 1;
    if (zero && m != nullptr) {
      int64_t mx = -1;
      for (int64_t t = lane; t < L; t += kWarp)
        if (m[t * g.m_s1] != 0) mx = t;
      last = warp_max_i(mx);
    }
    const int64_t tile = static_cast<int64_t>(kWarp) * kGaeK;
    for (int64_t hi = L - 1; hi >= 0; hi -= tile) {
      // This lane's positions, latest first: t_q = hi - lane * K - q.
      T rq[kGaeK], vq[kGaeK];
      bool onq[kGaeK], keepq[kGaeK];
      Map<T> P = identity_map<T>();
#pragma unroll
      for (int q = 0; q < kGaeK; ++q) {
        const int64_t t = hi - static_cast<int64_t>(lane) * kGaeK - q;
        const bool inb = t >= 0;
        const bool on = inb && (m == nullptr || m[t * g.m_s1] != 0);
        const T rv = on ? r[t * g.r_s1] : T(0);
        const T vv = on && v != nullptr ? v[t * g.v_s1] : T(0);
        const bool keep = on || (zero && inb && t <= last);
        rq[q] = rv;
        vq[q] = vv;
        onq[q] = on;
        keepq[q] = keep;
        const Map<T> f = keep ? Map<T>{c, gamma, rv - vv, T(0), vv} : identity_map<T>();
        P = compose(P, f);
      }
      // Inclusive scan over lanes (lane 0 first): S_j = P_0, then P_1, ..., then P_j.
      Map<T> Sj = P;
#pragma unroll
      for (int d = 1; d < kWarp; d <<= 1) {
        const Map<T> up = shfl_up_map(Sj, d);
        if (lane >= d) Sj = compose(up, Sj);
      }
      Map<T> E = shfl_up_map(Sj, 1);
      if (lane == 0) E = identity_map<T>();
      T a_st = E.a * A + E.b * nv + E.c;
      T nv_st = E.d * nv + E.e;
#pragma unroll
      for (int q = 0; q < kGaeK; ++q) {
        const int64_t t = hi - static_cast<int64_t>(lane) * kGaeK - q;
        if (keepq[q]) {
          a_st = c * a_st + gamma * nv_st + (rq[q] - vq[q]);
          nv_st = vq[q];
        }
        if (t >= 0) {
          adv[oo + t] = onq[q] ? a_st : T(0);
          if (ret != nullptr) ret[oo + t] = onq[q] ? a_st + vq[q] : T(0);
        }
      }
      const T A_new = Sj.a * A + Sj.b * nv + Sj.c;
      const T nv_new = Sj.d * nv + Sj.e;
      A = shfl_idx(A_new, kWarp - 1);
      nv = shfl_idx(nv_new, kWarp - 1);
    }
  }
}

// ------------------------------------------------------------------------------------------
// masked row moments and whitening
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(
    int64_t R, int64_t C, const T* __restrict__ x, int64_t x_s0, int64_t x_s1,
    const uint8_t* __restrict__ msk, int64_t m_s0, int64_t m_s1, int64_t* __restrict__ cnt,
    double* __restrict__ mean_out, double* __restrict__ m2_out) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  for (int64_t row = warp; row < R; row += n_warps) {
    const T* xr = x + row * x_s0;
    const uint8_t* mr = msk != nullptr ? msk + row * m_s0 : nullptr;
    double n = 0, sum = 0;
    for (int64_t col = lane; col < C; col += kWarp) {
      const bool on = mr == nullptr || mr[col * m_s1] != 0;
      if (on) {
        n += 1.0;
        sum += static_cast<double>(xr[col * x_s1]);
      }
    }
    n = warp_sum(n);
    sum = warp_sum(sum);
    const double mean = n > 0 ? sum / n : 0.0;
    double m2 = 0;
    for (int64_t col = lane; col < C; col += kWarp) {
      const bool on = mr == nullptr || mr[col * m_s1] != 0;
      if (on) {
        const double d = static_cast<double>(xr[col * x_s1]) - mean;
        m2 += d * d;
      }
    }
    m2 = warp_sum(m2);
    if (lane == 0) {
      cnt[row] = static_cast<int64_t>(n);
      mean_out[row] = mean;
      m2_out[row] = m2;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) whiten_kernel(
    int64_t R, int64_t C, const T* __restrict__ x, int64_t x_s0, int64_t x_s1,
    const uint8_t* __restrict__ msk, int64_t m_s0, int64_t m_s1, double mean, double scale,
    double add_back, T* __restrict__ out) {
  const int64_t n = R * C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    const int64_t row = i / C, col = i - row * C;
    const bool on = msk == nullptr || msk[row * m_s0 + col * m_s1] != 0;
    const double w = (static_cast<double>(x[row * x_s0 + col * x_s1]) - mean) * scale + add_back;
    out[i] = on ? static_cast<T>(w) : T(0);
  }
}

// ------------------------------------------------------------------------------------------
// group statistics (one warp per group; methods and size-one codes as advantage.h)
// ------------------------------------------------------------------------------------------
struct GroupParams {
  int method, size_one, norm_by_std, has_floor;
  double eps, std_floor, f_norm, batch_std, alpha;
};

__global__ void __launch_bounds__(kThreads) group_kernel(
    int64_t G, const double* __restrict__ s, const int64_t* __restrict__ order,
    const int64_t* __restrict__ seg, const double* __restrict__ lens, GroupParams p,
    double* __restrict__ x) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const double inf = INFINITY;
  for (int64_t g = warp; g < G; g += n_warps) {
    const int64_t lo = seg[g], hi = seg[g + 1];
    // count and first valid member (by position in the group, i.e. sample index order)
    double n = 0;
    int64_t first = INT64_MAX;
    for (int64_t k = lo + lane; k < hi; k += kWarp) {
      const double v = s[order[k]];
      if (v == v) {
        n += 1.0;
        if (k < first) first = k;
      }
    }
    n = warp_sum(n);
    first = warp_min_i(first);
    if (n == 0) continue;  // every member NaN: the caller writes 0 for them
    const double K = s[order[first]];
    double sumd = 0;
    for (int64_t k = lo + lane; k < hi; k += kWarp) {
      const double v = s[order[k]];
      if (v == v) sumd += v - K;
    }
    sumd = warp_sum(sumd);
    const double md = sumd / n;
    double m2 = 0;
    for (int64_t k = lo + lane; k < hi; k += kWarp) {
      const double v = s[order[k]];
      if (v == v) {
        const double dd = v - K - md;
        m2 += dd * dd;
      }
    }
    m2 = warp_sum(m2);
    const double sd = sqrt(m2 / (n > 1 ? n - 1.0 : 1.0));
    const double sd_f = p.has_floor ? fmax(sd, p.std_floor) : sd;
    const double bs_f = p.has_floor ? fmax(p.batch_std, p.std_floor) : p.batch_std;
    const double one_f = p.has_floor ? fmax(1.0, p.std_floor) : 1.0;
    // method-wide group quantities
    double base = md;  // opo baseline (relative to K)
    if (p.method == 5) {
      double w = 0, ws = 0;
      for (int64_t k = lo + lane; k < hi; k += kWarp) {
        const int64_t i = order[k];
        const double v = s[i];
        if (v == v) {
          const double l = lens != nullptr ? lens[i] : 1.0;
          w += l;
          ws += l * (v - K);
        }
      }
      w = warp_sum(w);
      ws = warp_sum(ws);
      if (w > 0) base = ws / w;
    }
    int64_t best = -1;
    double passk_adv = 0;
    if (p.method == 6 && n >= 2) {
      double mx = -inf;
      for (int64_t k = lo + lane; k < hi; k += kWarp) {
        const double v = s[order[k]];
        if (v == v) mx = fmax(mx, v);
      }
      mx = warp_max(mx);
      int64_t b = INT64_MAX;
      for (int64_t k = lo + lane; k < hi; k += kWarp) {
        const double v = s[order[k]];
        if (v == v && v == mx && k < b) b = k;
      }
      best = warp_min_i(b);
      double second = -inf;
      for (int64_t k = lo + lane; k < hi; k += kWarp) {
        const double v = s[order[k]];
        if (v == v && k != best) second = fmax(second, v);
      }
      second = warp_max(second);
      passk_adv = mx - second;
      if (p.norm_by_std) passk_adv /= sd_f + p.eps;
    }
    for (int64_t k = lo + lane; k < hi; k += kWarp) {
      const int64_t i = order[k];
      const double v = s[i];
      if (!(v == v)) continue;
      double res = 0;
      if (n >= 2) {
        const double cdev = v - K - md;
        switch (p.method) {
          case 0: res = cdev / (sd_f + p.eps); break;              // grpo
          case 2: res = cdev / (bs_f + p.eps); break;              // batch_std
          case 3: res = cdev * (n / (n - 1.0)); break;             // rloo
          case 5: res = (v - K) - base; break;                     // opo
          case 6: res = k == best ? passk_adv : 0.0; break;        // grpo_passk
          case 7: res = (p.alpha / p.f_norm) * cdev; break;        // gpg
          default: res = cdev; break;                              // dr_grpo, rf++ baseline
        }
      } else if (p.size_one == 1) {  // verl: baseline 0, std 1
        switch (p.method) {
          case 0: res = v / (one_f + p.eps); break;
          case 2: res = v / (bs_f + p.eps); break;
          case 7: res = p.alpha * v / p.f_norm; break;
          default: res = v; break;
        }
      }
      x[i] = res;
    }
  }
}

// ------------------------------------------------------------------------------------------
// broadcast and token rewards
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) broadcast_kernel(
    int64_t B, int64_t Tn, const T* __restrict__ a, const uint8_t* __restrict__ msk,
    int64_t m_s0, int64_t m_s1, T* __restrict__ out) {
  const int64_t n = B * Tn;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += step) {
    const int64_t b = i / Tn, t = i - b * Tn;
    out[i] = msk[b * m_s0 + t * m_s1] != 0 ? a[b] : T(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) token_rewards_kernel(
    SeqArgs g, const T* __restrict__ scores, int64_t sc_s, const T* __restrict__ kl,
    const uint8_t* __restrict__ msk, T kl_coef, T* __restrict__ out) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  // strides: kl uses (r_s0, r_s1), the mask (m_s0, m_s1)
  for (int64_t s = warp; s < g.S; s += n_warps) {
    int64_t L, ko, mo, oo;
    if (g.cu != nullptr) {
      const int64_t lo = g.cu[s];
      L = g.cu[s + 1] - lo;
      ko = lo * g.r_s1;
      mo = lo * g.m_s1;
      oo = lo;
    } else {
      L = g.T;
      ko = s * g.r_s0;
      mo = s * g.m_s0;
      oo = s * g.T;
    }
    const uint8_t* m = msk != nullptr ? msk + mo : nullptr;
    int64_t last = L - 1;
    if (m != nullptr) {
      int64_t mx = -1;
      for (int64_t t = lane; t < L; t += kWarp)
        if (m[t * g.m_s1] != 0) mx = t;
      last = warp_max_i(mx);
    }
    const T score = scores[s * sc_s];
    for (int64_t t = lane; t < L; t += kWarp) {
      const bool on = m == nullptr || m[t * g.m_s1] != 0;
      const T k = on && kl != nullptr ? kl[ko + t * g.r_s1] : T(0);
      const T pen = kl_coef * k;
      out[oo + t] = t == last ? score - pen : (on ? T(0) - pen : T(0));
    }
  }
}

// ------------------------------------------------------------------------------------------
// launch helpers
// ------------------------------------------------------------------------------------------
template <typename T>
int launch_gae(const SeqArgs& g, const void* r, const void* v, const uint8_t* m, const void* lv,
               double gamma, double lam, int zero, void* adv, void* ret, cudaStream_t st) {
  gae_kernel<T><<<blocks_for_warps(g.S), kThreads, 0, st>>>(
      g, static_cast<const T*>(r), static_cast<const T*>(v), m, static_cast<const T*>(lv),
      static_cast<T>(gamma), static_cast<T>(gamma * lam), zero, static_cast<T*>(adv),
      static_cast<T*>(ret));
  return check_launch();
}

#endif  // __CUDACC__

}  // namespace advantage
}  // namespace rlfuse

// ------------------------------------------------------------------------------------------
// extern "C" API
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

extern "C" {

int rlfuse_gae_fwd(int dtype, int64_t S, int64_t T, const void* cu, const void* r, int64_t r_s0,
                   int64_t r_s1, const void* v, int64_t v_s0, int64_t v_s1, const void* m,
                   int64_t m_s0, int64_t m_s1, const void* lv, int64_t lv_s, double gamma,
                   double lam, int zero, void* adv, void* ret, void* stream) {
  using namespace rlfuse::advantage;
  if (dtype != 0 && dtype != 3) return fail(cudaErrorInvalidValue, "gae_fwd: dtype must be 0 or 3");
  if (S < 0 || T < 0) return fail(cudaErrorInvalidValue, "gae_fwd: negative size");
  if (S == 0) return 0;
  if (r == nullptr || adv == nullptr) return fail(cudaErrorInvalidValue, "gae_fwd: null pointer");
  SeqArgs g{S, T, static_cast<const int64_t*>(cu), r_s0, r_s1, v_s0, v_s1, m_s0, m_s1, lv_s};
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint8_t* mk = static_cast<const uint8_t*>(m);
  if (dtype == 3) return launch_gae<double>(g, r, v, mk, lv, gamma, lam, zero, adv, ret, st);
  return launch_gae<float>(g, r, v, mk, lv, gamma, lam, zero, adv, ret, st);
}

int rlfuse_masked_row_stats(int dtype, int64_t R, int64_t C, const void* x, int64_t x_s0,
                            int64_t x_s1, const void* m, int64_t m_s0, int64_t m_s1,
                            int64_t* cnt, double* mean, double* m2, void* stream) {
  using namespace rlfuse::advantage;
  if (dtype != 0 && dtype != 3)
    return fail(cudaErrorInvalidValue, "masked_row_stats: dtype must be 0 or 3");
  if (R <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint8_t* mk = static_cast<const uint8_t*>(m);
  if (dtype == 3)
    row_stats_kernel<double><<<blocks_for_warps(R), kThreads, 0, st>>>(
        R, C, static_cast<const double*>(x), x_s0, x_s1, mk, m_s0, m_s1, cnt, mean, m2);
  else
    row_stats_kernel<float><<<blocks_for_warps(R), kThreads, 0, st>>>(
        R, C, static_cast<const float*>(x), x_s0, x_s1, mk, m_s0, m_s1, cnt, mean, m2);
  return check_launch();
}

int rlfuse_masked_whiten_apply(int dtype, int64_t R, int64_t C, const void* x, int64_t x_s0,
                               int64_t x_s1, const void* m, int64_t m_s0, int64_t m_s1,
                               double mean, double scale, double add_back, void* out,
                               void* stream) {
  using namespace rlfuse::advantage;
  if (dtype != 0 && dtype != 3)
    return fail(cudaErrorInvalidValue, "masked_whiten_apply: dtype must be 0 or 3");
  if (R <= 0 || C <= 0) return 0;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint8_t* mk = static_cast<const uint8_t*>(m);
  if (dtype == 3)
    whiten_kernel<double><<<blocks_for_elems(R * C), kThreads, 0, st>>>(
        R, C, static_cast<const double*>(x), x_s0, x_s1, mk, m_s0, m_s1, mean, scale, add_back,
        static_cast<double*>(out));
  else
    whiten_kernel<float><<<blocks_for_elems(R * C), kThreads, 0, st>>>(
        R, C, static_cast<const float*>(x), x_s0, x_s1, mk, m_s0, m_s1, mean, scale, add_back,
        static_cast<float*>(out));
  return check_launch();
}

int rlfuse_group_stats(int64_t B, const double* s, const int64_t* order, const int64_t* seg,
                       int64_t G, const double* lens, int method, int size_one, double eps,
                       double std_floor, int norm_by_std, double f_norm, double batch_std,
                       double alpha, double* x, void* stream) {
  using namespace rlfuse::advantage;
  if (G <= 0 || B <= 0) return 0;
  if (s == nullptr || order == nullptr || seg == nullptr || x == nullptr)
    return fail(cudaErrorInvalidValue, "group_stats: null pointer");
  GroupParams p{method, size_one, norm_by_std, std_floor >= 0 ? 1 : 0,
                eps, std_floor, f_norm, batch_std, alpha};
  group_kernel<<<blocks_for_warps(G), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      G, s, order, seg, lens, p, x);
  return check_launch();
}

int rlfuse_broadcast_rows(int dtype, int64_t B, int64_t T, const void* a, const void* m,
                          int64_t m_s0, int64_t m_s1, void* out, void* stream) {
  using namespace rlfuse::advantage;
  if (dtype != 0 && dtype != 3)
    return fail(cudaErrorInvalidValue, "broadcast_rows: dtype must be 0 or 3");
  if (B <= 0 || T <= 0) return 0;
  if (m == nullptr) return fail(cudaErrorInvalidValue, "broadcast_rows: null mask");
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint8_t* mk = static_cast<const uint8_t*>(m);
  if (dtype == 3)
    broadcast_kernel<double><<<blocks_for_elems(B * T), kThreads, 0, st>>>(
        B, T, static_cast<const double*>(a), mk, m_s0, m_s1, static_cast<double*>(out));
  else
    broadcast_kernel<float><<<blocks_for_elems(B * T), kThreads, 0, st>>>(
        B, T, static_cast<const float*>(a), mk, m_s0, m_s1, static_cast<float*>(out));
  return check_launch();
}

int rlfuse_adv_token_rewards(int dtype, int64_t S, int64_t T, const void* cu, const void* scores,
                             int64_t sc_s, const void* kl, int64_t k_s0, int64_t k_s1,
                             const void* m, int64_t m_s0, int64_t m_s1, double kl_coef,
                             void* out, void* stream) {
  using namespace rlfuse::advantage;
  if (dtype != 0 && dtype != 3)
    return fail(cudaErrorInvalidValue, "token_rewards: dtype must be 0 or 3");
  if (S <= 0) return 0;
  SeqArgs g{S, T, static_cast<const int64_t*>(cu), k_s0, k_s1, 0, 0, m_s0, m_s1, 0};
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const uint8_t* mk = static_cast<const uint8_t*>(m);
  if (dtype == 3)
    token_rewards_kernel<double><<<blocks_for_warps(S), kThreads, 0, st>>>(
        g, static_cast<const double*>(scores), sc_s, static_cast<const double*>(kl), mk,
        kl_coef, static_cast<double*>(out));
  else
    token_rewards_kernel<float><<<blocks_for_warps(S), kThreads, 0, st>>>(
        g, static_cast<const float*>(scores), sc_s, static_cast<const float*>(kl), mk,
        static_cast<float>(kl_coef), static_cast<float*>(out));
  return check_launch();
}

}  // extern "C"

#endif  // __CUDACC__
