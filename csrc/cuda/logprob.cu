// rlfuse CUDA backend: per-row token log-probabilities and entropy of logits / temperature.
//
// Exported (extern "C", no pybind11 here; bindings in csrc/cuda/logprob_api.cpp):
//   int rlfuse_token_logprobs_fwd(...);
//   int rlfuse_token_logprobs_bwd(...);
// Launchers return 0 on success, else a cudaError_t value; rlfuse_cuda_last_error() (runtime.cu) then
// returns a static message for the calling thread's last failure.
//
// Layout. Row r (0 <= r < n_outer * n_inner) starts at element offset
//   (r / n_inner) * stride_outer + (r % n_inner) * stride_inner
// from `logits` (strides in elements) and holds V contiguous elements. Logits dtype codes:
// 0 float32, 1 float16, 2 bfloat16, 3 float64. Accumulation (and the [N] float arrays) is
// float32, or float64 for dtype 3. z = x * inv_temp.
//
// Forward: one thread block per row (grid-stride over rows past 2^31-1). Each thread keeps an
// online (m, s, w) state, s = sum exp(z - m), w = sum exp(z - m) * (z - m), over a single read
// of its elements; states are combined with a fixed-order tree (warp shuffles, then shared
// memory). lse = m + log s, entropy = log s - w / s, logp = z[id] - lse.
//
// Determinism: thread t always owns the 16-byte element groups t, t + B, t + 2B, ... of its row
// (B = blockDim.x, a group is 16 / sizeof(T) elements) and then tail element
// floor(V / G) * G + t; it processes them in increasing order. This mapping is the same whether
// the group is fetched with one 128-bit load (all row bases 16-byte aligned) or with scalar loads
// (any alignment), and B depends only on V, so results depend only on the row's data, V and the
// dtype -- not on the row index, the number of rows, the strides or the alignment.
//
// Backward: 2-D grid, grid.x = rows (grid-stride past 2^31-1), grid.y = vocab chunks of
// kBwdThreads * kBwdUnitsPerThread units (a unit is a 16-byte group on the vector path, one
// element on the scalar path; grid-stride past 65535 chunks). Purely elementwise; every element
// of dlogits is written exactly once (ignored rows get zeros).
//
// Special values: z == -inf elements are skipped (contribute exactly 0); a NaN logit makes the
// row's lse/logp/entropy NaN; a +inf logit gives NaN too (softmax undefined); a row that is all
// -inf gives lse = -inf and NaN logp/entropy. An id outside [0, V) (other than ignore_index)
// never reads out of bounds: its logp is NaN, and in the backward no element is treated as the
// target.

#include <cstdint>

#include <cuda_runtime.h>

#include "rlfuse/cuda_utils.cuh"

