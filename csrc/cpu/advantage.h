// Advantage estimation (csrc/cpu/advantage.cpp), declared for every ISA level.
//
// Tensors arrive as raw pointers with element strides (see python/rlfuse/ops/advantage.py,
// which validates everything first).  Sequences are described either as padded rows
// (n_seq rows of T elements: element (s, t) at s * s0 + t * s1) or as packed segments
// (cu_seqlens[n_seq + 1]: element t of sequence s at (cu[s] + t) * s1, s0 unused).
#pragma once
#include <cstdint>

#include "isa.h"

namespace rlfuse {
namespace cpu {

// Mask element codes (python/rlfuse/ops/advantage.py _MASK_CODES).
enum MaskCode : int { kMaskU8 = 0, kMaskI32 = 1, kMaskI64 = 2, kMaskF32 = 3, kMaskF64 = 4 };

struct Strided {
  const void* p;  // never null: an absent input points at a constant with strides 0
  int64_t s0;     // row stride (padded layout), elements
  int64_t s1;     // element stride along a sequence
};

struct SeqLayout {
  int64_t n_seq;
  int64_t T;          // padded row length (unused when packed)
  const void* cu;     // packed: cu_seqlens (n_seq + 1 entries), else null
  int cu_code;        // 0 int32, 1 int64
};

// Status of a kernel that validates while it runs: code 0 = fine; else the first bad
// element in (seq, pos) order.  Codes: 1 mask not 0/1, 2 rewards/x/kl not finite at a
// valid position, 3 values not finite at a valid position, 4 last_values/scores not
// finite, 5 group of size one where the semantics make it an error.
struct AdvStatus {
  int64_t code;
  int64_t seq;
  int64_t pos;
};

struct GaeArgs {
  int dtype;            // 0 float32 or 3 float64 (rewards, values, last_values, outputs)
  SeqLayout lay;
  Strided rewards, values, mask;
  int mask_code;
  Strided last_values;  // s1 = stride over sequences
  double gamma, lam;
  int zero_masked;      // 0: skip masked positions (verl); 1: recurse with zeros (OpenRLHF/TRL)
  void* out_adv;        // contiguous in the layout ([n_seq, T] or [N]); returns when out_ret null
  void* out_ret;        // may be null
  double* row_stats;    // null, or [n_seq, 3]: valid count, mean and centred sum of squares
                        // of each sequence's advantages (for whitening)
  int num_threads;
};

struct RowStatsArgs {
  int dtype;            // 0 float32 or 3 float64
  int64_t n_rows, n_cols;
  Strided x, mask;      // element (r, c) at r * s0 + c * s1
  int mask_code;
  int64_t* out_count;   // [n_rows]
  double* out_mean;     // [n_rows]
  double* out_m2;       // [n_rows]  sum over valid (x - mean_row)^2
  int num_threads;
};

struct WhitenArgs {
  int dtype;            // 0 float32 or 3 float64 (x and out)
  int64_t n_rows, n_cols;
  Strided x, mask;
  int mask_code;
  double mean, scale, add_back;
  void* out;            // contiguous [n_rows, n_cols]; may alias x when x is contiguous
  int num_threads;
};

// Group advantage methods and size-one conventions (advantage.py _METHODS / _SEMANTICS).
enum GroupMethod : int {
  kGrpo = 0, kDrGrpo = 1, kBatchStd = 2, kRloo = 3, kRfppBaseline = 4, kOpo = 5,
  kGrpoPassk = 6, kGpg = 7
};
enum SizeOne : int { kSizeOneZero = 0, kSizeOneSelf = 1, kSizeOneError = 2 };

struct GroupArgs {
  int dtype;              // 0 float32 or 3 float64 (scores and outputs)
  int64_t B;
  Strided scores;         // [B] (n_score_cols == 0) or [B, n_score_cols] summed per row
  int64_t n_score_cols;
  const void* ids;        // null: contiguous blocks of group_size
  int ids_code;           // 0 int32, 1 int64
  int64_t ids_stride;
  int64_t group_size;
  int method;
  int size_one;
  double eps;
  double std_floor;       // < 0: none
  int norm_by_std;        // grpo_passk
  double f_norm;          // gpg
  int whiten_biased;      // reinforce_pp_baseline: 1 = biased variance, rsqrt(max(var, 1e-8))
  const double* lengths;  // [B] or null (opo / token weights; else from the mask)
  Strided mask;           // [B, T] or p == null
  int mask_code;
  int64_t T;
  void* out_sample;       // [B]
  void* out_tok;          // [B, T] contiguous, or null
  int num_threads;
};

struct TokenRewardArgs {
  int dtype;              // 0 float32 or 3 float64
  SeqLayout lay;
  Strided scores;         // s1 = stride over sequences
  Strided kl;             // strides 0 and a constant 0 when absent
  Strided mask;
  int mask_code;
  double kl_coef;
  void* out;              // contiguous in the layout
  int num_threads;
};

}  // namespace cpu
}  // namespace rlfuse

#define RLFUSE_ADVANTAGE_DECLS(NS)                                                    \
  namespace rlfuse { namespace cpu { namespace NS {                                   \
  void gae_fwd(const GaeArgs& a, AdvStatus* st);                                      \
  void masked_row_stats(const RowStatsArgs& a, AdvStatus* st);                        \
  void masked_whiten_apply(const WhitenArgs& a);                                      \
  void group_advantages(const GroupArgs& a, AdvStatus* st);                           \
  void token_rewards(const TokenRewardArgs& a, AdvStatus* st);                        \
  } } }

RLFUSE_FOR_EACH_ISA(RLFUSE_ADVANTAGE_DECLS)
