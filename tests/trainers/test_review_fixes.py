"""Fixes from a review of the trainers: optimizer settings on resume, a reference model
that is the policy, shared value-model parameters, resuming an older checkpoint of the
same directory, half-deleted checkpoint directories, supervised_warmup's arguments and
clearer errors for bad inputs."""
import json
import math
import os
import shutil
import warnings

import pytest
import torch

from rlfuse.models.tiny import tiny_causal_lm
from rlfuse.trainers import (ConfigError, DPOConfig, DPOTrainer, GRPOTrainer, PPOConfig,
                             PPOTrainer, RewardFunctionError, ValueModel, copy_reference,
                             latest_checkpoint, supervised_warmup)
from tests.trainers.conftest import small_grpo_config


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def _model(tok):
    return tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)


def _grpo(tmp_path, tok, rows, **kw):
    base = dict(report_to="none", save_steps=1, gradient_accumulation_steps=1)
    base.update(kw)
    return GRPOTrainer(_model(tok), length_reward, args=small_grpo_config(tmp_path, **base),
                       train_dataset=rows, tokenizer=tok)


def _steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _ckpts(out):
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")),
                  key=lambda n: int(n.split("-")[1]))


# -- 1. optimizer settings changed on resume ---------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_resume_uses_this_runs_optimizer_settings(tmp_path, tok, rows, schedule):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=2, lr_scheduler_type=schedule).train()
    tr = _grpo(tmp_path, tok, rows, max_steps=4, lr_scheduler_type=schedule,
               learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.5, adam_epsilon=1e-6)
    with pytest.warns(RuntimeWarning, match=r"learning_rate 0\.001 -> 0\.01.*weight_decay"):
        tr.train(resume_from_checkpoint=True)
    g = tr.optimizer.param_groups[0]
    assert (g["weight_decay"], g["betas"], g["eps"]) == (0.1, (0.5, 0.999), 1e-6)
    assert tr.scheduler.base_lrs == [1e-2] and g["initial_lr"] == 1e-2
    # the schedule goes on from the restored step with the new base learning rate
    lam = tr.scheduler.lr_lambdas[0]
    hist = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    for h in hist[2:]:
        assert h["lr"] == pytest.approx(1e-2 * lam(h["step"]), rel=1e-12)
    # the checkpoint written after the resume agrees with its trainer_state.json
    ck = os.path.join(out, "checkpoint-4")
    opt = torch.load(os.path.join(ck, "optimizer.pt"), weights_only=False)["param_groups"][0]
    cfg = json.load(open(os.path.join(ck, "trainer_state.json")))["config"]
    assert opt["initial_lr"] == cfg["learning_rate"] == 1e-2
    assert opt["weight_decay"] == cfg["weight_decay"] == 0.1
    assert torch.load(os.path.join(ck, "scheduler.pt"), weights_only=False)["base_lrs"] == [1e-2]


def test_resume_with_the_same_settings_does_not_warn(tmp_path, tok, rows):
    _grpo(tmp_path, tok, rows, max_steps=1).train()
    tr = _grpo(tmp_path, tok, rows, max_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tr.train(resume_from_checkpoint=True)


# -- 2. ref_model is the policy ----------------------------------------------------------
def _sharing_copy(model):
    """A second model object whose body is the policy's own (shared parameters)."""
    other = _model_like(model)
    other.model = model.model
    return other


def _model_like(model):
    import copy

    return copy.deepcopy(model)


def _build(algo, tmp_path, tok, rows, model, ref):
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                  max_steps=1, progress=False, plot=False, report_to="none")
    if algo == "ppo":
        return PPOTrainer(model, length_reward, args=PPOConfig(kl_coef=0.05,
                          max_completion_length=4, **common), train_dataset=rows,
                          tokenizer=tok, ref_model=ref)
    if algo == "grpo":
        return GRPOTrainer(model, length_reward, args=small_grpo_config(
            tmp_path, beta=0.05, report_to="none"), train_dataset=rows, tokenizer=tok,
            ref_model=ref)
    pairs = [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}] * 8
    return DPOTrainer(model, ref, args=DPOConfig(**common), train_dataset=pairs, tokenizer=tok)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "dpo"])
@pytest.mark.parametrize("how", ["same", "shared"])
def test_ref_model_that_is_the_policy_is_refused(tmp_path, tok, rows, algo, how):
    model = _model(tok)
    model.train()
    ref = model if how == "same" else _sharing_copy(model)
    with pytest.raises(ConfigError, match=r"ref_model must not be the model itself or share "
                                          r"its parameters.*copy_reference\(model\)"):
        _build(algo, tmp_path, tok, rows, model, ref)
    # nothing was modified
    assert model.training and all(p.requires_grad for p in model.parameters())
    # a copy is accepted
    _build(algo, tmp_path, tok, rows, model, copy_reference(model))


