// Batched search trees on the CPU: select, expand, backup and subtree extraction over B
// struct-of-arrays trees (layout and rules in tree.h; the Python reference in
// python/rlfuse/search/tree.py is the specification).
//
// Parallel over trees with OpenMP.  The W simulations of one tree run one after another on
// one thread, so the virtual loss (in-flight counts) of the earlier ones steers the later
// ones and the bump allocator needs no atomics; expand is parallel over rows (every new row
// writes its own node and its own parent edge).  Results do not depend on the thread count.
//
// Fast paths, each giving the plain rule's choices and values bit for bit (docs/search.md,
// tests/search/test_select_paths.py): sparse PUCT (only allocated children scored, the best
// unallocated action from a per-search memo), the walks of SelectParams::group trees in
// lockstep and in stages (select_trees, puct_walks, gumbel_walks), 16-lane Gumbel passes,
// expand rows in groups of four.  NaN scores follow the scan's rule in every path: the first
// valid action wins when its score is NaN, a NaN after it never wins (a maximum passes over
// NaN, so the vectorised argmaxes check the first valid action's score).
#include "rlfuse/common.h"
#include "tree.h"

#include <algorithm>
#include <cmath>
#include <cstring>
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
  float q(int64_t a) const { return t.edge_q[e + a]; }
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

constexpr int kLanes = 16;

// First index of the maximum of sc[0, K) (-inf entries never win unless all are -inf:
// then -1).  The maximum is found with 16 independent lanes (vectorised), then its first
// occurrence by a scan.
int64_t first_argmax(const float* sc, int64_t K) {
  float m16[kLanes];
  for (int j = 0; j < kLanes; ++j) m16[j] = -kInf;
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes)
    for (int j = 0; j < kLanes; ++j) m16[j] = sc[a0 + j] > m16[j] ? sc[a0 + j] : m16[j];
  float m = -kInf;
  for (int j = 0; j < kLanes; ++j) m = m16[j] > m ? m16[j] : m;
  for (int64_t a = a0; a < K; ++a) m = sc[a] > m ? sc[a] : m;
  if (m == -kInf) return -1;
  for (int64_t a = 0; a < K; ++a)
    if (sc[a] == m) return a;
  return -1;
}

// Argmax of precomputed scores sc[K] over the valid actions; with `pending` (several
// simulations per step) actions whose child is allocated and not yet expanded come last.
int64_t pick_scores(const NodeRef& r, float* sc, bool pending) {
  const int64_t K = r.t.K;
  const uint8_t* inv = r.t.invalid + r.e;
  if (!pending) {
    bool finite_scores = true;
    for (int64_t a = 0; a < K; ++a) {
      finite_scores &= sc[a] > -kInf;
      sc[a] = inv[a] ? -kInf : sc[a];
    }
    if (finite_scores) {
      const int64_t a = first_argmax(sc, K);
      if (a >= 0) return a;
    }
    // some valid action scored -inf (or none is valid): the general rule
    for (int64_t a = 0; a < K; ++a) sc[a] = inv[a] ? -kInf : sc[a];
  }
  return pick(r, [&](int64_t a) { return sc[a]; });
}

// The first valid action of a row, -1 when there is none.  With nothing pending it is
// where the scan of pick() starts, and it keeps it when its score is NaN (no comparison
// with NaN is true), whatever the scores after it; a maximum cannot tell that (NaN never
// wins one), so the vectorised argmaxes below check this action's score first.  (A NaN
// after it never wins either way.)
inline int64_t first_valid(const uint8_t* inv, int64_t K) {
  int64_t a = 0;
  while (a < K && inv[a]) ++a;
  return a < K ? a : -1;
}

// The choice when no simulation of the step is in flight (nothing is pending): sc[] holds
// the scores with the invalid actions already at -inf.
int64_t pick_masked(const NodeRef& r, float* sc) {
  const int64_t f = first_valid(r.t.invalid + r.e, r.t.K);
  if (f >= 0 && sc[f] != sc[f]) return f;  // a NaN first valid score (the scan's rule)
  const int64_t a = first_argmax(sc, r.t.K);
  return a >= 0 ? a : pick_scores(r, sc, false);  // every valid score is -inf
}

// Virtual visits of every action into v[K] (0 when no simulation of the step is in flight).
void virtual_visits(const NodeRef& r, float vl, bool any, float* v) {
  const int64_t K = r.t.K;
  if (!any || vl == 0.0f) {
    for (int64_t a = 0; a < K; ++a) v[a] = 0.0f;
    return;
  }
  for (int64_t a = 0; a < K; ++a) v[a] = r.virt(a, vl);
}

// kLanes-wide vectors (GCC vector extensions): one AVX-512 register, two or four on the
// lower ISA levels.  Loads are unaligned (memcpy).
typedef float vf16 __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi16 __attribute__((vector_size(4 * kLanes)));
typedef uint8_t vb16 __attribute__((vector_size(kLanes)));
typedef float vf4 __attribute__((vector_size(16)));

