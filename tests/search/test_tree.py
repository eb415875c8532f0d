"""Tree kernels: hand-worked cases, the C++ kernels against the Python reference phase by
phase, invariants after every call, payload stores, subtree extraction, bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rlfuse.search import Phases, RecurrentOutput, Root, Tree, gumbel_search, puct_search
from rlfuse.search.mcts import _simulate

from .envs import HashEnv

TREE_ARRAYS = ("parent", "action", "visits", "value", "raw_value", "depth", "flags", "inflight",
               "children", "logits", "prior", "children_visits", "children_values", "rewards",
               "discounts", "invalid", "children_q", "next_free")


def _terminal_bandit(rewards):
    """Every action ends the episode with reward rewards[a]; uniform prior, value 0."""
    r = torch.tensor(rewards)
    A = len(rewards)

    def fn(emb, action):
        M = action.shape[0]
        return RecurrentOutput(r[action], torch.ones(M), torch.zeros(M, A), torch.zeros(M),
                               None, None, torch.ones(M, dtype=torch.bool))
    return fn


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_puct_hand_worked(backend):
    # Two actions, equal priors, terminal children with rewards 1 and 0, root value 0.
    # c(N) = 1.25 + log((N + 19653) / 19652).  sim 1: all scores equal -> action 0 (lowest
    # index); the root's mean becomes (0 + 1) / 2.  sims 2-4: Q_hat(0) = 1 beats the
    # exploration of action 1 (sqrt(N) c / 2 < 1 + sqrt(N) c / (2 N) for N <= 4).  sim 5:
    # N = 5: 1 + 2.236 * 1.2502 / 10 = 1.2795 < 2.236 * 1.2502 / 2 = 1.3978 -> action 1.
    root = Root(torch.zeros(1, 2), torch.zeros(1))
    expected = {1: [1, 0], 4: [4, 0], 5: [4, 1], 6: [5, 1]}
    for n, counts in expected.items():
        out = puct_search(root, _terminal_bandit([1.0, 0.0]), n, dirichlet_fraction=0.0,
                          backend=backend)
        assert out.root_visit_counts[0].tolist() == counts
        t = out.tree
        # the revisited terminal leaf keeps value 0; the root's mean is (#action-0 visits)/N
        assert t.visits[0, 0].item() == n + 1
        assert t.value[0, 0].item() == pytest.approx(counts[0] / (n + 1))
        assert t.next_free[0].item() == 1 + sum(c > 0 for c in counts)
        t.check_invariants()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gumbel_hand_worked(backend):
    # Four actions, gumbel 0, priors favouring 3 > 2 > 1 > 0, terminal rewards all 0: the
    # sequential halving schedule for m = 4, n = 8 is 0 0 0 0 | 1 1 2 2 (ceil(log2 4) = 2
    # phases; the first gives 8 // (2 * 4) = 1 visit to each of the 4, the second
    # 8 // (2 * 2) = 2 to each of the best 2 by logits) -> counts [1, 1, 3, 3].
    root = Root(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.zeros(1))
    out = gumbel_search(root, _terminal_bandit([0.0] * 4), 8, gumbel_scale=0.0,
                        backend=backend)
    assert out.root_visit_counts[0].tolist() == [1, 1, 3, 3]
    assert out.action.item() == 3
    # weights = softmax(logits + sigma(q)); every q is 0 and the completed q too -> sigma 0
    assert torch.allclose(out.action_weights, torch.softmax(root.prior_logits, -1))


def _phases_pair(B, A, cap, rule, W, **kw):
    env = HashEnv(A, seed=3)
    max_depth = kw.pop("max_depth", cap)
    trees = []
    for backend, poison in (("cpu", 7), ("torch", 9)):
        t = Tree(B, A, cap)
        for name in TREE_ARRAYS[:-1]:  # nothing may be read before it is written
            x = getattr(t, name)
            x.fill_(math.nan if x.is_floating_point() else -poison if x.dtype != torch.uint8 else poison)
        root = env.root(B)
        t.init_roots(root.prior_logits, root.value)
        if rule == "gumbel":
            from rlfuse.search import sequential_halving_table
            t.gumbel.copy_(torch.randn(B, A, generator=torch.Generator().manual_seed(1)))
            t.considered.fill_(min(4, A))
            t.set_table(sequential_halving_table(4, cap - 1))
        from rlfuse.search.tree import make_store
        t.payload = make_store(root.embedding, B, cap, "cpu")
        trees.append(Phases(t, rule=rule, W=W, max_depth=max_depth, backend=backend,
                            **kw))
    return env, trees


def _assert_same(t1: Tree, t2: Tree, scale: float = 1.0):
    """Equal on the allocated nodes (the rest of the arrays is never read): integers
    exactly, floats to float32 rounding (of values of magnitude ``scale``)."""
    assert torch.equal(t1.next_free, t2.next_free)
    used = torch.arange(t1.capacity)[None, :] < t1.next_free[:, None]
    expanded = used & (t1.flags & 1).bool()  # edge rows are written by expand
    for name in TREE_ARRAYS:
        a, b = getattr(t1, name), getattr(t2, name)
        if a.dim() > 1:
            m = expanded if a.dim() == 3 else used
            a, b = a[m], b[m]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=name)
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("rule,W,kw", [
    ("puct", 1, {}), ("puct", 3, {}), ("puct", 4, {"virtual_loss": 0.0}),
    ("puct", 2, {"qnorm": "tree_minmax"}), ("puct", 2, {"max_depth": 2}),
    ("gumbel", 1, {}), ("gumbel", 3, {"virtual_loss": 2.0}),
])
def test_phases_match_reference(rule, W, kw):
    """Every phase of the C++ kernels against the reference, state compared after each
    call (a poisoned buffer would show: outputs are compared too), invariants each step."""
    B, A, steps = 5, 4, 6
    env, (fast, ref) = _phases_pair(B, A, steps * W + 1, rule, W, **kw)
    for ph in (fast, ref):
        ph.out_node.fill_(-7)
        ph.out_path.fill_(-7)
    for _ in range(steps):
        sels = [ph.select(W) for ph in (fast, ref)]
        for x, y in zip(sels[0], sels[1]):
            assert torch.equal(x, y)
        _assert_same(fast.tree, ref.tree)
        s = sels[0]
        out = env.step(fast.tree.payload.gather(s.tree, s.parent), s.action)
        for ph in (fast, ref):
            ph.expand(W, *(x.float().contiguous() for x in out[:4]))
            ph.tree.payload.put(s.tree, s.store, out[4], B * W)
        _assert_same(fast.tree, ref.tree)
        for ph in (fast, ref):
            ph.backup(W)
        _assert_same(fast.tree, ref.tree)
        fast.tree.check_invariants()


def test_searches_match_reference_backend():
    env = HashEnv(6, seed=5)
    root = env.root(4)
    for W in (1, 4):
        a = puct_search(root, env.step, 16, parallel=W, dirichlet_fraction=0.0,
                        temperature=0.0, backend="cpu")
        b = puct_search(root, env.step, 16, parallel=W, dirichlet_fraction=0.0,
                        temperature=0.0, backend="torch")
        _assert_same(a.tree, b.tree)
        assert torch.equal(a.action, b.action)
        a = gumbel_search(root, env.step, 16, parallel=W, gumbel_scale=0.0, backend="cpu")
        b = gumbel_search(root, env.step, 16, parallel=W, gumbel_scale=0.0, backend="torch")
        _assert_same(a.tree, b.tree)
        torch.testing.assert_close(a.action_weights, b.action_weights)


def test_invariant_check_catches_corruption():
    env = HashEnv(5)
    out = puct_search(env.root(3), env.step, 20, parallel=2)
    out.tree.check_invariants()
    for name, b, idx, delta in (("value", 1, (0,), 0.01), ("visits", 2, (0,), 1),
                                ("children_visits", 0, (0, 1), 1)):
        t = puct_search(env.root(3), env.step, 20, parallel=2).tree
        getattr(t, name)[(b,) + idx] += delta
        with pytest.raises(AssertionError):
            t.check_invariants()


def test_parallel_simulations_spread_and_invariants():
    # W = 8 simulations per step at a root with 8 actions: the virtual loss (and the rule
    # that a pending leaf is not chosen twice) sends each to a different action.
    A = 8
    root = Root(torch.randn(3, A), torch.zeros(3))
    out = puct_search(root, _terminal_bandit([0.5] * A), 8, parallel=8, dirichlet_fraction=0.0)
    assert (out.root_visit_counts == 1).all()
    out.tree.check_invariants()


def test_duplicate_pending_leaf_is_backed_up_twice():
    # One valid action and W = 2: the second simulation joins the first's pending leaf:
    # one node is created, the recurrent output of the second row is ignored.
    root = Root(torch.zeros(1, 3), torch.zeros(1))
    inv = torch.tensor([[False, True, True]])
    seen = []

    def fn(emb, action, exp):
        seen.append(exp.new.tolist())
        M = action.shape[0]
        return RecurrentOutput(torch.ones(M), torch.ones(M), torch.zeros(M, 3), torch.zeros(M),
                               None, None, torch.ones(M, dtype=torch.bool))
    out = puct_search(root, fn, 2, parallel=2, invalid_actions=inv, dirichlet_fraction=0.0)
    assert seen == [[True, False]]
    assert out.root_visit_counts[0].tolist() == [2, 0, 0]
    assert out.tree.next_free[0].item() == 2
    assert out.tree.visits[0, 1].item() == 2
    out.tree.check_invariants()


def test_expansion_info_and_payload_keys():
    # The 3-argument recurrent_fn learns (tree, parent, node, action, depth, new) per row;
    # object payloads are keyed by (tree, node).
    B, A = 3, 4
    root = Root(torch.randn(B, A), torch.zeros(B), [f"t{b}" for b in range(B)])
    rows = []

    def fn(emb, action, exp):
        rows.append(exp)
        M = action.shape[0]
        assert isinstance(emb, list) and len(emb) == M
        nxt = [f"{e}/{a}" for e, a in zip(emb, action.tolist())]
        return torch.zeros(M), torch.ones(M), torch.randn(M, A), torch.rand(M), nxt
    out = puct_search(root, fn, 10, parallel=2)
    t = out.tree
    for exp in rows:
        assert torch.equal(exp.tree, torch.arange(B).repeat_interleave(2))
        for b, p, n, a, d in zip(*(x.tolist() for x in exp[:5])):
            assert t.parent[b, n].item() == p and t.action[b, n].item() == a
            assert t.depth[b, n].item() == d
    # the payload of every node spells its path from the root
    for b in range(B):
        for n in range(1, t.next_free[b].item()):
            path, m = [], n
            while m > 0:
                path.append(str(t.action[b, m].item()))
                m = t.parent[b, m].item()
            assert t.embedding(b, n) == "/".join([f"t{b}"] + path[::-1])


def test_tensor_pytree_payloads():
    B, A = 2, 3
    emb = {"x": torch.arange(B, dtype=torch.float64), "pair": (torch.zeros(B, 2), torch.ones(B))}

    def fn(e, action):
        M = action.shape[0]
        nxt = {"x": e["x"] * 10 + action + 1, "pair": (e["pair"][0] + 1, e["pair"][1])}
        return torch.zeros(M), torch.ones(M), torch.zeros(M, A), torch.zeros(M), nxt
    out = puct_search(Root(torch.zeros(B, A), torch.zeros(B), emb), fn, 6)
    t = out.tree
    for b in range(B):
        for n in range(1, t.next_free[b].item()):
            p, a = t.parent[b, n].item(), t.action[b, n].item()
            e, ep = t.embedding(b, n), t.embedding(b, p)
            assert e["x"].item() == ep["x"].item() * 10 + a + 1
            assert e["pair"][0].tolist() == [t.depth[b, n].item()] * 2


@pytest.mark.parametrize("W,contiguous", [(1, True), (3, True), (3, False)])
def test_tensor_payload_rows_copied_by_the_extension(W, contiguous, monkeypatch):
    """One CPU tensor payload: the search loop copies its rows in the extension
    (Phases.step, TensorStore.rows); the trees and every node's payload equal those of
    torch's indexing, rows [2, 3] of float64; a non-contiguous next_embedding is served."""
    from rlfuse.search import tree as tree_mod

    B, A = 4, 6
    env = HashEnv(A, seed=5)
    root = env.root(B)
    emb = torch.arange(B * 6, dtype=torch.float64).view(B, 2, 3)

    def fn(e, action):  # the outputs depend on the gathered rows
        out = env.step((e.sum((1, 2)) * 4).long() % env.P, action)
        nxt = e * 0.5 + action[:, None, None].double()
        if not contiguous:
            nxt = nxt.transpose(1, 2).contiguous().transpose(1, 2)
        return out[:4] + (nxt,)
    runs = []
    for rows in (True, False):
        if not rows:  # torch's advanced indexing
            orig = tree_mod.TensorStore._fast_path

            def no_rows(self):
                orig(self)
                self.rows = None
            monkeypatch.setattr(tree_mod.TensorStore, "_fast_path", no_rows)
        out = puct_search(Root(root.prior_logits, root.value, emb), fn, 20, parallel=W,
                          dirichlet_fraction=0.0, temperature=0.0)
        assert (out.tree.payload.rows is not None) == rows
        runs.append(out.tree)
    _assert_same(runs[0], runs[1])
    t = runs[0]
    for b in range(B):
        assert torch.equal(t.embedding(b, 0), emb[b])
        for n in range(1, t.next_free[b].item()):
            p, a = t.parent[b, n].item(), t.action[b, n].item()
            assert torch.equal(t.embedding(b, n), t.embedding(b, p) * 0.5 + a)
            assert torch.equal(t.embedding(b, n), runs[1].embedding(b, n))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_subtree_reuse(backend):
    env = HashEnv(5, seed=2)
    B = 4
    root = env.root(B)
    out = puct_search(root, env.step, 30, dirichlet_fraction=0.0, backend=backend)
    t = out.tree
    act = out.root_visit_counts.argmax(-1)
    act[0] = out.root_visit_counts[0].argmin()  # possibly never expanded -> empty subtree
    sub = t.subtree(act, capacity=60)
    sub.check_invariants()
    for b in range(B):
        c = t.children[b, 0, act[b]].item()
        if c < 0:
            assert sub.next_free[b].item() == 0
            continue
        assert sub.visits[b, 0].item() == t.visits[b, c].item()
        assert sub.value[b, 0].item() == t.value[b, c].item()
        assert sub.children_visits[b, 0].tolist() == t.children_visits[b, c].tolist()
        assert sub.embedding(b, 0).item() == t.embedding(b, c).item()
        assert sub.next_free[b].item() == _subtree_size(t, b, c)
    # continue searching from the kept subtrees (empty ones restart from the new root)
    nxt = env.step(root.embedding, act)
    root2 = Root(nxt[2], nxt[3], nxt[4])
    before = torch.where(sub.next_free > 0, sub.visits[:, 0], 1).tolist()
    out2 = puct_search(root2, env.step, 20, dirichlet_fraction=0.0, tree=sub, backend=backend)
    assert out2.tree is sub  # searched in place
    out2.tree.check_invariants()
    for b in range(B):
        assert out2.tree.visits[b, 0].item() == before[b] + 20


