// The CPU helpers of the LLM step search's generation (python/rlfuse/search/llm_gen.py):
// KV-cache packing (kv_pack, for _pack) and the bookkeeping of one decoding step
// (DecodeLoop, for HFStepModel._loop_kernel).
//
// kv_pack:
// One output tensor [R, H, dst_cols, D] (contiguous; dst_cols >= C) receives in its first C
// columns, for every prefix i (a plan row (group, row, start, n, reps)), reps consecutive
// rows holding its cache slice: columns start .. start + n of row `row` of source tensor
// `group`, right-aligned (columns C - n .. C - 1), zeros in front; a prefix with group < 0
// gets zero rows.  (dst_cols > C: the generation's first cache update packs the prefixes
// straight into its own output, leaving column C for the new token.)  Sources are
// [Rs, H, Ts, D] tensors with any strides but a contiguous last dimension.  The first row
// of a prefix is copied from its source, its repeats from that row (one contiguous copy
// each).  Only bytes are copied, so every dtype works.  Every slice is checked against its
// source's rows and columns before anything is written.
//
// DecodeLoop.step_logits (temperature > 0, no nucleus): a whole decoding step from the
// raw float32 logits in one call: per live row the token drawn from
// softmax(logits / T) at its uniform (the exponentials computed once into a scratch row,
// a blocked scan for the first index whose running sum exceeds u * S, never a token of
// probability 0) and its log-prob under the raw logits, by sample_logits_rows
// (csrc/cpu/sample.cpp, compiled per ISA level, called through RLFUSE_ISA_CALL); then the
// bookkeeping below.  Not torch's arithmetic bit for bit: the same draws give the same
// tokens except within float rounding of a CDF boundary, and log-probs to float32
// accuracy.
//
// DecodeLoop.step (the nucleus, top_p < 1, over torch's probabilities, or greedy): the
// next token (inverting the CDF of the row's probabilities at one uniform draw, as
// torch's cumsum + searchsorted do, or a given greedy argmax) and its log-prob under the
// raw logits (the token_logprobs kernel of logprob.cpp, so the same bits as
// rlfuse.ops.token_logprobs).
//
// Both then do the bookkeeping of the step (book_step): padding for rows that already
// stopped (the pad id, log-prob 0), the stop check against a lookup table, the row's
// length at its first stop (and, optionally, at its first token of a second table: where
// a rollout's first step ends; with a per-row budget of such tokens, a row also stops at
// the one that spends it: a rollout ends at max_depth steps; with a step cap, at the
// step_cap-th token since its last such token: a step ends at max_new_tokens), and the
// position ids advanced by one.
//
// Compiled once (no ISA variants: kv_pack is memcpy / memset bound and the bookkeeping is
// a pass over R rows; the sampling and log-prob rows go through the ISA dispatch).  The
// Python side builds every buffer itself and checks shapes, strides and dtypes before the
// calls; the bindings check what they can of the raw pointers (null pointers, sizes, the
// pad id, the temperature).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/logprob.h"
#include "cpu/sample.h"

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
    if (reps < 0 || reps > R - rows) return i;  // (no overflow: 0 <= rows <= R)
    rows += reps;
    if (g < 0) continue;
    if (g >= static_cast<int64_t>(src.size())) return i;
    const Source& s = src[static_cast<size_t>(g)];
    if (row < 0 || row >= s.rows || start < 0 || n < 0 || n > C || start > s.cols - n)
      return i;
  }
  return rows == R ? -1 : N;
}

