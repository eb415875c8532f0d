"""TensorBoard logging (``report_to``, ``logging_dir``)."""

import json
import os

import pytest
import torch

from rlfuse.trainers import ConfigError, GRPOConfig, GRPOTrainer, RewardFunctionError
from rlfuse.trainers import config as config_mod
from tests.trainers.conftest import small_grpo_config

pytest.importorskip("tensorboard", reason="TensorBoard tests need the tensorboard package "
                                          "(installed by `make deps`)")


def length_reward(prompts, completions, **kw):   # varies inside a group
    return [float(len(c)) for c in completions]


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import (EventAccumulator,
                                                                        SCALARS)

    acc = EventAccumulator(logdir, size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _event_files(path):
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
            if f.startswith("events.out.tfevents")]


def _jsonl(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("logging_dir", [None, "tb_custom"])
def test_tensorboard_scalars_equal_jsonl(tmp_path, tok, tiny, rows, logging_dir):
    logdir = None if logging_dir is None else str(tmp_path / logging_dir)
    cfg = small_grpo_config(tmp_path, max_steps=3, report_to="tensorboard", logging_dir=logdir)
    tr = GRPOTrainer(tiny, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)
    tr.train()
    assert tr._tb_writer is None                    # closed at the end
    where = logdir or os.path.join(cfg.output_dir, "runs")
    assert _event_files(where)
    scalars = _scalars(where)
    hist = _jsonl(cfg.output_dir)
    assert [h["step"] for h in hist] == [1, 2, 3]
    numeric = {k for h in hist for k, v in h.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric <= set(scalars), numeric - set(scalars)
    assert "loss" in numeric and "rewards/length_reward" in numeric
    for key in numeric:
        want = [(h["step"], float(torch.tensor(h[key], dtype=torch.float32)))
                for h in hist if key in h]
        got = [(s, v) for s, v in scalars[key]]
        assert got == want, key
    # the values are not all equal (a scalar stuck at one value would not show an error)
    assert len({v for _, v in scalars["grad_norm"]}) > 1


def test_report_to_none_writes_no_events(tmp_path, tok, tiny, rows):
    cfg = small_grpo_config(tmp_path, max_steps=1, report_to="none")
    tr = GRPOTrainer(tiny, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)
    tr.train()
    assert os.path.exists(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert _event_files(str(tmp_path)) == []


def test_writer_closed_on_exception(tmp_path, tok, tiny, rows):
    calls = []

    def fails_on_second_round(prompts, completions, **kw):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return length_reward(prompts, completions)

    cfg = small_grpo_config(tmp_path, max_steps=3, report_to=["tensorboard"])
    tr = GRPOTrainer(tiny, fails_on_second_round, args=cfg, train_dataset=rows, tokenizer=tok)
    with pytest.raises(RewardFunctionError, match="boom"):
        tr.train()
    assert tr._tb_writer is None
    scalars = _scalars(os.path.join(cfg.output_dir, "runs"))
    assert [s for s, _ in scalars["loss"]] == [1]


@pytest.mark.parametrize("value, match", [
    ("wandb", "report_to: unknown integration 'wandb'"),
    (["tensorboard", "comet"], "report_to: unknown integration 'comet'"),
    (["none", "tensorboard"], "report_to: 'none' cannot be combined"),
    (3, "report_to: must be a name"),
])
def test_bad_report_to(value, match):
    with pytest.raises(ConfigError, match=match):
        GRPOConfig(report_to=value)


def test_bad_logging_dir():
    with pytest.raises(ConfigError, match="logging_dir"):
        GRPOConfig(logging_dir="")


def test_report_to_tensorboard_not_installed(monkeypatch):
    monkeypatch.setattr(config_mod, "tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match="report_to: 'tensorboard' needs the tensorboard"):
        GRPOConfig(report_to="tensorboard")
    # the default and "all" fall back to no TensorBoard
    assert GRPOConfig().report_to == "none"
    assert config_mod.report_integrations("all") == []
    assert config_mod.report_integrations(None) == []


def test_report_to_default_when_installed():
    assert GRPOConfig().report_to == "tensorboard"
    assert config_mod.report_integrations("all") == ["tensorboard"]
    assert GRPOConfig.parse_value("report_to", "tensorboard") == "tensorboard"


def test_resume_purges_events_after_the_checkpoint(tmp_path, tok, rows):
    from rlfuse.models.tiny import tiny_causal_lm

    def run(resume=None):
        model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
        cfg = small_grpo_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=None,
                                report_to="tensorboard")
        GRPOTrainer(model, length_reward, args=cfg, train_dataset=rows,
                    tokenizer=tok).train(resume_from_checkpoint=resume)
        return cfg.output_dir

    out = run()
    first = _scalars(os.path.join(out, "runs"))["loss"]
    out = run(os.path.join(out, "checkpoint-1"))   # steps 2 and 3 again
    again = _scalars(os.path.join(out, "runs"))["loss"]
    assert [s for s, _ in first] == [s for s, _ in again] == [1, 2, 3]
    assert again == first                          # the rerun steps are the same steps
    want = [(h["step"], float(torch.tensor(h["loss"], dtype=torch.float32)))
            for h in _jsonl(out)]
    assert again == want