namespace rlfuse {
namespace logprob {

using cu::acc_t;
using cu::exp_acc;
using cu::fma_acc;
using cu::fmax_acc;
using cu::from_acc;
using cu::ld_ro;
using cu::load_group;
using cu::log_acc;
using cu::mul_rn;
using cu::neg_inf;
using cu::quiet_nan;
using cu::store_group;
using cu::to_acc;
using cu::Vec16;

constexpr int64_t kMaxGridX = 2147483647LL;  // 2^31 - 1
constexpr int64_t kMaxGridY = 65535;
constexpr int kFwdMaxThreads = 512;
constexpr int kFwdMinBlocks = 2;  // >= 2 resident blocks/SM overlap one row's reduction tail
                                  // with another row's streaming (caps registers at 64)
// 16-byte groups in flight per thread in the forward (2 for double, whose exp needs more
// registers; float64 is a reference dtype, not a fast path). Results do not depend on it.
template <typename T>
struct FwdUnroll {
  static constexpr int value = sizeof(T) == 8 ? 2 : 4;
};
constexpr int kBwdThreads = 256;
// Units in flight per thread in the backward (1 for double: its exp needs many registers and
// ptxas spills on sm_90 with more; float64 is a reference dtype, not a fast path).
template <typename T>
struct BwdUnroll {
  static constexpr int value = sizeof(T) == 8 ? 1 : 4;
};
constexpr int kBwdUnitsPerThread = 8;  // units per thread per chunk

// Forward block size: a function of V only (results depend on it, see determinism above).
RLFUSE_HD int fwd_block_threads(int64_t V) {
  if (V <= 2048) return 128;
  if (V <= 8192) return 256;
  return kFwdMaxThreads;
}

// ------------------------------------------------------------------------------------------
// online log-sum-exp / entropy state
// ------------------------------------------------------------------------------------------
// Invariants: m is never NaN. Empty state: (m, s, w) = (-inf, 0, 0). After any element other
// than -inf has been added, s >= 1 or s is NaN, and w <= 0 (so entropy = log s - w / s >= 0).
template <typename A>
struct LseState {
  A m;
  A s;
  A w;
};

template <typename A>
RLFUSE_HD LseState<A> lse_empty() {
  LseState<A> st;
  st.m = neg_inf<A>();
  st.s = A(0);
  st.w = A(0);
  return st;
}

// Move the reference maximum up to mx (precondition: mx > st.m, so mx is not NaN and > -inf).
// With d = m - mx < 0 and c = exp(d):  s' = c * s,  w' = c * (w + d * s).
// An empty state (m == -inf) just takes m = mx (its s/w are 0 -- or NaN if only NaNs were seen,
// which is kept so that the NaN propagates). When c underflows to 0 the old terms vanish; w' is
// then set to 0 directly because d may have overflowed to -inf (|m|, |mx| ~ FLT_MAX), which would
// make 0 * (w + d * s) a NaN.
template <typename A, bool kW>
RLFUSE_HD void lse_raise_max(LseState<A>& st, A mx) {
  if (st.m != neg_inf<A>()) {
    const A d = st.m - mx;
    const A c = exp_acc(d);
    if (kW) st.w = (c == A(0)) ? A(0) : c * fma_acc(d, st.s, st.w);
    st.s = c * st.s;
  }
  st.m = mx;
}

// Add a group of N values: raise the reference maximum once to the group's (NaN-ignoring)
// maximum, then accumulate every value. Mathematically identical to the element-at-a-time update
// (which raises m whenever a larger z arrives), and bitwise identical to skipping -inf values:
//  * once m > -inf, a z == -inf gives d = -inf, e = exp(-inf) = +0, so s + e == s, and
//    w + e * max(d, lowest) == w + (-0) == w (the clamp only avoids the 0 * -inf NaN);
//  * while m == -inf (every value so far is -inf or NaN), the group is all -inf/NaN: -inf values
//    are skipped and a NaN is added to s, so it propagates.
// A NaN z (m finite) gives d = e = NaN, so s becomes NaN.
template <typename A, bool kW, int N>
RLFUSE_HD void lse_add_group(LseState<A>& st, const A (&z)[N]) {
  A mx = z[0];
  RLFUSE_UNROLL
  for (int j = 1; j < N; ++j) mx = fmax_acc(mx, z[j]);
  if (mx > st.m) lse_raise_max<A, kW>(st, mx);
  if (st.m != neg_inf<A>()) {
    RLFUSE_UNROLL
    for (int j = 0; j < N; ++j) {
      const A d = z[j] - st.m;
      const A e = exp_acc(d);
      st.s = st.s + e;
      if (kW) st.w = fma_acc(e, fmax_acc(d, cu::lowest<A>()), st.w);
    }
  } else {
    RLFUSE_UNROLL
    for (int j = 0; j < N; ++j) {
      if (z[j] != z[j]) st.s = st.s + z[j];  // NaN
    }
  }
}

// Combine two states (a from lower-numbered threads). An empty state (s == 0) contributes
// nothing, so the 0 * inf products of exp(-inf - M) * ... never arise from it; a side whose scale
// c underflows to 0 contributes 0 to w explicitly (its d may have overflowed to -inf). NaN in
// either s reaches the result's s (c * NaN, or exp(NaN) when both m are +inf).
template <typename A, bool kW>
struct LseCombine {
  RLFUSE_HD LseState<A> operator()(const LseState<A>& a, const LseState<A>& b) const {
    if (b.s == A(0)) return a;
    if (a.s == A(0)) return b;
    const A M = a.m > b.m ? a.m : b.m;
    const A da = a.m - M;
    const A db = b.m - M;
    const A ca = exp_acc(da);
    const A cb = exp_acc(db);
    LseState<A> r;
    r.m = M;
    r.s = fma_acc(ca, a.s, cb * b.s);
    if (kW) {
      const A xa = (ca == A(0)) ? A(0) : fma_acc(da, a.s, a.w);
      const A xb = (cb == A(0)) ? A(0) : fma_acc(db, b.s, b.w);
      r.w = fma_acc(ca, xa, cb * xb);
    } else {
      r.w = A(0);
    }
    return r;
  }
};

template <typename A>
RLFUSE_HD void lse_finalize(const LseState<A>& st, A& lse, A& entropy) {
  const A ls = log_acc(st.s);
  lse = st.m + ls;
  entropy = ls - st.w / st.s;
}

// z = x * inv_temp, never contracted into a following add.
template <typename T>
RLFUSE_HD acc_t<T> scaled(T x, acc_t<T> inv_temp) {
  return mul_rn(to_acc(x), inv_temp);
}

// Per-thread partial state of one row (see the determinism note at the top of the file).
template <typename T, bool kVec, bool kW>
RLFUSE_HD LseState<acc_t<T>> fwd_thread_partial(const T* row, int64_t V, int tid, int nthreads,
                                                 acc_t<T> inv_temp) {
  using A = acc_t<T>;
  constexpr int G = Vec16<T>::N;
  constexpr int U = FwdUnroll<T>::value;
  LseState<A> st = lse_empty<A>();
  const int64_t B = nthreads;
  const int64_t ngroups = V / G;
  int64_t g = tid;
  for (; g + (U - 1) * B < ngroups; g += U * B) {
    T v[U][G];
    RLFUSE_UNROLL
    for (int u = 0; u < U; ++u) load_group<T, kVec>(row + (g + u * B) * G, v[u]);
    RLFUSE_UNROLL
    for (int u = 0; u < U; ++u) {
      A z[G];
      RLFUSE_UNROLL
      for (int j = 0; j < G; ++j) z[j] = scaled(v[u][j], inv_temp);
      lse_add_group<A, kW, G>(st, z);
    }
  }
  for (; g < ngroups; g += B) {
    T v[G];
    load_group<T, kVec>(row + g * G, v);
    A z[G];
    RLFUSE_UNROLL
    for (int j = 0; j < G; ++j) z[j] = scaled(v[j], inv_temp);
    lse_add_group<A, kW, G>(st, z);
  }
  for (int64_t e = ngroups * G + tid; e < V; e += B) {
    const A z[1] = {scaled(ld_ro(row + e), inv_temp)};
    lse_add_group<A, kW, 1>(st, z);
  }
  return st;
}

RLFUSE_HD int64_t load_id(const void* ids, bool ids64, int64_t r) {
  return ids64 ? static_cast<const int64_t*>(ids)[r]
               : static_cast<int64_t>(static_cast<const int32_t*>(ids)[r]);
}

RLFUSE_HD int64_t row_offset(int64_t r, int64_t n_inner, int64_t stride_outer,
                             int64_t stride_inner) {
  return (r / n_inner) * stride_outer + (r % n_inner) * stride_inner;
}

// ------------------------------------------------------------------------------------------
// backward
// ------------------------------------------------------------------------------------------
// d/dz of (g_lp * logp[id] + g_e * H), times inv_temp (dz/dx), with t = z - lse = log p:
//   v != id : -g_lp * p - g_e * p * (t + H)
//   v == id :  g_lp * (1 - p) - g_e * p * (t + H)
// p * (t + H) is taken as 0 when p == 0 (z == -inf, or exp underflow).
template <typename A, bool kEnt>
RLFUSE_HD A bwd_value(A z, bool is_target, A lse, A H, A g_lp, A g_e, A inv_temp) {
  const A t = z - lse;
  const A p = exp_acc(t);
  A ent = A(0);
  if (kEnt) ent = (p == A(0)) ? A(0) : (g_e * p) * (t + H);
  const A lp = is_target ? g_lp * (A(1) - p) : A(0) - g_lp * p;  // +0 (not -0) when g_lp == 0
  return (lp - ent) * inv_temp;
}

struct BwdRowParams {
  int64_t V;
  int64_t id;
  int64_t chunk;
  int64_t nchunks;
  int64_t units_per_chunk;
};

// Converts the G loaded values of unit u (elements u*G .. u*G+G-1) into gradients in place;
// kZero: just zeros (ignored rows).
template <typename T, bool kEnt, bool kZero, int G>
RLFUSE_HD void bwd_compute_unit(T (&v)[G], int64_t u, int64_t id, acc_t<T> lse, acc_t<T> H,
                                acc_t<T> g_lp, acc_t<T> g_e, acc_t<T> inv_temp) {
  using A = acc_t<T>;
  if (kZero) {
    RLFUSE_UNROLL
    for (int j = 0; j < G; ++j) v[j] = from_acc<T>(A(0));
  } else {
    // Position of the target inside this unit, -1 when it is elsewhere (or out of range).
    const int64_t rel = id - u * G;
    const int jt = (rel >= 0 && rel < G) ? static_cast<int>(rel) : -1;
    RLFUSE_UNROLL
    for (int j = 0; j < G; ++j)
      v[j] = from_acc<T>(
          bwd_value<A, kEnt>(scaled(v[j], inv_temp), j == jt, lse, H, g_lp, g_e, inv_temp));
  }
}

// Loads unit u: a 16-byte group when kVec, one element otherwise.
template <typename T, bool kVec, int G>
RLFUSE_HD void bwd_load_unit(const T* row, int64_t u, T (&v)[G]) {
  if constexpr (kVec) {
    load_group<T, true>(row + u * G, v);
  } else {
    static_assert(G == 1, "scalar path uses single-element units");
    v[0] = ld_ro(row + u);
  }
}

// One thread's share of one vocab chunk of one (non-ignored) row.
// Units: 16-byte groups when kVec (row and out 16-byte aligned), single elements otherwise.
// Chunk c covers units [c * upc, min(nunits, (c + 1) * upc)); the < G tail elements of a row on
// the vector path belong to the last chunk. Thread t handles units t, t + B, ... of its chunk.
template <typename T, bool kVec, bool kEnt, bool kZero>
RLFUSE_HD void bwd_thread_chunk(const T* row, T* out, const BwdRowParams& rp, acc_t<T> lse,
                                acc_t<T> H, acc_t<T> g_lp, acc_t<T> g_e, acc_t<T> inv_temp,
                                int tid, int nthreads) {
  using A = acc_t<T>;
  constexpr int G = kVec ? Vec16<T>::N : 1;
  constexpr int U = BwdUnroll<T>::value;
  const int64_t B = nthreads;
  const int64_t V = rp.V;
  const int64_t nunits = V / G;
  const int64_t ubeg = rp.chunk * rp.units_per_chunk;
  const int64_t rem = nunits - ubeg;
  const int64_t uend = ubeg + (rem < rp.units_per_chunk ? rem : rp.units_per_chunk);

  int64_t u = ubeg + tid;
  for (; u + (U - 1) * B < uend; u += U * B) {
    T v[U][G];
    if (!kZero) {
      RLFUSE_UNROLL
      for (int k = 0; k < U; ++k) bwd_load_unit<T, kVec, G>(row, u + k * B, v[k]);
    }
    RLFUSE_UNROLL
    for (int k = 0; k < U; ++k) {
      bwd_compute_unit<T, kEnt, kZero, G>(v[k], u + k * B, rp.id, lse, H, g_lp, g_e, inv_temp);
      store_group<T, kVec, G>(out + (u + k * B) * G, v[k]);
    }
  }
  for (; u < uend; u += B) {
    T v[G];
    if (!kZero) bwd_load_unit<T, kVec, G>(row, u, v);
    bwd_compute_unit<T, kEnt, kZero, G>(v, u, rp.id, lse, H, g_lp, g_e, inv_temp);
    store_group<T, kVec, G>(out + u * G, v);
  }
  if (kVec && rp.chunk == rp.nchunks - 1) {
    for (int64_t e = nunits * G + tid; e < V; e += B) {
      T v[1];
      if (kZero) {
        v[0] = from_acc<T>(A(0));
      } else {
        v[0] = from_acc<T>(bwd_value<A, kEnt>(scaled(ld_ro(row + e), inv_temp), e == rp.id, lse,
                                              H, g_lp, g_e, inv_temp));
      }
      out[e] = v[0];
    }
  }
}

// Number of vocab chunks and units per chunk of the backward (host side).
template <typename T>
RLFUSE_HD void bwd_chunking(int64_t V, bool vec, int64_t& units_per_chunk, int64_t& nchunks) {
  const int64_t G = vec ? Vec16<T>::N : 1;
  // Same number of elements per chunk on both paths.
  units_per_chunk = static_cast<int64_t>(kBwdThreads) * kBwdUnitsPerThread * (Vec16<T>::N / G);
  const int64_t nunits = V / G;
  nchunks = (nunits + units_per_chunk - 1) / units_per_chunk;
  if (nchunks < 1) nchunks = 1;  // V < G: the single chunk handles the tail
}

// ------------------------------------------------------------------------------------------
// kernels
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

template <typename T, bool kVec, bool kEnt>
__global__ void __launch_bounds__(kFwdMaxThreads, kFwdMinBlocks)
    token_logprobs_fwd_kernel(const T* __restrict__ logits, int64_t rows, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* __restrict__ ids, bool ids64,
                              acc_t<T>* __restrict__ out_logp, acc_t<T>* __restrict__ out_entropy,
                              acc_t<T>* __restrict__ out_lse, acc_t<T> inv_temp,
                              int64_t ignore_index) {
  using A = acc_t<T>;
  __shared__ LseState<A> smem[32];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t id = load_id(ids, ids64, r);
    if (id == ignore_index) {  // uniform across the block
      if (tid == 0) {
        out_logp[r] = A(0);
        out_lse[r] = A(0);
        if (kEnt) out_entropy[r] = A(0);
      }
      continue;
    }
    const T* row = logits + row_offset(r, n_inner, stride_outer, stride_inner);
    const bool id_ok = id >= 0 && id < V;
    // Issue the target load early so its latency hides behind the row scan.
    T x_id = from_acc<T>(A(0));
    if (tid == 0 && id_ok) x_id = ld_ro(row + id);

    LseState<A> st = fwd_thread_partial<T, kVec, kEnt>(row, V, tid, static_cast<int>(blockDim.x),
                                                        inv_temp);
    st = cu::block_reduce(st, LseCombine<A, kEnt>{}, lse_empty<A>(), smem);
    if (tid == 0) {
      A lse, ent;
      lse_finalize(st, lse, ent);
      const A z_id = id_ok ? scaled(x_id, inv_temp) : quiet_nan<A>();
      out_logp[r] = z_id - lse;
      out_lse[r] = lse;
      if (kEnt) out_entropy[r] = ent;
    }
  }
}

template <typename T, bool kVec, bool kEnt>
__global__ void __launch_bounds__(kBwdThreads)
    token_logprobs_bwd_kernel(const T* __restrict__ logits, int64_t rows, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* __restrict__ ids, bool ids64,
                              const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ entropy,
                              const acc_t<T>* __restrict__ g_logp,
                              const acc_t<T>* __restrict__ g_entropy, T* __restrict__ dlogits,
                              acc_t<T> inv_temp, int64_t ignore_index, int64_t units_per_chunk,
                              int64_t nchunks) {
  using A = acc_t<T>;
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t id = load_id(ids, ids64, r);
    T* out = dlogits + r * V;
    BwdRowParams rp;
    rp.V = V;
    rp.id = id;
    rp.nchunks = nchunks;
    rp.units_per_chunk = units_per_chunk;
    if (id == ignore_index) {  // uniform across the block
      for (int64_t c = blockIdx.y; c < nchunks; c += gridDim.y) {
        rp.chunk = c;
        bwd_thread_chunk<T, kVec, kEnt, true>(nullptr, out, rp, A(0), A(0), A(0), A(0), A(0),
                                              tid, nthreads);
      }
      continue;
    }
    const T* row = logits + row_offset(r, n_inner, stride_outer, stride_inner);
    const A lse_r = lse[r];
    const A g_lp = g_logp != nullptr ? g_logp[r] : A(0);
    const A g_e = kEnt ? g_entropy[r] : A(0);
    const A H = kEnt ? entropy[r] : A(0);
    for (int64_t c = blockIdx.y; c < nchunks; c += gridDim.y) {
      rp.chunk = c;
      bwd_thread_chunk<T, kVec, kEnt, false>(row, out, rp, lse_r, H, g_lp, g_e, inv_temp, tid,
                                             nthreads);
    }
  }
}