def _subtree_size(t, b, n):
    kids = [c for c in t.children[b, n].tolist() if c >= 0]
    return 1 + sum(_subtree_size(t, b, c) for c in kids)


def test_step_reports_errors_of_each_stage():
    """Phases.step (the CPU's one call per step) raises naming the stage that failed: a
    non-finite recurrent output (expand), a full tree (select)."""
    B, A = 2, 3
    tree = Tree(B, A, 2)
    tree.init_roots(torch.zeros(B, A), torch.zeros(B))
    ph = Phases(tree, rule="puct", W=1, max_depth=4, backend="cpu")
    ph.step(0, None, 1)
    good = (torch.zeros(B), torch.ones(B), torch.zeros(B, A), torch.zeros(B), None, None)
    bad = (torch.zeros(B), torch.ones(B), torch.zeros(B, A), torch.tensor([0.0, math.inf]),
           None, None)
    with pytest.raises(RuntimeError, match="expand: recurrent_fn returned a non-finite value"
                                           r" \(row 1\)"):
        ph.step(1, bad, 1)
    ph.step(1, good, 0)  # the rows of the step that failed are written now
    with pytest.raises(RuntimeError, match=r"select: tree full \(tree 0\)"):
        ph.step(0, None, 1)


def test_bad_input():
    env = HashEnv(4)
    root = env.root(2)
    with pytest.raises(ValueError, match="num_simulations"):
        puct_search(root, env.step, 10, capacity=5)
    with pytest.raises(ValueError, match="every action is invalid"):
        puct_search(root, env.step, 4, invalid_actions=torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]]))
    with pytest.raises(ValueError, match="invalid_actions"):
        puct_search(root, env.step, 4, invalid_actions=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="prior_logits"):
        puct_search(Root(torch.full((2, 4), math.nan), torch.zeros(2)), env.step, 4)
    with pytest.raises(ValueError, match="root.value"):
        puct_search(Root(torch.zeros(2, 4), torch.zeros(3)), env.step, 4)
    with pytest.raises(TypeError, match="num_simulations"):
        puct_search(root, env.step, 2.5)
    with pytest.raises(ValueError, match="parallel"):
        gumbel_search(root, env.step, 4, parallel=0)
    with pytest.raises(ValueError, match="dirichlet_fraction"):
        puct_search(root, env.step, 4, dirichlet_fraction=1.5)
    with pytest.raises(TypeError, match="root"):
        puct_search((root.prior_logits, root.value), env.step, 4)
    with pytest.raises(ValueError, match="prior_logits must have shape"):
        puct_search(root, lambda e, a: (torch.zeros(a.shape[0]), torch.ones(a.shape[0]),
                                        torch.zeros(a.shape[0], 3), torch.zeros(a.shape[0]), e[0]),
                    4)
    with pytest.raises(TypeError, match="recurrent_fn must return"):
        puct_search(root, lambda e, a: (1, 2), 4)
    for backend in ("cpu", "torch"):
        with pytest.raises(RuntimeError, match="non-finite"):
            puct_search(root, lambda e, a: (torch.full(a.shape, math.nan), torch.ones(a.shape),
                                            torch.zeros(a.shape[0], 4), torch.zeros(a.shape),
                                            e[: a.shape[0]]), 4, backend=backend)
    t = puct_search(root, env.step, 4).tree
    with pytest.raises(ValueError, match="actions must be in"):
        t.subtree(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="shape"):
        t.subtree(torch.tensor([0]))
    with pytest.raises(ValueError, match="free capacity"):
        puct_search(root, env.step, 4, tree=t.subtree(torch.tensor([0, 1]), capacity=4))
    with pytest.raises(ValueError, match="next_embedding"):
        puct_search(root, lambda e, a: env.step(e, a)[:4] + (torch.zeros(3),), 4)


