"""metrics.jsonl survives a torn last line and a kill while it is rewritten on resume."""
import json
import os

import pytest

from rlfuse.models.tiny import tiny_causal_lm
from rlfuse.trainers import GRPOTrainer
from tests.trainers.conftest import small_grpo_config


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def _trainer(tmp_path, tok, rows, **kw):
    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    cfg = small_grpo_config(tmp_path, report_to="none", save_steps=2, **kw)
    return GRPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)


def _metrics(tmp_path):
    return open(tmp_path / "out" / "metrics.jsonl").read()


def test_torn_last_line_is_skipped_on_resume_and_plot(tmp_path, tok, rows):
    _trainer(tmp_path, tok, rows, max_steps=2).train()
    with open(tmp_path / "out" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.12')          # what a kill mid-append leaves
    tr = _trainer(tmp_path, tok, rows, max_steps=4)
    with pytest.warns(RuntimeWarning, match="last line"):
        assert tr.plot(str(tmp_path / "c.png")) is not None
    with pytest.warns(RuntimeWarning, match="last line"):
        tr.train(resume_from_checkpoint=True)
    steps = [json.loads(x)["step"] for x in _metrics(tmp_path).splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bad_line_before_the_last_raises_naming_it(tmp_path, tok, rows):
    _trainer(tmp_path, tok, rows, max_steps=2).train()
    p = tmp_path / "out" / "metrics.jsonl"
    lines = p.read_text().splitlines()
    p.write_text(lines[0] + "\n" + "garbage\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not valid JSON"):
        _trainer(tmp_path, tok, rows, max_steps=3).train(resume_from_checkpoint=True)


def test_kill_while_rewriting_on_resume_keeps_the_file(tmp_path, tok, rows, monkeypatch):
    _trainer(tmp_path, tok, rows, max_steps=3).train()        # checkpoint-2, checkpoint-3
    before = _metrics(tmp_path)
    import rlfuse.trainers.base as base

    calls = {"n": 0}
    real = base.json.dumps

    def dumps_then_killed(obj, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt                    # killed after writing one line
        return real(obj, *a, **k)
    tr = _trainer(tmp_path, tok, rows, max_steps=3)
    monkeypatch.setattr(base.json, "dumps", dumps_then_killed)
    with pytest.raises(KeyboardInterrupt):
        tr.load_checkpoint(str(tmp_path / "out" / "checkpoint-2"))
    monkeypatch.setattr(base.json, "dumps", real)
    assert _metrics(tmp_path) == before
