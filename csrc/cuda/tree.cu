// rlfuse CUDA backend: batched search trees (select, expand, backup, subtree).  Layout and
// the per-action rules are in csrc/cpu/tree.h (shared with the CPU kernels); the Python
// reference in python/rlfuse/search/tree.py is the specification.
//
// Exported (extern "C", no pybind11 here; bindings in csrc/cuda/tree_api.cpp):
//   rlfuse_tree_select, rlfuse_tree_expand, rlfuse_tree_backup, rlfuse_tree_subtree.
// Launchers return 0 or a cudaError_t value (message via rlfuse_cuda_last_error()).
//
// select: one warp per tree; its W simulations run one after another (so the virtual loss
//   of the earlier ones steers the later ones and the bump allocator needs no atomics).
//   At each node the lanes score the actions a = lane, lane + 32, ... and reduce (sums,
//   min / max, argmax with the lowest index on ties) with shuffles; lane 0 allocates and
//   writes, and __syncwarp() orders its writes before the lanes read them.
// expand: one warp per row (softmax over the valid logits with warp reductions).
// backup, subtree: one thread per tree (paths are short; the work is sequential per tree).
// Errors (tree full, no valid action, a non-finite recurrent output) are recorded in the
// int64 status [code, tree or row] with the first code to arrive; the Python side reads it
// once after the search.  A tree whose walk failed gets rows that expand and backup skip
// (abandon_walks) for the rest of the step.

#include <cstdint>

#include <cuda_runtime.h>

#include "rlfuse/cuda_utils.cuh"
#include "../cpu/tree.h"

namespace rlfuse {
namespace treecu {

using tree::View;
using tree::SelectParams;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;
constexpr float kInf = __builtin_inff();
constexpr float kTiny = 1.17549435e-38f;

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}
__device__ __forceinline__ int warp_sum_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// Argmax candidate: tier 2 = selectable, 1 = pending (chosen only when no tier 2), 0 = none;
// then the larger score, NaN below every number; then the lower index.  A total order, so
// that every lane of the xor butterfly ends with the same winner (the lanes' choices steer
// their loads and __shfl_sync calls: they must agree).
struct Cand {
  int tier;
  float score;
  int index;
};
__device__ __forceinline__ bool better(const Cand& a, const Cand& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.tier == 0) return a.index < b.index;
  const bool a_nan = isnan(a.score), b_nan = isnan(b.score);
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}
// The highest tier's first candidate (lowest index).
__device__ __forceinline__ bool earlier(const Cand& a, const Cand& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  return a.index < b.index;
}
template <bool (*Ahead)(const Cand&, const Cand&)>
__device__ __forceinline__ Cand warp_reduce(Cand c) {
  for (int o = 16; o > 0; o >>= 1) {
    Cand d{__shfl_xor_sync(kFull, c.tier, o), __shfl_xor_sync(kFull, c.score, o),
           __shfl_xor_sync(kFull, c.index, o)};
    if (Ahead(d, c)) c = d;
  }
  return c;
}
// Each lane's best and first candidates (its actions offered in increasing order).
struct Choice {
  Cand best{0, -kInf, 0}, first{0, -kInf, 0};
  __device__ explicit Choice(int64_t K) {
    best.index = first.index = int(K);
  }
  __device__ void offer(const Cand& c) {
    if (better(c, best)) best = c;
    if (earlier(c, first)) first = c;
  }
  // The action of the CPU scan (tree.cpp pick()): it starts from the tier's first action and
  // moves only to a strictly larger score, so a NaN there is kept, and a later NaN never wins;
  // otherwise the argmax.  -1 when no action is valid.  The same in every lane.
  __device__ int result() const {
    Cand b = warp_reduce<better>(best);
    const Cand f = warp_reduce<earlier>(first);
    if (isnan(f.score)) b = f;  // (f is of b's tier)
    return b.tier > 0 ? b.index : -1;
  }
};

__device__ __forceinline__ void record(int64_t* status, int code, int64_t where) {
  if (status == nullptr) return;
  unsigned long long* s = reinterpret_cast<unsigned long long*>(status);
  if (atomicCAS(s, 0ull, static_cast<unsigned long long>(code)) == 0ull)
    status[1] = where;
}