# -- 3. a value model on the policy's body ------------------------------------------------
def test_ppo_value_model_sharing_the_body_steps_each_parameter_once(tmp_path, tok, rows):
    model = _model(tok)
    vm = ValueModel(model.model, 32)
    cfg = PPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                    max_steps=1, kl_coef=0.0, max_completion_length=4, progress=False,
                    plot=False, report_to="none", learning_rate=1e-2)
    tr = PPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok,
                    value_model=vm)
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params})
    unique = {id(p): p for p in list(model.parameters()) + list(vm.parameters())}
    assert len(opt_params) == len(unique)
    r = tr.make_rollout(rows[:4])
    loss, _ = tr.accumulate_gradients(r)
    norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(p.grad) for p in unique.values() if p.grad is not None]))
    metrics = {}
    tr._optimizer_step(loss, metrics)
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-5)


# -- 4. resuming an older checkpoint of the same directory -----------------------------
def test_resuming_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=4, save_steps=2, save_total_limit=2).train()
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-4"]
    tr = _grpo(tmp_path, tok, rows, max_steps=3, save_total_limit=2, temperature=0.5)
    with pytest.warns(RuntimeWarning, match=r"not the newest checkpoint.*checkpoint-4.*"
                                            r"abandoned-from-step-2"):
        tr.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    aside = os.path.join(out, "abandoned-from-step-2")
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(aside)) == ["checkpoint-4", "metrics.jsonl"]
    assert _steps(os.path.join(aside, "metrics.jsonl")) == [3, 4]
    assert _steps(os.path.join(out, "metrics.jsonl")) == [1, 2, 3]
    assert latest_checkpoint(out) == os.path.join(out, "checkpoint-3")
    # the new branch continues
    _grpo(tmp_path, tok, rows, max_steps=5, save_total_limit=2,
          temperature=0.5).train(resume_from_checkpoint=True)
    assert _ckpts(out) == ["checkpoint-4", "checkpoint-5"]
    st = json.load(open(os.path.join(out, "checkpoint-5", "trainer_state.json")))
    assert st["config"]["temperature"] == 0.5
    assert _steps(os.path.join(out, "metrics.jsonl")) == [1, 2, 3, 4, 5]
    assert os.path.isdir(os.path.join(aside, "checkpoint-4"))    # nothing was deleted


