"""The CPU select's fast paths give the choices of its plain ones, bit for bit: walks of
several trees in lockstep (tree.SELECT_GROUP) against one tree at a time, and the sparse
PUCT rule (tree.SPARSE_SELECT: only allocated children scored, the best of the others
from a per-search memo) against scoring every action; on environments with exact and
near ties in the priors, invalid actions (masks and -inf logits), terminal nodes, several
simulations per step with virtual loss, and action counts around the 16-lane width."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from rlfuse import _backend
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
    ambiguous (-3) have a lower-indexed candidate within 2^-20 (or a tiny prior, or a NaN
    prior in the row, which this environment has not); both kinds occur here."""
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
                assert (bool(near.any()) or 0.0 < p < 1e-30
                        or bool(tree.prior[b, n].isnan().any()))
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


# --------------------------------------------------------------------------------------
# NaN scores: the specification's scan (tree._pick) keeps a node's first valid action when
# its score is NaN, whatever the scores after it; every CPU path at every ISA level must
# choose so (docs/search.md).  NaN is written into the tree's arrays, as low-level callers
# may: a prior (its score is NaN whether the action has a child or not) or a visited
# child's Q (children_values, which the reference reads, and children_q, which the kernels
# read).
# --------------------------------------------------------------------------------------
_ISAS = (["x86-64-v2", "x86-64-v3", "x86-64-v4"]
         if platform.machine().lower() in ("x86_64", "amd64") else ["baseline"])
# the CPU select paths (SELECT_GROUP, SPARSE_SELECT): the dense 16-lane argmax one tree at
# a time and in lockstep; the sparse rule (memo of the best unallocated prior) one tree at
# a time and in lockstep (with K <= 64 the branch-free small-node scoring of puct_walks)
_PATHS = {"dense": (1, False), "dense_lockstep": (4, False), "sparse": (1, True),
          "sparse_lockstep": (4, True)}


def _nan_tree(K: int, B: int, N: int, seed: int):
    """B roots over K actions (capacity N), tree b's first valid action at a different
    index (0, 1, 3, 17, 40, 63, 70, each capped at K - 2) and with the largest prior logit
    (so that it is visited first), the others random."""
    g = torch.Generator().manual_seed(seed)
    tree = Tree(B, K, N)
    inv = torch.zeros(B, K, dtype=torch.bool)
    logits = torch.randn(B, K, generator=g)
    for b in range(B):
        f = min((0, 1, 3, 17, 40, 63, 70)[b % 7], K - 2)
        inv[b, :f] = True
        logits[b, f] = 4.0
    tree.init_roots(logits, torch.randn(B, generator=g) * 0.1, inv)
    return tree


def _copy_tree(t: Tree) -> Tree:
    u = Tree(t.batch_size, t.num_actions, t.capacity)
    for name in tree_mod._ARRAYS:
        getattr(u, name).copy_(getattr(t, name))
    return u


def _nan_steps(fast: Tree, ref: Tree, W: int, steps: int, seed: int):
    """steps of select / expand / backup on the CPU and reference backends (one new
    Phases each: a fresh memo), the selections compared at every step."""
    pf = Phases(fast, rule="puct", W=W, max_depth=6, backend="cpu")
    pr = Phases(ref, rule="puct", W=W, max_depth=6, backend="torch")
    g = torch.Generator().manual_seed(seed)
    M, K = fast.batch_size * W, fast.num_actions
    for step in range(steps):
        a, b = pf.select(W), pr.select(W)
        for name in ("action", "parent", "node", "new"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (step, name)
        out = (torch.randn(M, generator=g) * 0.5, torch.full((M,), 0.9),
               torch.randn(M, K, generator=g), torch.randn(M, generator=g) * 0.5)
        for ph in (pf, pr):
            ph.expand(W, *out)
            ph.backup(W)
    for name in ("children", "visits", "children_visits", "next_free"):
        assert torch.equal(getattr(fast, name), getattr(ref, name)), name
    return pf


def _nan_case(kind: str, K: int, W: int):
    B = 7
    fast = _nan_tree(K, B, 1 + 9 * W, seed=K)  # room for 5 + 4 steps
    if kind == "root":  # unallocated: the sparse rule's memo and the dense argmax
        for b in range(B):
            fast.prior[b, 0, int((fast.invalid[b, 0] == 0).nonzero()[0])] = math.nan
        return fast, _copy_tree(fast)
    ref = _copy_tree(fast)
    _nan_steps(fast, ref, W, 5, seed=K + 1)  # no NaN yet: the backends agree
    expanded = (torch.arange(fast.capacity)[None] < fast.next_free[:, None]) & (
        fast.flags & 1).bool()
    hit = 0
    for t in (fast, ref):
        for b, n in expanded.nonzero().tolist():
            valid = (t.invalid[b, n] == 0).nonzero()
            if len(valid) == 0:
                continue
            f = int(valid[0])
            if kind == "prior":  # with or without a child
                t.prior[b, n, f] = math.nan
                hit += 1
            elif t.children_visits[b, n, f] > 0:  # "q": a visited child
                t.children_values[b, n, f] = math.nan
                t.children_q[b, n, f] = math.nan
                hit += 1
    assert hit > 0
    return fast, ref


@pytest.mark.parametrize("path", list(_PATHS))
@pytest.mark.parametrize("isa", _ISAS)
def test_nan_first_valid_score_on_every_path_and_isa(isa, path, monkeypatch):
    """A NaN score at a node's first valid action (its prior, or a visited child's Q), with
    numbers after it: every CPU path chooses as the reference (the first valid action), at
    every ISA level the build has, for K in the 16-lane tail only (5), vectors and a tail
    with the children mask (37) and above 64 actions (80), one simulation per step and three
    (virtual loss, the sparse rule with simulations in flight).  The fast paths used to take
    the best number after it."""
    C = _backend.cpu_module()
    old = C.active_isa()
    if not C.set_isa(isa):
        pytest.skip(f"this CPU (or build) lacks {isa}")
    group, sparse = _PATHS[path]
    monkeypatch.setattr(tree_mod, "SELECT_GROUP", group)
    monkeypatch.setattr(tree_mod, "SPARSE_SELECT", sparse)
    try:
        for K in (5, 37, 80):
            for kind, W in (("root", 1), ("prior", 3), ("q", 1)):
                fast, ref = _nan_case(kind, K, W)
                ph = _nan_steps(fast, ref, W, 4, seed=K + 2)
                if sparse and kind == "root":  # a NaN prior: the roots are scored densely
                    assert (ph.memo.view(fast.batch_size, -1)[:, 0] == -3).all()
    finally:
        C.set_isa(old)
