"""pytest-benchmark cases for batched tree search (the same as `rlfuse bench search`).

Targets (documentation, not assertions), CPU, B=64 trees, 64 actions, 128 simulations,
trivial recurrent_fn: node expansions/s >= 50x mctx muzero_policy (jitted), >= 10x mctx
gumbel_muzero_policy, >= 100x the pure-Python MCTS; on a GPU >= 10M expansions/s at B=1024.
"""

import pytest
import torch

from rlfuse.bench.search import HashEnv, _mctx_fns, python_mcts
from rlfuse.search import Tree, gumbel_search, puct_search

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(64, 64, 128)] if DEVICE == "cpu" else [(1024, 64, 128)]


@pytest.mark.parametrize("B,A,sims", CASES)
@pytest.mark.parametrize("mode", ["puct", "gumbel"])
@pytest.mark.parametrize("variant", ["rlfuse", "mctx", "python"])
def test_search(benchmark, variant, mode, B, A, sims):
    env = HashEnv(A, device=DEVICE)
    root = env.root(B)
    if variant == "rlfuse":
        search = puct_search if mode == "puct" else gumbel_search
        storage = Tree(B, A, sims + 1, DEVICE)

        def f():
            out = search(root, env.step, sims, tree=storage.clear())
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            return out
    elif variant == "mctx":
        if DEVICE != "cpu":
            pytest.skip("mctx is timed on the CPU only")
        fns, err = _mctx_fns(env, B, sims)
        if fns is None:
            pytest.skip(err)
        f = fns[mode]
    else:
        if mode != "puct":
            pytest.skip("the pure-Python baseline is PUCT")
        tables = env.py_tables()
        lg, v, s = root.prior_logits.tolist(), root.value.tolist(), root.embedding.tolist()

        def f():  # 4 trees (scale the time by B / 4 to compare)
            for b in range(4):
                python_mcts(lg[b], v[b], s[b], sims, tables, env.P, env.discount)
    f()
    benchmark.group = f"search {mode} B={B} A={A} sims={sims} (python: 4 trees)"
    benchmark.pedantic(f, rounds=3 if variant != "rlfuse" else 10, warmup_rounds=1)