// ------------------------------------------------------------------------------------------
// launch helpers
// ------------------------------------------------------------------------------------------
// Failures are recorded by csrc/cuda/runtime.cu (per-thread message, static strings only).
inline int fail(cudaError_t err, const char* msg) {
  return rlfuse_cuda_fail(static_cast<int>(err), msg != nullptr ? msg : cudaGetErrorString(err));
}

inline int check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, cudaGetErrorString(err));
  return 0;
}

// Row bases are all 16-byte aligned: base aligned and each stride that actually varies a
// multiple of the group size (a size-1 dimension's stride is irrelevant).
template <typename T>
bool rows_aligned16(const void* base, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
                    int64_t stride_inner) {
  constexpr int64_t G = Vec16<T>::N;
  return cu::is_aligned16(base) && (n_outer <= 1 || stride_outer % G == 0) &&
         (n_inner <= 1 || stride_inner % G == 0);
}

template <typename T>
int launch_fwd(const void* logits, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
               int64_t stride_inner, int64_t V, const void* ids, bool ids64, void* out_logp,
               void* out_entropy, void* out_lse, double inv_temp, int64_t ignore_index,
               cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = n_outer * n_inner;
  const bool vec = rows_aligned16<T>(logits, n_outer, n_inner, stride_outer, stride_inner);
  const bool ent = out_entropy != nullptr;
  const dim3 block(static_cast<unsigned>(fwd_block_threads(V)));
  const dim3 grid(static_cast<unsigned>(rows < kMaxGridX ? rows : kMaxGridX));
  const T* x = static_cast<const T*>(logits);
  A* lp = static_cast<A*>(out_logp);
  A* en = static_cast<A*>(out_entropy);
  A* ls = static_cast<A*>(out_lse);
  const A it = static_cast<A>(inv_temp);
#define RLFUSE_FWD_LAUNCH(VEC, ENT)                                                         \
  token_logprobs_fwd_kernel<T, VEC, ENT><<<grid, block, 0, stream>>>(                       \
      x, rows, n_inner, stride_outer, stride_inner, V, ids, ids64, lp, en, ls, it, ignore_index)
  if (vec) {
    if (ent) RLFUSE_FWD_LAUNCH(true, true);
    else RLFUSE_FWD_LAUNCH(true, false);
  } else {
    if (ent) RLFUSE_FWD_LAUNCH(false, true);
    else RLFUSE_FWD_LAUNCH(false, false);
  }
#undef RLFUSE_FWD_LAUNCH
  return check_launch();
}

