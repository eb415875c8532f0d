// Batched search trees on the CPU: select, expand, backup and subtree extraction over B
// struct-of-arrays trees (layout and rules in tree.h; the Python reference in
// python/rlfuse/search/tree.py is the specification).
//
// Parallel over trees with OpenMP.  The W simulations of one tree run one after another on
// one thread, so the virtual loss (in-flight counts) of the earlier ones steers the later
// ones and the bump allocator needs no atomics; expand is parallel over rows (every new row
// writes its own node and its own parent edge).  Results do not depend on the thread count.
#include "tree.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

using tree::View;

constexpr float kTiny = std::numeric_limits<float>::min();
constexpr float kInf = std::numeric_limits<float>::infinity();

struct NodeRef {
  const View& t;
  int64_t b;
  int64_t base;  // b * N
  int32_t s;
  int64_t e;     // (b * N + s) * K
  NodeRef(const View& tv, int64_t bb, int32_t ss)
      : t(tv), b(bb), base(bb * tv.N), s(ss), e((bb * tv.N + ss) * tv.K) {}
  // Virtual visits of the child behind action a.
  float virt(int64_t a, float vl) const {
    const int32_t c = t.child[e + a];
    return c >= 0 ? vl * float(t.inflight[base + c]) : 0.0f;
  }
  // Whether action a leads to a node allocated in this step and not yet expanded.
  bool pending(int64_t a) const {
    const int32_t c = t.child[e + a];
    return c >= 0 && !(t.flags[base + c] & tree::kExpanded);
  }
  float q(int64_t a) const { return t.reward[e + a] + t.discount[e + a] * t.edge_value[e + a]; }
};

// Argmax over the selectable actions (valid and not pending); when every valid action is
// pending, over the valid ones (the simulation then joins a pending leaf).  Lowest index on
// ties.  score(a) is evaluated once per action.
template <typename Score>
int64_t pick(const NodeRef& r, Score&& score) {
  const int64_t K = r.t.K;
  float best = -kInf, best_pending = -kInf;
  int64_t arg = -1, arg_pending = -1;
  for (int64_t a = 0; a < K; ++a) {
    if (r.t.invalid[r.e + a]) continue;
    const float s = score(a);
    if (r.pending(a)) {
      if (arg_pending < 0 || s > best_pending) { best_pending = s; arg_pending = a; }
    } else if (arg < 0 || s > best) {
      best = s;
      arg = a;
    }
  }
  return arg >= 0 ? arg : arg_pending;
}

int64_t select_puct(const View& t, const tree::SelectParams& p, const NodeRef& r) {
  const int64_t K = t.K;
  const float vl = p.virtual_loss;
  float lo, hi;
  if (p.qnorm == tree::kTreeMinMax) {
    lo = t.minmax[2 * r.b];
    hi = t.minmax[2 * r.b + 1];
  } else {
    lo = hi = t.value[r.base + r.s];
    for (int64_t a = 0; a < K; ++a) {
      if (t.edge_visits[r.e + a] > 0) {
        const float q = r.q(a);
        lo = q < lo ? q : lo;
        hi = q > hi ? q : hi;
      }
    }
  }
  const float n_parent = float(t.visits[r.base + r.s]) + vl * float(t.inflight[r.base + r.s]);
  const float explore = tree::puct_exploration(p.c1, p.c2, n_parent);
  return pick(r, [&](int64_t a) {
    const float n = float(t.edge_visits[r.e + a]);
    const float qn = n > 0 ? (hi > lo || p.qnorm == tree::kParentSiblings
                                  ? tree::min_max_normalise(r.q(a), lo, hi)
                                  : 0.0f)
                           : 0.0f;
    return tree::puct_score(qn, t.prior[r.e + a], explore, n, r.virt(a, vl));
  });
}

