"""rlfuse bench generate: the quick case runs every variant and says which decode path
rlfuse used."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


def test_quick_generate_bench_runs_every_variant():
    from rlfuse.bench import generate

    rows = generate.run("cpu", quick=True, repeat=1)
    assert len(rows) == 1
    row = rows[0]
    assert set(row.times_ms) == {"rlfuse", "model_fwd", "generate"}
    assert all(t is not None and t > 0 for t in row.times_ms.values()), row.notes
    assert row.notes["rlfuse_decode_steps"] == "lean decoder"
    assert "decode_step_us" in row.notes