@pytest.mark.gpu
@pytest.mark.parametrize("W", [1, 4])
def test_cuda_matches_cpu(W):
    """The CUDA kernels (warp per tree) against the CPU kernels: same trees, same actions."""
    env_cpu = HashEnv(40, seed=4)
    gpu = HashEnv(40, seed=4, device="cuda")
    root = env_cpu.root(33)
    root_gpu = Root(*(x.cuda() for x in root))
    for search, kw in ((puct_search, dict(dirichlet_fraction=0.0, temperature=0.0)),
                       (gumbel_search, dict(gumbel_scale=0.0))):
        a = search(root, env_cpu.step, 48, parallel=W, **kw)
        b = search(root_gpu, gpu.step, 48, parallel=W, **kw)
        assert torch.equal(a.action, b.action.cpu())
        assert torch.equal(a.root_visit_counts, b.root_visit_counts.cpu())
        for name in ("visits", "parent", "children_visits"):
            used = torch.arange(a.tree.capacity)[None] < a.tree.next_free[:, None]
            assert torch.equal(getattr(a.tree, name)[used], getattr(b.tree, name).cpu()[used])
        torch.testing.assert_close(a.tree.value, b.tree.value.cpu(), rtol=1e-4, atol=1e-4)
    # subtree extraction on the device
    sub = b.tree.subtree(b.action)
    ref = a.tree.subtree(a.action)
    assert torch.equal(sub.next_free.cpu(), ref.next_free)


