// pybind11 entry points of the tree family in rlfuse._C (compiled once; the kernels behind
// them are per-ISA, see isa.h).  A tree's arrays are preallocated by python/rlfuse/search,
// so their addresses are handed over once, as a TreeView; the per-search settings and
// output buffers likewise as a SelectConfig.  The calls of the search loop then take only
// these two objects, the number of simulations of the step and the recurrent outputs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
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

// The rows of the last select (its output buffers) and the recurrent outputs' addresses.
rlfuse::tree::ExpandInputs expand_inputs(const View& t, const rlfuse::tree::SelectParams& p,
                                         int W, int64_t reward, int64_t discount,
                                         int64_t logits, int64_t value, int64_t invalid,
                                         int64_t terminal) {
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
  return in;
}

// The paths the last select recorded.
rlfuse::tree::BackupInputs backup_inputs(const rlfuse::tree::SelectParams& p, int W) {
  rlfuse::tree::BackupInputs in{};
  in.W = W;
  in.path_stride = p.max_depth + 1;
  in.path = p.out_path;
  in.len = p.out_len;
  return in;
}

// Payload rows of a [B, n1, ...] buffer (search/tree.py TensorStore, one contiguous
// tensor), `row_bytes` bytes each: row m of a contiguous [M, ...] tensor <-> the buffer's row
// (m / W, node[m]) (the rows of a step are ordered tree by tree, W per tree); `put` copies
// rows -> buffer (in row order), else buffer -> rows.
void copy_payload_rows(int64_t buf, int64_t row_bytes, int64_t n1, int64_t W,
                       const int64_t* node, int64_t rows, int64_t M, bool put) {
  char* b = ptr<char>(buf);
  char* r = ptr<char>(rows);
  const size_t n = size_t(row_bytes);
  for (int64_t m = 0; m < M; ++m) {
    char* slot = b + ((m / W) * n1 + node[m]) * row_bytes;
    char* row = r + m * row_bytes;
    if (put)
      std::memcpy(slot, row, n);
    else
      std::memcpy(row, slot, n);
  }
}

}  // namespace

void rlfuse_bind_tree(py::module_& m) {
  py::class_<View>(m, "TreeView", py::module_local(), "Addresses and sizes of one batch of trees (search/tree.py).")
      .def(py::init(&rlfuse::tree::make_view));
  py::class_<rlfuse::tree::SelectParams>(
      m, "SelectConfig", py::module_local(), "Selection rule, constants and output buffers of one search.")
      .def(py::init([](const std::vector<int64_t>& ia, const std::vector<double>& fa) {
        return rlfuse::tree::make_select(ia, fa, false);
      }));

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
        const rlfuse::tree::ExpandInputs in =
            expand_inputs(t, p, W, reward, discount, logits, value, invalid, terminal);
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
      "tree_expand_backup",
      [](const View& t, const rlfuse::tree::SelectParams& p, int W, int64_t reward,
         int64_t discount, int64_t logits, int64_t value, int64_t invalid, int64_t terminal,
         int nt) {
        const rlfuse::tree::ExpandInputs in =
            expand_inputs(t, p, W, reward, discount, logits, value, invalid, terminal);
        const rlfuse::tree::BackupInputs bi = backup_inputs(p, W);
        int64_t where = -1;
        int rc;
        {
          py::gil_scoped_release release;
          rc = RLFUSE_ISA_CALL(tree_expand, t, in, nt, &where);
          if (rc == 0) RLFUSE_ISA_CALL(tree_backup, t, bi, nt);
        }
        return py::make_tuple(rc, where);
      },
      "tree_expand, then (if it succeeded) tree_backup, in one call; returns expand's "
      "(status, first bad row).");
  m.def(
      "tree_backup",
      [](const View& t, const rlfuse::tree::SelectParams& p, int W, int nt) {
        const rlfuse::tree::BackupInputs in = backup_inputs(p, W);
        py::gil_scoped_release release;
        RLFUSE_ISA_CALL(tree_backup, t, in, nt);
      },
      "Back up the paths of the last select and release their virtual loss.");
  m.def(
      "tree_step",
      [](const View& t, rlfuse::tree::SelectParams p, int W, int64_t reward, int64_t discount,
         int64_t logits, int64_t value, int64_t invalid, int64_t terminal, int64_t buf,
         int64_t row_bytes, int64_t n1, int64_t put_rows, int W_next, int64_t gather_rows,
         int nt) {
        int64_t where = -1;
        int rc = 0, stage = 0;
        {
          py::gil_scoped_release release;
          if (W > 0) {
            const rlfuse::tree::ExpandInputs in =
                expand_inputs(t, p, W, reward, discount, logits, value, invalid, terminal);
            rc = RLFUSE_ISA_CALL(tree_expand, t, in, nt, &where);
            if (rc == 0) {
              RLFUSE_ISA_CALL(tree_backup, t, backup_inputs(p, W), nt);
              if (put_rows != 0)
                copy_payload_rows(buf, row_bytes, n1, W, p.out_store, put_rows, t.B * W, true);
            }
          }
          if (rc == 0 && W_next > 0) {
            stage = 1;
            p.W = W_next;
            rc = RLFUSE_ISA_CALL(tree_select, t, p, nt, &where);
            if (rc == 0 && gather_rows != 0)
              copy_payload_rows(buf, row_bytes, n1, W_next, p.out_parent, gather_rows,
                                t.B * W_next, false);
          }
        }
        return py::make_tuple(rc, where, stage);
      },
      "One simulation step in one call: (W > 0) expand and back up the last select's W "
      "simulations per tree, and copy their new payload rows (put_rows, contiguous [B * W, "
      "...]; 0: none) into slot out_store of the payload buffer buf ([B, n1, ...], rows of "
      "row_bytes bytes); then (W_next > 0) select W_next simulations per tree and copy their "
      "parents' payload rows into gather_rows (0: none).  Returns (status, first bad row or "
      "tree, stage: 0 expand, 1 select).");
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
