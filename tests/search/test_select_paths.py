"""The CPU select's fast paths give the choices of its plain ones, bit for bit: walks of
several trees in lockstep (tree.SELECT_GROUP) against one tree at a time, and the sparse
PUCT rule (tree.SPARSE_SELECT: only allocated children scored, the best of the others
from a per-search memo) against scoring every action; on environments with exact and
near ties in the priors, invalid actions (masks and -inf logits), terminal nodes, several
simulations per step with virtual loss, and action counts around the 16-lane width."""

from __future__ import annotations

import pytest
import torch

from rlfuse.search import Phases, RecurrentOutput, Root, Tree, gumbel_search, puct_search
from rlfuse.search import tree as tree_mod
from rlfuse.search.mcts import _simulate

from .test_tree import TREE_ARRAYS, _assert_same


class TieEnv:
    """Integer states; prior logits from a few levels (exact ties) plus near ties (a level
    and the level + 1e-7, whose priors are within 2^-20 of each other), some -inf logits,
    some masked actions, some terminal states; rewards and values on a coarse grid."""

    def __init__(self, A: int, P: int = 211, seed: int = 0, ties: bool = True):
        g = torch.Generator().manual_seed(seed)
        self.A, self.P = A, P
        levels = torch.tensor([0.0, 0.5, 1.0, 1.0 + 1e-7, 2.0])
        self.L = levels[torch.randint(0, len(levels), (P, A), generator=g)]
        if not ties:  # continuous logits, rewards and values (float64 ties are not float32's)
            self.L = torch.randn(P, A, generator=g)
        self.L[torch.rand(P, A, generator=g) < 0.1] = -float("inf")
        self.L[:, 0] = 0.0  # at least one valid action
        self.inv = torch.rand(P, A, generator=g) < 0.1
        self.inv[:, 0] = False
        self.R = torch.randint(-2, 3, (P,), generator=g).float() / 2
        self.V = torch.randint(-4, 5, (P,), generator=g).float() / 4
        self.term = torch.rand(P, generator=g) < 0.1
        if not ties:
            self.R, self.V = torch.randn(P, generator=g), torch.randn(P, generator=g)

    def root(self, B: int) -> Root:
        s = torch.arange(B) % self.P
        return Root(self.L[s].clone(), self.V[s].clone(), s)

    def step(self, emb, action):
        nxt = (emb * 37 + action * 11 + 3) % self.P
        M = nxt.shape[0]
        return RecurrentOutput(self.R[nxt], torch.full((M,), 0.9), self.L[nxt], self.V[nxt],
                               nxt, self.inv[nxt], self.term[nxt])


def _search(rule, env, B, sims, group, sparse, monkeypatch, **kw):
    monkeypatch.setattr(tree_mod, "SELECT_GROUP", group)
    monkeypatch.setattr(tree_mod, "SPARSE_SELECT", sparse)
    root = env.root(B)
    if rule == "puct":
        return puct_search(root, env.step, sims, dirichlet_fraction=0.0, temperature=0.0,
                           backend="cpu", **kw)
    return gumbel_search(root, env.step, sims, gumbel_scale=0.0, backend="cpu", **kw)


def _assert_identical(t1: Tree, t2: Tree):
    """Bit-for-bit equal on the allocated nodes."""
    assert torch.equal(t1.next_free, t2.next_free)
    used = torch.arange(t1.capacity)[None, :] < t1.next_free[:, None]
    expanded = used & (t1.flags & 1).bool()
    for name in TREE_ARRAYS[:-1]:
        a, b = getattr(t1, name), getattr(t2, name)
        m = expanded if a.dim() == 3 else used
        a, b = a[m], b[m]
        if a.is_floating_point():  # NaN-free; compare the bits (so -0.0 != 0.0 too)
            a, b = a.view(torch.int32), b.view(torch.int32)
        assert torch.equal(a, b), name


