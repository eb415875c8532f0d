"""Fresh runs never mix with an earlier run's checkpoints; a checkpoint resumes only into
a compatible trainer."""
import json
import os

import pytest
import torch

from rlfuse.trainers import (ConfigError, DPOConfig, DPOTrainer, GRPOTrainer, PPOConfig,
                             PPOTrainer, copy_reference, latest_checkpoint)
from tests.trainers.conftest import small_grpo_config


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def _grpo(tmp_path, tok, rows, **kw):
    from rlfuse.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    cfg = small_grpo_config(tmp_path, report_to="none", save_steps=1, save_total_limit=2, **kw)
    return GRPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)


def _ckpts(out):
    return sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))


def test_fresh_run_refuses_a_dir_with_checkpoints(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=4).train()
    assert _ckpts(out) == ["checkpoint-3", "checkpoint-4"]
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(ConfigError, match="output_dir.*overwrite_output_dir"):
        _grpo(tmp_path, tok, rows, max_steps=2, seed=7).train()
    # nothing of the earlier run was touched
    assert _ckpts(out) == ["checkpoint-3", "checkpoint-4"]
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    # resume_from_checkpoint=True with checkpoints present is a resume, not a fresh start
    res = _grpo(tmp_path, tok, rows, max_steps=5).train(resume_from_checkpoint=True)
    assert res["global_step"] == 5


def test_overwrite_output_dir_deletes_the_old_checkpoints(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=4).train()
    # run B (fresh, overwrite) keeps its own newest checkpoints, not the old run's
    _grpo(tmp_path, tok, rows, max_steps=2, seed=7, overwrite_output_dir=True).train()
    assert _ckpts(out) == ["checkpoint-1", "checkpoint-2"]
    with open(os.path.join(latest_checkpoint(out), "trainer_state.json")) as f:
        assert json.load(f)["config"]["seed"] == 7
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2]


def test_overwrite_output_dir_must_be_a_bool():
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        small_grpo_config(__import__("pathlib").Path("/tmp"), overwrite_output_dir="yes")


def test_resume_refuses_another_algorithm(tmp_path, tok, tiny, rows):
    pairs = [{"prompt": r["prompt"], "chosen": r["solution"], "rejected": "x"} for r in rows]
    cfg = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                    max_steps=1, save_steps=1, progress=False, plot=False, report_to="none")
    DPOTrainer(tiny, copy_reference(tiny), args=cfg, train_dataset=pairs, tokenizer=tok).train()
    g = _grpo(tmp_path, tok, rows, max_steps=2)
    with pytest.raises(ConfigError, match="written by a dpo trainer.*grpo"):
        g.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("kw, field", [
    (dict(seed=1), "seed"),
    (dict(num_generations=2), "num_generations"),
    (dict(gradient_accumulation_steps=1, per_device_train_batch_size=8),
     "per_device_train_batch_size"),
    (dict(num_iterations=2), "num_iterations"),
])
def test_resume_refuses_other_data_order_fields(tmp_path, tok, rows, kw, field):
    _grpo(tmp_path, tok, rows, max_steps=1).train()
    tr = _grpo(tmp_path, tok, rows, max_steps=2, **kw)
    with pytest.raises(ConfigError, match=f"resume_from_checkpoint: .*{field}="):
        tr.train(resume_from_checkpoint=True)


def test_resume_refuses_another_dataset_size(tmp_path, tok, rows):
    _grpo(tmp_path, tok, rows, max_steps=1).train()
    tr = _grpo(tmp_path, tok, rows[:32], max_steps=2)
    with pytest.raises(ConfigError, match="train_dataset of 64 rows"):
        tr.train(resume_from_checkpoint=True)
    # max_steps and the learning rate may change on resume
    res = _grpo(tmp_path, tok, rows, max_steps=2, learning_rate=1e-4).train(
        resume_from_checkpoint=True)
    assert res["global_step"] == 2