template <typename V, typename T>
inline V load16(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
inline vf16 splat(float x) { return vf16{} + x; }
inline vi16 splat(int32_t x) { return vi16{} + x; }
inline vi16 lane_ids() {
  vi16 v;
  for (int j = 0; j < kLanes; ++j) v[j] = j;
  return v;
}

// Lane j of v and of v with its lanes in blocks of 2 k swapped (k = 8, 4, 2, 1).
template <typename V>
inline V swap_blocks(V v, int k) {
  switch (k) {
    case 8: return __builtin_shuffle(v, vi16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    case 4: return __builtin_shuffle(v, vi16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    case 2: return __builtin_shuffle(v, vi16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    default: return __builtin_shuffle(v, vi16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  }
}
// Every lane gets the maximum (minimum) of the lanes; for float lanes without NaN the value
// is exact (which of +0 / -0 is not specified).
template <typename V>
inline V lanes_max(V v) {
  for (int k = 8; k >= 1; k /= 2) {
    const V w = swap_blocks(v, k);
    v = w > v ? w : v;
  }
  return v;
}
template <typename V>
inline V lanes_min(V v) {
  for (int k = 8; k >= 1; k /= 2) {
    const V w = swap_blocks(v, k);
    v = w < v ? w : v;
  }
  return v;
}

// Lane-wise comparisons (-1 / 0 lanes, false on NaN as the operators), selects and
// reductions of the kLanes-wide vectors.  With AVX-512 (one register) and without x86
// SIMD they are the vector-extension operators; below AVX-512, GCC 12 lowers a compare or
// a select of 16-float vectors one lane at a time, so there they are intrinsics on two
// 8-lane (AVX2) or four 4-lane (SSE4.1) parts.  The reductions see no NaN (their callers
// never let one in); which of +0 / -0 comes out of a maximum is not specified.
#if defined(__AVX512F__) || !defined(__SSE4_1__)
inline vi16 v_gt(vf16 a, vf16 b) { return a > b; }
inline vi16 v_lt(vf16 a, vf16 b) { return a < b; }
inline vi16 v_ge(vf16 a, vf16 b) { return a >= b; }
inline vi16 v_eq(vf16 a, vf16 b) { return a == b; }
inline vi16 v_gt(vi16 a, vi16 b) { return a > b; }
inline vi16 v_eq(vi16 a, vi16 b) { return a == b; }
inline vf16 v_sel(vi16 m, vf16 a, vf16 b) { return m ? a : b; }
inline vi16 v_sel(vi16 m, vi16 a, vi16 b) { return m ? a : b; }
inline vi16 v_valid(const uint8_t* inv) {
  return __builtin_convertvector(load16<vb16>(inv), vi16) == 0;
}
inline float v_hmax(vf16 v) { return lanes_max(v)[0]; }
inline float v_hmin(vf16 v) { return lanes_min(v)[0]; }
inline int32_t v_hmin(vi16 v) { return lanes_min(v)[0]; }
#else
#if defined(__AVX2__)
constexpr int kParts = 2;
typedef __m256 PF;
typedef __m256i PI;
inline PF p_gt(PF a, PF b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline PF p_lt(PF a, PF b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline PF p_ge(PF a, PF b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
inline PF p_eq(PF a, PF b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline PI p_gt(PI a, PI b) { return _mm256_cmpgt_epi32(a, b); }
inline PI p_eq(PI a, PI b) { return _mm256_cmpeq_epi32(a, b); }
inline PF p_sel(PF m, PF a, PF b) { return _mm256_blendv_ps(b, a, m); }
inline PI p_sel(PI m, PI a, PI b) { return _mm256_blendv_epi8(b, a, m); }
inline PI p_int(PF m) { return _mm256_castps_si256(m); }
inline PF p_and(PF a, PF b) { return _mm256_and_ps(a, b); }
inline PI p_addi(PI a, PI b) { return _mm256_add_epi32(a, b); }
// first, first + 1, ...
inline PI p_ids(int32_t first) {
  return _mm256_add_epi32(_mm256_set1_epi32(first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#else
constexpr int kParts = 4;
typedef __m128 PF;
typedef __m128i PI;
inline PF p_gt(PF a, PF b) { return _mm_cmpgt_ps(a, b); }
inline PF p_lt(PF a, PF b) { return _mm_cmplt_ps(a, b); }
inline PF p_ge(PF a, PF b) { return _mm_cmpge_ps(a, b); }
inline PF p_eq(PF a, PF b) { return _mm_cmpeq_ps(a, b); }
inline PI p_gt(PI a, PI b) { return _mm_cmpgt_epi32(a, b); }
inline PI p_eq(PI a, PI b) { return _mm_cmpeq_epi32(a, b); }
inline PF p_sel(PF m, PF a, PF b) { return _mm_blendv_ps(b, a, m); }
inline PI p_sel(PI m, PI a, PI b) { return _mm_blendv_epi8(b, a, m); }
inline PI p_int(PF m) { return _mm_castps_si128(m); }
inline PF p_and(PF a, PF b) { return _mm_and_ps(a, b); }
inline PI p_addi(PI a, PI b) { return _mm_add_epi32(a, b); }
inline PI p_ids(int32_t first) {
  return _mm_add_epi32(_mm_set1_epi32(first), _mm_setr_epi32(0, 1, 2, 3));
}
#endif
// the parts of a vector (as floats or as ints) and back
struct FParts {
  PF p[kParts];
};
struct IParts {
  PI p[kParts];
};
template <typename V>
inline FParts fparts(V v) {
  FParts x;
  std::memcpy(x.p, &v, sizeof(x.p));
  return x;
}
template <typename V>
inline IParts iparts(V v) {
  IParts x;
  std::memcpy(x.p, &v, sizeof(x.p));
  return x;
}
template <typename V, typename X>
inline V join(const X& x) {
  V v;
  std::memcpy(&v, x.p, sizeof(v));
  return v;
}
#define RLFUSE_PARTWISE(ret, name, T, P, split, expr)  \
  inline ret name(T a, T b) {                           \
    const P x = split(a), y = split(b);                 \
    P r;                                                \
    for (int i = 0; i < kParts; ++i) r.p[i] = expr;     \
    return join<ret>(r);                                \
  }
RLFUSE_PARTWISE(vi16, v_gt, vf16, FParts, fparts, p_gt(x.p[i], y.p[i]))
RLFUSE_PARTWISE(vi16, v_lt, vf16, FParts, fparts, p_lt(x.p[i], y.p[i]))
RLFUSE_PARTWISE(vi16, v_ge, vf16, FParts, fparts, p_ge(x.p[i], y.p[i]))
RLFUSE_PARTWISE(vi16, v_eq, vf16, FParts, fparts, p_eq(x.p[i], y.p[i]))
RLFUSE_PARTWISE(vi16, v_gt, vi16, IParts, iparts, p_gt(x.p[i], y.p[i]))
RLFUSE_PARTWISE(vi16, v_eq, vi16, IParts, iparts, p_eq(x.p[i], y.p[i]))
#undef RLFUSE_PARTWISE
inline vf16 v_sel(vi16 m, vf16 a, vf16 b) {
  const FParts mm = fparts(m), x = fparts(a), y = fparts(b);
  FParts r;
  for (int i = 0; i < kParts; ++i) r.p[i] = p_sel(mm.p[i], x.p[i], y.p[i]);
  return join<vf16>(r);
}
inline vi16 v_sel(vi16 m, vi16 a, vi16 b) {
  const IParts mm = iparts(m), x = iparts(a), y = iparts(b);
  IParts r;
  for (int i = 0; i < kParts; ++i) r.p[i] = p_sel(mm.p[i], x.p[i], y.p[i]);
  return join<vi16>(r);
}
// the valid lanes (inv[j] == 0) of 16 invalid flags
inline vi16 v_valid(const uint8_t* inv) {
  IParts r;
#if defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(inv));
  r.p[0] = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(b), _mm256_setzero_si256());
  r.p[1] = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), _mm256_setzero_si256());
#else
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(inv));
  const __m128i z = _mm_setzero_si128();
  r.p[0] = _mm_cmpeq_epi32(_mm_cvtepu8_epi32(b), z);
  r.p[1] = _mm_cmpeq_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(b, 4)), z);
  r.p[2] = _mm_cmpeq_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(b, 8)), z);
  r.p[3] = _mm_cmpeq_epi32(_mm_cvtepu8_epi32(_mm_srli_si128(b, 12)), z);
#endif
  return join<vi16>(r);
}
// the parts folded into one 4-lane register, then across its lanes
inline __m128 fold_max(vf16 v) {
  const FParts x = fparts(v);
#if defined(__AVX2__)
  const __m256 m = _mm256_max_ps(x.p[0], x.p[1]);
  return _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
#else
  return _mm_max_ps(_mm_max_ps(x.p[0], x.p[1]), _mm_max_ps(x.p[2], x.p[3]));
#endif
}
inline __m128 fold_min(vf16 v) {
  const FParts x = fparts(v);
#if defined(__AVX2__)
  const __m256 m = _mm256_min_ps(x.p[0], x.p[1]);
  return _mm_min_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
#else
  return _mm_min_ps(_mm_min_ps(x.p[0], x.p[1]), _mm_min_ps(x.p[2], x.p[3]));
#endif
}
inline float v_hmax(vf16 v) {
  __m128 x = fold_max(v);
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline float v_hmin(vf16 v) {
  __m128 x = fold_min(v);
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_min_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline int32_t v_hmin(vi16 v) {
  const IParts x = iparts(v);
#if defined(__AVX2__)
  const __m256i m = _mm256_min_epi32(x.p[0], x.p[1]);
  __m128i y = _mm_min_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
#else
  __m128i y = _mm_min_epi32(_mm_min_epi32(x.p[0], x.p[1]), _mm_min_epi32(x.p[2], x.p[3]));
#endif
  y = _mm_min_epi32(y, _mm_shuffle_epi32(y, 0x4E));
  y = _mm_min_epi32(y, _mm_shuffle_epi32(y, 0xB1));
  return _mm_cvtsi128_si32(y);
}
#endif

// Running first argmax in kLanes lanes (lane j sees actions j, j + kLanes, ...): a strict
// > keeps the lowest index within a lane, and result() takes the lowest index among the
// lanes that hold the maximum, so the answer is the first index of the maximum, as a scan
// would give.  -1 when every score is -inf (or NaN).  NaN scores never win here: the
// callers check the first valid action's score (first_valid).
struct LaneArgmax {
#if defined(__AVX512F__) || !defined(__SSE4_1__)
  vf16 best = splat(-kInf);
  vi16 idx = splat(int32_t(-1));
  // scores of actions a0 .. a0 + kLanes - 1
  void update(vf16 s, vi16 ids) {
    const vi16 take = v_gt(s, best);
    best = v_sel(take, s, best);
    idx = v_sel(take, ids, idx);
  }
  // one score (the tail of K): action a in lane j
  void update(int j, float s, int32_t a) {
    if (s > best[j]) {
      best[j] = s;
      idx[j] = a;
    }
  }
  // scores of actions a0 .. a0 + kLanes - 1
  void update_at(vf16 s, int32_t a0) { update(s, lane_ids() + a0); }
  vf16 best16() const { return best; }
  vi16 idx16() const { return idx; }
#else
  // (kept in the parts, which stay in registers across the passes)
  FParts best = fparts(splat(-kInf));
  IParts idx = iparts(splat(int32_t(-1)));
  void update(vf16 s, vi16 ids) {
    const FParts x = fparts(s);
    const IParts i = iparts(ids);
    for (int k = 0; k < kParts; ++k) {
      const PF take = p_gt(x.p[k], best.p[k]);
      best.p[k] = p_sel(take, x.p[k], best.p[k]);
      idx.p[k] = p_sel(p_int(take), i.p[k], idx.p[k]);
    }
  }
  // scores of actions a0 .. a0 + kLanes - 1 (the indices made in the parts)
  void update_at(vf16 s, int32_t a0) {
    const FParts x = fparts(s);
    for (int k = 0; k < kParts; ++k) {
      const PF take = p_gt(x.p[k], best.p[k]);
      best.p[k] = p_sel(take, x.p[k], best.p[k]);
      idx.p[k] = p_sel(p_int(take), p_ids(a0 + k * (kLanes / kParts)), idx.p[k]);
    }
  }
  // one score (the tail of K): action a in lane j, as a vector update with the other
  // lanes at -inf (which never win)
  void update(int j, float s, int32_t a) {
    float sv[kLanes];
    int32_t av[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      sv[l] = -kInf;
      av[l] = 0;
    }
    sv[j] = s;
    av[j] = a;
    update(load16<vf16>(sv), load16<vi16>(av));
  }
  vf16 best16() const { return join<vf16>(best); }
  vi16 idx16() const { return join<vi16>(idx); }
#endif
  // (the maximum is exact in any order, and only its value matters here; then the lowest
  // index among the lanes that hold it)
  int64_t result() const {
    const vf16 b = best16();
    const float m = v_hmax(b);
    if (m == -kInf) return -1;
    return v_hmin(v_sel(v_eq(b, splat(m)), idx16(), splat(std::numeric_limits<int32_t>::max())));
  }
};

// Whether some of the floats seen is NaN, 16 at a time, in intrinsics per ISA level (GCC
// lowers a compare of 16-float vectors lane by lane where the registers are narrower; one
// unordered compare covers two registers' worth).
struct NanFlag {
#if defined(__AVX512F__)
  __mmask16 m = 0;
  void add(vf16 x) {
    __m512 v;
    std::memcpy(&v, &x, sizeof(v));
    m |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  bool any16() const { return m != 0; }
#elif defined(__AVX__)
  __m256 m = _mm256_setzero_ps();
  void add(vf16 x) {
    __m256 h[2];
    std::memcpy(h, &x, sizeof(h));
    m = _mm256_or_ps(m, _mm256_cmp_ps(h[0], h[1], _CMP_UNORD_Q));
  }
  bool any16() const { return _mm256_movemask_ps(m) != 0; }
#elif defined(__SSE2__)
  __m128 m = _mm_setzero_ps();
  void add(vf16 x) {
    __m128 h[4];
    std::memcpy(h, &x, sizeof(h));
    m = _mm_or_ps(m, _mm_or_ps(_mm_cmpunord_ps(h[0], h[1]), _mm_cmpunord_ps(h[2], h[3])));
  }
  bool any16() const { return _mm_movemask_ps(m) != 0; }
#else
  bool m = false;
  void add(vf16 x) {
    for (int j = 0; j < kLanes; ++j) m |= x[j] != x[j];
  }
  bool any16() const { return m; }
#endif
  bool tail = false;
  void add(float x) { tail |= x != x; }
  bool any() const { return tail || any16(); }
};

// Min / max of the node's value and its visited children's Q (mctx's parent_siblings
// bounds), in kLanes lanes.
void visited_bounds(const int32_t* ev, const float* eq, int64_t K, float nv, float* lo_out,
                    float* hi_out) {
  int64_t a0 = 0;
#if defined(__AVX512F__) || !defined(__SSE4_1__)
  vf16 lo16 = splat(nv), hi16 = splat(nv);
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 q = load16<vf16>(eq + a0);
    const vi16 vis = v_gt(load16<vi16>(ev + a0), splat(int32_t(0)));
    lo16 = v_sel(vis & v_lt(q, lo16), q, lo16);
    hi16 = v_sel(vis & v_gt(q, hi16), q, hi16);
  }
#else
  // (the running bounds kept in the parts, which stay in registers)
  FParts lo_p = fparts(splat(nv)), hi_p = fparts(splat(nv));
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const FParts q = fparts(load16<vf16>(eq + a0));
    const FParts vis = fparts(v_gt(load16<vi16>(ev + a0), splat(int32_t(0))));
    for (int k = 0; k < kParts; ++k) {
      lo_p.p[k] = p_sel(p_and(vis.p[k], p_lt(q.p[k], lo_p.p[k])), q.p[k], lo_p.p[k]);
      hi_p.p[k] = p_sel(p_and(vis.p[k], p_gt(q.p[k], hi_p.p[k])), q.p[k], hi_p.p[k]);
    }
  }
  const vf16 lo16 = join<vf16>(lo_p), hi16 = join<vf16>(hi_p);
#endif
  float lo = nv, hi = nv;
  for (int j = 0; j < kLanes; ++j) {
    lo = lo16[j] < lo ? lo16[j] : lo;
    hi = hi16[j] > hi ? hi16[j] : hi;
  }
  for (int64_t a = a0; a < K; ++a) {
    const float qa = eq[a];
    const bool vis = ev[a] > 0;
    lo = vis && qa < lo ? qa : lo;
    hi = vis && qa > hi ? qa : hi;
  }
  *lo_out = lo;
  *hi_out = hi;
}

// PUCT score of action a without virtual visits: tree::puct_score(q_norm, prior, explore,
// n, 0), bit for bit (n / (n + 0) is exactly 1 for n > 0, so that division is dropped).
inline float puct_score_real(float q_norm, float prior, float explore, float n) {
  return (n > 0.0f ? q_norm : 0.0f) + explore * prior / (n + 1.0f);
}

// Per-thread scratch of select: 3 K floats, and c(s) sqrt(N(s)) of the PUCT rule by
// integer N(s) (NaN until computed; a node's N(s) is an integer whenever no simulation of
// the step is in flight through it), which saves a log per visited node.
struct Scratch {
  std::vector<float> k3;
  std::vector<float> explore;
  std::vector<float> walks;  // Gumbel lockstep walks: 2 K floats per walk and a zero row
  Scratch(int64_t K, int64_t n_explore, int64_t n_walks = 0)
      : k3(3 * size_t(K)),
        explore(size_t(n_explore), std::numeric_limits<float>::quiet_NaN()),
        walks(n_walks > 0 ? size_t(2 * n_walks + 1) * size_t(K) : 0, 0.0f) {}
};

float puct_explore(const View& t, const tree::SelectParams& p, const NodeRef& r, Scratch& sc) {
  const int32_t n = t.visits[r.base + r.s];
  if (t.inflight[r.base + r.s] != 0 || n < 0 || size_t(n) >= sc.explore.size())
    return tree::puct_exploration(p.c1, p.c2, tree::parent_visits(t, p, r.b, r.s));
  float& e = sc.explore[size_t(n)];
  if (e != e) e = tree::puct_exploration(p.c1, p.c2, float(n));
  return e;
}

// ---------------------------------------------------------------------------------------
// Sparse PUCT choice.  An action without a child has no visits (an invariant of the
// tree), so its score is explore * prior (n = 0, no virtual visits, never pending), and
// for explore > 0 the best of them is the one with the largest prior (lowest index on
// ties): a node's prior does not change during a search, so that action is remembered in
// p.memo until it gets a child.  Only the allocated children (few below the root) are
// scored one by one, with the arithmetic of the dense rule; the answer is the dense
// rule's, bit for bit.  Cases where that argument could fail fall back to the dense rule:
// two unallocated priors so close that explore * prior may round to the same float,
// tiny products, a non-finite score, a NaN prior (a NaN score wins when it is the node's
// first valid action's, whatever the others: a ranking by prior cannot tell), many
// children.
// ---------------------------------------------------------------------------------------
constexpr int64_t kDense = -2;  // "score this node densely"
constexpr int32_t kMemoUnknown = -2, kMemoNone = -1, kMemoAmbiguous = -3;

// Bits j (0..15) set where child[j] >= 0 (the sign bit is clear).
inline uint32_t allocated_mask16(const int32_t* child) {
#if defined(__AVX512DQ__)
  return uint32_t(~_mm512_movepi32_mask(_mm512_loadu_si512(child))) & 0xffffu;
#elif defined(__AVX2__)
  const uint32_t lo = uint32_t(_mm256_movemask_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(child))));
  const uint32_t hi = uint32_t(_mm256_movemask_ps(_mm256_loadu_ps(reinterpret_cast<const float*>(child + 8))));
  return ~(lo | hi << 8) & 0xffffu;
#else
  uint32_t m = 0;
  for (int j = 0; j < kLanes; ++j) m |= uint32_t(child[j] >= 0) << j;
  return m;
#endif
}

// Bit a set where child[a] >= 0, for K <= 64.
inline uint64_t children_mask(const int32_t* child, int64_t K) {
  uint64_t m = 0;
  int64_t j = 0;
  for (; j + kLanes <= K; j += kLanes) m |= uint64_t(allocated_mask16(child + j)) << j;
  for (; j < K; ++j) m |= uint64_t(child[j] >= 0) << j;
  return m;
}

// The set bits of m (increasing) plus `offset` into out[n, ...]; returns the new count.
inline int list_bits(uint64_t m, int64_t offset, int n, int32_t* out) {
  for (; m != 0; m &= m - 1) out[n++] = int32_t(offset + __builtin_ctzll(m));
  return n;
}

// The actions with a child, in increasing order, into out[0, limit]; returns their
// number, or limit + 1 once there are more than limit.  The child row is turned into a
// 64-bit mask per 64 actions (fixed-length loops), then its set bits are listed.
inline int allocated_actions(const int32_t* child, int64_t K, int limit, int32_t* out) {
  int n = 0;
  for (int64_t b0 = 0; b0 < K; b0 += 64) {
    const int64_t len = K - b0 < 64 ? K - b0 : 64;
    uint64_t m = 0;
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) m |= uint64_t(allocated_mask16(child + b0 + j)) << j;
    for (; j < len; ++j) m |= uint64_t(child[b0 + j] >= 0) << j;
    if (n + __builtin_popcountll(m) > limit) return limit + 1;
    n = list_bits(m, b0, n, out);
  }
  return n;
}

// The valid action without a child with the largest prior (lowest index on ties), from
// the memo or recomputed into it; kMemoNone when there is none, kMemoAmbiguous when some
// lower-indexed candidate's prior is within 2^-20 of it (or the prior is tiny but not 0),
// or some prior of the node is NaN.
int32_t best_unallocated(const View& t, const tree::SelectParams& p, const NodeRef& r) {
  const int32_t* ch = t.child + r.e;
  int32_t* slot = p.memo + r.base + r.s;
  uint64_t* kids = p.kids != nullptr ? p.kids + r.base + r.s : nullptr;
  const int32_t code = *slot;
  if (code >= 0 ? ch[code] < 0 : code != kMemoUnknown) return code;
  const int64_t K = t.K;
  if (kids != nullptr) *kids = children_mask(ch, K);
  const float* prior = t.prior + r.e;
  const uint8_t* inv = t.invalid + r.e;
  LaneArgmax best;
  NanFlag nan;
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vi16 cand = v_gt(splat(int32_t(0)), load16<vi16>(ch + a0)) & v_valid(inv + a0);
    const vf16 pr = load16<vf16>(prior + a0);
    best.update_at(v_sel(cand, pr, splat(-kInf)), int32_t(a0));
    nan.add(pr);
  }
  for (int64_t a = a0; a < K; ++a) {
    best.update(int(a - a0), ch[a] < 0 && !inv[a] ? prior[a] : -kInf, int32_t(a));
    nan.add(prior[a]);
  }
  const int64_t u = best.result();
  int32_t out = int32_t(u);
  if (nan.any()) {
    // a NaN prior (written by a low-level caller; expand writes none): its score wins
    // whenever it is the first valid action's, which may change as children are allocated
    // and become pending; the node is scored densely for the rest of the search
    out = kMemoAmbiguous;
  } else if (u < 0) {
    out = kMemoNone;
  } else {
    const float pu = prior[u];
    if (pu > 0.0f && pu < 1e-30f) out = kMemoAmbiguous;
    const float near = pu - pu * 0x1p-20f;
    // a lower-indexed candidate within 2^-20 of it (16 lanes at a time)
    vi16 hit = splat(int32_t(0));
    for (a0 = 0; a0 < u && a0 + kLanes <= K; a0 += kLanes)
      hit |= v_gt(splat(int32_t(0)), load16<vi16>(ch + a0)) & v_valid(inv + a0) &
             v_gt(splat(int32_t(u)), lane_ids() + int32_t(a0)) &
             v_ge(load16<vf16>(prior + a0), splat(near));
    bool any = false;
    for (int j = 0; j < kLanes; ++j) any |= hit[j] != 0;
    for (int64_t a = a0; a < u; ++a) any |= ch[a] < 0 && !inv[a] && prior[a] >= near;
    if (any) out = kMemoAmbiguous;
  }
  *slot = out;
  return out;
}

// The PUCT choice at node r by the sparse rule (see above), or kDense.
__attribute__((always_inline)) inline int64_t select_puct_sparse(const View& t, const tree::SelectParams& p, const NodeRef& r,
                           bool in_flight, float explore) {
  const int64_t K = t.K;
  const int32_t* ch = t.child + r.e;
  // Above a quarter of the actions (and 16) the dense pass is cheaper.
  constexpr int kMaxSparse = 64;
  int32_t kids[kMaxSparse];
  const int limit = int(K / 4 < 16 ? 16 : K / 4 > kMaxSparse ? kMaxSparse : K / 4);
  int nk;
  if (p.kids != nullptr && p.memo[r.base + r.s] != kMemoUnknown) {
    const uint64_t m = p.kids[r.base + r.s];  // the child row's mask (K <= 64)
    nk = __builtin_popcountll(m) > limit ? limit + 1 : list_bits(m, 0, 0, kids);
  } else {
    nk = allocated_actions(ch, K, limit, kids);
  }
  if (nk > limit) return kDense;
  const int32_t u = best_unallocated(t, p, r);
  if (u == kMemoAmbiguous) return kDense;
  const int32_t* ev = t.edge_visits + r.e;
  const float* eq = t.edge_q + r.e;
  const float* prior = t.prior + r.e;
  const uint8_t* inv = t.invalid + r.e;
  // Q bounds: the node's value and its visited children's Q (visited implies allocated)
  float lo = t.value[r.base + r.s], hi = lo;
  float kq[kMaxSparse], kn[kMaxSparse];
  for (int i = 0; i < nk; ++i) {
    const float qa = eq[kids[i]];
    const int32_t na = ev[kids[i]];
    kq[i] = qa;
    kn[i] = float(na);
    const bool vis = na > 0;
    lo = vis && qa < lo ? qa : lo;
    hi = vis && qa > hi ? qa : hi;
  }
  const bool normalise = tree::qnorm_bounds(t, p, r.b, &lo, &hi);
  const float d = hi - lo > 1e-8f ? hi - lo : 1e-8f;
  const float vl = p.virtual_loss;
  float best = -kInf, best_pending = -kInf;
  int64_t arg = -1, arg_pending = -1;
  bool finite_scores = true;
  for (int i = 0; i < nk; ++i) {
    const int32_t a = kids[i];
    if (inv[a]) continue;
    const float n = kn[i];
    const float qn = normalise ? (kq[i] - lo) / d : 0.0f;
    float s;
    bool pending = false;
    if (!in_flight) {
      s = puct_score_real(qn, prior[a], explore, n);
    } else {
      const int32_t c = ch[a];
      s = tree::puct_score(qn, prior[a], explore, n, vl * float(t.inflight[r.base + c]));
      pending = !(t.flags[r.base + c] & tree::kExpanded);
    }
    finite_scores &= s - s == 0.0f;
    if (pending) {
      if (s > best_pending) { best_pending = s; arg_pending = a; }
    } else if (s > best) {
      best = s;
      arg = a;
    }
  }
  if (!finite_scores) return kDense;
  if (u >= 0) {
    // n = 0, no virtual visits: puct_score_real(., prior, explore, 0) = explore * prior
    const float su = explore * prior[u];
    if (prior[u] > 0.0f && !(su >= 1e-30f)) return kDense;  // tiny products
    if (arg < 0 || su > best || (su == best && u < arg)) arg = u;
  }
  if (arg >= 0) return arg;
  return arg_pending >= 0 ? arg_pending : kDense;
}

// Index of the lowest set bit, 64 for none.
inline int lowest_bit(uint64_t m) {
#if defined(__BMI__)
  return int(_tzcnt_u64(m));
#else
  return m != 0 ? __builtin_ctzll(m) : 64;
#endif
}

// The sparse rule for the common case, in two halves without branches on the data: no
// simulation in flight, K <= 64, at most 4 allocated children, a memo entry that still
// names an unallocated action.  puct_small_a reads the node (children mask, memo) and says
// whether the case applies; puct_small_b scores (the children in increasing order, so the
// strict > keeps the lowest index on ties, as the scan does) and returns the choice or
// kDense (a non-finite or tiny score: another path decides).
struct SmallNode {
  uint64_t mask;
  int32_t code;
  float explore;
};

inline bool puct_small_a(const View& t, const tree::SelectParams& p, const NodeRef& r,
                         float explore, SmallNode& sn) {
  const int32_t code = p.memo[r.base + r.s];
  sn.code = code;
  sn.explore = explore;
  if (p.kids != nullptr) {
    // one word instead of the child row (valid once the memo entry is known: code != -2)
    const uint64_t m = p.kids[r.base + r.s];
    sn.mask = m;
    return (explore > 0.0f) & (explore < kInf) & (__builtin_popcountll(m) <= 4) &
           (code >= 0) && !((m >> code) & 1);
  }
  const int32_t* ch = t.child + r.e;
  const uint64_t m = children_mask(ch, t.K);
  sn.mask = m;
  return (explore > 0.0f) & (explore < kInf) & (__builtin_popcountll(m) <= 4) & (code >= 0) &&
         ch[code] < 0;
}

inline int64_t puct_small_b(const View& t, const tree::SelectParams& p, const NodeRef& r,
                            const SmallNode& sn) {
  const int32_t* ev = t.edge_visits + r.e;
  const float* eq = t.edge_q + r.e;
  const float* prior = t.prior + r.e;
  const uint8_t* inv = t.invalid + r.e;
  const float explore = sn.explore;
  uint64_t m = sn.mask;
  int32_t a[4];
  bool present[4];
  float n[4], q[4];
  float lo = t.value[r.base + r.s], hi = lo;
  for (int i = 0; i < 4; ++i) {
    const int bit = lowest_bit(m);
    m &= m - 1;
    present[i] = bit < 64;
    a[i] = present[i] ? bit : 0;  // a safe index for the absent ones (masked below)
    const int32_t na = ev[a[i]];
    n[i] = float(na);
    q[i] = eq[a[i]];
    const bool vis = present[i] & (na > 0);
    lo = vis && q[i] < lo ? q[i] : lo;
    hi = vis && q[i] > hi ? q[i] : hi;
  }
  const bool normalise = tree::qnorm_bounds(t, p, r.b, &lo, &hi);
  const float d = hi - lo > 1e-8f ? hi - lo : 1e-8f;
  // puct_score_real of the four, lane by lane (two divisions instead of eight)
  const vf4 nv = {n[0], n[1], n[2], n[3]};
  const vf4 pv = {prior[a[0]], prior[a[1]], prior[a[2]], prior[a[3]]};
  const vf4 qn = normalise ? (vf4{q[0], q[1], q[2], q[3]} - lo) / d : vf4{};
  const vf4 sv = (nv > 0.0f ? qn : vf4{}) + explore * pv / (nv + 1.0f);
  float best = -kInf;
  int32_t arg = -1;
  bool finite_scores = true;
  for (int i = 0; i < 4; ++i) {
    const float s = sv[i];
    const bool valid = present[i] & (inv[a[i]] == 0);
    finite_scores &= !valid | (s - s == 0.0f);
    const bool take = valid & (s > best);
    best = take ? s : best;
    arg = take ? a[i] : arg;
  }
  // the best unallocated action: n = 0, no virtual visits, score explore * prior
  const int32_t u = sn.code;
  const float pu = prior[u];
  const float su = explore * pu;
  if ((!finite_scores) | ((pu > 0.0f) & !(su >= 1e-30f))) return kDense;
  const bool take_u = (arg < 0) | (su > best) | ((su == best) & (u < arg));
  return take_u ? u : arg;
}

// scratch: 2 K floats.  The per-node terms (the Q bounds, c(s) sqrt(N(s))) are computed
// once, then one branch-free pass over the actions scores them (it vectorises).
int64_t select_puct(const View& t, const tree::SelectParams& p, const NodeRef& r,
                    bool in_flight, Scratch& scr) {
  const float explore = puct_explore(t, p, r, scr);
  if (p.memo != nullptr && explore > 0.0f && explore < kInf) {
    const int64_t a = select_puct_sparse(t, p, r, in_flight, explore);
    if (a != kDense) return a;
  }
  float* scratch = scr.k3.data();
  const int64_t K = t.K;
  const int32_t* ev = t.edge_visits + r.e;
  const float* eq = t.edge_q + r.e;
  const float* prior = t.prior + r.e;
  const uint8_t* inv = t.invalid + r.e;
  float lo, hi;
  visited_bounds(ev, eq, K, t.value[r.base + r.s], &lo, &hi);
  const bool normalise = tree::qnorm_bounds(t, p, r.b, &lo, &hi);
  float* sc = scratch;
  if (!in_flight) {
    // No virtual loss and no pending leaves (the first simulation of a step): scores with
    // the invalid actions at -inf and their first maximum in one pass.
    // (q - lo) / d as tree::min_max_normalise computes it, the denominator hoisted
    const float d = hi - lo > 1e-8f ? hi - lo : 1e-8f;
    LaneArgmax best;
    int64_t a0 = 0;
    for (; a0 + kLanes <= K; a0 += kLanes) {
      const vf16 n = __builtin_convertvector(load16<vi16>(ev + a0), vf16);
      const vf16 qn = normalise ? (load16<vf16>(eq + a0) - lo) / d : splat(0.0f);
      // puct_score_real, lane by lane
      const vf16 score = v_sel(v_gt(n, splat(0.0f)), qn, splat(0.0f)) +
                         explore * load16<vf16>(prior + a0) / (n + 1.0f);
      best.update_at(v_sel(v_valid(inv + a0), score, splat(-kInf)), int32_t(a0));
    }
    for (int64_t a = a0; a < K; ++a) {
      const float n = float(ev[a]);
      const float qn = normalise ? tree::min_max_normalise(eq[a], lo, hi) : 0.0f;
      const float score = puct_score_real(qn, prior[a], explore, n);
      best.update(int(a - a0), inv[a] ? -kInf : score, int32_t(a));
    }
    const int64_t f = first_valid(inv, K);
    if (f >= 0) {  // a NaN first valid score wins (the scan's rule)
      const float qf = normalise ? tree::min_max_normalise(eq[f], lo, hi) : 0.0f;
      const float sf = puct_score_real(qf, prior[f], explore, float(ev[f]));
      if (sf != sf) return f;
    }
    const int64_t a = best.result();
    if (a >= 0) return a;
    // every valid score is -inf (or no action is valid): the general rule
    for (int64_t b = 0; b < K; ++b) {
      const float qn = normalise ? tree::min_max_normalise(eq[b], lo, hi) : 0.0f;
      sc[b] = puct_score_real(qn, prior[b], explore, float(ev[b]));
    }
    return pick_scores(r, sc, false);
  }
  float* v = scratch + K;
  virtual_visits(r, p.virtual_loss, in_flight, v);
  for (int64_t a = 0; a < K; ++a) {
    const float n = float(ev[a]);
    const float qn = normalise ? tree::min_max_normalise(eq[a], lo, hi) : 0.0f;
    sc[a] = tree::puct_score(qn, prior[a], explore, n, v[a]);
  }
  return pick_scores(r, sc, in_flight);
}

// Completed, rescaled and scaled Q-values of a node (mctx qtransform_completed_by_mix_value)
// into sigma[K]; returns the sum of the real visits.
float gumbel_sigma(const View& t, const tree::SelectParams& p, const NodeRef& r, float* sigma) {
  const int64_t K = t.K;
  const int32_t* ev = t.edge_visits + r.e;
  const float* prior = t.prior + r.e;
  const float* eq = t.edge_q + r.e;
  // sums and maxima in 16 independent lanes (vectorised), then across the lanes
  int64_t a0 = 0;
#if defined(__AVX512F__) || !defined(__SSE4_1__)
  vf16 sn16 = splat(0.0f), mn16 = splat(0.0f), sp16 = splat(0.0f), sw16 = splat(0.0f);
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 n = __builtin_convertvector(load16<vi16>(ev + a0), vf16);
    vf16 pr = load16<vf16>(prior + a0);
    pr = v_sel(v_gt(pr, splat(kTiny)), pr, splat(kTiny));
    const vi16 vis = v_gt(n, splat(0.0f));
    sn16 += n;
    mn16 = v_sel(v_gt(n, mn16), n, mn16);
    sp16 = v_sel(vis, sp16 + pr, sp16);
    // pr * q + sw: one fused multiply-add where the ISA level has it, as the scalar form
    sw16 = v_sel(vis, pr * load16<vf16>(eq + a0) + sw16, sw16);
  }
#else
  // the same lane by lane in the parts (which stay in registers across the pass)
  const FParts zero = fparts(splat(0.0f)), tiny = fparts(splat(kTiny));
  FParts sn_p = zero, mn_p = zero, sp_p = zero, sw_p = zero;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const FParts n = fparts(__builtin_convertvector(load16<vi16>(ev + a0), vf16));
    const FParts pr0 = fparts(load16<vf16>(prior + a0));
    const FParts q = fparts(load16<vf16>(eq + a0));
    for (int k = 0; k < kParts; ++k) {
      const PF pr = p_sel(p_gt(pr0.p[k], tiny.p[k]), pr0.p[k], tiny.p[k]);
      const PF vis = p_gt(n.p[k], zero.p[k]);
      sn_p.p[k] = sn_p.p[k] + n.p[k];
      mn_p.p[k] = p_sel(p_gt(n.p[k], mn_p.p[k]), n.p[k], mn_p.p[k]);
      sp_p.p[k] = p_sel(vis, sp_p.p[k] + pr, sp_p.p[k]);
      sw_p.p[k] = p_sel(vis, pr * q.p[k] + sw_p.p[k], sw_p.p[k]);
    }
  }
  const vf16 sn16 = join<vf16>(sn_p), mn16 = join<vf16>(mn_p), sp16 = join<vf16>(sp_p),
             sw16 = join<vf16>(sw_p);