// Completed, rescaled and scaled Q-values of a node (mctx qtransform_completed_by_mix_value)
// into sigma[K]; returns the sum of the real visits.
float gumbel_sigma(const View& t, const tree::SelectParams& p, const NodeRef& r, float* sigma) {
  const int64_t K = t.K;
  float sum_n = 0, max_n = 0, sum_p = 0, wq = 0;
  for (int64_t a = 0; a < K; ++a) {
    const float n = float(t.edge_visits[r.e + a]);
    sum_n += n;
    max_n = n > max_n ? n : max_n;
    if (n > 0) {
      const float pr = t.prior[r.e + a] > kTiny ? t.prior[r.e + a] : kTiny;
      sum_p += pr;
      wq += pr * r.q(a);
    }
  }
  const float raw = t.raw_value[r.base + r.s];
  const float v_mix = sum_n > 0 ? (raw + sum_n * (wq / sum_p)) / (sum_n + 1.0f) : raw;
  float lo = kInf, hi = -kInf;
  for (int64_t a = 0; a < K; ++a) {
    const float c = t.edge_visits[r.e + a] > 0 ? r.q(a) : v_mix;
    sigma[a] = c;
    lo = c < lo ? c : lo;
    hi = c > hi ? c : hi;
  }
  const float scale = (p.maxvisit_init + max_n) * p.value_scale;
  for (int64_t a = 0; a < K; ++a) sigma[a] = scale * tree::min_max_normalise(sigma[a], lo, hi);
  return sum_n;
}

int64_t select_gumbel(const View& t, const tree::SelectParams& p, const NodeRef& r, bool root,
                      float* sigma) {
  const int64_t K = t.K;
  const float vl = p.virtual_loss;
  gumbel_sigma(t, p, r, sigma);
  const float* logit = t.logit + r.e;
  if (root) {
    // Sequential halving: the simulation index is the number of root visits taken so far,
    // in-flight ones included.
    float max_logit = -kInf;
    int64_t sim = 0;
    for (int64_t a = 0; a < K; ++a) {
      max_logit = logit[a] > max_logit ? logit[a] : max_logit;
      const int32_t c = t.child[r.e + a];
      sim += t.edge_visits[r.e + a] + (c >= 0 ? t.inflight[r.base + c] : 0);
    }
    if (sim >= p.table_len) sim = p.table_len - 1;
    const int32_t row = t.considered[r.b] < p.table_rows ? t.considered[r.b] : p.table_rows - 1;
    const int32_t want = t.table[int64_t(row) * p.table_len + sim];
    const float* g = t.gumbel + r.b * K;
    const int64_t a = pick(r, [&](int64_t a) {
      const int32_t c = t.child[r.e + a];
      const int32_t n = t.edge_visits[r.e + a] + (c >= 0 ? t.inflight[r.base + c] : 0);
      return tree::gumbel_root_score(g[a], logit[a] - max_logit, sigma[a], n == want);
    });
    return a;
  }
  // Interior: argmax softmax(logits + sigma) - N(a) / (1 + sum N), over valid actions.
  float zmax = -kInf, total = 0;
  for (int64_t a = 0; a < K; ++a) {
    if (t.invalid[r.e + a]) continue;
    const float z = logit[a] + sigma[a];
    zmax = z > zmax ? z : zmax;
    total += float(t.edge_visits[r.e + a]) + r.virt(a, vl);
  }
  float zsum = 0;
  for (int64_t a = 0; a < K; ++a)
    if (!t.invalid[r.e + a]) zsum += std::exp(logit[a] + sigma[a] - zmax);
  return pick(r, [&](int64_t a) {
    const float pa = std::exp(logit[a] + sigma[a] - zmax) / zsum;
    return pa - (float(t.edge_visits[r.e + a]) + r.virt(a, vl)) / (1.0f + total);
  });
}

// One tree, W simulations.  Returns a Status.
int select_tree(const View& t, const tree::SelectParams& p, int64_t b, float* sigma) {
  const int64_t N = t.N, W = p.W, D = int64_t(p.max_depth) + 1;
  const int64_t base = b * N;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t o = b * W + w;
    int32_t* path = p.out_path + o * D;
    int32_t len = 0;
    int32_t s = 0;
    path[len++] = 0;
    int64_t leaf = -1, act = -1;
    bool is_new = false;
    for (int depth = 0;; ++depth) {
      const NodeRef r(t, b, s);
      const int64_t a = p.rule == tree::kGumbel ? select_gumbel(t, p, r, depth == 0, sigma)
                                                : select_puct(t, p, r);
      if (a < 0) return tree::kNoValidAction;  // the root lost its valid actions
      act = a;
      int32_t c = t.child[r.e + a];
      if (c < 0) {
        const int32_t n = t.next_free[b];
        if (n >= N) return tree::kTreeFull;
        t.next_free[b] = n + 1;
        c = n;
        t.child[r.e + a] = n;
        t.parent[base + n] = s;
        t.action[base + n] = int32_t(a);
        t.depth[base + n] = t.depth[base + s] + 1;
        t.flags[base + n] = 0;
        t.inflight[base + n] = 0;
        t.visits[base + n] = 0;
        is_new = true;
      }
      path[len++] = c;
      const uint8_t f = t.flags[base + c];
      if (is_new || !(f & tree::kExpanded) || (f & tree::kTerminal) || depth + 1 >= p.max_depth) {
        leaf = c;
        break;
      }
      s = c;
    }
    // Virtual loss: the walk counts for the later simulations of this step.
    for (int32_t i = 0; i < len; ++i) t.inflight[base + path[i]] += 1;
    p.out_node[o] = leaf;
    p.out_parent[o] = path[len - 2];
    p.out_action[o] = act;
    p.out_store[o] = is_new ? leaf : N;
    p.out_new[o] = is_new ? 1 : 0;
    p.out_len[o] = len;
  }
  return tree::kOk;
}