void kv_pack(char* dst, int64_t H, int64_t C, int64_t dst_cols, int64_t row_bytes,
             const std::vector<Source>& src, const int64_t* plan, int64_t N) {
  const int64_t head_bytes = dst_cols * row_bytes, out_row = H * head_bytes;
  char* out = dst;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t* p = plan + 5 * i;
    const int64_t g = p[0], reps = p[4];
    if (reps == 0) continue;
    if (g < 0) {
      for (int64_t k = 0; k < reps * H; ++k, out += head_bytes)
        std::memset(out, 0, static_cast<size_t>(C * row_bytes));
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

// Sampling a row's next token from its probabilities p[0:V) and the uniform draw u,
// exactly as torch does it on the CPU: cdf = p.cumsum(-1) (accumulated in double, stored
// as float), v = u * cdf[-1] (float), idx = searchsorted(cdf, v, right=True) (the same
// binary search), clamped to V - 1.  The rows' probabilities are overwritten by the cdf.
//
// cdf_rows: the cumulative sums of B rows at once.  Each row's sums keep their order (the
// same bits as one row at a time); the B independent chains of double additions overlap
// instead of waiting on each other's latency.
template <int B>
void cdf_rows(float* const* p, int64_t V) {
  double acc[B];
  for (int j = 0; j < B; ++j) acc[j] = 0.0;
  for (int64_t i = 0; i < V; ++i) {
    for (int j = 0; j < B; ++j) {
      acc[j] += static_cast<double>(p[j][i]);
      p[j][i] = static_cast<float>(acc[j]);
    }
  }
}

int64_t invert_cdf(const float* cdf, int64_t V, float u) {
  const float v = u * cdf[V - 1];
  int64_t lo = 0, hi = V;
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    if (!(cdf[mid] > v)) lo = mid + 1; else hi = mid;
  }
  return lo < V - 1 ? lo : V - 1;
}

constexpr int kRowBlock = 8;

// The sampled token of each row in rows[0:n) (row r's probabilities at probs + r * V).
void sample_rows(float* probs, int64_t V, const float* u, const int64_t* rows, int64_t n,
                 int64_t* out) {
  float* p[kRowBlock];
  int64_t i = 0;
  for (; i + kRowBlock <= n; i += kRowBlock) {
    for (int j = 0; j < kRowBlock; ++j) p[j] = probs + rows[i + j] * V;
    cdf_rows<kRowBlock>(p, V);
  }
  for (; i < n; ++i) {
    p[0] = probs + rows[i] * V;
    cdf_rows<1>(p, V);
  }
  for (i = 0; i < n; ++i) out[i] = invert_cdf(probs + rows[i] * V, V, u[rows[i]]);
}

// The buffers of one decoding loop (set once per loop) and what one step reads.
struct Loop {
  int64_t R, width, pad_id;
  const uint8_t* stop;   // stop[id] != 0: id ends a row; ids >= n_stop do not
  int64_t n_stop;
  const uint8_t* split;  // a second table (ids >= n_split: not in it), or null
  int64_t n_split;
  uint8_t* done;         // [R] in/out
  int64_t* cur;          // [R] out: the tokens (the next step's input ids)
  int64_t* toks;         // [R, width] out: column t
  float* lp;             // [R, width] out: column t
  int64_t* length;       // [R] in/out: t + 1 at a row's first stop token (else unchanged)
  int64_t* first_split;  // [R] in/out: t + 1 at a row's first token in `split` (if 0 before)
  int64_t* pos;          // [R] in/out: + 1
  int64_t* split_budget; // [R] in/out, or null: a row stops at the token in `split` that
                         // takes its budget to 0 (each such token takes one off)
  int64_t* since;        // [R] in/out, or null: tokens since the row's last `split` token;
  int64_t step_cap;      // with `since`: a row stops at its step_cap-th token without one
};

struct Step {
  float* probs;           // [R, V] contiguous (sampling), or null
  const float* u;         // [R] uniforms (sampling), or null
  const int64_t* argmax;  // [R] greedy tokens, or null
  const float* logits;    // [R, V] rows at logits_stride elements
  int64_t logits_stride, V, t;
  int num_threads;
};

// The bookkeeping of step t once the live rows' tokens are known (ids[i]: the i-th row not
// done, or, with `all_rows`, ids[r] for every row r): padding, first split, stops,
// lengths, tokens, positions.  Returns the rows still live.
int64_t book_step(const Loop& s, int64_t t, const int64_t* ids, bool all_rows) {
  int64_t live = 0;
  for (int64_t r = 0, i = 0; r < s.R; ++r) {
    int64_t id = s.pad_id;
    if (!s.done[r]) {
      id = all_rows ? ids[r] : ids[i++];
      bool stop = id >= 0 && id < s.n_stop && s.stop[id];
      if (s.split && id >= 0 && id < s.n_split && s.split[id]) {
        if (!s.first_split[r]) s.first_split[r] = t + 1;
        if (s.split_budget && --s.split_budget[r] <= 0) stop = true;
        if (s.since) s.since[r] = 0;
      } else if (s.since && ++s.since[r] >= s.step_cap) {
        stop = true;  // a step of step_cap tokens without a split token: where it ends
      }
      if (stop) {
        s.done[r] = 1;
        s.length[r] = t + 1;
      } else {
        ++live;
      }
    }
    s.cur[r] = id;
    s.toks[r * s.width + t] = id;
    s.pos[r] += 1;
  }
  return live;
}

int64_t decode_step(const Loop& s, const Step& q) {
  const int64_t t = q.t;
  // the rows still running, and their tokens (sampled in blocks of rows, or the argmax)
  std::vector<int64_t> rows, ids;
  rows.reserve(static_cast<size_t>(s.R));
  for (int64_t r = 0; r < s.R; ++r)
    if (!s.done[r]) rows.push_back(r);
  const int64_t n = static_cast<int64_t>(rows.size());
  ids.resize(rows.size());
  if (q.argmax) {
    for (int64_t i = 0; i < n; ++i) ids[i] = q.argmax[rows[i]];
  } else {
    const int64_t blocks = (n + 4 * kRowBlock - 1) / (4 * kRowBlock);
#ifdef _OPENMP
#pragma omp parallel for num_threads(q.num_threads) if (q.num_threads > 1 && blocks > 1)
#endif
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = b * 4 * kRowBlock, hi = std::min(n, lo + 4 * kRowBlock);
      sample_rows(q.probs, q.V, q.u, rows.data() + lo, hi - lo, ids.data() + lo);
    }
  }
  // the rows that were padding before this step (their log-prob is 0)
  std::vector<uint8_t> pad(s.done, s.done + s.R);
  const int64_t live = book_step(s, t, ids.data(), false);
  // log-probs of the tokens (token_logprobs over the whole batch)
  std::vector<float> lp(static_cast<size_t>(s.R)), lse(static_cast<size_t>(s.R));
  const int64_t bad = RLFUSE_ISA_CALL(token_logprobs_fwd, q.logits, 0 /* float32 */, s.R, 1,
                                      q.logits_stride, 0, q.V, s.cur, 1 /* int64 */, lp.data(),
                                      nullptr, lse.data(), 1.0, int64_t(-100), q.num_threads);
  if (bad >= 0) return -1 - bad;
  for (int64_t r = 0; r < s.R; ++r)
    s.lp[r * s.width + t] = pad[static_cast<size_t>(r)] ? 0.0f : lp[static_cast<size_t>(r)];
  return live;
}