#endif
  float sn[kLanes], sp[kLanes], sw[kLanes];
  std::memcpy(sn, &sn16, sizeof(sn));
  std::memcpy(sp, &sp16, sizeof(sp));
  std::memcpy(sw, &sw16, sizeof(sw));
  float sum_n = 0, max_n = v_hmax(mn16), sum_p = 0, wq = 0;  // (visits: no -0)
  for (int j = 0; j < kLanes; ++j) {  // the sums in lane order
    sum_n += sn[j];
    sum_p += sp[j];
    wq += sw[j];
  }
  for (int64_t a = a0; a < K; ++a) {
    const float n = float(ev[a]);
    const float pr = prior[a] > kTiny ? prior[a] : kTiny;
    sum_n += n;
    max_n = n > max_n ? n : max_n;
    sum_p += n > 0 ? pr : 0.0f;
    wq += n > 0 ? pr * eq[a] : 0.0f;
  }
  const float raw = t.raw_value[r.base + r.s];
  const float v_mix = sum_n > 0 ? (raw + sum_n * (wq / sum_p)) / (sum_n + 1.0f) : raw;
  vf16 lo16 = splat(kInf), hi16 = splat(-kInf);
  for (a0 = 0; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 c = v_sel(v_gt(load16<vi16>(ev + a0), splat(int32_t(0))), load16<vf16>(eq + a0),
                         splat(v_mix));
    std::memcpy(sigma + a0, &c, sizeof(c));
    lo16 = v_sel(v_lt(c, lo16), c, lo16);
    hi16 = v_sel(v_gt(c, hi16), c, hi16);
  }
  // (across the lanes in log steps: of equal +0 / -0 either may come out, which changes
  // no value below: sigma only feeds sums with the logits before exp and comparisons)
  float lo = v_hmin(lo16), hi = v_hmax(hi16);
  for (int64_t a = a0; a < K; ++a) {
    const float c = ev[a] > 0 ? eq[a] : v_mix;
    sigma[a] = c;
    lo = c < lo ? c : lo;
    hi = c > hi ? c : hi;
  }
  const float scale = (p.maxvisit_init + max_n) * p.value_scale;
  for (int64_t a = 0; a < K; ++a) sigma[a] = scale * tree::min_max_normalise(sigma[a], lo, hi);
  return sum_n;
}