template <typename T>
int launch_bwd(const void* logits, int64_t n_outer, int64_t n_inner, int64_t stride_outer,
               int64_t stride_inner, int64_t V, const void* ids, bool ids64, const void* lse,
               const void* entropy, const void* g_logp, const void* g_entropy, void* dlogits,
               double inv_temp, int64_t ignore_index, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = n_outer * n_inner;
  constexpr int64_t G = Vec16<T>::N;
  const bool vec = rows_aligned16<T>(logits, n_outer, n_inner, stride_outer, stride_inner) &&
                   cu::is_aligned16(dlogits) && (rows <= 1 || V % G == 0);
  const bool ent = g_entropy != nullptr;
  int64_t upc = 0, nchunks = 0;
  bwd_chunking<T>(V, vec, upc, nchunks);
  const dim3 block(kBwdThreads);
  const dim3 grid(static_cast<unsigned>(rows < kMaxGridX ? rows : kMaxGridX),
                  static_cast<unsigned>(nchunks < kMaxGridY ? nchunks : kMaxGridY));
  const T* x = static_cast<const T*>(logits);
  const A* ls = static_cast<const A*>(lse);
  const A* en = static_cast<const A*>(entropy);
  const A* glp = static_cast<const A*>(g_logp);
  const A* gen = static_cast<const A*>(g_entropy);
  T* dx = static_cast<T*>(dlogits);
  const A it = static_cast<A>(inv_temp);
#define RLFUSE_BWD_LAUNCH(VEC, ENT)                                                         \
  token_logprobs_bwd_kernel<T, VEC, ENT><<<grid, block, 0, stream>>>(                       \
      x, rows, n_inner, stride_outer, stride_inner, V, ids, ids64, ls, en, glp, gen, dx, it, \
      ignore_index, upc, nchunks)
  if (vec) {
    if (ent) RLFUSE_BWD_LAUNCH(true, true);
    else RLFUSE_BWD_LAUNCH(true, false);
  } else {
    if (ent) RLFUSE_BWD_LAUNCH(false, true);
    else RLFUSE_BWD_LAUNCH(false, false);
  }
#undef RLFUSE_BWD_LAUNCH
  return check_launch();
}