inline bool finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

}  // namespace

int tree_select(const View& t, const tree::SelectParams& p, int nt, int64_t* where) {
  std::vector<int> codes(size_t(t.B), tree::kOk);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> sigma(size_t(t.K) > 0 ? size_t(t.K) : 1);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < t.B; ++b) codes[size_t(b)] = select_tree(t, p, b, sigma.data());
  }
  for (int64_t b = 0; b < t.B; ++b) {
    if (codes[size_t(b)] != tree::kOk) {
      *where = b;
      return codes[size_t(b)];
    }
  }
  *where = -1;
  return tree::kOk;
}

int tree_expand(const View& t, const tree::ExpandInputs& in, int nt, int64_t* where) {
  const int64_t K = t.K, N = t.N, M = in.M;
  int64_t first_bad = M;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : first_bad)
  for (int64_t m = 0; m < M; ++m) {
    if (!in.is_new[m]) continue;
    const float* lg = in.logits + m * K;
    const uint8_t* inv = in.invalid != nullptr ? in.invalid + m * K : nullptr;
    bool ok = finite(in.reward[m]) && finite(in.discount[m]) && finite(in.value[m]);
    for (int64_t a = 0; a < K; ++a)
      if (std::isnan(lg[a]) || lg[a] == kInf) ok = false;
    if (!ok) {
      first_bad = m < first_bad ? m : first_bad;
      continue;
    }
    const int64_t b = m / in.W;
    const int64_t base = b * N;
    const int64_t n = in.node[m];
    const int64_t e = (base + n) * K;
    // Softmax over the valid actions (invalid: masked, or a -inf logit).
    float mx = -kInf;
    int valid = 0;
    for (int64_t a = 0; a < K; ++a) {
      const bool bad = (inv != nullptr && inv[a]) || lg[a] == -kInf;
      t.invalid[e + a] = bad ? 1 : 0;
      if (!bad) {
        ++valid;
        mx = lg[a] > mx ? lg[a] : mx;
      }
    }
    float sum = 0;
    for (int64_t a = 0; a < K; ++a) {
      const float ex = t.invalid[e + a] ? 0.0f : std::exp(lg[a] - mx);
      t.prior[e + a] = ex;
      sum += ex;
    }
    const float inv_sum = valid > 0 ? 1.0f / sum : 0.0f;
    for (int64_t a = 0; a < K; ++a) {
      t.prior[e + a] *= inv_sum;
      t.logit[e + a] = lg[a];
      t.child[e + a] = -1;
      t.edge_visits[e + a] = 0;
      t.edge_value[e + a] = 0;
      t.reward[e + a] = 0;
      t.discount[e + a] = 0;
    }
    t.raw_value[base + n] = in.value[m];
    t.value[base + n] = in.value[m];
    t.visits[base + n] = 0;
    const bool term = (in.terminal != nullptr && in.terminal[m]) || valid == 0;
    t.flags[base + n] = tree::kExpanded | (term ? tree::kTerminal : 0);
    const int64_t pe = (base + in.parent[m]) * K + in.action[m];
    t.reward[pe] = in.reward[m];
    t.discount[pe] = in.discount[m];
  }
  *where = first_bad;
  return first_bad < M ? tree::kNotFinite : tree::kOk;
}

