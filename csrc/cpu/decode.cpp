// One-token decode step of a Llama-family attention block, for the lean sampler
// (python/rlfuse/models/decode.py).  For every row b and KV head:
//   * rotary embedding of the new key (rotate-half convention of transformers' Llama:
//     x * cos + [-x2, x1] * sin with the row's table entries), written with the new value
//     into column L of the KV buffers;
//   * for each query head of the group: rotary of the query, scores q.k_j * scale over the
//     attended columns j <= L, a softmax in float32 and the weighted sum of the values.
// This replaces about a dozen small tensor ops per layer (rotary, two cache writes,
// two batched matmuls, mask, softmax, transposes), whose dispatch cost dominates at
// decode batch sizes.  silu_mul is the SwiGLU product silu(g) * u in one pass, rms_norm
// the Llama RMSNorm w * (x / sqrt(mean(x^2) + eps)) of each row.
// Compiled once per ISA level (isa.h).
#include "cpu/decode.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "rlfuse/common.h"

namespace rlfuse {
namespace cpu {
namespace RLFUSE_ISA {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kW = 16;  // lanes of a vector block
constexpr int kS = 64;  // score columns per block (the buffers' C is a multiple of it)
constexpr int kV = 32;  // head lanes per value-accumulation chunk

inline void rotate(const float* x, const float* c, const float* s, int64_t hd, float* y) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) y[i] = x[i] * c[i] - x[i + h] * s[i];
  for (int64_t i = h; i < hd; ++i) y[i] = x[i] * c[i] + x[i - h] * s[i];
}

// rotary of x, or of w * rmsnorm(x) when w is given (tmp: hd floats of scratch)
inline void norm_rotate(const float* x, const float* w, float eps, const float* c,
                        const float* s, int64_t hd, float* tmp, float* y) {
  if (w) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < hd; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(hd) + eps);
    for (int64_t i = 0; i < hd; ++i) tmp[i] = w[i] * (x[i] * r);
    x = tmp;
  }
  rotate(x, c, s, hd, y);
}

}  // namespace