def test_moving_newer_checkpoints_aside_is_kill_safe(tmp_path, tok, rows, monkeypatch):
    import rlfuse.trainers.base as B

    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=5, save_total_limit=None).train()
    real, calls = os.rename, []

    def dying_rename(a, b):
        calls.append(b)
        if "abandoned" in b and len([c for c in calls if "abandoned" in c]) == 2:
            raise KeyboardInterrupt("killed")
        return real(a, b)

    monkeypatch.setattr(B.os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        _grpo(tmp_path, tok, rows, max_steps=4, save_total_limit=None).train(
            resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    monkeypatch.setattr(B.os, "rename", real)
    # every checkpoint left is whole (newest moved first), the metrics are all kept
    for n in _ckpts(out):
        assert os.path.isfile(os.path.join(out, n, "trainer_state.json"))
    assert _ckpts(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert _steps(os.path.join(out, "metrics.jsonl")) == [1, 2, 3, 4, 5]
    # the same resume again finishes the job
    with pytest.warns(RuntimeWarning, match="abandoned-from-step-2-2"):
        _grpo(tmp_path, tok, rows, max_steps=4, save_total_limit=None).train(
            resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    assert _ckpts(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert sorted(os.listdir(os.path.join(out, "abandoned-from-step-2"))) == [
        "checkpoint-5", "metrics.jsonl"]
    assert sorted(os.listdir(os.path.join(out, "abandoned-from-step-2-2"))) == [
        "checkpoint-3", "checkpoint-4", "metrics.jsonl"]
    assert _steps(os.path.join(out, "metrics.jsonl")) == [1, 2, 3, 4]


# -- 5. supervised_warmup's arguments -------------------------------------------------
@pytest.mark.parametrize("kw, name", [
    (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"),
    (dict(learning_rate=float("inf")), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(seed="x"), "seed")])
def test_supervised_warmup_refuses_bad_arguments(tok, rows, kw, name):
    model = _model(tok)
    before = [p.detach().clone() for p in model.parameters()]
    args = dict(steps=2, batch_size=4, learning_rate=3e-3, seed=0)
    args.update(kw)
    with pytest.raises(ValueError, match=f"^{name}"):
        supervised_warmup(model, tok, rows, **args)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_supervised_warmup_without_clipping_runs(tok, rows):
    losses = supervised_warmup(_model(tok), tok, rows, steps=2, batch_size=4,
                               learning_rate=3e-3, max_grad_norm=None)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


# -- 6. directories left by a kill -------------------------------------------------------
def test_kill_leftovers_are_cleaned_at_the_start(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=2).train()
    # a kill while rotation deleted checkpoint-1, and one while checkpoint-3 was written
    shutil.copytree(os.path.join(out, "checkpoint-1"), os.path.join(out, ".del-checkpoint-0"))
    os.remove(os.path.join(out, ".del-checkpoint-0", "model.safetensors"))
    os.makedirs(os.path.join(out, ".tmp-checkpoint-3"))
    tr = _grpo(tmp_path, tok, rows, max_steps=3)
    tr.train(resume_from_checkpoint=True)
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == [
        "checkpoint-2", "checkpoint-3"]


def test_the_only_copy_of_a_replaced_checkpoint_is_kept(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    _grpo(tmp_path, tok, rows, max_steps=2).train()
    # a kill between the two renames of a replacement of checkpoint-2: the old one renamed
    # away, the new one whole but not renamed in
    shutil.copytree(os.path.join(out, "checkpoint-2"), os.path.join(out, ".del-checkpoint-2"))
    os.rename(os.path.join(out, "checkpoint-2"), os.path.join(out, ".tmp-checkpoint-2"))
    tr = _grpo(tmp_path, tok, rows, max_steps=2)
    tr.train(resume_from_checkpoint=True)
    assert tr.state["global_step"] == 2
    assert sorted(n for n in os.listdir(out) if "checkpoint" in n) == [
        "checkpoint-1", "checkpoint-2"]


def test_replacing_a_checkpoint_leaves_no_leftovers(tmp_path, tok, rows):
    out = str(tmp_path / "out")
    tr = _grpo(tmp_path, tok, rows, max_steps=1)
    tr.train()
    tr.save_checkpoint()                      # checkpoint-1 again
    assert sorted(os.listdir(out)) == ["checkpoint-1", "metrics.jsonl"]


# -- 7. clearer errors ------------------------------------------------------------------
def test_reward_function_returning_a_scalar_is_named(tmp_path, tok, rows):
    def scalar_reward(prompts, completions, **kw):
        return 1.0

    tr = GRPOTrainer(_model(tok), scalar_reward, args=small_grpo_config(
        tmp_path, report_to="none", max_steps=1), train_dataset=rows, tokenizer=tok)
    with pytest.raises(RewardFunctionError,
                       match=r"'scalar_reward' must return a list of 8 values.*got a float"):
        tr.train()


def test_dataset_given_as_columns_is_refused(tmp_path, tok):
    with pytest.raises(TypeError, match="train_dataset must be a sequence of rows"):
        GRPOTrainer(_model(tok), length_reward, args=small_grpo_config(tmp_path),
                    train_dataset={"prompt": ["1+1="] * 8}, tokenizer=tok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_names_device(tmp_path, tok, rows):
    with pytest.raises(ConfigError, match="^device: 'cuda'"):
        GRPOTrainer(_model(tok), length_reward, args=small_grpo_config(tmp_path, device="cuda"),
                    train_dataset=rows, tokenizer=tok)


def test_ppo_refuses_an_unused_ref_model_as_grpo_does(tmp_path, tok, rows):
    model = _model(tok)
    cfg = PPOConfig(output_dir=str(tmp_path / "out"), kl_coef=0.0, report_to="none")
    with pytest.raises(ConfigError, match=r"ref_model is given but kl_coef == 0"):
        PPOTrainer(model, length_reward, args=cfg, train_dataset=rows, tokenizer=tok,
                   ref_model=copy_reference(model))
    with pytest.raises(ConfigError, match=r"ref_model is given but beta == 0"):
        GRPOTrainer(model, length_reward, args=small_grpo_config(tmp_path, beta=0.0),
                    train_dataset=rows, tokenizer=tok, ref_model=copy_reference(model))


# -- 8. the metrics each trainer writes ------------------------------------------------
def test_ppo_logs_the_reward_metrics_of_grpo(tmp_path, tok, rows):
    cfg = PPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                    max_steps=1, num_ppo_epochs=1, kl_coef=0.0, max_completion_length=4,
                    progress=False, plot=False, report_to="none")
    PPOTrainer(_model(tok), length_reward, args=cfg, train_dataset=rows, tokenizer=tok).train()
    h = json.loads(open(tmp_path / "out" / "metrics.jsonl").readline())
    for k in ("reward_std", "rewards/length_reward", "clipped_ratio", "tokens_per_s"):
        assert k in h, k
