// The sampling of a decoding step from raw logits, fused (DecodeLoop.step_logits in
// kvpack_api.cpp): per row, the next token drawn from softmax(x / T) at one uniform draw
// u, and its log-prob under the raw logits (log softmax(x)).
//
// Per row, in 16-lane chunks (the row's tail chunk padded with -inf):
//   m = max x (the max of x / T is m / T, T > 0);
//   e_i = 2^((x_i - m) log2(e) / T) (vexp2_nonpos's polynomial), exactly 0 below 2^-126
//   (so -inf logits have probability 0), stored ONCE in a per-thread scratch row, with
//   each chunk's sum (a fixed pairwise tree over its lanes);
//   S = the chunk sums added in order in double; target = u S;
//   the token: the first chunk whose running sum exceeds target, then the first index
//   inside it whose running sum (the same double chain, element by element) exceeds
//   target (searchsorted right=True semantics over the stored e).  Should rounding (the
//   chunk's tree sum against its element chain, or u close to 1) leave no such index, the
//   last index with e > 0 (in that chunk, else in the row) is taken: never a token of
//   probability 0, and a draw of exactly 0 picks the first token with e > 0;
//   lp = (x_tok - m) - log S when T == 1; otherwise a second pass sums 2^((x_i - m)
//   log2(e)) (the raw distribution) for the log-sum-exp.
// A stopped row (done) gets the pad id and log-prob 0 without its logits being read.  A
// live row without a finite maximum (all -inf, or +inf / NaN only) gets V - 1 and a NaN
// log-prob, as token_logprobs gives; a row with NaN among finite logits has a NaN sum and
// gets the fallback token (the last one with a finite e) and a NaN log-prob.  The caller
// keeps T in [1e-30, 1e30], where the scale log2(e) / T is a normal float.
//
// Rows are independent (one thread owns a row), so the results do not depend on the
// number of threads.  Compiled once per ISA level: a chunk is one AVX-512 register (v4) or
// two AVX2 registers (v3), in intrinsics; plain 16-lane loops elsewhere (v2).
#include "rlfuse/common.h"
#include "sample.h"

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

constexpr int kL = 16;  // lane_max16 in common.h assumes 16
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__)
// Logits i .. i + 16 of the row (those past V: -inf), one masked load.
inline __m512 load_chunk(const float* x, int64_t i, int64_t V) {
  if (i + kL <= V) return _mm512_loadu_ps(x + i);
  const __mmask16 k = static_cast<__mmask16>((1u << (V - i)) - 1u);
  return _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), k, x + i);
}
#elif defined(__AVX2__) && defined(__FMA__)
// Logits i .. i + 8 of the row (those past V: -inf), one masked load.
inline __m256 load_chunk8(const float* x, int64_t i, int64_t V) {
  if (i + 8 <= V) return _mm256_loadu_ps(x + i);
  const int n = i < V ? static_cast<int>(V - i) : 0;
  const __m256i k = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_maskload_ps(x + i, k),
                          _mm256_castsi256_ps(k));
}
#endif

inline float row_max(const float* x, int64_t V) {
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(kNegInf);
  for (int64_t i = 0; i < V; i += kL) mv = _mm512_max_ps(load_chunk(x, i, V), mv);
  return _mm512_reduce_max_ps(mv);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a = _mm256_set1_ps(kNegInf), b = a;
  for (int64_t i = 0; i < V; i += kL) {
    a = _mm256_max_ps(load_chunk8(x, i, V), a);
    b = _mm256_max_ps(load_chunk8(x, i + 8, V), b);
  }
  float lane[8];
  _mm256_storeu_ps(lane, _mm256_max_ps(a, b));
  float m = kNegInf;
  for (int j = 0; j < 8; ++j) m = lane[j] > m ? lane[j] : m;
  return m;
#else
  float lane[kL];
  for (int j = 0; j < kL; ++j) lane[j] = kNegInf;
  int64_t i = 0;
  for (; i + kL <= V; i += kL) lane_max16(lane, x + i);
  float m = kNegInf;
  for (int j = 0; j < kL; ++j) m = lane[j] > m ? lane[j] : m;
  for (; i < V; ++i) m = x[i] > m ? x[i] : m;
  return m;
#endif
}

