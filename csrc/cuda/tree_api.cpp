// pybind11 entry points of the tree family in rlfuse._cuda (host compiler).  Kernels and
// launchers are in csrc/cuda/tree.cu; the TreeView / SelectConfig objects carry device
// addresses and are built once per tree / search (csrc/cpu/tree.h).  Launches are
// asynchronous on the given stream; errors found by the kernels go to the status buffer
// of the SelectConfig, which python/rlfuse/search/tree.py reads after the search.
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "api.h"
#include "cpu/tree.h"

namespace py = pybind11;
using rlfuse::cuda_api::as_ptr;
using rlfuse::cuda_api::launch;
using rlfuse::tree::SelectParams;
using rlfuse::tree::View;
using u64 = std::uint64_t;

extern "C" {
int rlfuse_tree_select(const View* t, const SelectParams* p, int W, void* stream);
int rlfuse_tree_expand(const View* t, const SelectParams* p, int W, const float* reward,
                       const float* discount, const float* logits, const float* value,
                       const uint8_t* invalid, const uint8_t* terminal, void* stream);
int rlfuse_tree_backup(const View* t, const SelectParams* p, int W, void* stream);
int rlfuse_tree_subtree(const View* src, const View* dst, const int64_t* actions,
                        int32_t* src_of, void* stream);
}

void rlfuse_bind_cuda_tree(py::module_& m) {
  py::class_<View>(m, "TreeView", py::module_local(),
                   "Device addresses and sizes of one batch of trees (search/tree.py).")
      .def(py::init(&rlfuse::tree::make_view));
  py::class_<SelectParams>(m, "SelectConfig", py::module_local(),
                           "Selection rule, constants, output and status buffers of a search.")
      .def(py::init([](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        return rlfuse::tree::make_select(ia, fa, true);
      }));
  m.def(
      "tree_select",
      [](const View& t, const SelectParams& p, int W, u64 stream) {
        launch("tree_select", [&] { return rlfuse_tree_select(&t, &p, W, as_ptr(stream)); });
      },
      "W simulations per tree from the roots to new leaves (a warp per tree).");
  m.def(
      "tree_expand",
      [](const View& t, const SelectParams& p, int W, u64 reward, u64 discount, u64 logits,
         u64 value, u64 invalid, u64 terminal, u64 stream) {
        launch("tree_expand", [&] {
          return rlfuse_tree_expand(&t, &p, W, static_cast<const float*>(as_ptr(reward)),
                                    static_cast<const float*>(as_ptr(discount)),
                                    static_cast<const float*>(as_ptr(logits)),
                                    static_cast<const float*>(as_ptr(value)),
                                    static_cast<const uint8_t*>(as_ptr(invalid)),
                                    static_cast<const uint8_t*>(as_ptr(terminal)), as_ptr(stream));
        });
        return py::make_tuple(0, -1);
      },
      "Write the new leaves of the last select (a warp per row); errors go to the status.");
  m.def(
      "tree_backup",
      [](const View& t, const SelectParams& p, int W, u64 stream) {
        launch("tree_backup", [&] { return rlfuse_tree_backup(&t, &p, W, as_ptr(stream)); });
      },
      "Back up the paths of the last select and release their virtual loss.");
  m.def(
      "tree_subtree",
      [](const View& src, const View& dst, u64 actions, u64 src_of, u64 stream) {
        launch("tree_subtree", [&] {
          return rlfuse_tree_subtree(&src, &dst, static_cast<const int64_t*>(as_ptr(actions)),
                                     static_cast<int32_t*>(as_ptr(src_of)), as_ptr(stream));
        });
      },
      "Copy the subtree under each root's child actions[b] into dst (a thread per tree).");
}