// Shared argument validation. Returns 0 and sets rows, or an error code.
inline int validate_common(int dtype, int64_t n_outer, int64_t n_inner, int64_t V, int ids_dtype,
                           int64_t& rows) {
  if (dtype < cu::kFloat32 || dtype > cu::kFloat64)
    return fail(cudaErrorInvalidValue, "invalid logits dtype code (expected 0..3)");
  if (ids_dtype != 0 && ids_dtype != 1)
    return fail(cudaErrorInvalidValue, "invalid ids dtype code (expected 0=int32, 1=int64)");
  if (n_outer < 0 || n_inner < 0 || V < 0)
    return fail(cudaErrorInvalidValue, "negative n_outer, n_inner or V");
  if (n_inner > 0 && n_outer > INT64_MAX / n_inner)
    return fail(cudaErrorInvalidValue, "n_outer * n_inner overflows int64");
  rows = n_outer * n_inner;
  if (rows > 0 && V > INT64_MAX / rows)
    return fail(cudaErrorInvalidValue, "rows * V overflows int64");
  return 0;
}

#endif  // __CUDACC__

}  // namespace logprob
}  // namespace rlfuse

// ------------------------------------------------------------------------------------------
// extern "C" API
// ------------------------------------------------------------------------------------------
#if defined(__CUDACC__)

