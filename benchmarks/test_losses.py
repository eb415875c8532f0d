"""pytest-benchmark cases for the fused losses (the same as `rlfuse bench losses`).

Run with `make bench` (or `pytest benchmarks/test_losses.py`).  Targets live here as
documentation, not assertions: compare the medians that pytest-benchmark prints.
CPU target (B=64, T=4096, float32, forward+backward of clipped PPO + k3 KL, token-mean):
>= 4x the same chain in torch eager and >= 1.5x torch.compile of it.
"""

import pytest
import torch

from rlfuse.bench.losses import BETA, EPS_HIGH, EPS_LOW, _inputs, _trl, _verl, eager_ppo_k3
from rlfuse.ops import policy_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(64, 4096)] if DEVICE == "cpu" else [(256, 8192)]
VARIANTS = ["rlfuse", "eager", "compile", "verl", "trl"]

_COMPILED = {}


def _fn(variant):
    if variant == "rlfuse":
        return lambda lp, old, adv, mask, ref: policy_loss(
            lp, old, adv, mask, ref_logp=ref, beta=BETA, kl_kind="k3", epsilon_low=EPS_LOW,
            epsilon_high=EPS_HIGH)[0]
    if variant == "eager":
        return lambda *a: eager_ppo_k3(*a)[0]
    if variant == "compile":
        if "ppo" not in _COMPILED:
            _COMPILED["ppo"] = torch.compile(eager_ppo_k3, dynamic=False)
        return lambda *a: _COMPILED["ppo"](*a)[0]
    if variant == "verl":
        v = _verl()
        if v is None:
            pytest.skip("verl not installed")
        return v[0]
    t = _trl()
    if t is None:
        pytest.skip("TRL not installed")
    return t


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("B,T", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_ppo_k3_forward_backward(benchmark, variant, B, T):
    t = _inputs(B, T, DEVICE)
    x = t["lp"].detach().clone().requires_grad_()
    f = _fn(variant)

    def run():
        torch.autograd.grad(f(x, t["old"], t["adv"], t["mask"], t["ref"]), x)
        _sync()

    run()
    benchmark.group = f"ppo+k3 fwd+bwd B={B} T={T} float32"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("B,T", CASES)
@pytest.mark.parametrize("variant", ["rlfuse", "eager", "compile"])
def test_ppo_k3_forward(benchmark, variant, B, T):
    t = _inputs(B, T, DEVICE)
    f = _fn(variant)

    def run():
        with torch.no_grad():
            f(t["lp"], t["old"], t["adv"], t["mask"], t["ref"])
        _sync()

    run()
    benchmark.group = f"ppo+k3 fwd B={B} T={T} float32"
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