// One chunk of 16 logits (the row's tail padded with -inf): a pointer into the row when
// the chunk is whole, else v.
inline const float* chunk_at(const float* x, int64_t i, int64_t V, float* v) {
  if (i + kL <= V) return x + i;
  for (int j = 0; j < kL; ++j) v[j] = i + j < V ? x[i + j] : kNegInf;
  return v;
}

// 2^w for w <= 0, exactly 0 where w < -126 (-inf logits); NaN stays NaN.  The same
// polynomial as vexp2_nonpos in common.h, written with the ISA's intrinsics (GCC does
// not vectorise the chunk loops below well by itself).
#if defined(__AVX512F__)
inline __m512 exp2_16(__m512 w) {
  const __m512 lo = _mm512_set1_ps(-126.0f), sh = _mm512_set1_ps(12582912.0f);
  const __m512 u = _mm512_max_ps(lo, w);  // (NaN w: w)
  const __m512 t = _mm512_add_ps(u, sh);
  const __m512 f = _mm512_sub_ps(u, _mm512_sub_ps(t, sh));
  __m512 p = _mm512_set1_ps(1.535336196e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887502e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618436918e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332367e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264774e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __m512i n = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(sh));
  const __m512 sc = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_add_epi32(n, _mm512_set1_epi32(127)), 23));
  const __mmask16 keep = _mm512_cmp_ps_mask(w, lo, _CMP_NLT_UQ);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, sc));
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 exp2_8(__m256 w) {
  const __m256 lo = _mm256_set1_ps(-126.0f), sh = _mm256_set1_ps(12582912.0f);
  const __m256 u = _mm256_max_ps(lo, w);
  const __m256 t = _mm256_add_ps(u, sh);
  const __m256 f = _mm256_sub_ps(u, _mm256_sub_ps(t, sh));
  __m256 p = _mm256_set1_ps(1.535336196e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887502e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618436918e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332367e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264774e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471825e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i n = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(sh));
  const __m256 sc = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
  const __m256 keep = _mm256_cmp_ps(w, lo, _CMP_NLT_UQ);
  return _mm256_and_ps(keep, _mm256_mul_ps(p, sc));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
inline float exp2_1(float w) {
  const float p = vexp2_nonpos(w);  // (clamps at -126; NaN stays NaN)
  return w < -126.0f ? 0.0f : p;
}
#endif

// e[0:16) = 2^((x[i:i+16) - m) c) (past V: 0); returns their sum.
inline float exp_chunk(const float* __restrict x, int64_t i, int64_t V, float m, float c,
                       float* __restrict e) {
#if defined(__AVX512F__)
  const __m512 w = _mm512_mul_ps(_mm512_sub_ps(load_chunk(x, i, V), _mm512_set1_ps(m)),
                                 _mm512_set1_ps(c));
  const __m512 p = exp2_16(w);
  _mm512_storeu_ps(e, p);
  return _mm512_reduce_add_ps(p);
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 mv = _mm256_set1_ps(m), cv = _mm256_set1_ps(c);
  const __m256 a = exp2_8(_mm256_mul_ps(_mm256_sub_ps(load_chunk8(x, i, V), mv), cv));
  const __m256 b = exp2_8(_mm256_mul_ps(_mm256_sub_ps(load_chunk8(x, i + 8, V), mv), cv));
  _mm256_storeu_ps(e, a);
  _mm256_storeu_ps(e + 8, b);
  return hsum8(_mm256_add_ps(a, b));
#else
  float buf[kL];
  const float* v = chunk_at(x, i, V, buf);
  for (int j = 0; j < kL; ++j) e[j] = exp2_1((v[j] - m) * c);
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = e[j] + e[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
#endif
}

// sum_i 2^((x_i - m) log2(e)) (the raw distribution's exp-sum relative to m): float
// lanes, flushed into double every 128 chunks.
inline double raw_sum(const float* x, int64_t V, float m) {
  const float c = kLog2e;
  double S = 0.0;
  const int64_t nc = (V + kL - 1) / kL;
  for (int64_t k0 = 0; k0 < nc; k0 += 128) {
    const int64_t k1 = std::min(nc, k0 + 128);
    float part;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m), cv = _mm512_set1_ps(c);
    __m512 s = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; ++k)
      s = _mm512_add_ps(s, exp2_16(_mm512_mul_ps(_mm512_sub_ps(load_chunk(x, k * kL, V), mv),
                                                 cv)));
    part = _mm512_reduce_add_ps(s);
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 mv = _mm256_set1_ps(m), cv = _mm256_set1_ps(c);
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t i = k * kL;
      s0 = _mm256_add_ps(s0, exp2_8(_mm256_mul_ps(_mm256_sub_ps(load_chunk8(x, i, V), mv), cv)));
      s1 = _mm256_add_ps(s1, exp2_8(_mm256_mul_ps(_mm256_sub_ps(load_chunk8(x, i + 8, V), mv),
                                                  cv)));
    }
    part = hsum8(_mm256_add_ps(s0, s1));
#else
    float s[kL];
    for (int j = 0; j < kL; ++j) s[j] = 0.0f;
    for (int64_t k = k0; k < k1; ++k) {
      float v[kL];
      const float* xc = chunk_at(x, k * kL, V, v);
      for (int j = 0; j < kL; ++j) s[j] += exp2_1((xc[j] - m) * c);
    }
    float s8[8], s4[4];
    for (int j = 0; j < 8; ++j) s8[j] = s[j] + s[j + 8];
    for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
    part = (s4[0] + s4[2]) + (s4[1] + s4[3]);
#endif
    S += double(part);
  }
  return S;
}