def test_overwrite_refuses_to_delete_the_checkpoint_the_model_was_loaded_from(tmp_path, tok,
                                                                             rows):
    """overwrite_output_dir deletes the earlier run's checkpoints, but not the one this
    run's model (or tokenizer) was just loaded from: that raises before anything goes."""
    from rlfuse.models.tiny import tiny_causal_lm

    out = tmp_path / "out"
    src = out / "checkpoint-500"
    tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0).save_pretrained(src)
    tok.save_pretrained(src)
    before = sorted(os.listdir(src))
    cfg = small_grpo_config(tmp_path, report_to="none", save_steps=0, max_steps=1,
                            overwrite_output_dir=True)
    with pytest.raises(ConfigError, match="overwrite_output_dir would delete.*loaded from"):
        GRPOTrainer(str(src), length_reward, args=cfg, train_dataset=rows).train()
    assert sorted(os.listdir(src)) == before


# -- a checkpoint written before disable_dropout was recorded -----------------------------
def _ppo(tmp_path, tok, rows, **kw):
    from rlfuse.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                per_device_train_batch_size=4, max_completion_length=4, num_ppo_epochs=1,
                kl_coef=0.0, save_steps=1, progress=False, plot=False, seed=0,
                report_to="none")
    base.update(kw)
    return PPOTrainer(model, length_reward, args=PPOConfig(**base), train_dataset=rows,
                      tokenizer=tok)


def _dpo(tmp_path, tok, rows, **kw):
    from rlfuse.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    pairs = [{"prompt": r["prompt"], "chosen": r["solution"], "rejected": "x"} for r in rows]
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                save_steps=1, progress=False, plot=False, report_to="none")
    base.update(kw)
    return DPOTrainer(model, copy_reference(model), args=DPOConfig(**base),
                      train_dataset=pairs, tokenizer=tok)


def _unrecord(ckpt, field):
    """Make ``ckpt`` look as if written before ``field`` was recorded."""
    path = os.path.join(ckpt, "trainer_state.json")
    with open(path) as f:
        state = json.load(f)
    del state["config"][field]
    with open(path, "w") as f:
        json.dump(state, f, indent=1)


@pytest.mark.parametrize("make", [_ppo, _dpo], ids=["ppo", "dpo"])
def test_checkpoint_without_disable_dropout_resumes_only_with_dropout_on(tmp_path, tok, rows,
                                                                        make):
    """Before disable_dropout existed (b3a2958) every run trained with dropout on: a
    checkpoint without the field is one of disable_dropout=False, so the PPO / DPO default
    (True) refuses it, naming the setting to pass; that setting resumes it."""
    out = str(tmp_path / "out")
    make(tmp_path, tok, rows, max_steps=1, disable_dropout=False).train()
    ckpt = os.path.join(out, "checkpoint-1")
    _unrecord(ckpt, "disable_dropout")
    before = open(os.path.join(ckpt, "trainer_state.json")).read()
    tr = make(tmp_path, tok, rows, max_steps=2)
    assert tr.args.disable_dropout is True
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint: .*disable_dropout=False "
                       r"\(this run: True; not recorded.*pass disable_dropout=False "
                       r"\(--disable_dropout false\)"):
        tr.train(resume_from_checkpoint=True)
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl"]
    assert open(os.path.join(ckpt, "trainer_state.json")).read() == before
    res = make(tmp_path, tok, rows, max_steps=2, disable_dropout=False).train(
        resume_from_checkpoint=True)
    assert res["global_step"] == 2


def test_grpo_checkpoint_without_disable_dropout_resumes_with_the_default(tmp_path, tok, rows):
    """GRPO's default (False) is what a run before the field did: it resumes as before."""
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=1).train()
    _unrecord(os.path.join(out, "checkpoint-1"), "disable_dropout")
    assert _grpo(tmp_path, tok, rows, max_steps=2).train(
        resume_from_checkpoint=True)["global_step"] == 2
    with pytest.raises(ConfigError, match="disable_dropout=False .*not recorded"):
        _grpo(tmp_path, tok, rows, max_steps=3, disable_dropout=True).train(
            resume_from_checkpoint=os.path.join(out, "checkpoint-1"))