def _on_cpu(t: Tree):
    """The arrays of a tree, on the CPU (for _assert_same)."""
    from types import SimpleNamespace

    return SimpleNamespace(capacity=t.capacity,
                           **{n: getattr(t, n).cpu() for n in TREE_ARRAYS})


def _nan_prior_tree(dev):
    """Roots with NaN priors: tree 0 every valid one (every score is NaN), tree 1 two of
    four (NaN scores after the first valid action's, which is a number), trees 2 and 3 the
    first valid action's only (a NaN score first, numbers after it; tree 3 has larger
    priors on its invalid actions)."""
    nan = math.nan
    t = Tree(4, 4, 16, dev)
    t.init_roots(torch.zeros(4, 4), torch.zeros(4),
                 invalid=torch.tensor([[True, False, False, False], [False] * 4, [False] * 4,
                                       [True, True, False, False]]))
    t.prior[:, 0] = torch.tensor([[0.0, nan, nan, nan], [0.1, nan, 0.7, nan],
                                  [nan, 0.2, 0.7, 0.1], [0.5, 0.9, nan, 0.3]], device=dev)
    return t


@pytest.mark.parametrize("backend,group,sparse", [
    ("cpu", 1, False), ("cpu", 4, False), ("cpu", 1, True), ("cpu", 4, True),
    ("torch", 4, True), pytest.param("cuda", 4, True, marks=pytest.mark.gpu)])