CASES = [  # rule, A, B, W, extra search arguments
    ("puct", 5, 7, 1, {}),
    ("puct", 16, 1, 1, {}),
    ("puct", 37, 7, 1, {}),
    ("puct", 37, 6, 3, {}),
    ("puct", 37, 5, 2, {"virtual_loss": 2.0, "qtransform": "tree_minmax"}),
    ("puct", 64, 9, 1, {"max_depth": 4}),
    ("puct", 80, 4, 4, {"virtual_loss": 0.0}),
    ("gumbel", 5, 7, 1, {}),
    ("gumbel", 37, 7, 1, {}),
    ("gumbel", 37, 6, 3, {}),
    ("gumbel", 64, 5, 2, {"virtual_loss": 2.0, "max_depth": 3}),
]


@pytest.mark.parametrize("rule,A,B,W,kw", CASES)
def test_fast_select_paths_are_identical(rule, A, B, W, kw, monkeypatch):
    env = TieEnv(A, seed=A + B)
    sims = 48
    plain = _search(rule, env, B, sims, 1, False, monkeypatch, parallel=W, **kw)
    for group, sparse in ((1, True), (3, True), (4, False), (64, True), (4, True)):
        fast = _search(rule, env, B, sims, group, sparse, monkeypatch, parallel=W, **kw)
        _assert_identical(plain.tree, fast.tree)
        assert torch.equal(plain.action, fast.action)
        assert torch.equal(plain.action_weights, fast.action_weights)
        fast.tree.check_invariants()


@pytest.mark.parametrize("rule,W", [("puct", 1), ("puct", 3), ("gumbel", 1), ("gumbel", 2)])
def test_fast_select_paths_match_reference(rule, W, monkeypatch):
    """The default paths (lockstep groups, sparse PUCT) against the Python reference, with
    B not a multiple of the group and K not a multiple of 16 (no exact ties: the float64
    reference breaks those differently from float32)."""
    monkeypatch.setattr(tree_mod, "SELECT_GROUP", 4)
    monkeypatch.setattr(tree_mod, "SPARSE_SELECT", True)
    env = TieEnv(21, seed=7, ties=False)
    root = env.root(6)
    out = {}
    for backend in ("cpu", "torch"):
        if rule == "puct":
            out[backend] = puct_search(root, env.step, 12, parallel=W, dirichlet_fraction=0.0,
                                       temperature=0.0, backend=backend)
        else:
            out[backend] = gumbel_search(root, env.step, 12, parallel=W, gumbel_scale=0.0,
                                         backend=backend)
    _assert_same(out["cpu"].tree, out["torch"].tree)
    assert torch.equal(out["cpu"].action, out["torch"].action)


def test_sparse_memo_holds_the_best_unallocated_action(monkeypatch):
    """After a PUCT search, every memo entry that still names an unallocated action is the
    valid unallocated action with the largest prior (lowest index on ties); entries marked
    ambiguous (-3) have a lower-indexed candidate within 2^-20; both kinds occur here."""
    monkeypatch.setattr(tree_mod, "SPARSE_SELECT", True)
    A, B, sims = 37, 6, 40
    env = TieEnv(A, seed=11)
    root = env.root(B)
    tree = Tree(B, A, sims + 1)
    tree.init_roots(root.prior_logits, root.value, torch.isinf(root.prior_logits))
    tree.payload = tree_mod.make_store(root.embedding, B, sims + 1, "cpu")
    ph = Phases(tree, rule="puct", W=1, max_depth=sims)
    assert ph.memo is not None
    _simulate(ph, env.step, sims)
    memo = ph.memo.view(B, tree.capacity)
    n_known = n_ambiguous = 0
    for b in range(B):
        for n in range(int(tree.next_free[b])):
            code = int(memo[b, n])
            if code == -2:
                continue
            cand = (tree.children[b, n] < 0) & (tree.invalid[b, n] == 0)
            pr = torch.where(cand, tree.prior[b, n], torch.tensor(-1.0))
            if code == -1:
                assert not bool(cand.any())
            elif code == -3:
                best = int(pr.argmax())
                p = float(pr[best])
                near = cand[:best] & (tree.prior[b, n, :best] >= p - p * 2.0 ** -20)
                assert bool(near.any()) or 0.0 < p < 1e-30
                n_ambiguous += 1
            elif bool(cand[code]):
                assert code == int(pr.argmax()), (b, n)
                n_known += 1
    assert n_known > 0 and n_ambiguous > 0