// The fused step (temperature T > 0, no nucleus): the tokens of the live rows sampled from
// softmax(logits / T) at the uniforms u with their log-probs under the raw logits, the pad
// id and log-prob 0 for stopped rows (whose logits are not read), by sample_logits_rows
// (sample.cpp, through the ISA dispatch); then the same bookkeeping as decode_step.
int64_t decode_step_logits(const Loop& s, const float* u, const float* logits,
                           int64_t logits_stride, int64_t V, int64_t t, double temperature,
                           int num_threads) {
  std::vector<int64_t> ids(static_cast<size_t>(s.R));
  std::vector<float> lp(static_cast<size_t>(s.R));
  RLFUSE_ISA_CALL(sample_logits_rows, logits, logits_stride, s.R, V, s.done, s.pad_id, u,
                  temperature, ids.data(), lp.data(), num_threads);
  const int64_t live = book_step(s, t, ids.data(), true);
  for (int64_t r = 0; r < s.R; ++r) s.lp[r * s.width + t] = lp[static_cast<size_t>(r)];
  return live;
}

void check_pad(const Loop& s, int64_t V, const char* fn) {
  if (s.pad_id < 0 || s.pad_id >= V)
    for (int64_t r = 0; r < s.R; ++r)
      if (s.done[r])  // a stopped row gets the pad id: the model's next input
        throw std::invalid_argument(std::string(fn) + ": the pad token id " +
                                    std::to_string(s.pad_id) +
                                    " is outside the model's vocabulary [0, " +
                                    std::to_string(V) + ")");
}

}  // namespace