// Gumbel choices without simulations in flight (no virtual visits, nothing pending):
// those of the general code below, bit for bit, in 16-lane passes with the argmax fused.
// The sum of the visits is an integer sum (exact in float up to 2^24, where the general
// code's float sum is exact too); the softmax denominator keeps its sequential order.
int64_t gumbel_root_real(const View& t, const tree::SelectParams& p, const NodeRef& r,
                         const float* sigma, float* sc) {
  const int64_t K = t.K;
  const float* logit = t.logit + r.e;
  const int32_t* ev = t.edge_visits + r.e;
  const uint8_t* inv = t.invalid + r.e;
  vf16 mx16 = splat(-kInf);
  vi16 sim16 = splat(int32_t(0));
  int64_t a0 = 0;
#if defined(__AVX512F__) || !defined(__SSE4_1__)
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 lg = load16<vf16>(logit + a0);
    mx16 = v_sel(v_gt(lg, mx16), lg, mx16);
    sim16 += load16<vi16>(ev + a0);
  }
#else
  {
    FParts mx_p = fparts(mx16);
    IParts sim_p = iparts(sim16);
    for (; a0 + kLanes <= K; a0 += kLanes) {
      const FParts lg = fparts(load16<vf16>(logit + a0));
      const IParts n = iparts(load16<vi16>(ev + a0));
      for (int k = 0; k < kParts; ++k) {
        mx_p.p[k] = p_sel(p_gt(lg.p[k], mx_p.p[k]), lg.p[k], mx_p.p[k]);
        sim_p.p[k] = p_addi(sim_p.p[k], n.p[k]);
      }
    }
    mx16 = join<vf16>(mx_p);
    sim16 = join<vi16>(sim_p);
  }