@pytest.mark.parametrize("W", [1, 3])
def test_nan_scores_are_chosen_as_the_specification_scans(backend, group, sparse, W,
                                                          monkeypatch):
    """NaN scores: the specification's scan starts from the first valid action and moves
    only to a strictly larger score (no comparison with NaN is true), so every score NaN
    gives the first valid action, a NaN first valid score wins over the numbers after it,
    and a NaN after a number never wins.  On the CPU every select path follows it (the
    16-lane argmaxes check the first valid action's score; the sparse rule's memo, which
    ranks priors, leaves a node with a NaN prior to the dense rule;
    tests/search/test_select_paths.py covers K above 16 and every ISA level); on CUDA the
    lanes of a warp must agree on the choice (they reduce a total order, NaN lowest, and
    take the tier's first action when its score is NaN)."""
    from rlfuse.search import tree as search_tree

    monkeypatch.setattr(search_tree, "SELECT_GROUP", group)
    monkeypatch.setattr(search_tree, "SPARSE_SELECT", sparse)
    dev = torch.device("cuda" if backend == "cuda" else "cpu")
    M = 4 * W
    out = (torch.zeros(M), torch.ones(M), torch.zeros(M, 4), torch.full((M,), 0.5))
    trees = []
    for be, d in ((backend, dev), ("torch", torch.device("cpu"))):
        tree = _nan_prior_tree(d)
        ph = Phases(tree, rule="puct", W=W, max_depth=3, backend=be)
        for step in range(4):
            sel = ph.select(W)
            if step == 0:  # first valid; the largest prior (0.7); the first valid, twice
                assert sel.action.view(4, W)[:, 0].tolist() == [1, 2, 0, 2]
            ph.expand(W, *(x.to(d) for x in out))
            ph.backup(W)
        ph.finish()
        trees.append(_on_cpu(tree))
        trees[-1].prior = trees[-1].prior.nan_to_num(-1.0)
    _assert_same(*trees)


