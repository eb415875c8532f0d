"""End to end: TRL's GRPOTrainer on the tiny model, a few optimizer steps with fixed seeds,
gives the same losses and metrics with and without rlfuse.integrations.trl.patch()."""

from __future__ import annotations

import pytest

from tests.helpers import require_peer

pytestmark = [pytest.mark.peer, pytest.mark.slow]

KEYS = ("loss", "kl", "entropy", "reward", "clip_ratio/region_mean", "grad_norm")


def test_grpo_trainer_same_losses_with_and_without_patch(tmp_path):
    require_peer("trl")
    import rlfuse.integrations.trl as rl_trl
    from rlfuse.bench.trl import grpo_run

    kw = dict(hidden_size=32, batch=8, completion=8, steps=3, learning_rate=1e-3)
    want = grpo_run(False, workdir=str(tmp_path / "a"), **kw)["logs"]
    got = grpo_run(True, workdir=str(tmp_path / "b"), **kw)["logs"]
    assert not rl_trl.is_patched()
    assert len(got) == len(want) == 3
    assert any(abs(h["loss"]) > 1e-4 for h in want)  # the loss is not trivially zero
    assert any(h["kl"] > 0 for h in want)
    for step, (g, w) in enumerate(zip(got, want)):
        for k in KEYS:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-3, abs=1e-5), (step, k, g[k], w[k])