#endif
  float max_logit = v_hmax(mx16);  // (+0 / -0: a centred logit of either sign)
  int64_t sim = 0;
  for (int j = 0; j < kLanes; ++j) sim += sim16[j];
  for (int64_t a = a0; a < K; ++a) {
    max_logit = logit[a] > max_logit ? logit[a] : max_logit;
    sim += ev[a];
  }
  if (sim >= p.table_len) sim = p.table_len - 1;
  const int32_t row = t.considered[r.b] < p.table_rows ? t.considered[r.b] : p.table_rows - 1;
  const int32_t want = t.table[int64_t(row) * p.table_len + sim];
  const float* g = t.gumbel + r.b * K;
  LaneArgmax best;
  for (a0 = 0; a0 + kLanes <= K; a0 += kLanes) {
    // tree::gumbel_root_score, lane by lane
    vf16 s = load16<vf16>(g + a0) + (load16<vf16>(logit + a0) - max_logit) +
             load16<vf16>(sigma + a0);
    s = v_sel(v_gt(s, splat(-1e9f)), s, splat(-1e9f));
    const vi16 ok = v_eq(load16<vi16>(ev + a0), splat(want)) & v_valid(inv + a0);
    s = v_sel(ok, s, splat(-kInf));
    std::memcpy(sc + a0, &s, sizeof(s));
    best.update_at(s, int32_t(a0));
  }
  for (int64_t a = a0; a < K; ++a) {
    const float score = tree::gumbel_root_score(g[a], logit[a] - max_logit, sigma[a], ev[a] == want);
    sc[a] = inv[a] ? -kInf : score;
    best.update(int(a - a0), sc[a], int32_t(a));
  }
  const int64_t f = first_valid(inv, K);
  if (f >= 0 && sc[f] != sc[f]) return f;  // a NaN first valid score wins (the scan's rule)
  const int64_t a = best.result();
  return a >= 0 ? a : pick_scores(r, sc, false);  // every valid score is -inf
}

