"""MCTS policies: small games (tic-tac-toe against a perfect opponent, a bandit with a
known best arm) and the root helpers."""

from __future__ import annotations

import random

import pytest
import torch

from rlfuse.search import (
    RecurrentOutput,
    Root,
    dirichlet_noise,
    gumbel_search,
    puct_search,
    select_action,
    sequential_halving_table,
    visit_policy,
)

from .envs import LINES, ttt_perfect_moves, ttt_step


def _play_ttt(agent_first: bool, seeds, search) -> list:
    """Games against a perfect opponent (random among its optimal moves); +1 agent won,
    0 draw, -1 agent lost.  Boards are kept from the view of the player to move."""
    B = len(seeds)
    rngs = [random.Random(s) for s in seeds]
    board = torch.zeros(B, 9, dtype=torch.int8)
    done, result = [False] * B, [0] * B
    for ply in range(9):
        live = [b for b in range(B) if not done[b]]
        if not live:
            break
        agent_turn = (ply % 2 == 0) == agent_first
        if agent_turn:
            bl = board[live]
            out = search(Root(torch.zeros(len(live), 9), torch.zeros(len(live)), bl), bl != 0)
            moves = dict(zip(live, out.action.tolist()))
        else:
            moves = {b: rngs[b].choice(ttt_perfect_moves(tuple(board[b].tolist()))) for b in live}
        for b, a in moves.items():
            cells = board[b].clone()
            assert cells[a] == 0, "illegal move"
            cells[a] = 1
            if (cells[LINES].sum(-1) == 3).any():
                done[b], result[b] = True, (1 if agent_turn else -1)
            elif (cells != 0).all():
                done[b] = True
            board[b] = -cells
    return result


@pytest.mark.slow
@pytest.mark.parametrize("agent_first", [True, False])
def test_tic_tac_toe_never_loses(agent_first):
    # PUCT, uniform prior, leaf values = the expected outcome of random play (what random
    # playouts estimate), 1600 simulations, 4 per step.
    def search(root, inv):
        return puct_search(root, ttt_step, 1600, invalid_actions=inv, parallel=4,
                           dirichlet_fraction=0.0, temperature=0.0)
    results = _play_ttt(agent_first, list(range(16)), search)
    assert min(results) >= 0, results


def test_tic_tac_toe_takes_wins_and_blocks():
    # X to move (as +1): a win at 2 (row 0 1 2); O to move facing X's open row: block at 5.
    win = torch.tensor([[1, 1, 0, -1, -1, 0, 0, 0, 0]], dtype=torch.int8)
    block = torch.tensor([[1, 0, 0, -1, -1, 0, 1, 0, 0]], dtype=torch.int8)
    for board, best in ((win, 2), (block, 5)):
        root = Root(torch.zeros(1, 9), torch.zeros(1), board)
        p = puct_search(root, ttt_step, 200, invalid_actions=board != 0,
                        dirichlet_fraction=0.0, temperature=0.0)
        g = gumbel_search(root, ttt_step, 200, invalid_actions=board != 0, gumbel_scale=0.0)
        assert p.action.item() == best and g.action.item() == best


@pytest.mark.parametrize("search", ["puct", "gumbel"])
@pytest.mark.parametrize("parallel", [1, 4])
def test_bandit_finds_best_arm(search, parallel):
    # 16 arms with fixed rewards in [0, 0.6) and one at 0.9; a noisy prior correlated with
    # the rewards that puts another arm first in some trees; terminal after one pull.
    B, A = 8, 16
    g = torch.Generator().manual_seed(0)
    means = torch.rand(B, A, generator=g) * 0.6
    best = torch.randint(0, A, (B,), generator=g)
    means[torch.arange(B), best] = 0.9
    logits = 3 * means + torch.randn(B, A, generator=g)
    assert (logits.argmax(-1) != best).sum() >= 2

    def fn(emb, action):
        M = action.shape[0]
        return RecurrentOutput(means[emb, action], torch.ones(M), torch.zeros(M, A),
                               torch.zeros(M), emb, None, torch.ones(M, dtype=torch.bool))
    root = Root(logits, torch.zeros(B), torch.arange(B))
    if search == "puct":
        out = puct_search(root, fn, 256, parallel=parallel, dirichlet_fraction=0.0,
                          temperature=0.0)
    else:
        out = gumbel_search(root, fn, 256, parallel=parallel, gumbel_scale=0.0,
                            max_num_considered_actions=16)
    assert torch.equal(out.action, best)
    assert (out.action_weights.argmax(-1) == best).all()
    out.tree.check_invariants()


def test_sequential_halving_table_by_hand():
    t = sequential_halving_table(4, 10)
    assert t.shape == (5, 10)
    assert t[0].tolist() == list(range(10)) and t[1].tolist() == list(range(10))
    # m = 4: 2 phases; 10 // (2 * 4) = 1 visit each, then 10 // (2 * 2) = 2 each for 2
    assert t[4].tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    # m = 3: ceil(log2 3) = 2; 10 // 6 = 1 visit each of 3, then 2 live: 10 // 4 = 2 each
    assert t[3].tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_dirichlet_noise():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4000, 5, generator=g), -1)
    noisy = dirichlet_noise(probs, fraction=0.25, alpha=0.3, generator=g)
    assert torch.allclose(noisy.sum(-1), torch.ones(4000), atol=1e-5)
    noise = (noisy - 0.75 * probs) / 0.25
    assert (noise >= -1e-6).all()
    # Dirichlet(0.3, ..., 0.3) over 5: mean 1/5, variance (1/5)(4/5) / (1.5 + 1) = 0.064
    assert noise.mean().item() == pytest.approx(0.2, abs=0.01)
    assert noise.var().item() == pytest.approx(0.064, rel=0.1)
    assert torch.equal(dirichlet_noise(probs, fraction=0.0, alpha=0.3), probs)


def test_select_action_and_visit_policy():
    counts = torch.tensor([[0, 3, 1, 0], [2, 2, 0, 0]], dtype=torch.int32)
    assert select_action(counts, 0.0).tolist() == [1, 0]
    assert torch.allclose(visit_policy(counts), torch.tensor([[0, .75, .25, 0], [.5, .5, 0, 0]]))
    g = torch.Generator().manual_seed(0)
    many = counts[:1].repeat(4000, 1)
    draws = select_action(many, 1.0, g)
    assert (draws != 0).all() and (draws != 3).all()  # never unvisited actions
    assert (draws == 1).float().mean().item() == pytest.approx(0.75, abs=0.03)
    # temperature 0.5: N^2 -> 9 : 1
    draws = select_action(many, 0.5, g)
    assert (draws == 1).float().mean().item() == pytest.approx(0.9, abs=0.02)


def test_dirichlet_noise_changes_search_and_generator_reproduces():
    root = Root(torch.zeros(2, 6), torch.zeros(2))

    def fn(emb, action):
        M = action.shape[0]
        return (torch.zeros(M), torch.ones(M), torch.zeros(M, 6), torch.zeros(M), None)
    runs = [puct_search(root, fn, 30, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0].root_visit_counts, runs[1].root_visit_counts)
    assert not torch.equal(runs[0].root_visit_counts, runs[2].root_visit_counts)


def test_halving_table_is_cached_but_fresh():
    """The table is built once per (m, n) and handed out as a new tensor each call."""
    a = sequential_halving_table(4, 8)
    assert a[4].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    a.fill_(-1)
    b = sequential_halving_table(4, 8)
    assert b[4].tolist() == [0, 0, 0, 0, 1, 1, 2, 2] and b.data_ptr() != a.data_ptr()
