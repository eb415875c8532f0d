// Batched search trees (csrc/cpu/tree.cpp, csrc/cuda/tree.cu): the struct-of-arrays view,
// the argument blocks of select / expand / backup / subtree, and the per-action rules
// (PUCT, Gumbel) shared by the CPU and CUDA kernels.  The specification is the Python
// reference in python/rlfuse/search/tree.py.
//
// Layout (all contiguous, int32 indices, B trees of capacity N nodes, K actions):
//   per node [B, N]: parent, action (from the parent), visits, value (running mean of the
//     backed-up returns), raw_value (the evaluation), depth, flags, inflight (simulations
//     of the current step that passed through the node: virtual loss)
//   per edge [B, N, K]: child (-1: not allocated), logit (prior logit), prior (softmax of
//     the valid logits), visits, value (value of the child), reward, discount, invalid
//     and edge_q = reward + discount * value (kept by backup, so that select reads one
//     array instead of three)
//   per tree [B]: next_free (bump allocator), minmax [B, 2] (min / max Q seen in backups)
//   Gumbel root data: gumbel [B, K] (noise + logits are combined at the root), considered
//     [B] (number of considered actions) and the sequential-halving table [rows, len].
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RLFUSE_TREE_HD __host__ __device__ __forceinline__
#else
// static: each ISA build of tree.cpp gets its own copy (no cross-ISA linking).
#define RLFUSE_TREE_HD static inline
#include "isa.h"
#endif