// Interior, first part: the exponentials of the valid actions' logits + sigma (minus
// their maximum) into sc[K]; returns 1 + the sum of the valid actions' visits, or -1 when
// that sum is not exact in float (the general code then decides).
float gumbel_interior_exps(const View& t, const NodeRef& r, const float* sigma, float* sc) {
  const int64_t K = t.K;
  const float* logit = t.logit + r.e;
  const int32_t* ev = t.edge_visits + r.e;
  const uint8_t* inv = t.invalid + r.e;
  vf16 zm16 = splat(-kInf);
  vi16 tot16 = splat(int32_t(0));
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vi16 ok = v_valid(inv + a0);
    const vf16 z = load16<vf16>(logit + a0) + load16<vf16>(sigma + a0);
    zm16 = v_sel(ok & v_gt(z, zm16), z, zm16);
    tot16 += ok & load16<vi16>(ev + a0);
  }
  float zmax = v_hmax(zm16);  // (+0 / -0: exp(z - zmax) is the same)
  int64_t tot = 0;
  for (int j = 0; j < kLanes; ++j) tot += tot16[j];
  for (int64_t a = a0; a < K; ++a) {
    const float z = logit[a] + sigma[a];
    zmax = !inv[a] && z > zmax ? z : zmax;
    tot += inv[a] ? 0 : ev[a];
  }
  if (tot >= (int64_t(1) << 24)) return -1.0f;  // the general code's sum would round
  for (int64_t a = 0; a < K; ++a) sc[a] = inv[a] ? 0.0f : rlfuse::vexp(logit[a] + sigma[a] - zmax);
  return 1.0f + float(tot);
}

// The softmax denominator, in the order of the general code.
inline float sequential_sum(const float* x, int64_t K) {
  float s = 0;
  for (int64_t a = 0; a < K; ++a) s += x[a];
  return s;
}

// Interior, last part: scores sc[a] / zsum - N(a) / den over the valid actions, argmax.
int64_t gumbel_interior_pick(const View& t, const NodeRef& r, float* sc, float zsum, float den) {
  const int64_t K = t.K;
  const int32_t* ev = t.edge_visits + r.e;
  const uint8_t* inv = t.invalid + r.e;
  LaneArgmax best;
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 n = __builtin_convertvector(load16<vi16>(ev + a0), vf16);
    vf16 s = load16<vf16>(sc + a0) / zsum - n / den;
    s = v_sel(v_valid(inv + a0), s, splat(-kInf));
    std::memcpy(sc + a0, &s, sizeof(s));
    best.update_at(s, int32_t(a0));
  }
  for (int64_t a = a0; a < K; ++a) {
    const float score = sc[a] / zsum - float(ev[a]) / den;
    sc[a] = inv[a] ? -kInf : score;
    best.update(int(a - a0), sc[a], int32_t(a));
  }
  const int64_t f = first_valid(inv, K);
  if (f >= 0 && sc[f] != sc[f]) return f;  // a NaN first valid score wins (the scan's rule)
  const int64_t a = best.result();
  return a >= 0 ? a : pick_scores(r, sc, false);  // every valid score is -inf
}

int64_t gumbel_interior_real(const View& t, const NodeRef& r, const float* sigma, float* sc) {
  const float den = gumbel_interior_exps(t, r, sigma, sc);
  if (den < 0.0f) return -2;
  return gumbel_interior_pick(t, r, sc, sequential_sum(sc, t.K), den);
}

// scratch: 3 K floats (sigma, virtual visits, scores).
int64_t select_gumbel(const View& t, const tree::SelectParams& p, const NodeRef& r, bool root,
                      bool in_flight, float* scratch) {
  const int64_t K = t.K;
  float* sigma = scratch;
  float* v = scratch + K;
  float* sc = scratch + 2 * K;
  const float vl = p.virtual_loss;
  gumbel_sigma(t, p, r, sigma);
  const float* logit = t.logit + r.e;
  const int32_t* ev = t.edge_visits + r.e;
  const uint8_t* inv = t.invalid + r.e;
  if (root) {
    // Sequential halving: the simulation index is the number of root visits taken so far,
    // in-flight ones included.
    if (!in_flight) return gumbel_root_real(t, p, r, sigma, sc);
    virtual_visits(r, 1.0f, in_flight, v);  // in-flight simulations per action
    float max_logit = -kInf;
    int64_t sim = 0;
    for (int64_t a = 0; a < K; ++a) {
      max_logit = logit[a] > max_logit ? logit[a] : max_logit;
      sim += ev[a] + int32_t(v[a]);
    }
    if (sim >= p.table_len) sim = p.table_len - 1;
    const int32_t row = t.considered[r.b] < p.table_rows ? t.considered[r.b] : p.table_rows - 1;
    const int32_t want = t.table[int64_t(row) * p.table_len + sim];
    const float* g = t.gumbel + r.b * K;
    for (int64_t a = 0; a < K; ++a) {
      const float score = tree::gumbel_root_score(g[a], logit[a] - max_logit, sigma[a],
                                                  ev[a] + int32_t(v[a]) == want);
      sc[a] = inv[a] ? -kInf : score;
    }
    return in_flight ? pick_scores(r, sc, true) : pick_masked(r, sc);
  }
  // Interior: argmax softmax(logits + sigma) - N(a) / (1 + sum N), over valid actions.
  if (!in_flight) {
    const int64_t a = gumbel_interior_real(t, r, sigma, sc);
    if (a != -2) return a;
  }
  virtual_visits(r, vl, in_flight, v);
  float zmax = -kInf, total = 0;
  for (int64_t a = 0; a < K; ++a) {
    const float z = logit[a] + sigma[a];
    zmax = !inv[a] && z > zmax ? z : zmax;
    total += inv[a] ? 0.0f : float(ev[a]) + v[a];
  }
  for (int64_t a = 0; a < K; ++a) sc[a] = inv[a] ? 0.0f : rlfuse::vexp(logit[a] + sigma[a] - zmax);
  float zsum = 0;
  for (int64_t a = 0; a < K; ++a) zsum += sc[a];
  for (int64_t a = 0; a < K; ++a) {
    const float score = sc[a] / zsum - (float(ev[a]) + v[a]) / (1.0f + total);
    sc[a] = inv[a] ? -kInf : score;
  }
  return in_flight ? pick_scores(r, sc, true) : pick_masked(r, sc);
}

// One simulation's walk from the root; step() advances it by one node.
struct Walk {
  int64_t b, o;      // tree, output row
  int32_t* path;
  int32_t len, s;    // path length, current node
  int depth;
  int64_t act;
  bool is_new;
};

inline void start_walk(const tree::SelectParams& p, Walk& w, int64_t b, int64_t sim) {
  w.b = b;
  w.o = b * p.W + sim;
  w.path = p.out_path + w.o * (int64_t(p.max_depth) + 1);
  w.path[0] = 0;
  w.len = 1;
  w.s = 0;
  w.depth = 0;
  w.act = -1;
  w.is_new = false;
}

// Ask for the rows that the choice at node n of tree b will read (the first 64 actions).
inline void prefetch_node(const View& t, const tree::SelectParams& p, int64_t b, int32_t n) {
  const int64_t i = b * t.N + n, e = i * t.K;
  const int64_t K = t.K < 4 * kLanes ? t.K : 4 * kLanes;
  for (int64_t a = 0; a < K; a += kLanes) {
    __builtin_prefetch(t.child + e + a);
    __builtin_prefetch(t.edge_visits + e + a);
    __builtin_prefetch(t.edge_q + e + a);
    __builtin_prefetch(t.prior + e + a);
    if (p.rule == tree::kGumbel) __builtin_prefetch(t.logit + e + a);
  }
  for (int64_t a = 0; a < K; a += 4 * kLanes) __builtin_prefetch(t.invalid + e + a);
  __builtin_prefetch(t.visits + i);
  __builtin_prefetch(t.inflight + i);
  if (p.rule == tree::kGumbel) {
    __builtin_prefetch(t.raw_value + i);
  } else {
    __builtin_prefetch(t.value + i);
    if (p.memo != nullptr) __builtin_prefetch(p.memo + i);
  }
}