struct Node {
  const View& t;
  int64_t b, base, e;
  int32_t s;
  __device__ Node(const View& tv, int64_t bb, int32_t ss)
      : t(tv), b(bb), base(bb * tv.N), e((bb * tv.N + ss) * tv.K), s(ss) {}
  __device__ float q(int64_t a) const { return t.edge_q[e + a]; }
  __device__ float inflight_child(int64_t a) const {
    const int32_t c = t.child[e + a];
    return c >= 0 ? float(t.inflight[base + c]) : 0.0f;
  }
  __device__ bool pending(int64_t a) const {
    const int32_t c = t.child[e + a];
    return c >= 0 && !(t.flags[base + c] & tree::kExpanded);
  }
  __device__ Cand cand(int64_t a, float score) const {
    if (t.invalid[e + a]) return Cand{0, -kInf, int(a)};
    return Cand{pending(a) ? 1 : 2, score, int(a)};
  }
};

__device__ int select_puct(const View& t, const SelectParams& p, const Node& r, int lane) {
  const int64_t K = t.K;
  const float vl = p.virtual_loss;
  float lo = t.value[r.base + r.s], hi = lo;
  for (int64_t a = lane; a < K; a += kWarp) {
    if (t.edge_visits[r.e + a] > 0) {
      const float q = r.q(a);
      lo = fminf(lo, q);
      hi = fmaxf(hi, q);
    }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const bool normalise = tree::qnorm_bounds(t, p, r.b, &lo, &hi);
  const float explore = tree::puct_exploration(p.c1, p.c2, tree::parent_visits(t, p, r.b, r.s));
  Choice best(K);
  for (int64_t a = lane; a < K; a += kWarp) {
    const float n = float(t.edge_visits[r.e + a]);
    const float qn = normalise ? tree::min_max_normalise(r.q(a), lo, hi) : 0.0f;
    best.offer(r.cand(a, tree::puct_score(qn, t.prior[r.e + a], explore, n,
                                          vl * r.inflight_child(a))));
  }
  return best.result();
}

__device__ int select_gumbel(const View& t, const SelectParams& p, const Node& r, bool root,
                             int lane) {
  const int64_t K = t.K;
  const float vl = p.virtual_loss;
  const float* logit = t.logit + r.e;
  // completed Q (mixed value for the unvisited), rescaled, scaled
  float sum_n = 0, max_n = 0, sum_p = 0, wq = 0;
  for (int64_t a = lane; a < K; a += kWarp) {
    const float n = float(t.edge_visits[r.e + a]);
    sum_n += n;
    max_n = fmaxf(max_n, n);
    if (n > 0) {
      const float pr = fmaxf(t.prior[r.e + a], kTiny);
      sum_p += pr;
      wq += pr * r.q(a);
    }
  }
  sum_n = warp_sum(sum_n);
  max_n = warp_max(max_n);
  sum_p = warp_sum(sum_p);
  wq = warp_sum(wq);
  const float raw = t.raw_value[r.base + r.s];
  const float v_mix = sum_n > 0 ? (raw + sum_n * (wq / sum_p)) / (sum_n + 1.0f) : raw;
  float lo = kInf, hi = -kInf;
  for (int64_t a = lane; a < K; a += kWarp) {
    const float c = t.edge_visits[r.e + a] > 0 ? r.q(a) : v_mix;
    lo = fminf(lo, c);
    hi = fmaxf(hi, c);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const float scale = (p.maxvisit_init + max_n) * p.value_scale;
  auto sigma = [&](int64_t a) {
    const float c = t.edge_visits[r.e + a] > 0 ? r.q(a) : v_mix;
    return scale * tree::min_max_normalise(c, lo, hi);
  };
  Choice best(K);
  if (root) {
    float max_logit = -kInf;
    int sim = 0;
    for (int64_t a = lane; a < K; a += kWarp) {
      max_logit = fmaxf(max_logit, logit[a]);
      sim += t.edge_visits[r.e + a] + int(r.inflight_child(a));
    }
    max_logit = warp_max(max_logit);
    sim = warp_sum_int(sim);
    if (sim >= p.table_len) sim = p.table_len - 1;
    const int32_t row = t.considered[r.b] < p.table_rows ? t.considered[r.b] : p.table_rows - 1;
    const int32_t want = t.table[int64_t(row) * p.table_len + sim];
    const float* g = t.gumbel + r.b * K;
    for (int64_t a = lane; a < K; a += kWarp) {
      const int n = t.edge_visits[r.e + a] + int(r.inflight_child(a));
      best.offer(r.cand(a, tree::gumbel_root_score(g[a], logit[a] - max_logit, sigma(a),
                                                   n == want)));
    }
  } else {
    float zmax = -kInf, total = 0;
    for (int64_t a = lane; a < K; a += kWarp) {
      if (t.invalid[r.e + a]) continue;
      zmax = fmaxf(zmax, logit[a] + sigma(a));
      total += float(t.edge_visits[r.e + a]) + vl * r.inflight_child(a);
    }
    zmax = warp_max(zmax);
    total = warp_sum(total);
    float zsum = 0;
    for (int64_t a = lane; a < K; a += kWarp)
      if (!t.invalid[r.e + a]) zsum += expf(logit[a] + sigma(a) - zmax);
    zsum = warp_sum(zsum);
    for (int64_t a = lane; a < K; a += kWarp) {
      const float pa = expf(logit[a] + sigma(a) - zmax) / zsum;
      const float n = float(t.edge_visits[r.e + a]) + vl * r.inflight_child(a);
      best.offer(r.cand(a, pa - n / (1.0f + total)));
    }
  }
  return best.result();
}

// A walk that cannot finish (tree full, no valid action) ends tree b's step: its row and the
// rows of the later walks are written as rows that expand and backup skip (not new, empty
// path), so that no phase reads an earlier step's outputs; the error is in the status
// (Phases.finish raises it).  A failed walk holds no virtual loss (finish_walk adds it).
__device__ void abandon_walks(const View& t, const SelectParams& p, int64_t b, int64_t w) {
  for (; w < p.W; ++w) {
    const int64_t o = b * p.W + w;
    p.out_node[o] = 0;
    p.out_parent[o] = 0;
    p.out_action[o] = 0;
    p.out_store[o] = t.N;
    p.out_new[o] = 0;
    p.out_len[o] = 0;
  }
}

__global__ void select_kernel(View t, SelectParams p) {
  const int lane = threadIdx.x % kWarp;
  const int64_t b = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (b >= t.B) return;  // whole warps leave together
  const int64_t N = t.N, W = p.W, D = int64_t(p.max_depth) + 1;
  const int64_t base = b * N;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t o = b * W + w;
    int32_t* path = p.out_path + o * D;
    int32_t len = 1;
    int32_t s = 0;
    if (lane == 0) path[0] = 0;
    int64_t act = -1;
    bool is_new = false;
    for (int depth = 0;; ++depth) {
      const Node r(t, b, s);
      const int a = p.rule == tree::kGumbel ? select_gumbel(t, p, r, depth == 0, lane)
                                            : select_puct(t, p, r, lane);
      if (a < 0) {
        if (lane == 0) {
          record(p.status, tree::kNoValidAction, b);
          abandon_walks(t, p, b, w);
        }
        return;
      }
      act = a;
      int32_t c = t.child[r.e + a];
      if (c < 0) {
        __syncwarp();  // every lane has read the node before lane 0 allocates
        if (lane == 0) c = tree::allocate_node(t, b, s, a);
        c = __shfl_sync(kFull, c, 0);
        if (c < 0) {
          if (lane == 0) {
            record(p.status, tree::kTreeFull, b);
            abandon_walks(t, p, b, w);
          }
          return;
        }
        is_new = true;
      }
      if (lane == 0) path[len] = c;
      ++len;
      __syncwarp();
      const uint8_t f = t.flags[base + c];
      if (is_new || !(f & tree::kExpanded) || (f & tree::kTerminal) || depth + 1 >= p.max_depth)
        break;
      s = c;
    }
    if (lane == 0) tree::finish_walk(t, p, b, o, path, len, act, is_new);
    __syncwarp();
  }
}

__device__ __forceinline__ bool finite(float x) { return fabsf(x) <= 3.402823466e38f; }

__global__ void expand_kernel(View t, tree::ExpandInputs in, int64_t* status) {
  const int lane = threadIdx.x % kWarp;
  const int64_t m = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (m >= in.M || !in.is_new[m]) return;
  const int64_t K = t.K;
  const float* lg = in.logits + m * K;
  const uint8_t* inv = in.invalid != nullptr ? in.invalid + m * K : nullptr;
  bool ok = finite(in.reward[m]) && finite(in.discount[m]) && finite(in.value[m]);
  for (int64_t a = lane; a < K; a += kWarp)
    if (isnan(lg[a]) || lg[a] == kInf) ok = false;
  if (!__all_sync(kFull, ok)) {
    if (lane == 0) record(status, tree::kNotFinite, m);
    return;
  }
  const int64_t b = m / in.W, base = b * t.N, n = in.node[m];
  const int64_t e = (base + n) * K;
  float mx = -kInf;
  int valid = 0;
  for (int64_t a = lane; a < K; a += kWarp) {
    const bool bad = (inv != nullptr && inv[a]) || lg[a] == -kInf;
    t.invalid[e + a] = bad ? 1 : 0;
    if (!bad) {
      ++valid;
      mx = fmaxf(mx, lg[a]);
    }
  }
  mx = warp_max(mx);
  valid = warp_sum_int(valid);
  float sum = 0;
  for (int64_t a = lane; a < K; a += kWarp) {
    const bool bad = (inv != nullptr && inv[a]) || lg[a] == -kInf;
    sum += bad ? 0.0f : expf(lg[a] - mx);
  }
  sum = warp_sum(sum);
  const float inv_sum = valid > 0 ? 1.0f / sum : 0.0f;
  for (int64_t a = lane; a < K; a += kWarp) {
    const bool bad = (inv != nullptr && inv[a]) || lg[a] == -kInf;
    t.prior[e + a] = bad ? 0.0f : expf(lg[a] - mx) * inv_sum;
    t.logit[e + a] = lg[a];
    t.child[e + a] = -1;
    t.edge_visits[e + a] = 0;
    t.edge_value[e + a] = 0.0f;
    t.edge_q[e + a] = 0.0f;
    t.reward[e + a] = 0.0f;
    t.discount[e + a] = 0.0f;
  }
  if (lane == 0) tree::expand_node_fields(t, in, m, base, n, valid);
}

__global__ void backup_kernel(View t, tree::BackupInputs in) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < t.B) tree::backup_tree(t, in, b);
}