namespace rlfuse {
namespace tree {

enum Flags : uint8_t { kExpanded = 1, kTerminal = 2 };
enum Rule : int { kPuct = 0, kGumbel = 1 };
enum QNorm : int { kParentSiblings = 0, kTreeMinMax = 1 };
// Status codes (first failing tree / row is reported with them).
enum Status : int { kOk = 0, kTreeFull = 1, kNotFinite = 2, kNoValidAction = 3 };

// Number of int64 words in the pointer block that describes a tree (tree.py _VIEW_FIELDS).
constexpr int kViewWords = 25;

struct View {
  int64_t B, N, K;
  int32_t* parent;
  int32_t* action;
  int32_t* visits;
  float* value;
  float* raw_value;
  int32_t* depth;
  uint8_t* flags;
  int32_t* inflight;
  int32_t* child;
  float* logit;
  float* prior;
  int32_t* edge_visits;
  float* edge_value;
  float* reward;
  float* discount;
  uint8_t* invalid;
  int32_t* next_free;
  float* minmax;
  float* gumbel;          // [B, K] or null (PUCT)
  int32_t* considered;    // [B] or null (PUCT)
  const int32_t* table;   // [table_rows, table_len] or null (PUCT)
  float* edge_q;          // [B, N, K] Q = reward + discount * value, kept by backup (read by
                          // select: one array instead of three)
};

struct SelectParams {
  int rule;               // Rule
  int W;                  // simulations per tree in this call
  int max_depth;          // edges from the root; a walk stops there (the leaf is revisited)
  int qnorm;              // QNorm (PUCT)
  float c1, c2;           // PUCT: c(s) = c1 + log((N(s) + c2 + 1) / c2)
  float virtual_loss;     // virtual visits per in-flight simulation (0: none)
  float value_scale, maxvisit_init;  // Gumbel sigma(q) = (maxvisit_init + max N) * scale * q
  int table_rows, table_len;
  // outputs, [B, W] (int64 for torch indexing) and paths [B, W, max_depth + 1] (int32)
  int64_t* out_node;      // leaf: the node allocated (new) or revisited
  int64_t* out_parent;
  int64_t* out_action;
  int64_t* out_store;     // out_node when new, else N (a scratch slot for the payload store)
  uint8_t* out_new;
  int32_t* out_path;      // root .. leaf
  int32_t* out_len;
  // CPU, PUCT: [B, N] memo of each node's best unallocated action by prior (-2: not yet
  // known, -1: none left, -3: near a tie, scored densely); filled with -2 when a search
  // starts (it is valid for one search: a node's prior does not change during it).
  // Null: every node is scored densely (the CUDA kernels ignore it).
  int32_t* memo;
  // CPU, PUCT, K <= 64, with the memo: [B, N] bit a set where the node has a child for
  // action a; valid where the memo entry is known (not -2): written when the memo entry
  // is computed, a bit added when a child is allocated.  Null: read the child rows.
  uint64_t* kids;
  int group;              // CPU: walks of this many trees advance in lockstep (1: a tree at a
                          // time); the choices do not depend on it
  int64_t* status;        // CUDA: [2] device (code, first tree / row); null on the CPU
};

struct ExpandInputs {
  int64_t M, W;           // rows (B * W): row m belongs to tree m / W
  const int64_t* node;    // [M] (select's out_node)
  const int64_t* parent;
  const int64_t* action;
  const uint8_t* is_new;  // only new rows are written
  const float* reward;    // [M]
  const float* discount;  // [M]
  const float* logits;    // [M, K] (-inf marks an invalid action)
  const float* value;     // [M]
  const uint8_t* invalid; // [M, K] or null
  const uint8_t* terminal;// [M] or null
};

struct BackupInputs {
  int W;
  int path_stride;        // max_depth + 1
  const int32_t* path;    // [B, W, path_stride]
  const int32_t* len;     // [B, W]
};

// ---------------------------------------------------------------------------------------
// Per-action rules, shared by both backends.  Arithmetic in float32 in the order mctx
// uses, so that searches agree with it (ties aside).
// ---------------------------------------------------------------------------------------
RLFUSE_TREE_HD float puct_exploration(float c1, float c2, float n_parent) {
  return __builtin_sqrtf(n_parent) * (c1 + __builtin_logf((n_parent + c2 + 1.0f) / c2));
}

// PUCT score of one action; q_norm is the normalised Q (0 when unvisited), n the real
// visits, v the virtual visits of its child.
RLFUSE_TREE_HD float puct_score(float q_norm, float prior, float explore, float n, float v) {
  const float value_score = n > 0.0f ? q_norm * (n / (n + v)) : 0.0f;
  return value_score + explore * prior / (n + v + 1.0f);
}

RLFUSE_TREE_HD float min_max_normalise(float q, float lo, float hi) {
  const float d = hi - lo;
  return (q - lo) / (d > 1e-8f ? d : 1e-8f);
}

// PUCT bounds for the Q normalisation: with kTreeMinMax the tree's min / max Q (lo / hi
// are replaced); returns whether Q is normalised at all (kTreeMinMax before two distinct
// values were seen: no).
RLFUSE_TREE_HD bool qnorm_bounds(const View& t, const SelectParams& p, int64_t b, float* lo,
                                 float* hi) {
  if (p.qnorm != kTreeMinMax) return true;
  *lo = t.minmax[2 * b];
  *hi = t.minmax[2 * b + 1];
  return *hi > *lo;
}

// N(s) with the virtual visits of the simulations in flight through node s.
RLFUSE_TREE_HD float parent_visits(const View& t, const SelectParams& p, int64_t b, int32_t s) {
  const int64_t n = b * t.N + s;
  return float(t.visits[n]) + p.virtual_loss * float(t.inflight[n]);
}

// Gumbel sequential-halving score at the root (mctx seq_halving.score_considered).
RLFUSE_TREE_HD float gumbel_root_score(float g, float centred_logit, float sigma, bool on_schedule) {
  float s = g + centred_logit + sigma;
  s = s > -1e9f ? s : -1e9f;
  return on_schedule ? s : -__builtin_inff();
}

// ---------------------------------------------------------------------------------------
// Per-tree sequential phases, shared by both backends (CPU: a thread per tree in turn;
// CUDA: a thread per tree).
// ---------------------------------------------------------------------------------------
// Backup of tree b's W recorded paths: g <- raw_value(leaf), then g <- r + discount * g up
// each edge; running means, visits, edge visits / values, min / max; releases the virtual
// loss (in-flight counts).  The means are updated as v += (g - v) / (n + 1), which keeps
// v exact while every return equals it: (v * n + g) / (n + 1) drifts by an ulp, and the
// min-max normalisation of Q (epsilon 1e-8) would blow that rounding up to a full-range
// difference between equal actions.  A row of fewer than 2 nodes (no finished walk has
// one; CUDA: a failed walk's, out_len 0) is skipped.
RLFUSE_TREE_HD void backup_tree(const View& t, const BackupInputs& in, int64_t b) {
  const int64_t N = t.N, K = t.K, W = in.W, D = in.path_stride;
  const int64_t base = b * N;
  float lo = t.minmax[2 * b], hi = t.minmax[2 * b + 1];
  for (int64_t w = 0; w < W; ++w) {
    const int32_t* path = in.path + (b * W + w) * D;
    const int32_t len = in.len[b * W + w];
    if (len < 2) continue;  // no walk (CUDA: one that failed, out_len 0)
    const int32_t leaf = path[len - 1];
    float g = t.raw_value[base + leaf];
    float cnt = float(t.visits[base + leaf]);
    t.value[base + leaf] += (g - t.value[base + leaf]) / (cnt + 1.0f);
    t.visits[base + leaf] += 1;
    t.inflight[base + leaf] -= 1;
    for (int32_t i = len - 1; i >= 1; --i) {
      const int32_t c = path[i], s = path[i - 1];
      const int64_t pe = (base + s) * K + t.action[base + c];
      g = t.reward[pe] + t.discount[pe] * g;
      cnt = float(t.visits[base + s]);
      t.value[base + s] += (g - t.value[base + s]) / (cnt + 1.0f);
      t.visits[base + s] += 1;
      t.inflight[base + s] -= 1;
      t.edge_visits[pe] += 1;
      t.edge_value[pe] = t.value[base + c];
      const float q = t.reward[pe] + t.discount[pe] * t.value[base + c];
      t.edge_q[pe] = q;
      lo = q < lo ? q : lo;
      hi = q > hi ? q : hi;
    }
  }
  t.minmax[2 * b] = lo;
  t.minmax[2 * b + 1] = hi;
}

// Allocate the child of node s for action a in tree b (bump allocator) and write its node
// fields; returns its id, or -1 when the tree is full.
RLFUSE_TREE_HD int32_t allocate_node(const View& t, int64_t b, int32_t s, int64_t a) {
  const int64_t base = b * t.N;
  const int32_t n = t.next_free[b];
  if (n >= t.N) return -1;
  t.next_free[b] = n + 1;
  t.child[(base + s) * t.K + a] = n;
  t.parent[base + n] = s;
  t.action[base + n] = int32_t(a);
  t.depth[base + n] = t.depth[base + s] + 1;
  t.flags[base + n] = 0;
  t.inflight[base + n] = 0;
  t.visits[base + n] = 0;
  t.value[base + n] = 0.0f;
  t.raw_value[base + n] = 0.0f;
  return n;
}

// End of simulation o's walk in tree b: its path counts as virtual loss for the later
// simulations of the step; the outputs of the walk.
RLFUSE_TREE_HD void finish_walk(const View& t, const SelectParams& p, int64_t b, int64_t o,
                                const int32_t* path, int32_t len, int64_t act, bool is_new) {
  const int64_t base = b * t.N;
  for (int32_t i = 0; i < len; ++i) t.inflight[base + path[i]] += 1;
  const int64_t leaf = path[len - 1];
  p.out_node[o] = leaf;
  p.out_parent[o] = path[len - 2];
  p.out_action[o] = act;
  p.out_store[o] = is_new ? leaf : t.N;
  p.out_new[o] = is_new ? 1 : 0;
  p.out_len[o] = len;
}

// The node fields that expand writes for row m (node n of the tree at `base`), and the
// parent edge's reward and discount; `valid` = number of valid actions at the node.
RLFUSE_TREE_HD void expand_node_fields(const View& t, const ExpandInputs& in, int64_t m,
                                       int64_t base, int64_t n, int valid) {
  t.raw_value[base + n] = in.value[m];
  t.value[base + n] = in.value[m];
  t.visits[base + n] = 0;
  const bool term = (in.terminal != nullptr && in.terminal[m]) || valid == 0;
  t.flags[base + n] = kExpanded | (term ? kTerminal : 0);
  const int64_t pe = (base + in.parent[m]) * t.K + in.action[m];
  t.reward[pe] = in.reward[m];
  t.discount[pe] = in.discount[m];
}

// Breadth-first copy of the subtree under tree b's root child actions[b] into dst; a child
// gets its destination id (and its parent link) when it is queued; src_of[b, i] is the
// source of dst node i (the queue).  An unexpanded child comes back as an empty tree.
RLFUSE_TREE_HD void subtree_tree(const View& src, const View& dst, const int64_t* actions,
                                 int32_t* src_of, int64_t b) {
  const int64_t K = src.K, sb = b * src.N, db = b * dst.N;
  int32_t* so = src_of + db;
  for (int64_t i = 0; i < dst.N; ++i) so[i] = -1;
  dst.next_free[b] = 0;
  dst.minmax[2 * b] = __builtin_inff();
  dst.minmax[2 * b + 1] = -__builtin_inff();
  // a tree with no nodes (new, cleared, or an empty subtree itself) has no root row to read
  if (src.next_free[b] < 1) return;
  const int32_t r = src.child[sb * K + actions[b]];
  if (r < 0 || r >= src.next_free[b] || !(src.flags[sb + r] & kExpanded)) return;
  int32_t count = 1;
  so[0] = r;
  dst.parent[db] = -1;
  dst.action[db] = -1;
  const int32_t d0 = src.depth[sb + r];
  for (int32_t i = 0; i < count; ++i) {
    const int32_t s = so[i];
    const int64_t se = (sb + s) * K, de = (db + i) * K;
    for (int64_t a = 0; a < K; ++a) {
      int32_t c = src.child[se + a];
      if (c >= 0 && (!(src.flags[sb + c] & kExpanded) || count >= dst.N)) c = -1;
      int32_t nc = -1;
      if (c >= 0) {
        nc = count++;
        so[nc] = c;
        dst.parent[db + nc] = i;
        dst.action[db + nc] = int32_t(a);
      }
      dst.child[de + a] = nc;
      dst.logit[de + a] = src.logit[se + a];
      dst.prior[de + a] = src.prior[se + a];
      dst.edge_visits[de + a] = c >= 0 ? src.edge_visits[se + a] : 0;
      dst.edge_value[de + a] = c >= 0 ? src.edge_value[se + a] : 0.0f;
      dst.edge_q[de + a] = c >= 0 ? src.edge_q[se + a] : 0.0f;
      dst.reward[de + a] = c >= 0 ? src.reward[se + a] : 0.0f;
      dst.discount[de + a] = c >= 0 ? src.discount[se + a] : 0.0f;
      dst.invalid[de + a] = src.invalid[se + a];
    }
    dst.raw_value[db + i] = src.raw_value[sb + s];
    dst.value[db + i] = src.value[sb + s];
    dst.visits[db + i] = src.visits[sb + s];
    dst.depth[db + i] = src.depth[sb + s] - d0;
    dst.flags[db + i] = src.flags[sb + s];
    dst.inflight[db + i] = 0;
  }
  dst.next_free[b] = count;
}

}  // namespace tree
}  // namespace rlfuse

