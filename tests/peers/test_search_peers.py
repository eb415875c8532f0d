"""Oracle: rlfuse.search against mctx 0.0.71 (muzero_policy, gumbel_muzero_policy) on the
same deterministic environment, with gumbel scale 0 and no Dirichlet noise.  Root visit
counts, the whole tree's visit counts and values, chosen actions and policy targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfuse.search import gumbel_search, puct_search
from tests.helpers import require_peer
from tests.search.envs import HashEnv

B, A, SIMS = 16, 6, 40


def _mctx_setup(env: HashEnv):
    jax = require_peer("jax")
    mctx = require_peer("mctx")
    jnp = jax.numpy
    L, R, V = (jnp.asarray(x) for x in (env.L, env.R, env.V))

    def rec(params, key, action, emb):
        nxt = (emb * 31 + action * 7 + 1) % env.P
        out = mctx.RecurrentFnOutput(reward=R[nxt], discount=jnp.full(nxt.shape, env.discount,
                                                                      jnp.float32),
                                     prior_logits=L[nxt], value=V[nxt])
        return out, nxt
    root = mctx.RootFnOutput(prior_logits=L[:B], value=V[:B],
                             embedding=jnp.arange(B, dtype=jnp.int32))
    return jax, mctx, rec, root


@pytest.mark.slow
def test_puct_matches_mctx_muzero_policy():
    env = HashEnv(A, seed=0)
    jax, mctx, rec, root = _mctx_setup(env)
    fn = jax.jit(lambda r: mctx.muzero_policy((), jax.random.PRNGKey(0), r, rec, SIMS,
                                              dirichlet_fraction=0.0, temperature=0.0))
    ref = fn(root)
    t = ref.search_tree
    for backend in ("cpu", "torch"):
        out = puct_search(env.root(B), env.step, SIMS, dirichlet_fraction=0.0, temperature=0.0,
                          backend=backend)
        assert np.array_equal(out.root_visit_counts.numpy(), np.asarray(t.children_visits[:, 0]))
        assert np.array_equal(out.tree.visits.numpy(), np.asarray(t.node_visits))
        assert np.array_equal(out.tree.parent.numpy(), np.asarray(t.parents))
        np.testing.assert_allclose(out.tree.value.numpy(), np.asarray(t.node_values), atol=1e-5)
        np.testing.assert_allclose(out.action_weights.numpy(), np.asarray(ref.action_weights),
                                   atol=1e-6)
        # temperature 0: the most visited action (mctx breaks ties at random: compare where
        # the maximum is unique)
        counts = out.root_visit_counts
        unique = (counts == counts.max(-1, keepdim=True).values).sum(-1) == 1
        assert unique.sum() >= B // 2
        assert np.array_equal(out.action[unique].numpy(), np.asarray(ref.action)[unique.numpy()])


@pytest.mark.slow
def test_gumbel_matches_mctx_gumbel_muzero_policy():
    env = HashEnv(A, seed=0)
    jax, mctx, rec, root = _mctx_setup(env)
    inv = np.zeros((B, A), dtype=bool)
    inv[::3, 1] = True  # some root actions invalid
    fn = jax.jit(lambda r: mctx.gumbel_muzero_policy((), jax.random.PRNGKey(0), r, rec, SIMS,
                                                     invalid_actions=jax.numpy.asarray(inv),
                                                     gumbel_scale=0.0,
                                                     max_num_considered_actions=4))
    ref = fn(root)
    t = ref.search_tree
    for backend in ("cpu", "torch"):
        out = gumbel_search(env.root(B), env.step, SIMS, gumbel_scale=0.0,
                            invalid_actions=torch.from_numpy(inv), max_num_considered_actions=4,
                            backend=backend)
        assert np.array_equal(out.root_visit_counts.numpy(), np.asarray(t.children_visits[:, 0]))
        assert np.array_equal(out.tree.visits.numpy(), np.asarray(t.node_visits))
        assert np.array_equal(out.action.numpy(), np.asarray(ref.action))
        np.testing.assert_allclose(out.tree.value.numpy(), np.asarray(t.node_values), atol=1e-5)
        np.testing.assert_allclose(out.action_weights.numpy(), np.asarray(ref.action_weights),
                                   atol=1e-5)


def test_sequential_halving_table_matches_mctx():
    require_peer("mctx")
    from mctx._src import seq_halving

    from rlfuse.search import sequential_halving_table
    for m, n in ((16, 128), (4, 10), (7, 33), (2, 5), (16, 7)):
        ours = sequential_halving_table(m, n).tolist()
        assert ours == [list(r) for r in seq_halving.get_table_of_considered_visits(m, n)]