void rlfuse_bind_kvpack(py::module_& m) {
  m.def(
      "kv_pack",
      [](uint64_t dst, int64_t R, int64_t H, int64_t C, int64_t row_bytes,
         const std::vector<std::vector<int64_t>>& sources, uint64_t plan, int64_t N,
         int64_t dst_cols) {
        if (R < 0 || H < 1 || C < 0 || row_bytes < 1 || N < 0)
          throw std::invalid_argument("kv_pack: needs R, C, N >= 0 and H, row_bytes >= 1");
        if (dst_cols < 0) dst_cols = C;
        if (dst_cols < C)
          throw std::invalid_argument("kv_pack: dst_cols (" + std::to_string(dst_cols) +
                                      ") must be >= C (" + std::to_string(C) + ")");
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
        if (bad < 0)
          kv_pack(reinterpret_cast<char*>(dst), H, C, dst_cols, row_bytes, src, p, N);
        return bad;
      },
      py::arg("dst"), py::arg("R"), py::arg("H"), py::arg("C"), py::arg("row_bytes"),
      py::arg("sources"), py::arg("plan"), py::arg("N"), py::arg("dst_cols") = -1,
      "Pack right-aligned KV-cache slices of several source tensors into the first C columns "
      "of one contiguous [R, H, dst_cols, D] tensor (dst_cols: C when negative), each "
      "repeated as its plan row says (raw pointers and byte strides; a plan of N rows "
      "(group, row, start, n, reps) as int64).  Columns C .. dst_cols - 1 are left for the "
      "caller (a repeated row copies them from its first row).  Returns -1, or the first "
      "plan row that does not fit (N: the repeats do not add up to R); nothing is written "
      "then.");
  py::class_<Loop>(m, "DecodeLoop",
                   "The buffers of one decoding loop of the LLM step search (raw pointers, "
                   "built in rlfuse.search.llm_gen): stop and split tables (pointer, size), "
                   "then done, cur, toks, lp, length, first_split (0: no split table), pos; "
                   "split_budget (0: none): int64 [R], a row stops at the split-table token "
                   "that takes its budget to 0; since (0: none): int64 [R] tokens since the "
                   "row's last split-table token, a row stopping at its step_cap-th.")
      .def(py::init([](int64_t R, int64_t width, int64_t pad_id,
                       const std::vector<uint64_t>& tables,
                       const std::vector<uint64_t>& buffers, uint64_t split_budget,
                       uint64_t since, int64_t step_cap) {
             if (R < 1 || width < 1)
               throw std::invalid_argument("DecodeLoop: needs R, width >= 1");
             if (tables.size() != 4 || buffers.size() != 7)
               throw std::invalid_argument(
                   "DecodeLoop: tables are (stop, n_stop, split, n_split), buffers (done, cur, "
                   "toks, lp, length, first_split, pos)");
             for (size_t i = 0; i < buffers.size(); ++i)
               if (buffers[i] == 0 && i != 5)
                 throw std::invalid_argument("DecodeLoop: a null buffer");
             if (tables[0] == 0 || (tables[2] != 0 && buffers[5] == 0))
               throw std::invalid_argument(
                   "DecodeLoop: needs a stop table, and first_split with a split table");
             if (split_budget != 0 && tables[2] == 0)
               throw std::invalid_argument("DecodeLoop: split_budget needs a split table");
             if (since != 0 && (tables[2] == 0 || step_cap < 1))
               throw std::invalid_argument(
                   "DecodeLoop: since needs a split table and step_cap >= 1");
             auto i64 = [&](size_t i) { return reinterpret_cast<int64_t*>(buffers[i]); };
             return Loop{R, width, pad_id, reinterpret_cast<const uint8_t*>(tables[0]),
                         static_cast<int64_t>(tables[1]),
                         reinterpret_cast<const uint8_t*>(tables[2]),
                         static_cast<int64_t>(tables[3]), reinterpret_cast<uint8_t*>(buffers[0]),
                         i64(1), i64(2), reinterpret_cast<float*>(buffers[3]), i64(4),
                         i64(5), i64(6), reinterpret_cast<int64_t*>(split_budget),
                         reinterpret_cast<int64_t*>(since), step_cap};
           }),
           py::arg("R"), py::arg("width"), py::arg("pad_id"), py::arg("tables"),
           py::arg("buffers"), py::arg("split_budget") = 0, py::arg("since") = 0,
           py::arg("step_cap") = 0)
      .def(
          "step",
          [](const Loop& s, uint64_t probs, uint64_t u, uint64_t argmax, uint64_t logits,
             int64_t logits_stride, int64_t V, int64_t t, int num_threads) {
            if (V < 1 || t < 0 || t >= s.width || logits == 0 ||
                (argmax == 0 && (probs == 0 || u == 0)))
              throw std::invalid_argument(
                  "DecodeLoop.step: needs V >= 1, 0 <= t < width, logits, and argmax or "
                  "probs and u");
            check_pad(s, V, "DecodeLoop.step");
            const Step q{reinterpret_cast<float*>(probs), reinterpret_cast<const float*>(u),
                         reinterpret_cast<const int64_t*>(argmax),
                         reinterpret_cast<const float*>(logits), logits_stride, V, t,
                         num_threads < 1 ? 1 : num_threads};
            py::gil_scoped_release release;
            return decode_step(s, q);
          },
          "Step t's sampling (or greedy ids; float32 probabilities, overwritten) over "
          "float32 logits: padding, stop checks, lengths, first split positions, log-probs, "
          "positions.  Returns the rows still live, or -1 - row for a token id outside "
          "[0, V).")
      .def(
          "step_logits",
          [](const Loop& s, uint64_t u, uint64_t logits, int64_t logits_stride, int64_t V,
             int64_t t, double temperature, int num_threads) {
            if (u == 0) throw std::invalid_argument("DecodeLoop.step_logits: u is a null pointer");
            if (logits == 0)
              throw std::invalid_argument("DecodeLoop.step_logits: logits is a null pointer");
            if (V < 1 || t < 0 || t >= s.width)
              throw std::invalid_argument(
                  "DecodeLoop.step_logits: needs V >= 1 and 0 <= t < width");
            if (s.R > 1 && logits_stride < V)
              throw std::invalid_argument(
                  "DecodeLoop.step_logits: logits_stride must be >= V (rows may not overlap)");
            // (the kernel scales by float(log2(e) / T): finite and normal only in this range)
            if (!(std::isfinite(temperature) && temperature >= 1e-30 && temperature <= 1e30))
              throw std::invalid_argument(
                  "DecodeLoop.step_logits: temperature must be finite and in [1e-30, 1e30], "
                  "got " + std::to_string(temperature));
            check_pad(s, V, "DecodeLoop.step_logits");
            const float* up = reinterpret_cast<const float*>(u);
            const float* lg = reinterpret_cast<const float*>(logits);
            const int nt = num_threads < 1 ? 1 : num_threads;
            py::gil_scoped_release release;
            return decode_step_logits(s, up, lg, logits_stride, V, t, temperature, nt);
          },
          py::arg("u"), py::arg("logits"), py::arg("logits_stride"), py::arg("V"),
          py::arg("t"), py::arg("temperature"), py::arg("num_threads") = 1,
          "Step t, sampled from float32 logits (rows at logits_stride elements, contiguous "
          "last dimension) in one call: per live row, the token drawn from "
          "softmax(logits / temperature) at its uniform u[row] (float32 [R]) and its log-prob "
          "under the raw logits; the pad id and log-prob 0 for stopped rows; then the "
          "bookkeeping of step.  Returns the rows still live.");
}

