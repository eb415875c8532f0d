// KV-cache packing for the LLM step search (python/rlfuse/search/llm_gen.py, _pack).
//
// One output tensor [R, H, C, D] (contiguous) receives, for every row r, the cache slice
// of one prefix: columns start[r] .. start[r] + n[r] of row src_row[r] of source tensor
// group[r], right-aligned (columns C - n[r] .. C - 1), zeros in front; a row with
// group[r] < 0 is all zeros.  Sources are [Rs, H, Ts, D] tensors with any strides but a
// contiguous last dimension; their rows may repeat (several samples of one prefix).  Only
// bytes are copied, so every dtype works.  This replaces a gather per source batch plus a
// scatter into the output (two passes over the cache) with one pass of contiguous copies.
//
// Compiled once (no ISA variants: it is memcpy / memset bound).  The Python side checks
// shapes, strides, dtypes and ranges before the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

struct Source {
  const char* base;
  int64_t s_row, s_head, s_col;  // bytes
};

void kv_pack(char* dst, int64_t R, int64_t H, int64_t C, int64_t row_bytes,
             const std::vector<Source>& src, const int64_t* group, const int64_t* src_row,
             const int64_t* start, const int64_t* n) {
  const int64_t head_bytes = C * row_bytes;
  for (int64_t r = 0; r < R; ++r) {
    char* out = dst + r * H * head_bytes;
    const int64_t g = group[r];
    if (g < 0) {
      std::memset(out, 0, static_cast<size_t>(H * head_bytes));
      continue;
    }
    const Source& s = src[static_cast<size_t>(g)];
    const int64_t cols = n[r], pad = C - cols;
    const char* in = s.base + src_row[r] * s.s_row + start[r] * s.s_col;
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
  }
}

}  // namespace

void rlfuse_bind_kvpack(py::module_& m) {
  m.def(
      "kv_pack",
      [](uint64_t dst, int64_t R, int64_t H, int64_t C, int64_t row_bytes,
         const std::vector<std::vector<int64_t>>& sources, uint64_t group, uint64_t src_row,
         uint64_t start, uint64_t n) {
        std::vector<Source> src;
        src.reserve(sources.size());
        for (const auto& s : sources) {
          if (s.size() != 4) throw std::invalid_argument("kv_pack: a source is (ptr, s_row, s_head, s_col)");
          src.push_back(Source{reinterpret_cast<const char*>(static_cast<uintptr_t>(s[0])), s[1],
                               s[2], s[3]});
        }
        py::gil_scoped_release release;
        kv_pack(reinterpret_cast<char*>(dst), R, H, C, row_bytes, src,
                reinterpret_cast<const int64_t*>(group), reinterpret_cast<const int64_t*>(src_row),
                reinterpret_cast<const int64_t*>(start), reinterpret_cast<const int64_t*>(n));
      },
      "Pack right-aligned KV-cache slices of several source tensors into one [R, H, C, D] "
      "tensor (raw pointers and byte strides; validated in rlfuse.search.llm_gen).");
}
