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
