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


# -- trees with no nodes, Phases' own arguments, float32 ranges ------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_subtree_of_a_tree_without_nodes_is_empty(backend, monkeypatch):
    """A new, cleared or empty-subtree tree has next_free 0 and root rows holding anything:
    its subtree must come back empty, never follow them (the CPU kernel read node 1 << 30
    and crashed the process)."""
    from rlfuse import _backend

    if backend == "torch":
        monkeypatch.setattr(_backend, "available", lambda b, d="cpu": b == "torch")
    t = Tree(2, 4, 8)
    t.next_free.zero_()
    t.children.fill_(1 << 30)
    t.flags.fill_(0xFF)
    d = t.subtree(torch.tensor([0, 3]))
    assert d.next_free.tolist() == [0, 0]
    # a child index past next_free (stale, from before a clear) is not followed either
    t.init_roots(torch.zeros(2, 4), torch.zeros(2))
    t.children[:, 0] = 5
    assert t.subtree(torch.tensor([1, 2])).next_free.tolist() == [0, 0]


def test_subtree_twice_without_a_search_between():
    """tree.subtree(a).subtree(b), as a two-player game reuses a tree for two moves: the
    first subtree of an unexpanded child is empty, and so is the second."""
    from rlfuse.search import RecurrentOutput, Root, puct_search

    B, K = 2, 16

    def fn(emb, act):
        M = act.shape[0]
        return RecurrentOutput(torch.zeros(M), torch.ones(M), torch.zeros(M, K), torch.zeros(M))

    out = puct_search(Root(torch.zeros(B, K), torch.zeros(B)), fn, 4, dirichlet_fraction=0.0)
    unvisited = (out.root_visit_counts == 0).int().argmax(-1)
    for _ in range(3):    # heap junk for the next tree's uninitialised arrays
        j = torch.full((B, 8, K), 1 << 29, dtype=torch.int32)
        del j
    t1 = out.tree.subtree(unvisited, capacity=8)
    assert t1.next_free.tolist() == [0, 0]
    assert t1.subtree(torch.zeros(B, dtype=torch.long)).next_free.tolist() == [0, 0]


@pytest.mark.parametrize("kw, match", [
    (dict(max_depth=0), "max_depth"),
    (dict(max_depth=-1), "max_depth"),
    (dict(max_depth=2.0), "max_depth"),
    (dict(W=0), "W"),
    (dict(virtual_loss=1e39), "virtual_loss"),
    (dict(c2=float("inf")), "c2"),
    (dict(value_scale=-1e39), "value_scale"),
])
def test_phases_rejects_arguments_its_buffers_or_float32_cannot_hold(kw, match):
    tree = Tree(2, 3, 16)
    tree.init_roots(torch.zeros(2, 3), torch.zeros(2))
    args = dict(rule="puct", W=1, max_depth=4, backend="cpu")
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        Phases(tree, **args)


def test_phases_needs_initialised_roots():
    tree = Tree(2, 3, 16)
    tree.init_roots(torch.zeros(2, 3), torch.zeros(2))
    tree.next_free[1] = 0
    with pytest.raises(ValueError, match="init_roots"):
        Phases(tree, rule="puct", W=1, max_depth=4, backend="cpu")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_expand_and_backup_skip_a_row_without_a_walk(backend):
    """A row that is not new with out_len 0 is how the CUDA select leaves the walks of a
    tree whose walk failed (tree full, no valid action; the error is raised by finish):
    expand and backup must leave that tree alone, never read path[len - 1] = path[-1] or
    an earlier step's path.  (The CPU and reference selects raise instead; their backup
    skips such a row alike.)"""
    from .test_tree import TREE_ARRAYS

    tree = Tree(2, 3, 8)
    tree.init_roots(torch.zeros(2, 3), torch.zeros(2))
    ph = Phases(tree, rule="puct", W=1, max_depth=4, backend=backend)
    out = (torch.zeros(2), torch.ones(2), torch.zeros(2, 3), torch.tensor([5.0, 7.0]))
    ph.select(1)
    ph.expand(1, *out)
    ph.backup(1)
    tree1 = {n: getattr(tree, n)[1].clone() for n in TREE_ARRAYS}
    # tree 1's row as the CUDA select writes it for a failed walk; row 0 keeps its walk
    ph.out_node[1], ph.out_parent[1], ph.out_action[1] = 0, 0, 0
    ph.out_store[1], ph.out_new[1], ph.out_len[1] = tree.capacity, 0, 0
    ph.out_new[0] = 0
    ph.expand(1, *out)
    ph.backup(1)
    for n in TREE_ARRAYS:  # (unallocated rows hold anything, NaN too)
        torch.testing.assert_close(getattr(tree, n)[1], tree1[n], rtol=0, atol=0,
                                   equal_nan=True, msg=n)
    assert tree.visits[0, 0] == 3  # row 0 was backed up again


