"""rlfuse bench search_llm: the quick case runs MCTS and the baselines at equal budget and
takes the overhead over two sampling seeds."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("transformers")


def test_quick_search_llm_bench_reports_the_overhead_over_seeds():
    import torch

    from rlfuse.bench import search_llm

    n = torch.get_num_threads()
    rows = search_llm.run("cpu", quick=True)
    assert torch.get_num_threads() == n                  # one_thread() restores it
    assert [r.mode for r in rows] == ["mcts", "best_of_n", "beam", "overhead"]
    assert all(r.times_ms["rlfuse"] > 0 for r in rows)
    note = rows[3].notes["overhead"]
    m = re.match(r"([\d.]+)% of the MCTS wall time outside model forwards over sampling "
                 r"seeds 0-1 \(per seed: ([\d.]+)%, ([\d.]+)%;", note)
    assert m, note
    total, a, b = map(float, m.groups())
    assert 0 < total < 100 and min(a, b) - 0.1 <= total <= max(a, b) + 0.1
    assert "target >= 2x: met" in rows[3].notes["reuse"]


@pytest.mark.parametrize("quick", [False, True])
def test_search_llm_bench_problems_are_held_out_from_the_warmup(monkeypatch, quick):
    """The bench searches the problems `rlfuse search` does: none is a warm-up prompt (the
    full run's 32 seed-1000 problems held 13 of them before)."""
    from rlfuse.bench import search_llm
    from rlfuse.search import llm_demo
    from rlfuse.tasks import ChainTask

    seen = {}
    monkeypatch.setattr(llm_demo, "default_model",
                        lambda task, warmup_steps, seed: seen.update(warm=warmup_steps) or
                        (None, None, []))
    monkeypatch.setattr(search_llm, "_searches",
                        lambda task, model, tok, problems, sims, quick: seen.update(
                            problems=problems) or [])
    search_llm.run("cpu", quick=quick)
    n, warm = (8, 150) if quick else (32, 400)
    assert seen["warm"] == warm and len(seen["problems"]) == n
    warmup = {e["prompt"] for e in llm_demo.warmup_examples(ChainTask(), steps=warm, seed=0)}
    assert not {p["prompt"] for p in seen["problems"]} & warmup
    assert seen["problems"] == llm_demo.held_out_problems(ChainTask(), n, seed=1000,
                                                          warmup_steps=warm)


def test_search_llm_bench_accuracy_target_is_the_mean_over_the_seeds(monkeypatch):
    """The MCTS vs best-of-N target is judged on the mean accuracy over the overhead row's
    sampling seeds (one seed's 32 problems are one noisy draw), each seed compared at its
    own budget."""
    from rlfuse.bench import search_llm
    from rlfuse.search import llm_demo

    acc = {0: (0.5, 0.75), 1: (0.75, 0.25)}           # seed 0 behind, seed 1 well ahead
    calls = []

    def compare(model, tok, task, problems, num_simulations=4, num_candidates=4,
                parallel=2, seed=0, **kw):
        calls.append(seed)
        m, b = acc.get(seed, (1.0, 1.0))
        stats = dict(overhead_seconds=0.01, wall_seconds=0.1, search_seconds=0.005,
                     forward_calls=3, tokens_encoded=1, tokens_encoded_naive=4,
                     reencode_reduction=4.0)
        return {"mcts": {"accuracy": m, "tokens": 10, "seconds": 0.1},
                "best_of_n": {"accuracy": b, "tokens": 10, "seconds": 0.1},
                "beam": {"accuracy": 0.0, "tokens": 12, "seconds": 0.1},
                "majority_vote": {"accuracy": 0.0}, "search": stats}

    monkeypatch.setattr(llm_demo, "compare", compare)
    rows = search_llm._searches(None, None, None, [{"prompt": "p"}] * 8, 8, quick=True)
    assert calls == [0, 0, 1]                       # warm-up call, seed 0, seed 1
    note = rows[0].notes["target"]
    assert note.startswith("MCTS accuracy 0.625 vs best-of-N 0.500 at equal budget, mean "
                           "over sampling seeds 0-1 (per seed: 0.500/0.750, 0.750/0.250; "
                           "MCTS ahead in 1, behind in 1): met"), note
    acc[1] = (0.5, 0.5)                             # mean 0.500 vs 0.625
    rows = search_llm._searches(None, None, None, [{"prompt": "p"}] * 8, 8, quick=True)
    assert rows[0].notes["target"].endswith("NOT met")