def test_memo_is_per_search():
    """A tree reused (cleared) across searches gets a fresh memo: the second search equals a
    search on a new tree."""
    env = TieEnv(37, seed=3)
    storage = Tree(5, 37, 33)
    for _ in range(2):
        a = puct_search(env.root(5), env.step, 32, dirichlet_fraction=0.0, temperature=0.0,
                        tree=storage.clear())
    b = puct_search(env.root(5), env.step, 32, dirichlet_fraction=0.0, temperature=0.0)
    _assert_identical(a.tree, b.tree)


@pytest.mark.parametrize("A,W", [(37, 1), (64, 3)])
def test_children_mask_matches_the_child_rows(A, W):
    """With K <= 64 the sparse rule reads a node's children from a 64-bit mask; after a
    search, every node whose memo entry is known has the mask of its child row."""
    B, sims = 6, 40
    env = TieEnv(A, seed=A)
    root = env.root(B)
    tree = Tree(B, A, sims + 1)
    tree.init_roots(root.prior_logits, root.value, torch.isinf(root.prior_logits))
    tree.payload = tree_mod.make_store(root.embedding, B, sims + 1, "cpu")
    ph = Phases(tree, rule="puct", W=W, max_depth=sims)
    assert ph.kids is not None
    _simulate(ph, env.step, sims)
    memo, kids = ph.memo.view(B, -1), ph.kids.view(B, -1)
    bits = torch.tensor([1 << a if a < 63 else -(1 << 63) for a in range(A)])
    checked = 0
    for b in range(B):
        for n in range(int(tree.next_free[b])):
            if int(memo[b, n]) == -2:
                continue
            want = int(bits[tree.children[b, n] >= 0].sum())
            assert int(kids[b, n]) == want, (b, n)
            checked += 1
    assert checked > B
    wide = Tree(2, 65, 4)
    wide.init_roots(torch.zeros(2, 65), torch.zeros(2))
    assert Phases(wide, rule="puct", W=1, max_depth=3).kids is None


@pytest.mark.parametrize("A", [16, 64])
def test_fast_select_paths_on_a_kept_subtree(A, monkeypatch):
    """A search continued on a subtree (nodes with children before the search starts)
    gives the same trees on the fast and the plain paths."""
    env = TieEnv(A, seed=5)
    B = 5
    trees = []
    for group, sparse in ((1, False), (4, True)):
        monkeypatch.setattr(tree_mod, "SELECT_GROUP", group)
        monkeypatch.setattr(tree_mod, "SPARSE_SELECT", sparse)
        first = puct_search(env.root(B), env.step, 40, dirichlet_fraction=0.0, temperature=0.0)
        act = first.root_visit_counts.argmax(-1)
        sub = first.tree.subtree(act, capacity=80)
        nxt = env.step(env.root(B).embedding, act)
        out = puct_search(Root(nxt.prior_logits, nxt.value, nxt.embedding), env.step, 30,
                          dirichlet_fraction=0.0, temperature=0.0, tree=sub)
        out.tree.check_invariants()
        trees.append(out)
    assert bool((trees[1].tree.next_free > 31).any())  # some trees kept nodes
    _assert_identical(trees[0].tree, trees[1].tree)
    assert torch.equal(trees[0].action, trees[1].action)
