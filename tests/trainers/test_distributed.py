import json
import os
import subprocess
import sys

import pytest
import torch

from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(out, *args, worker="ddp_worker"):
    """Two processes over gloo running ``tests.trainers.<worker> OUT ARGS``; returns the
    saved results of rank 0 and rank 1."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    os.makedirs(out, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", f"tests.trainers.{worker}", out, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(f"{out}/rank0.pt"), torch.load(f"{out}/rank1.pt")


def _initial_params():
    return list(tiny_causal_lm(tiny_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                               seed=0).parameters())


@pytest.fixture(scope="module")
def ddp_grpo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    return out, _launch(out, "ddp", "grpo")


@pytest.mark.slow
def test_two_process_gloo_ddp(ddp_grpo):
    out, (r0, r1) = ddp_grpo
    assert r0["world"] == r1["world"] == 2 and not r0["fsdp"]
    # DDP kept the replicas identical, and they trained
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], _initial_params()))
    # ranks sampled different completions (seed + rank) from different prompts
    assert r0["rewards"] != r1["rewards"]
    state = json.load(open(f"{out}/checkpoint-2/trainer_state.json"))
    assert state["world_size"] == 2 and state["global_step"] == 2
    assert os.path.isfile(f"{out}/checkpoint-2/rng_state_1.pth")


@pytest.mark.slow
def test_two_process_gloo_fsdp_matches_ddp(tmp_path, ddp_grpo):
    from safetensors.torch import load_file

    _, (d0, _d1) = ddp_grpo
    out = str(tmp_path / "fsdp")
    r0, r1 = _launch(out, "fsdp", "grpo")
    assert r0["world"] == r1["world"] == 2 and r0["fsdp"] and r1["fsdp"]
    # the gathered full parameters are the same on both ranks, they trained, and they are
    # those of the DDP run on the same data (same samples: same seeds and rewards)
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(r0["params"], _initial_params()))
    assert r0["rewards"] == d0["rewards"]
    assert len(r0["params"]) == len(d0["params"])
    for a, b in zip(r0["params"], d0["params"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the checkpoint holds the full (gathered) parameters
    state = json.load(open(f"{out}/checkpoint-2/trainer_state.json"))
    assert state["fsdp"] is True and state["world_size"] == 2 and state["global_step"] == 2
    sd = load_file(f"{out}/checkpoint-2/model.safetensors")
    model = tiny_causal_lm(tiny_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, seed=0)
    names = [n for n, _ in model.named_parameters()]
    for n, p in zip(names, r0["params"]):
        assert torch.equal(sd[n], p), n
    # resuming from checkpoint-1 (model, optimizer, RNG, data position) ends where the
    # uninterrupted run ended
    res0, res1 = _launch(str(tmp_path / "resumed"), "fsdp", "grpo", f"{out}/checkpoint-1")
    assert res0["rewards"] == r0["rewards"][1:]
    for a, b, c in zip(res0["params"], res1["params"], r0["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "dpo"])
def test_two_process_gloo_fsdp_matches_ddp_ppo_dpo(tmp_path, algo):
    """PPO (policy, value model and reference sharded) and DPO (reference sharded for the
    precomputation) under FSDP2 end with the parameters of the DDP run."""
    d0, _ = _launch(str(tmp_path / "ddp"), "ddp", algo)
    f0, f1 = _launch(str(tmp_path / "fsdp"), "fsdp", algo)
    assert f0["fsdp"] and not d0["fsdp"]
    assert f0["rewards"] == pytest.approx(d0["rewards"], rel=1e-5, abs=1e-6)
    assert len(f0["params"]) == len(d0["params"])
    for a, b, c in zip(f0["params"], f1["params"], d0["params"]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(f0["params"], _initial_params()))


def test_two_process_batch_std_is_over_every_process(tmp_path):
    """scale_rewards="batch": the std is that of the rewards of both processes (TRL gathers
    them first), so each rank's advantages are the one-process advantages of the whole
    batch, whatever the split; with the std of its own rewards, each rank's would differ."""
    from rlfuse.ops import group_advantages

    r0, r1 = _launch(str(tmp_path / "bstd"), worker="batch_std_worker")
    assert r0["world"] == r1["world"] == 2
    rewards = torch.cat([r0["rewards"], r1["rewards"]])
    got = torch.cat([r0["advantages"], r1["advantages"]]).double()
    want = group_advantages(rewards.float(), group_size=4, method="batch_std",
                            semantics="trl").double()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # TRL's formula (float64): (r - nanmean of the group) / (nanstd of all rewards + 1e-4),
    # 0 where the reward is missing
    valid = ~torch.isnan(rewards)
    mean = torch.stack([g[~torch.isnan(g)].mean() for g in rewards.view(-1, 4)])
    trl = (rewards - mean.repeat_interleave(4)) / (rewards[valid].std() + 1e-4)
    trl = torch.where(valid, trl, torch.zeros_like(trl))
    torch.testing.assert_close(got, trl, rtol=1e-5, atol=1e-6)
    local = torch.cat([group_advantages(r["rewards"].float(), group_size=4,
                                        method="batch_std", semantics="trl").double()
                       for r in (r0, r1)])
    assert (local - trl).abs().max() > 0.1