def test_resume_refusal_names_the_settings_to_pass(tmp_path, tok, rows):
    _grpo(tmp_path, tok, rows, max_steps=1).train()
    tr = _grpo(tmp_path, tok, rows[:32], max_steps=2, seed=5, num_iterations=2)
    with pytest.raises(ConfigError) as ei:
        tr.train(resume_from_checkpoint=True)
    msg = str(ei.value)
    assert "pass seed=0 (--seed 0), num_iterations=1 (--num_iterations 1), " \
        "the same train_dataset (64 rows), or start a fresh run" in msg


# -- resuming another directory's checkpoint into output_dir ------------------------------
def test_resume_from_another_dir_refuses_an_output_dir_with_checkpoints(tmp_path, tok, rows):
    """Resuming run A's checkpoint into an output_dir holding run B's checkpoints would mix
    them: refused as for a fresh run, nothing touched; overwrite_output_dir deletes B's."""
    a = tmp_path / "a"
    _grpo(a, tok, rows, max_steps=2).train()
    src = str(a / "out" / "checkpoint-1")
    _grpo(tmp_path, tok, rows, max_steps=3, seed=7).train()
    out = str(tmp_path / "out")
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-3"]
    metrics = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(ConfigError, match=r"output_dir: .*already holds checkpoints .*"
                       r"checkpoint-3\), and resume_from_checkpoint=.*overwrite_output_dir"):
        _grpo(tmp_path, tok, rows, max_steps=3).train(resume_from_checkpoint=src)
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-3"]
    assert open(os.path.join(out, "metrics.jsonl")).read() == metrics
    # an incompatible checkpoint is refused before overwrite_output_dir deletes anything
    with pytest.raises(ConfigError, match="resume_from_checkpoint: .*seed=0"):
        _grpo(tmp_path, tok, rows, max_steps=3, seed=7, overwrite_output_dir=True).train(
            resume_from_checkpoint=src)
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-3"]
    res = _grpo(tmp_path, tok, rows, max_steps=3, overwrite_output_dir=True).train(
        resume_from_checkpoint=src)
    assert res["global_step"] == 3
    with open(os.path.join(out, "checkpoint-2", "trainer_state.json")) as f:
        assert json.load(f)["config"]["seed"] == 0       # the resumed run's, not B's
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [2, 3]
    assert _ckpts(str(a / "out")) == ["checkpoint-1", "checkpoint-2"]   # the source stays


def test_resume_from_another_dir_into_an_empty_output_dir(tmp_path, tok, rows):
    a = tmp_path / "a"
    _grpo(a, tok, rows, max_steps=1).train()
    res = _grpo(tmp_path, tok, rows, max_steps=2).train(
        resume_from_checkpoint=str(a / "out" / "checkpoint-1") + os.sep)
    assert res["global_step"] == 2
    assert _ckpts(str(tmp_path / "out")) == ["checkpoint-2"]


def test_overwrite_never_deletes_the_checkpoint_resumed_from(tmp_path, tok, rows):
    """A checkpoint kept inside one of output_dir's old checkpoints is not deleted by
    overwrite_output_dir when the run resumes from it."""
    a = tmp_path / "a"
    _grpo(a, tok, rows, max_steps=1).train()
    out = tmp_path / "out"
    kept = out / "checkpoint-9" / "saved"
    kept.mkdir(parents=True)
    os.rename(a / "out" / "checkpoint-1", kept / "checkpoint-1")
    before = sorted(os.listdir(kept / "checkpoint-1"))
    with pytest.raises(ConfigError, match="overwrite_output_dir would delete .*checkpoint-9, "
                       "which holds the checkpoint this run resumes from"):
        _grpo(tmp_path, tok, rows, max_steps=2, overwrite_output_dir=True).train(
            resume_from_checkpoint=str(kept / "checkpoint-1"))
    assert sorted(os.listdir(kept / "checkpoint-1")) == before