extern "C" {

int rlfuse_token_logprobs_fwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* ids, int ids_dtype, void* out_logp, void* out_entropy,
                              void* out_lse, double inv_temp, int64_t ignore_index,
                              void* stream) {
  using namespace rlfuse::logprob;
  int64_t rows = 0;
  if (const int rc = validate_common(dtype, n_outer, n_inner, V, ids_dtype, rows)) return rc;
  if (rows == 0) return 0;
  if (ids == nullptr || out_logp == nullptr || out_lse == nullptr || (V > 0 && logits == nullptr))
    return fail(cudaErrorInvalidValue, "token_logprobs_fwd: null ids/logits/output pointer");
  const bool ids64 = ids_dtype == 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case rlfuse::cu::kFloat32:
      return launch_fwd<float>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids, ids64,
                               out_logp, out_entropy, out_lse, inv_temp, ignore_index, s);
    case rlfuse::cu::kFloat16:
      return launch_fwd<__half>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids,
                                ids64, out_logp, out_entropy, out_lse, inv_temp, ignore_index, s);
    case rlfuse::cu::kBFloat16:
      return launch_fwd<__nv_bfloat16>(logits, n_outer, n_inner, stride_outer, stride_inner, V,
                                       ids, ids64, out_logp, out_entropy, out_lse, inv_temp,
                                       ignore_index, s);
    default:
      return launch_fwd<double>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids,
                                ids64, out_logp, out_entropy, out_lse, inv_temp, ignore_index, s);
  }
}

