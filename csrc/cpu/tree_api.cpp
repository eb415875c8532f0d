// pybind11 entry points of the tree family in rlfuse._C (compiled once; the kernels behind
// them are per-ISA, see isa.h).  A tree's arrays are preallocated by python/rlfuse/search,
// so their addresses are handed over once, as a TreeView; the per-search settings and
// output buffers likewise as a SelectConfig.  The calls of the search loop then take only
// these two objects, the number of simulations of the step and the recurrent outputs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/tree.h"

namespace py = pybind11;
using rlfuse::tree::View;

namespace {

template <typename T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

View make_view(const std::vector<int64_t>& w) {
  if (w.size() != size_t(rlfuse::tree::kViewWords))
    throw std::invalid_argument("rlfuse._C.TreeView: expected " +
                                std::to_string(rlfuse::tree::kViewWords) + " words, got " +
                                std::to_string(w.size()));
  View v{};
  v.B = w[0];
  v.N = w[1];
  v.K = w[2];
  v.parent = ptr<int32_t>(w[3]);
  v.action = ptr<int32_t>(w[4]);
  v.visits = ptr<int32_t>(w[5]);
  v.value = ptr<float>(w[6]);
  v.raw_value = ptr<float>(w[7]);
  v.depth = ptr<int32_t>(w[8]);
  v.flags = ptr<uint8_t>(w[9]);
  v.inflight = ptr<int32_t>(w[10]);
  v.child = ptr<int32_t>(w[11]);
  v.logit = ptr<float>(w[12]);
  v.prior = ptr<float>(w[13]);
  v.edge_visits = ptr<int32_t>(w[14]);
  v.edge_value = ptr<float>(w[15]);
  v.reward = ptr<float>(w[16]);
  v.discount = ptr<float>(w[17]);
  v.invalid = ptr<uint8_t>(w[18]);
  v.next_free = ptr<int32_t>(w[19]);
  v.minmax = ptr<float>(w[20]);
  v.gumbel = ptr<float>(w[21]);
  v.considered = ptr<int32_t>(w[22]);
  v.table = ptr<const int32_t>(w[23]);
  return v;
}

// ints: rule, max_depth, qnorm, table_rows, table_len, then the output addresses node,
// parent, action, store, new, path, len; floats: c1, c2, virtual_loss, value_scale,
// maxvisit_init.
rlfuse::tree::SelectParams make_select(const std::vector<int64_t>& ia,
                                       const std::vector<double>& fa) {
  if (ia.size() != 12 || fa.size() != 5)
    throw std::invalid_argument("rlfuse._C.SelectConfig: expected 12 ints and 5 floats");
  rlfuse::tree::SelectParams p{};
  p.rule = int(ia[0]);
  p.max_depth = int(ia[1]);
  p.qnorm = int(ia[2]);
  p.table_rows = int(ia[3]);
  p.table_len = int(ia[4]);
  p.out_node = ptr<int64_t>(ia[5]);
  p.out_parent = ptr<int64_t>(ia[6]);
  p.out_action = ptr<int64_t>(ia[7]);
  p.out_store = ptr<int64_t>(ia[8]);
  p.out_new = ptr<uint8_t>(ia[9]);
  p.out_path = ptr<int32_t>(ia[10]);
  p.out_len = ptr<int32_t>(ia[11]);
  p.c1 = float(fa[0]);
  p.c2 = float(fa[1]);
  p.virtual_loss = float(fa[2]);
  p.value_scale = float(fa[3]);
  p.maxvisit_init = float(fa[4]);
  return p;
}

}  // namespace

void rlfuse_bind_tree(py::module_& m) {
  py::class_<View>(m, "TreeView", "Addresses and sizes of one batch of trees (search/tree.py).")
      .def(py::init(&make_view));
  py::class_<rlfuse::tree::SelectParams>(
      m, "SelectConfig", "Selection rule, constants and output buffers of one search.")
      .def(py::init(&make_select));

  m.def(
      "tree_select",
      [](const View& t, rlfuse::tree::SelectParams p, int W, int nt) {
        p.W = W;
        int64_t where = -1;
        int rc;
        {
          py::gil_scoped_release release;
          rc = RLFUSE_ISA_CALL(tree_select, t, p, nt, &where);
        }
        return py::make_tuple(rc, where);
      },
      "W simulations per tree from the roots to new leaves; returns (status, first tree).");
  m.def(
      "tree_expand",
      [](const View& t, const rlfuse::tree::SelectParams& p, int W, int64_t reward,
         int64_t discount, int64_t logits, int64_t value, int64_t invalid, int64_t terminal,
         int nt) {
        rlfuse::tree::ExpandInputs in{};
        in.M = t.B * W;
        in.W = W;
        in.node = p.out_node;
        in.parent = p.out_parent;
        in.action = p.out_action;
        in.is_new = p.out_new;
        in.reward = ptr<const float>(reward);
        in.discount = ptr<const float>(discount);
        in.logits = ptr<const float>(logits);
        in.value = ptr<const float>(value);
        in.invalid = ptr<const uint8_t>(invalid);
        in.terminal = ptr<const uint8_t>(terminal);
        int64_t where = -1;
        int rc;
        {
          py::gil_scoped_release release;
          rc = RLFUSE_ISA_CALL(tree_expand, t, in, nt, &where);
        }
        return py::make_tuple(rc, where);
      },
      "Write the new leaves of the last select (float32 contiguous rows; invalid / terminal "
      "uint8 or 0); returns (status, first bad row).");
  m.def(
      "tree_backup",
      [](const View& t, const rlfuse::tree::SelectParams& p, int W, int nt) {
        rlfuse::tree::BackupInputs in{};
        in.W = W;
        in.path_stride = p.max_depth + 1;
        in.path = p.out_path;
        in.len = p.out_len;
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(tree_backup, t, in, nt);
      },
      "Back up the paths of the last select and release their virtual loss.");
  m.def(
      "tree_subtree",
      [](const View& src, const View& dst, int64_t actions, int64_t src_of, int nt) {
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(tree_subtree, src, dst, ptr<const int64_t>(actions),
                        ptr<int32_t>(src_of), nt);
      },
      "Copy the subtree under each root's child `actions[b]` (int64 [B]) into dst, renumbered "
      "breadth first; src_of (int32 [B, dst.N]) receives the source node of each dst node.");
}