// One node of walk w: choose, allocate or follow.  Returns 0 (go on), 1 (the walk is
// finished: its outputs are written) or a Status (negated).
inline int advance(const View& t, const tree::SelectParams& p, Walk& w, const NodeRef& r,
                   int64_t a);

inline int step(const View& t, const tree::SelectParams& p, Walk& w, bool in_flight,
                Scratch& scratch) {
  const NodeRef r(t, w.b, w.s);
  const int64_t a = p.rule == tree::kGumbel
                        ? select_gumbel(t, p, r, w.depth == 0, in_flight, scratch.k3.data())
                        : select_puct(t, p, r, in_flight, scratch);
  return advance(t, p, w, r, a);
}

// Walk w takes action a at node r: allocate or follow; 0, 1 or a negated Status as step().
inline int advance(const View& t, const tree::SelectParams& p, Walk& w, const NodeRef& r,
                   int64_t a) {
  if (a < 0) return -tree::kNoValidAction;  // the root lost its valid actions
  w.act = a;
  int32_t c = t.child[r.e + a];
  if (c < 0) {
    c = tree::allocate_node(t, w.b, w.s, a);
    if (c < 0) return -tree::kTreeFull;
    if (p.kids != nullptr) p.kids[r.base + r.s] |= uint64_t(1) << a;
    w.is_new = true;
  }
  w.path[w.len++] = c;
  const uint8_t f = t.flags[r.base + c];
  if (w.is_new || !(f & tree::kExpanded) || (f & tree::kTerminal) || w.depth + 1 >= p.max_depth) {
    tree::finish_walk(t, p, w.b, w.o, w.path, w.len, w.act, w.is_new);
    return 1;
  }
  w.s = c;
  ++w.depth;
  return 0;
}

// One tree, W simulations.  Returns a Status.
int select_tree(const View& t, const tree::SelectParams& p, int64_t b, Scratch& scratch) {
  for (int64_t sim = 0; sim < p.W; ++sim) {
    Walk w;
    start_walk(p, w, b, sim);
    const bool in_flight = sim > 0;  // earlier simulations of this step hold virtual loss
    int rc;
    while ((rc = step(t, p, w, in_flight, scratch)) == 0) {
    }
    if (rc < 0) return -rc;
  }
  return tree::kOk;
}

constexpr int kMaxGroup = 64;

// PUCT walks without simulations in flight (K <= 64, with the memo), advanced in lockstep
// and each node in stages across the walks (read the node; score; advance), so that the
// dependent loads and arithmetic of the walks overlap.  The choices are those of step().
void puct_walks(const View& t, const tree::SelectParams& p, Walk* walks, int n, Scratch& scratch,
                int* codes) {
  SmallNode sn[kMaxGroup];
  bool small[kMaxGroup];
  while (n > 0) {
    for (int i = 0; i < n; ++i) {
      const NodeRef r(t, walks[i].b, walks[i].s);
      small[i] = puct_small_a(t, p, r, puct_explore(t, p, r, scratch), sn[i]);
    }
    for (int i = 0; i < n;) {
      Walk& w = walks[i];
      const NodeRef r(t, w.b, w.s);
      int64_t a = small[i] ? puct_small_b(t, p, r, sn[i]) : kDense;
      if (a == kDense) a = select_puct(t, p, r, false, scratch);
      const int rc = advance(t, p, w, r, a);
      if (rc == 0) {
        ++i;
        continue;
      }
      if (rc < 0) codes[w.b] = -rc;
      --n;  // finished: the last walk takes its place (with its first stage)
      walks[i] = walks[n];
      sn[i] = sn[n];
      small[i] = small[n];
    }
  }
}

// Gumbel walks without simulations in flight, advanced in lockstep and each node in
// stages (completed Q; root choice or the exponentials; the softmax denominators of four
// walks in one loop; scores and argmax): the long chains of dependent arithmetic of the
// interior rule (sequential sums) run four at a time.  The choices are those of step().
void gumbel_walks(const View& t, const tree::SelectParams& p, Walk* walks, int n,
                  Scratch& scratch, int* codes) {
  const int64_t K = t.K;
  float* buf = scratch.walks.data();  // per walk: sigma [K], scores [K]; a zero row at the end
  const float* zero = buf + (scratch.walks.size() - size_t(K));
  int64_t act[kMaxGroup];
  float den[kMaxGroup], zsum[kMaxGroup];
  while (n > 0) {
    for (int i = 0; i < n; ++i) {
      const Walk& w = walks[i];
      const NodeRef r(t, w.b, w.s);
      float* sigma = buf + int64_t(i) * 2 * K;
      gumbel_sigma(t, p, r, sigma);
      if (w.depth == 0) {
        act[i] = gumbel_root_real(t, p, r, sigma, sigma + K);
        den[i] = 0.0f;  // decided
      } else {
        den[i] = gumbel_interior_exps(t, r, sigma, sigma + K);
        if (den[i] < 0.0f) {  // the general rule
          act[i] = select_gumbel(t, p, r, false, false, scratch.k3.data());
          den[i] = 0.0f;
        }
      }
    }
    // the sequential sums of up to four walks side by side (each in its own order)
    for (int i0 = 0; i0 < n; i0 += 4) {
      const float* x[4];
      for (int k = 0; k < 4; ++k)
        x[k] = i0 + k < n && den[i0 + k] > 0.0f ? buf + int64_t(i0 + k) * 2 * K + K : zero;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t a = 0; a < K; ++a) {
        s0 += x[0][a];
        s1 += x[1][a];
        s2 += x[2][a];
        s3 += x[3][a];
      }
      const float sums[4] = {s0, s1, s2, s3};
      for (int k = 0; k < 4 && i0 + k < n; ++k) zsum[i0 + k] = sums[k];
    }
    for (int i = 0; i < n;) {
      Walk& w = walks[i];
      const NodeRef r(t, w.b, w.s);
      const int64_t a = den[i] > 0.0f
                            ? gumbel_interior_pick(t, r, buf + int64_t(i) * 2 * K + K, zsum[i], den[i])
                            : act[i];
      const int rc = advance(t, p, w, r, a);
      if (rc == 0) {
        prefetch_node(t, p, w.b, w.s);
        ++i;
        continue;
      }
      if (rc < 0) codes[w.b] = -rc;
      --n;  // finished: the last walk takes its place (with its stage results)
      walks[i] = walks[n];
      act[i] = act[n];
      den[i] = den[n];
      zsum[i] = zsum[n];
      if (i < n) std::memcpy(buf + int64_t(i) * 2 * K, buf + int64_t(n) * 2 * K, 2 * K * sizeof(float));
    }
  }
}

// Trees [b0, b1), W simulations each, their walks advanced in lockstep (one node of each
// walk in turn, the next node's rows prefetched), so that the memory accesses and the
// dependent arithmetic of one walk overlap those of the others.  Simulation `sim` of every
// tree runs after simulation sim - 1 of that tree has finished, as in select_tree; trees
// are independent, so the choices are those of select_tree.  codes[b] gets the Status.
void select_trees(const View& t, const tree::SelectParams& p, int64_t b0, int64_t b1,
                  Scratch& scratch, int* codes) {
  Walk walks[kMaxGroup];
  for (int64_t sim = 0; sim < p.W; ++sim) {
    const bool in_flight = sim > 0;
    int n = 0;
    for (int64_t b = b0; b < b1; ++b)
      if (codes[b] == tree::kOk) start_walk(p, walks[n++], b, sim);
    if (p.rule == tree::kGumbel && !in_flight) {
      gumbel_walks(t, p, walks, n, scratch, codes);
      continue;
    }
    if (p.rule == tree::kPuct && !in_flight && p.memo != nullptr && t.K <= 64) {
      puct_walks(t, p, walks, n, scratch, codes);
      continue;
    }
    while (n > 0) {
      for (int i = 0; i < n;) {
        Walk& w = walks[i];
        const int rc = step(t, p, w, in_flight, scratch);
        if (rc == 0) {
          prefetch_node(t, p, w.b, w.s);
          ++i;
          continue;
        }
        if (rc < 0) codes[w.b] = -rc;
        walks[i] = walks[--n];  // finished: the last walk takes its place
      }
    }
  }
}

inline bool finite(float x) { return std::fabs(x) <= std::numeric_limits<float>::max(); }

}  // namespace

int tree_select(const View& t, const tree::SelectParams& p, int nt, int64_t* where) {
  std::vector<int> codes(size_t(t.B), tree::kOk);
#pragma omp parallel num_threads(nt)
  {
    // N(s) <= capacity + (the visits a kept root brought along): the cache covers 2 N, up
    // to 4096 entries (it is filled afresh by every call; larger N(s) are computed)
    const int64_t G = p.group < kMaxGroup ? p.group : kMaxGroup;
    Scratch scratch(t.K, p.rule == tree::kPuct ? (2 * t.N + 2 < 4096 ? 2 * t.N + 2 : 4096) : 0,
                    p.rule == tree::kGumbel && G > 1 ? G : 0);
    if (G <= 1) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < t.B; ++b) codes[size_t(b)] = select_tree(t, p, b, scratch);
    } else {
#pragma omp for schedule(static)
      for (int64_t b0 = 0; b0 < t.B; b0 += G)
        select_trees(t, p, b0, b0 + G < t.B ? b0 + G : t.B, scratch, codes.data());
    }
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