// The token of one live row (see the top of the file); *S_out: the tempered exp-sum.
inline int64_t sample_row(const float* x, int64_t V, float m, float c, float u, float* e,
                          float* csum, double* S_out) {
  const int64_t nc = (V + kL - 1) / kL;
  for (int64_t k = 0; k < nc; ++k) {
    csum[k] = exp_chunk(x, k * kL, V, m, c, e + k * kL);
  }
  double S = 0.0;
  for (int64_t k = 0; k < nc; ++k) S += double(csum[k]);
  *S_out = S;
  const double target = double(u) * S;
  double run = 0.0;
  int64_t k = 0;
  for (; k < nc; ++k) {
    const double next = run + double(csum[k]);
    if (next > target) break;
    run = next;
  }
  if (k < nc) {
    const float* ek = e + k * kL;
    for (int j = 0; j < kL; ++j) {
      run += double(ek[j]);
      if (run > target) return k * kL + j;
    }
    for (int j = kL - 1; j >= 0; --j)  // rounding: the chunk's last token of e > 0
      if (ek[j] > 0.0f) return k * kL + j;
  }
  for (int64_t i = V - 1; i >= 0; --i)  // past the end: the row's last token of e > 0
    if (e[i] > 0.0f) return i;
  return V - 1;
}

std::vector<float>& scratch(int64_t n) {
  thread_local std::vector<float> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(static_cast<size_t>(n));
  return buf;
}

}  // namespace

void sample_logits_rows(const float* logits, int64_t stride, int64_t R, int64_t V,
                        const uint8_t* done, int64_t pad_id, const float* u,
                        double temperature, int64_t* ids, float* lp, int num_threads) {
  const bool unit = temperature == 1.0;
  const float c = static_cast<float>(1.4426950408889634 / temperature);
  const int64_t nc = (V + kL - 1) / kL;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1 && R > 1)
#endif
  for (int64_t r = 0; r < R; ++r) {
    if (done[r]) {  // padding: its row is not read
      ids[r] = pad_id;
      lp[r] = 0.0f;
      continue;
    }
    const float* x = logits + r * stride;
    const float m = row_max(x, V);
    if (!std::isfinite(m)) {
      ids[r] = V - 1;
      lp[r] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    std::vector<float>& buf = scratch(nc * kL + nc);
    double S;
    const int64_t tok = sample_row(x, V, m, c, u[r], buf.data(), buf.data() + nc * kL, &S);
    if (!unit) S = raw_sum(x, V, m);
    ids[r] = tok;
    lp[r] = static_cast<float>((double(x[tok]) - m) - std::log(S));
  }
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