@pytest.mark.gpu
@pytest.mark.parametrize("capacity, W", [(1, 1), (2, 2)])
def test_cuda_failed_walks_leave_rows_that_expand_and_backup_skip(capacity, W):
    """A walk that finds its tree full ends the tree's step: its row and the later ones are
    not new, with an empty path, so expand and backup leave the tree as the finished walks
    made it (never reading path[-1] or an earlier step's outputs); finish raises."""
    gpu = Tree(1, 3, capacity, torch.device("cuda"))
    gpu.init_roots(torch.zeros(1, 3), torch.zeros(1))
    ph = Phases(gpu, rule="puct", W=W, max_depth=4, backend="cuda")
    sel = ph.select(W)
    assert sel.new[-1].item() == 0 and ph.out_len[W - 1].item() == 0
    assert sel.store[-1].item() == capacity
    out = (torch.zeros(W), torch.ones(W), torch.zeros(W, 3), torch.full((W,), 5.0))
    ph.expand(W, *(x.cuda() for x in out))
    ph.backup(W)
    with pytest.raises(RuntimeError, match="tree full"):
        ph.finish()
    cpu = Tree(1, 3, capacity)
    cpu.init_roots(torch.zeros(1, 3), torch.zeros(1))
    if W > 1:  # the walks that finished: a CPU step of W - 1 walks
        rp = Phases(cpu, rule="puct", W=W - 1, max_depth=4, backend="cpu")
        rp.select(W - 1)
        rp.expand(W - 1, *(x[: W - 1] for x in out))
        rp.backup(W - 1)
    _assert_same(_on_cpu(gpu), cpu)
