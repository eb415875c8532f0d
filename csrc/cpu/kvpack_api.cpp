// The CPU helpers of the LLM step search's generation (python/rlfuse/search/llm_gen.py):
// KV-cache packing (kv_pack, for _pack) and the bookkeeping of one decoding step
// (decode_step, for HFStepModel._decode_impl).
//
// kv_pack:
// One output tensor [R, H, C, D] (contiguous) receives, for every prefix i (a plan row
// (group, row, start, n, reps)), reps consecutive rows holding its cache slice: columns
// start .. start + n of row `row` of source tensor `group`, right-aligned (columns C - n ..
// C - 1), zeros in front; a prefix with group < 0 gets zero rows.  Sources are
// [Rs, H, Ts, D] tensors with any strides but a contiguous last dimension.  The first row
// of a prefix is copied from its source, its repeats from that row (one contiguous copy
// each).  Only bytes are copied, so every dtype works.  Every slice is checked against its
// source's rows and columns before anything is written.
//
// decode_step: everything a decoding step does after the forward and torch's softmax, in
// one call instead of ~12 small torch ops: per row, the next token (inverting the CDF of
// the row's probabilities at one uniform draw, as torch's cumsum + searchsorted do, or a
// given greedy argmax), padding for rows that already stopped, the stop check against a
// lookup table, the row's length at its first stop (and, optionally, at its first token
// of a second table: where a rollout's first step ends), the log-prob of the token under the
// raw logits (the token_logprobs kernel of logprob.cpp, so the same bits as
// rlfuse.ops.token_logprobs), and the position ids advanced by one.
//
// Compiled once (no ISA variants: kv_pack is memcpy / memset bound, decode_step reads one
// row of probabilities; the log-probs go through the ISA dispatch).  The Python side
// builds every buffer itself and checks shapes, strides and dtypes before the calls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu/logprob.h"

namespace py = pybind11;

namespace {

struct Source {
  const char* base;
  int64_t s_row, s_head, s_col;  // bytes
  int64_t rows, cols;            // its extent: [rows, H, cols, D]
};

// The first plan row whose slice does not fit (its source, its rows, its columns, C, the
// R output rows), or -1.
int64_t kv_pack_check(int64_t R, int64_t C, const std::vector<Source>& src,
                      const int64_t* plan, int64_t N) {
  int64_t rows = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t* p = plan + 5 * i;
    const int64_t g = p[0], row = p[1], start = p[2], n = p[3], reps = p[4];
    if (reps < 0 || (rows += reps) > R) return i;
    if (g < 0) continue;
    if (g >= static_cast<int64_t>(src.size())) return i;
    const Source& s = src[static_cast<size_t>(g)];
    if (row < 0 || row >= s.rows || start < 0 || n < 0 || n > C || start + n > s.cols)
      return i;
  }
  return rows == R ? -1 : N;
}

void kv_pack(char* dst, int64_t H, int64_t C, int64_t row_bytes,
             const std::vector<Source>& src, const int64_t* plan, int64_t N) {
  const int64_t head_bytes = C * row_bytes, out_row = H * head_bytes;
  char* out = dst;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t* p = plan + 5 * i;
    const int64_t g = p[0], reps = p[4];
    if (reps == 0) continue;
    if (g < 0) {
      std::memset(out, 0, static_cast<size_t>(reps * out_row));
      out += reps * out_row;
      continue;
    }
    const Source& s = src[static_cast<size_t>(g)];
    const int64_t cols = p[3], pad = C - cols;
    const char* in = s.base + p[1] * s.s_row + p[2] * s.s_col;
    char* first = out;
    for (int64_t h = 0; h < H; ++h, out += head_bytes, in += s.s_head) {
      if (pad) std::memset(out, 0, static_cast<size_t>(pad * row_bytes));
      char* o = out + pad * row_bytes;
      if (s.s_col == row_bytes) {
        std::memcpy(o, in, static_cast<size_t>(cols * row_bytes));
      } else {
        for (int64_t c = 0; c < cols; ++c)
          std::memcpy(o + c * row_bytes, in + c * s.s_col, static_cast<size_t>(row_bytes));
      }
    }
    for (int64_t k = 1; k < reps; ++k, out += out_row)
      std::memcpy(out, first, static_cast<size_t>(out_row));
  }
}

// Row r's next token from its probabilities p[0:V) and the uniform draw u, exactly as
// torch does it on the CPU: cdf = p.cumsum(-1) (accumulated in double, stored as float),
// v = u * cdf[-1] (float), idx = searchsorted(cdf, v, right=True) (the same binary
// search), clamped to V - 1.  The row's probabilities are overwritten by the cdf.
int64_t sample_row(float* p, int64_t V, float u) {
  double acc = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    acc += static_cast<double>(p[i]);
    p[i] = static_cast<float>(acc);
  }
  const float v = u * p[V - 1];
  int64_t lo = 0, hi = V;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (!(p[mid] > v)) lo = mid + 1; else hi = mid;
  }
  return lo < V - 1 ? lo : V - 1;
}

struct Step {
  float* probs;         // [R, V] contiguous (sampling), or null
  const float* u;       // [R] uniforms (sampling), or null
  const int64_t* argmax;  // [R] greedy tokens, or null
  const void* logits;   // [R, V] rows at logits_stride elements, dtype code logits_dtype
  int logits_dtype;
  int64_t logits_stride, R, V;
  const uint8_t* stop;  // stop[id] != 0: id ends a row; ids >= n_stop do not
  int64_t n_stop;
  uint8_t* done;        // [R] in/out
  int64_t* cur;         // [R] out: the tokens (the next step's input ids)
  int64_t* toks;        // [R, toks_stride] out: column t
  float* lp;            // [R, lp_stride] out: column t
  int64_t* length;      // [R] in/out: t + 1 at a row's first stop token (else unchanged)
  const uint8_t* split;  // a second table (ids >= n_split: not in it), or null
  int64_t n_split;
  int64_t* first_split;  // [R] in/out: t + 1 at a row's first token in `split` (if 0 before)
  int64_t* pos;         // [R] in/out: + 1
  int64_t toks_stride, lp_stride, t, pad_id;
  int num_threads;
};

