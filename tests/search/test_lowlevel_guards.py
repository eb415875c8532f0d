"""Guards of the search's raw-pointer entry points against inputs that would write or read
out of bounds: Phases step widths and stores, kv_pack plans whose sums overflow int64, and
a DecodeLoop pad id outside the vocabulary."""

from __future__ import annotations

import array

import pytest
import torch

from rlfuse.search.tree import Phases, Tree

_C = pytest.importorskip("rlfuse._C")


def _phases(W=1):
    tree = Tree(2, 3, 64)
    tree.init_roots(torch.zeros(2, 3), torch.zeros(2))
    return tree, Phases(tree, rule="puct", W=W, max_depth=4, backend="cpu")


@pytest.mark.parametrize("call", [
    lambda ph: ph.step(0, None, 16),
    lambda ph: ph.step(0, None, -1),
    lambda ph: ph.select(2),
    lambda ph: ph.select(0),
    lambda ph: ph.backup(3),
])
def test_phases_reject_widths_beyond_their_buffers(call):
    _, ph = _phases(W=1)
    with pytest.raises(ValueError, match="Phases"):
        call(ph)


def test_phases_step_rejects_another_trees_store():
    from rlfuse.search.tree import TensorStore

    tree, ph = _phases(W=1)
    store = TensorStore(torch.zeros(2, 4), 2, 8, "cpu")    # sized for a tree of 8 nodes
    with pytest.raises(ValueError, match="payload store"):
        ph.step(0, None, 1, store, 0, 0)
    ok = TensorStore(torch.zeros(2, 4), 2, tree.capacity, "cpu")
    gathered = ok.empty_rows(2)
    ph.step(0, None, 1, ok, 0, gathered.data_ptr())        # the right size passes


def test_kv_pack_rejects_a_plan_whose_slice_end_overflows():
    src = torch.randn(2, 1, 8, 4)
    es = src.element_size()
    srcs = [[src.data_ptr(), src.stride(0) * es, src.stride(1) * es, src.stride(2) * es, 2, 8]]
    dst = torch.empty(1, 1, 4, 4)
    plan = array.array("q", [0, 0, 2 ** 63 - 2, 4, 1])   # start + n wraps around in int64
    assert _C.kv_pack(dst.data_ptr(), 1, 1, 4, 16, srcs, plan.buffer_info()[0], 1) == 0
    big = array.array("q", [-1, 0, 0, 0, 1, -1, 0, 0, 0, 2 ** 63 - 1])   # reps sum wraps
    assert _C.kv_pack(dst.data_ptr(), 1, 1, 4, 16, srcs, big.buffer_info()[0], 2) == 1


def test_kv_pack_into_wider_rows_writes_only_the_first_columns():
    """dst_cols > C: each [H, dst_cols, D] row gets the slice right-aligned in its first C
    columns (zeros in front); the columns after C are left alone, repeats included; a
    dst_cols below C is refused."""
    src = torch.randn(2, 2, 8, 4)
    es = src.element_size()
    srcs = [[src.data_ptr(), src.stride(0) * es, src.stride(1) * es, src.stride(2) * es, 2, 8]]
    plan = array.array("q", [0, 1, 2, 3, 2, -1, 0, 0, 0, 1])   # 3 columns twice, a zero row
    dst = torch.full((3, 2, 6, 4), float("nan"))
    assert _C.kv_pack(dst.data_ptr(), 3, 2, 4, 16, srcs, plan.buffer_info()[0], 2, 6) == -1
    for r in (0, 1):
        assert torch.equal(dst[r, :, 1:4], src[1, :, 2:5]) and not dst[r, :, :1].any()
    assert not dst[2, :, :4].any()
    assert dst[:, :, 4:].isnan().all()
    with pytest.raises(ValueError, match="dst_cols"):
        _C.kv_pack(dst.data_ptr(), 3, 2, 4, 16, srcs, plan.buffer_info()[0], 2, 3)


def test_decode_loop_names_a_pad_id_outside_the_vocabulary():
    R, V, W = 2, 5, 2
    stop = torch.tensor([True, False, False, False, False])
    done = torch.tensor([True, False])                     # row 0 stopped: it gets the pad
    cur, pos = torch.zeros(R, 1, dtype=torch.long), torch.zeros(R, 1, dtype=torch.long)
    toks, lp = torch.zeros(R, W, dtype=torch.long), torch.zeros(R, W)
    length = torch.zeros(R, dtype=torch.long)
    loop = _C.DecodeLoop(R, W, 9, [stop.data_ptr(), 5, 0, 0],
                         [done.data_ptr(), cur.data_ptr(), toks.data_ptr(), lp.data_ptr(),
                          length.data_ptr(), 0, pos.data_ptr()])
    am, logits = torch.tensor([1, 2]), torch.zeros(R, V)
    with pytest.raises(ValueError, match="pad token id 9"):
        loop.step(0, 0, am.data_ptr(), logits.data_ptr(), V, V, 1, 1)