void decode_attention(const DecodeAttnArgs& a) {
  const int64_t hd = a.hd, C = a.C, L = a.L, group = a.nh / a.nkv;
  const int64_t work = a.B * a.nh * (L + 1) * hd;
  const int threads = work < (int64_t(1) << 16) ? 1 : std::max(1, a.num_threads);
#pragma omp parallel num_threads(threads)
  {
    const int64_t cols = (L / kS + 1) * kS;
    std::vector<float> scratch(static_cast<size_t>(3 * hd + 2 * cols));
    float* tmp = scratch.data() + 2 * hd + 2 * cols;
    float* qr = scratch.data();
    float* acc = qr + hd;
    float* p = acc + hd;
    float* keep = p + cols;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < a.B; ++b) {
      const float* c = a.cos + a.pos[b] * a.cs_stride;
      const float* s = a.sin + a.pos[b] * a.cs_stride;
      const uint8_t* m = a.mask + b * a.mask_stride;
      // attended columns: mask nonzero and column <= L (a 0/1 float per column)
      const int64_t nb = (L + kS) / kS, nv = nb * (kS / kW);
      for (int64_t jb = 0; jb < nv; ++jb) {
        const uint8_t* mb = m + jb * kW;
        const int lim = static_cast<int>(std::min<int64_t>(L - jb * kW, kW));
        float* kb2 = keep + jb * kW;
        for (int l = 0; l < kW; ++l) kb2[l] = (l <= lim ? 1.f : 0.f) * (mb[l] ? 1.f : 0.f);
      }
      for (int64_t kh = 0; kh < a.nkv; ++kh) {
        const int64_t bk = b * a.nkv + kh;
        float* kb = a.kbuf + (bk * C) * hd;
        float* vb = a.vbuf + (bk * C) * hd;
        norm_rotate(a.k + b * a.k_stride + kh * hd, a.k_norm, a.norm_eps, c, s, hd, tmp, acc);
        for (int64_t i = 0; i < hd; ++i) kb[i * C + L] = acc[i];
        const float* vn = a.v + b * a.v_stride + kh * hd;
        std::copy(vn, vn + hd, vb + L * hd);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t qh = kh * group + g;
          norm_rotate(a.q + b * a.q_stride + qh * hd, a.q_norm, a.norm_eps, c, s, hd, tmp, qr);
          // scores of kS columns at a time from the transposed keys (C is a multiple of kS;
          // columns past L are computed and ignored): kS / 16 independent vertical FMA chains
          for (int64_t jb = 0; jb < nb; ++jb) {
            float t[kS] = {};
            const float* kt = kb + jb * kS;
            for (int64_t i = 0; i < hd; ++i) {
              const float qi = qr[i] * a.scale;
              for (int l = 0; l < kS; ++l) t[l] += qi * kt[i * C + l];
            }
            std::copy(t, t + kS, p + jb * kS);
          }
          float lane[kW];
          std::fill(lane, lane + kW, -INFINITY);
          for (int64_t jb = 0; jb < nv; ++jb)
            for (int l = 0; l < kW; ++l) {
              const float v = keep[jb * kW + l] != 0.f ? p[jb * kW + l] : -INFINITY;
              lane[l] = lane[l] > v ? lane[l] : v;
            }
          float mx = lane[0];
          for (int l = 1; l < kW; ++l) mx = std::max(mx, lane[l]);
          // exp of the attended scores (2^u form, vectorised), 0 elsewhere
          const float shift = mx * kLog2e;
          std::fill(lane, lane + kW, 0.f);
          for (int64_t jb = 0; jb < nv; ++jb) {
            float* pb = p + jb * kW;
            const float* kp = keep + jb * kW;
            for (int l = 0; l < kW; ++l) {
              // a select, not a product: a masked (or unused) column's score may exceed the
              // attended maximum, and exp of that (or a NaN key) times 0 would be NaN
              const float e = vexp2_nonpos(std::min(pb[l] * kLog2e - shift, 0.f));
              pb[l] = kp[l] != 0.f ? e : 0.f;
              lane[l] += pb[l];
            }
          }
          float sum = 0.f;
          for (int l = 0; l < kW; ++l) sum += lane[l];
          float* o = a.out + b * a.out_stride + qh * hd;
          const float inv = 1.f / sum;  // column L (the new token) is always attended
          if (hd % kW == 0) {
            // chunks of up to 32 lanes of the head, two columns in flight (independent chains)
            for (int64_t ib = 0; ib < hd; ib += kV) {
              const int64_t w = std::min<int64_t>(kV, hd - ib);
              float t0[kV] = {}, t1[kV] = {};
              int64_t j = 0;
              for (; j + 1 <= L; j += 2) {
                const float w0 = p[j], w1 = p[j + 1];
                const float* v0 = vb + j * hd + ib;
                const float* v1 = v0 + hd;
                if (w == kV) {
                  for (int l = 0; l < kV; ++l) t0[l] += w0 * v0[l];
                  for (int l = 0; l < kV; ++l) t1[l] += w1 * v1[l];
                } else {
                  for (int64_t l = 0; l < w; ++l) t0[l] += w0 * v0[l];
                  for (int64_t l = 0; l < w; ++l) t1[l] += w1 * v1[l];
                }
              }
              if (j == L) {
                const float* v0 = vb + j * hd + ib;
                for (int64_t l = 0; l < w; ++l) t0[l] += p[j] * v0[l];
              }
              for (int64_t l = 0; l < w; ++l) o[ib + l] = (t0[l] + t1[l]) * inv;
            }
          } else {
            std::fill(acc, acc + hd, 0.f);
            for (int64_t j = 0; j <= L; ++j) {
              const float w = p[j];
              const float* vj = vb + j * hd;
              for (int64_t i = 0; i < hd; ++i) acc[i] += w * vj[i];
            }
            for (int64_t i = 0; i < hd; ++i) o[i] = acc[i] * inv;
          }
        }
      }
    }
  }
}

void silu_mul(const float* g, const float* u, int64_t g_stride, int64_t u_stride, float* out,
              int64_t out_stride, int64_t B, int64_t n, int num_threads) {
  const int threads = B * n < (int64_t(1) << 16) ? 1 : std::max(1, num_threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const float* gb = g + b * g_stride;
    const float* ub = u + b * u_stride;
    float* ob = out + b * out_stride;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      // sigmoid from e = exp(-|x|) <= 1, so the exponential never overflows
      const float x = gb[i];
      const float e = vexp2_nonpos(-std::fabs(x) * kLog2e);
      const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);
      ob[i] = x * sig * ub[i];
    }
  }
}

void rms_norm(const float* x, int64_t x_stride, const float* w, float eps, float* out,
              int64_t out_stride, int64_t B, int64_t n, int num_threads) {
  const int threads = B * n < (int64_t(1) << 16) ? 1 : std::max(1, num_threads);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * x_stride;
    float* ob = out + b * out_stride;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += xb[i] * xb[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) ob[i] = w[i] * (xb[i] * r);
  }
}

}  // namespace RLFUSE_ISA
}  // namespace cpu
}  // namespace rlfuse