int64_t decode_step(const Step& s) {
  int64_t live = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(s.num_threads) if (s.num_threads > 1) reduction(+ : live)
#endif
  for (int64_t r = 0; r < s.R; ++r) {
    int64_t id = s.pad_id;
    if (!s.done[r]) {
      id = s.argmax ? s.argmax[r] : sample_row(s.probs + r * s.V, s.V, s.u[r]);
      if (s.split && id >= 0 && id < s.n_split && s.split[id] && !s.first_split[r])
        s.first_split[r] = s.t + 1;
      if (id >= 0 && id < s.n_stop && s.stop[id]) {
        s.done[r] = 1;
        s.length[r] = s.t + 1;
      } else {
        ++live;
      }
    }
    s.cur[r] = id;
    s.toks[r * s.toks_stride + s.t] = id;
    s.pos[r] += 1;
  }
  // log-probs of the tokens (padding included, as token_logprobs over the whole batch)
  std::vector<float> lp(static_cast<size_t>(s.R)), lse(static_cast<size_t>(s.R));
  const int64_t bad = RLFUSE_ISA_CALL(token_logprobs_fwd, s.logits, s.logits_dtype, s.R, 1,
                                      s.logits_stride, 0, s.V, s.cur, 1, lp.data(), nullptr,
                                      lse.data(), 1.0, int64_t(-100), s.num_threads);
  if (bad >= 0) return -1 - bad;
  for (int64_t r = 0; r < s.R; ++r) s.lp[r * s.lp_stride + s.t] = lp[static_cast<size_t>(r)];
  return live;
}

}  // namespace

void rlfuse_bind_kvpack(py::module_& m) {
  m.def(
      "kv_pack",
      [](uint64_t dst, int64_t R, int64_t H, int64_t C, int64_t row_bytes,
         const std::vector<std::vector<int64_t>>& sources, uint64_t plan, int64_t N) {
        if (R < 0 || H < 1 || C < 0 || row_bytes < 1 || N < 0)
          throw std::invalid_argument("kv_pack: needs R, C, N >= 0 and H, row_bytes >= 1");
        std::vector<Source> src;
        src.reserve(sources.size());
        for (const auto& s : sources) {
          if (s.size() != 6)
            throw std::invalid_argument("kv_pack: a source is (ptr, s_row, s_head, s_col, rows, cols)");
          src.push_back(Source{reinterpret_cast<const char*>(static_cast<uintptr_t>(s[0])), s[1],
                               s[2], s[3], s[4], s[5]});
        }
        const int64_t* p = reinterpret_cast<const int64_t*>(plan);
        py::gil_scoped_release release;
        const int64_t bad = kv_pack_check(R, C, src, p, N);
        if (bad < 0) kv_pack(reinterpret_cast<char*>(dst), H, C, row_bytes, src, p, N);
        return bad;
      },
      "Pack right-aligned KV-cache slices of several source tensors into one [R, H, C, D] "
      "tensor, each repeated as its plan row says (raw pointers and byte strides; a plan of "
      "N rows (group, row, start, n, reps) as int64).  Returns -1, or the first plan row "
      "that does not fit (N: the repeats do not add up to R); nothing is written then.");
  m.def(
      "decode_step",
      [](uint64_t probs, uint64_t u, uint64_t argmax, uint64_t logits, int logits_dtype,
         int64_t logits_stride, int64_t R, int64_t V, uint64_t stop, int64_t n_stop,
         uint64_t done, uint64_t cur, uint64_t toks, int64_t toks_stride, uint64_t lp,
         int64_t lp_stride, uint64_t length, uint64_t split, int64_t n_split,
         uint64_t first_split, uint64_t pos, int64_t t, int64_t pad_id, int num_threads) {
        if (R < 1 || V < 1 || (argmax == 0 && (probs == 0 || u == 0)))
          throw std::invalid_argument("decode_step: needs R, V >= 1 and argmax or probs and u");
        if (split != 0 && first_split == 0)
          throw std::invalid_argument("decode_step: a split table needs first_split");
        if (logits_dtype < 0 || logits_dtype > 3)
          throw std::invalid_argument("decode_step: logits_dtype must be a dtype code 0-3");
        Step s{reinterpret_cast<float*>(probs), reinterpret_cast<const float*>(u),
               reinterpret_cast<const int64_t*>(argmax), reinterpret_cast<const void*>(logits),
               logits_dtype, logits_stride, R, V, reinterpret_cast<const uint8_t*>(stop),
               n_stop, reinterpret_cast<uint8_t*>(done), reinterpret_cast<int64_t*>(cur),
               reinterpret_cast<int64_t*>(toks), reinterpret_cast<float*>(lp),
               reinterpret_cast<int64_t*>(length), reinterpret_cast<const uint8_t*>(split),
               n_split, reinterpret_cast<int64_t*>(first_split), reinterpret_cast<int64_t*>(pos),
               toks_stride, lp_stride, t, pad_id, num_threads < 1 ? 1 : num_threads};
        py::gil_scoped_release release;
        return decode_step(s);
      },
      "One decoding step's sampling (or greedy ids), padding, stop checks, lengths (and "
      "first positions in a second table), "
      "log-probs and positions; returns the rows still live, or -1 - row for a token id "
      "outside [0, V) (raw pointers; buffers built in rlfuse.search.llm_gen).");
}
