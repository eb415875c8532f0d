"""Benchmark of batched tree search: node expansions per second of ``puct_search`` and
``gumbel_search`` against mctx (``muzero_policy`` / ``gumbel_muzero_policy``, jitted, timed
after a warm-up call) and a straightforward pure-Python MCTS, on the same trivial
environment.

CPU case (the issue's): B=64 trees, 64 actions, 128 simulations (8192 expansions per
search).  GPU case: B=1024 (rlfuse only, plus mctx on the CPU is not comparable).  The
environment (:class:`HashEnv`) maps (state, action) to an integer hash and looks rewards,
values and prior logits up in fixed tables, identically in torch, JAX and plain Python.

rlfuse reuses one preallocated Tree (``Tree.clear()``, ``tree=``) across searches.  Times
are ms per search of the whole batch (medians, all variants interleaved); the pure-Python
MCTS (PUCT, the mctx rules, one node object per node, one tree after another) runs on
fewer trees and its time is scaled to the full batch (it is linear in the number of
trees).  Every row's notes give
the expansions per second.

mctx runs on JAX (XLA), which keeps its own CPU thread pool: ``--threads`` (torch's
intra-op threads) does not limit it, so on a machine with more cores than ``--threads``
the mctx column may use more of them than rlfuse does (the benchmark does not limit
JAX's threads).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlfuse.bench.harness import Row, time_variants

NAME = "search"
CPU_CASES = [(64, 64, 128)]
CPU_QUICK = [(16, 64, 32)]
GPU_CASES = [(1024, 64, 128)]


class HashEnv:
    """Deterministic environment: states are ints, the next state is an integer hash of
    (state, action) modulo P; rewards, values and prior logits are table lookups (float32),
    so torch, JAX and Python compute the same numbers."""

    def __init__(self, num_actions: int, P: int = 997, discount: float = 0.9, seed: int = 0,
                 device="cpu"):
        rng = np.random.default_rng(seed)
        self.A, self.P, self.discount = num_actions, P, discount
        self.L = rng.normal(size=(P, num_actions)).astype(np.float32)
        self.R = rng.normal(size=P).astype(np.float32)
        self.V = rng.normal(size=P).astype(np.float32)
        self.Lt, self.Rt, self.Vt = (torch.from_numpy(x).to(device) for x in (self.L, self.R,
                                                                               self.V))
        self.device = torch.device(device)
        self._disc: dict = {}

    def root(self, B: int):
        from rlfuse.search import Root

        s = torch.arange(B, device=self.device) % self.P
        return Root(self.Lt[s].clone(), self.Vt[s].clone(), s)

    def step(self, emb, action):
        nxt = (emb * 31 + action * 7 + 1) % self.P
        M = nxt.shape[0]
        d = self._disc.get(M)
        if d is None:
            d = self._disc[M] = torch.full((M,), self.discount, device=self.device)
        # index_select, not Lt[nxt]: with 2 torch threads, advanced indexing of the [P, A]
        # table takes the parallel index kernel, ~25x slower on a 2-core VM (and its worker
        # then spins); the values are the same
        return (self.Rt.index_select(0, nxt), d, self.Lt.index_select(0, nxt),
                self.Vt.index_select(0, nxt), nxt)

    # plain-Python twin for the pure-Python MCTS
    def py_tables(self):
        return self.L.tolist(), self.R.tolist(), self.V.tolist()


# --------------------------------------------------------------------------------------
# a straightforward pure-Python MCTS (PUCT, mctx rules), for the baseline
# --------------------------------------------------------------------------------------
class _Node:
    __slots__ = ("prior", "value", "raw", "visits", "children", "state", "reward",
                 "discount")

    def __init__(self, logits, value, state, reward=0.0, discount=0.0):
        m = max(logits)
        ex = [math.exp(x - m) for x in logits]
        s = sum(ex)
        self.prior = [x / s for x in ex]
        self.value = self.raw = value
        self.visits = 0
        self.children = {}
        self.state, self.reward, self.discount = state, reward, discount


def python_mcts(logits, value, state, num_simulations, tables, P, discount,
                c1=1.25, c2=19652.0):
    """One tree; returns the root visit counts."""
    L, R, V = tables
    A = len(logits)
    root = _Node(logits, value, state)
    root.visits = 1
    for _ in range(num_simulations):
        node, path = root, [root]
        while True:
            n_par = node.visits
            pb_c = c1 + math.log((n_par + c2 + 1) / c2)
            qs = {a: ch.reward + ch.discount * ch.value for a, ch in node.children.items()}
            lo = min([node.value] + list(qs.values()))
            hi = max([node.value] + list(qs.values()))
            best, arg = -math.inf, 0
            for a in range(A):
                ch = node.children.get(a)
                n = ch.visits if ch is not None else 0
                q = (qs[a] - lo) / max(hi - lo, 1e-8) if n > 0 else 0.0
                s = q + math.sqrt(n_par) * pb_c * node.prior[a] / (n + 1)
                if s > best:
                    best, arg = s, a
            ch = node.children.get(arg)
            if ch is None:
                nxt = (node.state * 31 + arg * 7 + 1) % P
                ch = _Node(L[nxt], V[nxt], nxt, R[nxt], discount)
                node.children[arg] = ch
                path.append(ch)
                break
            node = ch
            path.append(node)
        g = path[-1].raw
        leaf = path[-1]
        leaf.value = (leaf.value * leaf.visits + g) / (leaf.visits + 1)
        leaf.visits += 1
        for i in range(len(path) - 2, -1, -1):
            child, node = path[i + 1], path[i]
            g = child.reward + child.discount * g
            node.value = (node.value * node.visits + g) / (node.visits + 1)
            node.visits += 1
    return [root.children[a].visits if a in root.children else 0 for a in range(A)]


# --------------------------------------------------------------------------------------
def _mctx_fns(env: HashEnv, B: int, sims: int):
    try:
        import jax
        import jax.numpy as jnp
        import mctx
    except Exception as exc:  # peer not installed
        return None, f"{type(exc).__name__}: {exc}"
    L, R, V = (jnp.asarray(x) for x in (env.L, env.R, env.V))

    def rec(params, key, action, emb):
        nxt = (emb * 31 + action * 7 + 1) % env.P
        out = mctx.RecurrentFnOutput(reward=R[nxt],
                                     discount=jnp.full(nxt.shape, env.discount, jnp.float32),
                                     prior_logits=L[nxt], value=V[nxt])
        return out, nxt
    emb = jnp.arange(B, dtype=jnp.int32) % env.P
    root = mctx.RootFnOutput(prior_logits=L[emb], value=V[emb], embedding=emb)
    key = jax.random.PRNGKey(0)
    mz = jax.jit(lambda r, k: mctx.muzero_policy((), k, r, rec, sims))
    gz = jax.jit(lambda r, k: mctx.gumbel_muzero_policy((), k, r, rec, sims))
    return {
        "puct": lambda: mz(root, key).action.block_until_ready(),
        "gumbel": lambda: gz(root, key).action.block_until_ready(),
    }, None


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    from rlfuse.search import Tree, gumbel_search, puct_search

    dev = torch.device(device)
    gpu = dev.type == "cuda"
    repeat = repeat or (3 if quick else 5)
    rows: list[Row] = []
    for B, A, sims in (GPU_CASES if gpu else (CPU_QUICK if quick else CPU_CASES)):
        env = HashEnv(A, device=dev)
        root = env.root(B)
        expansions = B * sims
        mctx_fns, mctx_err = (None, "not timed on a GPU run") if gpu else _mctx_fns(env, B, sims)
        tables = env.py_tables()
        B_py = min(B, 2 if quick else 4)
        s_py = root.embedding[:B_py].tolist()
        lg_py, v_py = root.prior_logits[:B_py].tolist(), root.value[:B_py].tolist()

        def py_search():
            for b in range(B_py):
                python_mcts(lg_py[b], v_py[b], s_py[b], sims, tables, env.P, env.discount)

        storage = Tree(B, A, sims + 1, dev)  # preallocated once, cleared per search

        for mode in ("puct", "gumbel"):
            search = puct_search if mode == "puct" else gumbel_search

            def ours(backend=None, search=search):
                # torch at one intra-op thread while the search runs (restored after): its
                # tensors are tiny, and with 2 threads on a shared 2-core VM each op that
                # enters torch's thread pool can wait milliseconds for the other thread
                # (100 ms per search measured under load, against 20 ms); the kernels
                # themselves use one thread at this size either way (tree.THREAD_MIN_PAIRS)
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    return search(root, env.step, sims, tree=storage.clear(), backend=backend)
                finally:
                    torch.set_num_threads(threads)
            # `backends` is not used: the tree backend follows the device (cpu / cuda) and
            # there is no Triton one.
            fns = {"rlfuse": ours}
            notes = {}
            if mctx_fns is not None:
                fns["mctx"] = mctx_fns[mode]
            else:
                notes["mctx"] = mctx_err
            if mode == "puct":  # timed with the others, interleaved, then scaled
                fns["python"] = py_search
            times, errors = time_variants(fns, dev, warmup=1, repeat=repeat)
            notes.update(errors)
            if times.get("python"):
                times["python"] *= B / B_py
                notes["python"] = f"pure-Python PUCT MCTS on {B_py} trees, scaled to {B}"
            for v, t in times.items():
                if t:
                    notes[f"{v} expansions/s"] = f"{expansions / (t * 1e-3):,.0f}"
            # (a failed variant's error, from time_variants, keeps the key)
            notes.setdefault("rlfuse", "torch at 1 intra-op thread during the search")
            rows.append(Row(op="search", case=f"B={B} A={A} sims={sims}", dtype="float32",
                            mode=mode, times_ms=times, bytes_moved=0.0, notes=notes))
    return rows