namespace {

// Expand, first part for row m: checks (false: a non-finite output), the invalid mask,
// the exponentials of the valid logits (minus their maximum) into the prior row; *valid
// gets the number of valid actions.
bool expand_exps(const View& t, const tree::ExpandInputs& in, int64_t m, int64_t e, int* valid) {
  const int64_t K = t.K;
  const float* lg = in.logits + m * K;
  const uint8_t* inv = in.invalid != nullptr ? in.invalid + m * K : nullptr;
  const bool ok = finite(in.reward[m]) && finite(in.discount[m]) && finite(in.value[m]);
  int bad_logit = 0;  // NaN or +inf (branch-free, so that it vectorises)
  for (int64_t a = 0; a < K; ++a) bad_logit |= int(!(lg[a] < kInf));
  if (!ok || bad_logit) return false;
  // Softmax over the valid actions (invalid: masked, or a -inf logit).
  uint8_t* tinv = t.invalid + e;
  vf16 mx16 = splat(-kInf);
  vi16 nv16 = splat(int32_t(0));
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    const vf16 x = load16<vf16>(lg + a0);
    vi16 bad = x == -kInf;
    if (inv != nullptr) bad |= __builtin_convertvector(load16<vb16>(inv + a0), vi16) != 0;
    const vb16 b8 = __builtin_convertvector(bad & 1, vb16);
    std::memcpy(tinv + a0, &b8, sizeof(b8));
    nv16 += bad + 1;  // 1 - bad (bad is -1 or 0)
    mx16 = (~bad & (x > mx16)) ? x : mx16;
  }
  float mx = -kInf;
  int nvalid = 0;
  for (int j = 0; j < kLanes; ++j) {
    mx = mx16[j] > mx ? mx16[j] : mx;
    nvalid += nv16[j];
  }
  for (int64_t a = a0; a < K; ++a) {
    const uint8_t bad = ((inv != nullptr && inv[a]) || lg[a] == -kInf) ? 1 : 0;
    tinv[a] = bad;
    nvalid += 1 - bad;
    mx = !bad && lg[a] > mx ? lg[a] : mx;
  }
  float* pr = t.prior + e;
  for (int64_t a = 0; a < K; ++a) pr[a] = tinv[a] ? 0.0f : rlfuse::vexp(lg[a] - mx);
  *valid = nvalid;
  return true;
}

// Expand, last part for row m: the prior (exponentials / their sum), the logits, fresh
// edges, the node's fields.
void expand_finish(const View& t, const tree::ExpandInputs& in, int64_t m, int64_t base,
                   int64_t n, int64_t e, int valid, float sum) {
  const int64_t K = t.K;
  float* pr = t.prior + e;
  const float inv_sum = valid > 0 ? 1.0f / sum : 0.0f;
  for (int64_t a = 0; a < K; ++a) pr[a] *= inv_sum;
  const float* lg = in.logits + m * K;
  // the logits and fresh edges in 16-lane stores (rows of a few hundred bytes: libc's
  // memcpy / memset calls cost more than the stores)
  // (the row pointers in locals: the stores could alias the view's fields, which the
  // compiler would then reload on every iteration)
  float* __restrict logit = t.logit + e;
  int32_t* __restrict child = t.child + e;
  int32_t* __restrict ev = t.edge_visits + e;
  float* __restrict evalue = t.edge_value + e;
  float* __restrict eq = t.edge_q + e;
  float* __restrict reward = t.reward + e;
  float* __restrict discount = t.discount + e;
  const vi16 none = splat(int32_t(-1)), zero = splat(int32_t(0));
  int64_t a0 = 0;
  for (; a0 + kLanes <= K; a0 += kLanes) {
    std::memcpy(logit + a0, lg + a0, sizeof(vf16));
    std::memcpy(child + a0, &none, sizeof(vi16));
    std::memcpy(ev + a0, &zero, sizeof(vi16));
    std::memcpy(evalue + a0, &zero, sizeof(vi16));
    std::memcpy(eq + a0, &zero, sizeof(vi16));
    std::memcpy(reward + a0, &zero, sizeof(vi16));
    std::memcpy(discount + a0, &zero, sizeof(vi16));
  }
  for (int64_t a = a0; a < K; ++a) {
    logit[a] = lg[a];
    child[a] = -1;
    ev[a] = 0;
    evalue[a] = 0.0f;
    eq[a] = 0.0f;
    reward[a] = 0.0f;
    discount[a] = 0.0f;
  }
  tree::expand_node_fields(t, in, m, base, n, valid);
}

}  // namespace

// Rows in groups of four: the exponentials of each row, then the four softmax sums
// (sequential, each in its own order) side by side, then the rest of each row.
int tree_expand(const View& t, const tree::ExpandInputs& in, int nt, int64_t* where) {
  const int64_t K = t.K, N = t.N, M = in.M;
  int64_t first_bad = M;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(min : first_bad)
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    int64_t row[4], e[4];
    int valid[4];
    int nr = 0;
    // ask for the next group's edge rows, for writing (they were last touched in an
    // earlier search: each store would otherwise wait for its line)
    for (int64_t m = m0 + 4; m < m0 + 8 && m < M; ++m) {
      if (!in.is_new[m]) continue;
      const int64_t pe = ((m / in.W) * N + in.node[m]) * K;
      for (int64_t a = 0; a < K; a += kLanes) {
        __builtin_prefetch(t.logit + pe + a, 1);
        __builtin_prefetch(t.prior + pe + a, 1);
        __builtin_prefetch(t.child + pe + a, 1);
        __builtin_prefetch(t.edge_visits + pe + a, 1);
        __builtin_prefetch(t.edge_value + pe + a, 1);
        __builtin_prefetch(t.edge_q + pe + a, 1);
        __builtin_prefetch(t.reward + pe + a, 1);
        __builtin_prefetch(t.discount + pe + a, 1);
      }
      for (int64_t a = 0; a < K; a += 4 * kLanes) __builtin_prefetch(t.invalid + pe + a, 1);
    }
    for (int64_t m = m0; m < m0 + 4 && m < M; ++m) {
      if (!in.is_new[m]) continue;
      const int64_t base = (m / in.W) * N;
      e[nr] = (base + in.node[m]) * K;
      if (!expand_exps(t, in, m, e[nr], &valid[nr])) {
        first_bad = m < first_bad ? m : first_bad;
        continue;
      }
      row[nr++] = m;
    }
    if (nr == 0) continue;
    const float* x[4];
    for (int k = 0; k < 4; ++k) x[k] = t.prior + e[k < nr ? k : 0];
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t a = 0; a < K; ++a) {
      s0 += x[0][a];
      s1 += x[1][a];
      s2 += x[2][a];
      s3 += x[3][a];
    }
    const float sums[4] = {s0, s1, s2, s3};
    for (int k = 0; k < nr; ++k) {
      const int64_t m = row[k];
      const int64_t base = (m / in.W) * N;
      expand_finish(t, in, m, base, in.node[m], e[k], valid[k], sums[k]);
    }
  }
  *where = first_bad;
  return first_bad < M ? tree::kNotFinite : tree::kOk;
}

namespace {

// tree::backup_tree with the child's new mean carried in a register from one edge to the
// next (backup_tree reads it back from memory, which the compiler cannot forward past the
// other arrays' stores); the same operations in the same order.
void backup_tree_cpu(const View& t, const tree::BackupInputs& in, int64_t b) {
  const int64_t N = t.N, K = t.K, W = in.W, D = in.path_stride;
  const int64_t base = b * N;
  float* __restrict value = t.value + base;
  int32_t* __restrict visits = t.visits + base;
  int32_t* __restrict inflight = t.inflight + base;
  const int32_t* __restrict action = t.action + base;
  const float* __restrict reward = t.reward;
  const float* __restrict discount = t.discount;
  int32_t* __restrict edge_visits = t.edge_visits;
  float* __restrict edge_value = t.edge_value;
  float* __restrict edge_q = t.edge_q;
  float lo = t.minmax[2 * b], hi = t.minmax[2 * b + 1];
  for (int64_t w = 0; w < W; ++w) {
    const int32_t* path = in.path + (b * W + w) * D;
    const int32_t len = in.len[b * W + w];
    if (len < 2) continue;  // no walk (as tree::backup_tree)
    const int32_t leaf = path[len - 1];
    float g = t.raw_value[base + leaf];
    float cnt = float(visits[leaf]);
    float v = value[leaf] + (g - value[leaf]) / (cnt + 1.0f);
    value[leaf] = v;
    visits[leaf] += 1;
    inflight[leaf] -= 1;
    for (int32_t i = len - 1; i >= 1; --i) {
      const int32_t c = path[i], s = path[i - 1];
      const int64_t pe = (base + s) * K + action[c];
      const float r = reward[pe], d = discount[pe];
      g = r + d * g;
      cnt = float(visits[s]);
      const float vs = value[s] + (g - value[s]) / (cnt + 1.0f);
      value[s] = vs;
      visits[s] += 1;
      inflight[s] -= 1;
      edge_visits[pe] += 1;
      edge_value[pe] = v;  // the child's mean, updated just before
      const float q = r + d * v;
      edge_q[pe] = q;
      lo = q < lo ? q : lo;
      hi = q > hi ? q : hi;
      v = vs;
    }
  }
  t.minmax[2 * b] = lo;
  t.minmax[2 * b + 1] = hi;
}

}  // namespace

int tree_backup(const View& t, const tree::BackupInputs& in, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < t.B; ++b) backup_tree_cpu(t, in, b);
  return tree::kOk;
}

void tree_subtree(const View& src, const View& dst, const int64_t* actions, int32_t* src_of,
                  int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < src.B; ++b) tree::subtree_tree(src, dst, actions, src_of, b);
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
