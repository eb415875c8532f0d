"""Trainer fault tolerance (issue #10): SIGKILL and resume, non-finite steps, reward
function failures."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from rlfuse.trainers import GRPOTrainer, NonFiniteError, RewardFunctionError, latest_checkpoint
from rlfuse.trainers.base import score_completions
from tests.trainers.conftest import small_grpo_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _worker(out, *extra, wait=True):
    """The fault worker in a subprocess."""
    cmd = [sys.executable, "-m", "tests.trainers.fault_worker", out, *extra]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _in_process(out, *extra):
    """The same worker in this process (saves a Python start-up; one thread, as there)."""
    from tests.trainers import fault_worker

    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            fault_worker.main([out, *extra])
    finally:
        torch.set_num_threads(threads)


def _metrics(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]


def _same_result(ref_out, out):
    a, b = _metrics(ref_out), _metrics(out)
    assert [h["step"] for h in b] == [h["step"] for h in a]
    for x, y in zip(a, b):
        assert (x["loss"], x["reward"], x["grad_norm"]) == (y["loss"], y["reward"], y["grad_norm"])
    for p, q in zip(torch.load(os.path.join(ref_out, "final.pt")),
                    torch.load(os.path.join(out, "final.pt"))):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_result(tmp_path):
    ref = str(tmp_path / "ref")
    _in_process(ref)

    # 1. killed inside the write of checkpoint-4 (model written, not yet renamed)
    out = str(tmp_path / "in_ckpt")
    proc = _worker(out, "--kill-in-checkpoint", "4")
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(out).endswith("checkpoint-3")
    assert os.path.isdir(os.path.join(out, ".tmp-checkpoint-4"))      # the torn write
    _in_process(out, "--resume")
    _same_result(ref, out)

    # 2. killed at a random moment (RLFUSE_FAULT_SEED picks it), then resumed
    rng = random.Random(int(os.environ.get("RLFUSE_FAULT_SEED", "0")))
    out = str(tmp_path / "random")
    p = _worker(out, wait=False)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)                          # training has started: checkpoint-1 exists
    time.sleep(rng.uniform(0.0, 1.5))
    p.send_signal(signal.SIGKILL)
    p.wait()
    _in_process(out, "--resume")
    _same_result(ref, out)


# -- non-finite loss / gradients ------------------------------------------------------
def _trainer(tmp_path, tok, tiny, rows, **kw):
    def length_reward(prompts, completions, **k):
        return [float(len(c)) for c in completions]

    cfg = small_grpo_config(tmp_path, **kw)
    return GRPOTrainer(tiny, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)


def test_nonfinite_loss_step_is_skipped_and_counted(tmp_path, tok, tiny, rows):
    tr = _trainer(tmp_path, tok, tiny, rows, max_steps=3, max_nonfinite_steps=2)
    orig = tr.micro_batch_loss
    snap = {}

    def poisoned(mb, gt):
        loss, stats = orig(mb, gt)
        if tr.state["global_step"] == 1:          # the second step
            snap.setdefault("before", [p.detach().clone() for p in tiny.parameters()])
            loss = loss * float("nan")
        return loss, stats
    tr.micro_batch_loss = poisoned
    orig_round = tr._train_round

    def round_():
        out = orig_round()
        if tr.state["global_step"] == 2:
            snap["after"] = [p.detach().clone() for p in tiny.parameters()]
        return out
    tr._train_round = round_
    res = tr.train()
    assert res["nonfinite_steps"] == 1
    hist = _metrics(tr.args.output_dir)
    assert [h["skipped"] for h in hist] == [0, 1, 0]
    assert math.isnan(hist[1]["loss"])
    for a, b in zip(snap["before"], snap["after"]):
        assert torch.equal(a, b)                  # the NaN step changed nothing


def test_too_many_nonfinite_steps_stop_with_the_step_and_metric(tmp_path, tok, tiny, rows):
    tr = _trainer(tmp_path, tok, tiny, rows, max_steps=6, save_steps=2, max_nonfinite_steps=2)
    params = [p for p in tiny.parameters()]

    def nan_grad_hook(grad):
        return grad * float("nan") if tr.state["global_step"] >= 2 else grad
    params[0].register_hook(nan_grad_hook)        # finite loss, NaN gradients from step 3 on
    with pytest.raises(NonFiniteError, match=r"stopping at step 4: grad_norm is nan") as exc:
        tr.train()
    assert "checkpoint-2" in str(exc.value)
    ck = latest_checkpoint(tr.args.output_dir)
    assert ck.endswith("checkpoint-2")
    state = json.load(open(os.path.join(ck, "trainer_state.json")))
    assert state["global_step"] == 2
    from safetensors.torch import load_file

    weights = load_file(os.path.join(ck, "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


# -- reward functions -------------------------------------------------------------------
PROMPTS = ["1+1=", "2+2=", "3+3="]
COMPLETIONS = ["2", "5", "x"]


def test_reward_function_that_raises_names_the_sample():
    def picky(prompts, completions, **kw):
        return [float(int(c)) for c in completions]   # int("x") raises on sample 2

    with pytest.raises(RewardFunctionError,
                       match=r"'picky' raised ValueError.*sample 2 \(prompt='3\+3=', completion='x'\)"):
        score_completions([picky], [1.0], PROMPTS, COMPLETIONS, {})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "high"])
def test_reward_function_returning_nan_names_the_sample(bad):
    def f(prompts, completions, **kw):
        return [1.0, bad, 0.0]

    with pytest.raises(RewardFunctionError, match=r"returned .* for sample 1 \(prompt='2\+2='"):
        score_completions([f], [1.0], PROMPTS, COMPLETIONS, {})


def test_reward_function_wrong_length():
    with pytest.raises(RewardFunctionError, match="list of 3 values"):
        score_completions([lambda prompts, completions, **kw: [1.0]], [1.0], PROMPTS,
                          COMPLETIONS, {})


def test_none_rewards_are_excluded_from_group_statistics(tmp_path, tok, tiny, rows):
    total, per_func, n_none = score_completions(
        [lambda prompts, completions, **kw: [None, 1.0, None],
         lambda prompts, completions, **kw: [None, 2.0, 3.0]], [1.0, 0.5], PROMPTS,
        COMPLETIONS, {})
    assert n_none == 3
    assert math.isnan(total[0]) and total[1] == 2.0 and total[2] == 1.5

    calls = {"n": 0}

    def sometimes_none(prompts, completions, **kw):
        calls["n"] += 1
        return [None if i % 4 == 0 else float(len(c)) for i, c in enumerate(completions)]

    tr = GRPOTrainer(tiny, sometimes_none, args=small_grpo_config(tmp_path, max_steps=1),
                     train_dataset=rows, tokenizer=tok)
    r = tr.make_rollout(rows[:2])
    rew, adv = r.extra["rewards"], r.extra["advantages"]
    assert torch.isnan(rew[0::4]).all() and (adv[0::4] == 0).all()
    from rlfuse.ops import group_advantages_reference

    g = rew.view(2, 4)
    for k in range(2):                            # mean/std over the 3 non-None rewards
        v = g[k][1:]
        want = (v - v.mean()) / (v.std() + 1e-4)
        torch.testing.assert_close(adv.view(2, 4)[k][1:].double(), want, rtol=1e-5, atol=1e-5)
    m = tr._round_metrics(r, 0.0, {}, {"step": 1}, time.perf_counter())
    assert m["rewards_none"] == 2