def test_phases_max_depth_beyond_the_capacity_is_the_same_search():
    """max_depth is clamped to the tree's capacity (no walk is deeper): 2**40 gives the
    search max_depth = capacity gives, with a path buffer of capacity + 1 per walk."""
    from rlfuse.search import RecurrentOutput, Root, puct_search

    B, K = 3, 4
    g = torch.Generator().manual_seed(0)
    logits, values = torch.randn(B, K, generator=g), torch.randn(B, generator=g)

    def fn(emb, act):
        M = act.shape[0]
        h = (act.float() * 0.37).sin()
        return RecurrentOutput(h, torch.full((M,), 0.9), h[:, None] * torch.arange(K), -h)

    runs = [puct_search(Root(logits, values), fn, 12, max_depth=d, dirichlet_fraction=0.0,
                        parallel=2) for d in (12, 2 ** 40)]
    assert torch.equal(runs[0].root_visit_counts, runs[1].root_visit_counts)
    assert torch.equal(runs[0].tree.visits, runs[1].tree.visits)


@pytest.mark.parametrize("search, kw", [
    ("puct_search", dict(virtual_loss=1e39)),
    ("puct_search", dict(pb_c_base=1e39)),
    ("puct_search", dict(pb_c_init=-1e39)),
    ("puct_search", dict(dirichlet_alpha=1e39)),
    ("gumbel_search", dict(value_scale=1e39)),
    ("gumbel_search", dict(maxvisit_init=1e39)),
    ("gumbel_search", dict(gumbel_scale=1e39)),
])
def test_search_parameters_beyond_float32_are_refused(search, kw):
    """The kernels read them as float32: 1e39 would become inf and the scores NaN (the CPU
    search then disagreed with the reference instead of failing)."""
    import rlfuse.search as S

    def fn(emb, act):
        M = act.shape[0]
        return S.RecurrentOutput(torch.zeros(M), torch.ones(M), torch.zeros(M, 3), torch.zeros(M))

    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        getattr(S, search)(S.Root(torch.zeros(2, 3), torch.zeros(2)), fn, 4, **kw)


def test_tree_set_table_rejects_an_empty_table():
    t = Tree(1, 3, 8)
    for bad in (torch.zeros(0, 3, dtype=torch.int32), torch.zeros(2, 0, dtype=torch.int32),
                torch.zeros(4, dtype=torch.int32)):
        with pytest.raises(ValueError, match="set_table"):
            t.set_table(bad)


def test_searches_take_numpy_scalars():
    """numpy scalars (np.float32, np.int64) are real numbers: the searches and Phases take
    them as floats."""
    import numpy as np

    import rlfuse.search as S

    def fn(emb, act):
        M = act.shape[0]
        return S.RecurrentOutput(torch.zeros(M), torch.ones(M), torch.zeros(M, 3), torch.zeros(M))

    root = S.Root(torch.zeros(2, 3), torch.zeros(2))
    a = S.puct_search(root, fn, 4, pb_c_init=np.float32(1.25), pb_c_base=np.int64(19652),
                      virtual_loss=np.float32(1.0), dirichlet_fraction=0.0)
    b = S.puct_search(root, fn, 4, dirichlet_fraction=0.0)
    assert torch.equal(a.root_visit_counts, b.root_visit_counts)
    S.gumbel_search(root, fn, 4, value_scale=np.float32(0.1), maxvisit_init=np.float64(50))