__global__ void subtree_kernel(View src, View dst, const int64_t* actions, int32_t* src_of) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < src.B) tree::subtree_tree(src, dst, actions, src_of, b);
}

inline int check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return rlfuse_cuda_fail(static_cast<int>(err), cudaGetErrorString(err));
  return 0;
}

inline unsigned warp_blocks(int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

}  // namespace treecu
}  // namespace rlfuse

using rlfuse::treecu::check_launch;
using rlfuse::treecu::kWarp;
using rlfuse::treecu::kWarpsPerBlock;
using rlfuse::treecu::warp_blocks;

extern "C" {

int rlfuse_tree_select(const rlfuse::tree::View* t, const rlfuse::tree::SelectParams* p, int W,
                       void* stream) {
  if (t->B == 0) return 0;
  rlfuse::tree::SelectParams q = *p;
  q.W = W;
  rlfuse::treecu::select_kernel<<<warp_blocks(t->B), kWarp * kWarpsPerBlock, 0,
                                  static_cast<cudaStream_t>(stream)>>>(*t, q);
  return check_launch();
}

int rlfuse_tree_expand(const rlfuse::tree::View* t, const rlfuse::tree::SelectParams* p, int W,
                       const float* reward, const float* discount, const float* logits,
                       const float* value, const uint8_t* invalid, const uint8_t* terminal,
                       void* stream) {
  rlfuse::tree::ExpandInputs in{};
  in.M = t->B * W;
  in.W = W;
  in.node = p->out_node;
  in.parent = p->out_parent;
  in.action = p->out_action;
  in.is_new = p->out_new;
  in.reward = reward;
  in.discount = discount;
  in.logits = logits;
  in.value = value;
  in.invalid = invalid;
  in.terminal = terminal;
  if (in.M == 0) return 0;
  rlfuse::treecu::expand_kernel<<<warp_blocks(in.M), kWarp * kWarpsPerBlock, 0,
                                  static_cast<cudaStream_t>(stream)>>>(*t, in, p->status);
  return check_launch();
}

int rlfuse_tree_backup(const rlfuse::tree::View* t, const rlfuse::tree::SelectParams* p, int W,
                       void* stream) {
  rlfuse::tree::BackupInputs in{};
  in.W = W;
  in.path_stride = p->max_depth + 1;
  in.path = p->out_path;
  in.len = p->out_len;
  if (t->B == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((t->B + 127) / 128);
  rlfuse::treecu::backup_kernel<<<blocks, 128, 0, static_cast<cudaStream_t>(stream)>>>(*t, in);
  return check_launch();
}

int rlfuse_tree_subtree(const rlfuse::tree::View* src, const rlfuse::tree::View* dst,
                        const int64_t* actions, int32_t* src_of, void* stream) {
  if (src->B == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((src->B + 127) / 128);
  rlfuse::treecu::subtree_kernel<<<blocks, 128, 0, static_cast<cudaStream_t>(stream)>>>(
      *src, *dst, actions, src_of);
  return check_launch();
}

}  // extern "C"