int rlfuse_token_logprobs_bwd(const void* logits, int dtype, int64_t n_outer, int64_t n_inner,
                              int64_t stride_outer, int64_t stride_inner, int64_t V,
                              const void* ids, int ids_dtype, const void* lse,
                              const void* entropy, const void* g_logp, const void* g_entropy,
                              void* dlogits, double inv_temp, int64_t ignore_index,
                              void* stream) {
  using namespace rlfuse::logprob;
  int64_t rows = 0;
  if (const int rc = validate_common(dtype, n_outer, n_inner, V, ids_dtype, rows)) return rc;
  if (rows == 0 || V == 0) return 0;
  if (ids == nullptr || lse == nullptr || dlogits == nullptr || logits == nullptr)
    return fail(cudaErrorInvalidValue, "token_logprobs_bwd: null ids/logits/lse/dlogits pointer");
  if (g_entropy != nullptr && entropy == nullptr)
    return fail(cudaErrorInvalidValue, "token_logprobs_bwd: g_entropy given without entropy");
  const bool ids64 = ids_dtype == 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case rlfuse::cu::kFloat32:
      return launch_bwd<float>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids, ids64,
                               lse, entropy, g_logp, g_entropy, dlogits, inv_temp, ignore_index,
                               s);
    case rlfuse::cu::kFloat16:
      return launch_bwd<__half>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids,
                                ids64, lse, entropy, g_logp, g_entropy, dlogits, inv_temp,
                                ignore_index, s);
    case rlfuse::cu::kBFloat16:
      return launch_bwd<__nv_bfloat16>(logits, n_outer, n_inner, stride_outer, stride_inner, V,
                                       ids, ids64, lse, entropy, g_logp, g_entropy, dlogits,
                                       inv_temp, ignore_index, s);
    default:
      return launch_bwd<double>(logits, n_outer, n_inner, stride_outer, stride_inner, V, ids,
                                ids64, lse, entropy, g_logp, g_entropy, dlogits, inv_temp,
                                ignore_index, s);
  }
}

}  // extern "C"

#endif  // __CUDACC__
