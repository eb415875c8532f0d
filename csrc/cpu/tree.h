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
//   per tree [B]: next_free (bump allocator), minmax [B, 2] (min / max Q seen in backups)
//   Gumbel root data: gumbel [B, K] (noise + logits are combined at the root), considered
//     [B] (number of considered actions) and the sequential-halving table [rows, len].
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define RLFUSE_TREE_HD __host__ __device__ __forceinline__
#else
#define RLFUSE_TREE_HD inline
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
constexpr int kViewWords = 24;

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

// Gumbel sequential-halving score at the root (mctx seq_halving.score_considered).
RLFUSE_TREE_HD float gumbel_root_score(float g, float centred_logit, float sigma, bool on_schedule) {
  float s = g + centred_logit + sigma;
  s = s > -1e9f ? s : -1e9f;
  return on_schedule ? s : -__builtin_inff();
}

}  // namespace tree
}  // namespace rlfuse

#if !defined(__CUDACC__)
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
