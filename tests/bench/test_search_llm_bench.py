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