#if !defined(__CUDACC__)
// Host side (the *_api.cpp files of both extensions): the objects Python builds once.
#include <stdexcept>
#include <string>
#include <vector>

namespace rlfuse {
namespace tree {

template <typename T>
T* word_ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

inline View make_view(const std::vector<int64_t>& w) {
  if (w.size() != size_t(kViewWords))
    throw std::invalid_argument("TreeView: expected " + std::to_string(kViewWords) +
                                " words, got " + std::to_string(w.size()));
  View v{};
  v.B = w[0];
  v.N = w[1];
  v.K = w[2];
  v.parent = word_ptr<int32_t>(w[3]);
  v.action = word_ptr<int32_t>(w[4]);
  v.visits = word_ptr<int32_t>(w[5]);
  v.value = word_ptr<float>(w[6]);
  v.raw_value = word_ptr<float>(w[7]);
  v.depth = word_ptr<int32_t>(w[8]);
  v.flags = word_ptr<uint8_t>(w[9]);
  v.inflight = word_ptr<int32_t>(w[10]);
  v.child = word_ptr<int32_t>(w[11]);
  v.logit = word_ptr<float>(w[12]);
  v.prior = word_ptr<float>(w[13]);
  v.edge_visits = word_ptr<int32_t>(w[14]);
  v.edge_value = word_ptr<float>(w[15]);
  v.reward = word_ptr<float>(w[16]);
  v.discount = word_ptr<float>(w[17]);
  v.invalid = word_ptr<uint8_t>(w[18]);
  v.next_free = word_ptr<int32_t>(w[19]);
  v.minmax = word_ptr<float>(w[20]);
  v.gumbel = word_ptr<float>(w[21]);
  v.considered = word_ptr<int32_t>(w[22]);
  v.table = word_ptr<const int32_t>(w[23]);
  v.edge_q = word_ptr<float>(w[24]);
  return v;
}

// SelectConfig words.  ints: rule, max_depth, qnorm, table_rows, table_len, then the
// output addresses node, parent, action, store, new, path, len, then the memo and the
// children-mask addresses (0: none) and the lockstep group; floats: c1, c2, virtual_loss,
// value_scale, maxvisit_init; on CUDA a 16th int: the int64 [2] status buffer (code, tree
// or row).
inline SelectParams make_select(const std::vector<int64_t>& ia, const std::vector<double>& fa,
                                bool with_status) {
  const size_t n_int = with_status ? 16 : 15;
  if (ia.size() != n_int || fa.size() != 5)
    throw std::invalid_argument("SelectConfig: expected " + std::to_string(n_int) +
                                " ints and 5 floats");
  SelectParams p{};
  p.rule = int(ia[0]);
  p.max_depth = int(ia[1]);
  p.qnorm = int(ia[2]);
  p.table_rows = int(ia[3]);
  p.table_len = int(ia[4]);
  p.out_node = word_ptr<int64_t>(ia[5]);
  p.out_parent = word_ptr<int64_t>(ia[6]);
  p.out_action = word_ptr<int64_t>(ia[7]);
  p.out_store = word_ptr<int64_t>(ia[8]);
  p.out_new = word_ptr<uint8_t>(ia[9]);
  p.out_path = word_ptr<int32_t>(ia[10]);
  p.out_len = word_ptr<int32_t>(ia[11]);
  p.memo = word_ptr<int32_t>(ia[12]);
  p.kids = word_ptr<uint64_t>(ia[13]);
  p.group = int(ia[14]) > 1 ? int(ia[14]) : 1;
  p.c1 = float(fa[0]);
  p.c2 = float(fa[1]);
  p.virtual_loss = float(fa[2]);
  p.value_scale = float(fa[3]);
  p.maxvisit_init = float(fa[4]);
  p.status = with_status ? word_ptr<int64_t>(ia[15]) : nullptr;
  return p;
}

}  // namespace tree
}  // namespace rlfuse

#define RLFUSE_TREE_DECLS(NS)                                                              \
  namespace rlfuse { namespace cpu { namespace NS {                                        \
  /* Each returns kOk or a Status with the first failing tree (or row) in *where. */       \
  int tree_select(const tree::View& t, const tree::SelectParams& p, int nt, int64_t* where); \
  int tree_expand(const tree::View& t, const tree::ExpandInputs& in, int nt, int64_t* where); \
  int tree_backup(const tree::View& t, const tree::BackupInputs& in, int nt);               \
  void tree_subtree(const tree::View& src, const tree::View& dst, const int64_t* actions,  \
                    int32_t* src_of, int nt);                                              \
  } } }

namespace rlfuse { namespace cpu { namespace tree = ::rlfuse::tree; } }
RLFUSE_FOR_EACH_ISA(RLFUSE_TREE_DECLS)
#endif