int tree_backup(const View& t, const tree::BackupInputs& in, int nt) {
  const int64_t N = t.N, K = t.K, W = in.W, D = in.path_stride;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < t.B; ++b) {
    const int64_t base = b * N;
    float lo = t.minmax[2 * b], hi = t.minmax[2 * b + 1];
    for (int64_t w = 0; w < W; ++w) {
      const int32_t* path = in.path + (b * W + w) * D;
      const int32_t len = in.len[b * W + w];
      const int32_t leaf = path[len - 1];
      float g = t.raw_value[base + leaf];
      {
        const float cnt = float(t.visits[base + leaf]);
        t.value[base + leaf] = (t.value[base + leaf] * cnt + g) / (cnt + 1.0f);
        t.visits[base + leaf] += 1;
        t.inflight[base + leaf] -= 1;
      }
      for (int32_t i = len - 1; i >= 1; --i) {
        const int32_t c = path[i], s = path[i - 1];
        const int64_t pe = (base + s) * K + t.action[base + c];
        g = t.reward[pe] + t.discount[pe] * g;
        const float cnt = float(t.visits[base + s]);
        t.value[base + s] = (t.value[base + s] * cnt + g) / (cnt + 1.0f);
        t.visits[base + s] += 1;
        t.inflight[base + s] -= 1;
        t.edge_visits[pe] += 1;
        t.edge_value[pe] = t.value[base + c];
        const float q = t.reward[pe] + t.discount[pe] * t.value[base + c];
        lo = q < lo ? q : lo;
        hi = q > hi ? q : hi;
      }
    }
    t.minmax[2 * b] = lo;
    t.minmax[2 * b + 1] = hi;
  }
  return tree::kOk;
}

void tree_subtree(const View& src, const View& dst, const int64_t* actions, int32_t* src_of,
                  int nt) {
  const int64_t K = src.K;
#pragma omp parallel num_threads(nt)
  {
    std::vector<int32_t> new_of(size_t(src.N));
#pragma omp for schedule(static)
    for (int64_t b = 0; b < src.B; ++b) {
      const int64_t sb = b * src.N, db = b * dst.N;
      int32_t* so = src_of + db;
      for (int64_t i = 0; i < dst.N; ++i) so[i] = -1;
      dst.next_free[b] = 0;
      dst.minmax[2 * b] = kInf;
      dst.minmax[2 * b + 1] = -kInf;
      const int32_t r = src.child[sb * K + actions[b]];  // child of the root
      if (r < 0 || !(src.flags[sb + r] & tree::kExpanded)) continue;
      // Breadth-first renumbering: dst node i is src node so[i]; the queue is so itself.
      std::fill(new_of.begin(), new_of.end(), -1);
      int32_t count = 0;
      so[count] = r;
      new_of[r] = count++;
      const int32_t d0 = src.depth[sb + r];
      for (int32_t i = 0; i < count; ++i) {
        const int32_t s = so[i];
        const int64_t se = (sb + s) * K, de = (db + i) * K;
        for (int64_t a = 0; a < K; ++a) {
          int32_t c = src.child[se + a];
          if (c >= 0 && !(src.flags[sb + c] & tree::kExpanded)) c = -1;  // never expanded
          if (c >= 0 && count < dst.N) {
            so[count] = c;
            new_of[c] = count++;
          } else if (c >= 0) {
            c = -1;  // destination full (the caller sizes it so that this cannot happen)
          }
          dst.child[de + a] = c >= 0 ? new_of[c] : -1;
          dst.logit[de + a] = src.logit[se + a];
          dst.prior[de + a] = src.prior[se + a];
          dst.edge_visits[de + a] = c >= 0 ? src.edge_visits[se + a] : 0;
          dst.edge_value[de + a] = c >= 0 ? src.edge_value[se + a] : 0.0f;
          dst.reward[de + a] = c >= 0 ? src.reward[se + a] : 0.0f;
          dst.discount[de + a] = c >= 0 ? src.discount[se + a] : 0.0f;
          dst.invalid[de + a] = src.invalid[se + a];
        }
        dst.parent[db + i] = i == 0 ? -1 : new_of[src.parent[sb + s]];
        dst.action[db + i] = i == 0 ? -1 : src.action[sb + s];
        dst.raw_value[db + i] = src.raw_value[sb + s];
        dst.value[db + i] = src.value[sb + s];
        dst.visits[db + i] = src.visits[sb + s];
        dst.depth[db + i] = src.depth[sb + s] - d0;
        dst.flags[db + i] = src.flags[sb + s];
        dst.inflight[db + i] = 0;
      }
      dst.next_free[b] = count;
    }
  }
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
