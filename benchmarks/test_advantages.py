"""pytest-benchmark cases for the advantage family (the same as `rlfuse bench advantages`).

Run with `make bench` (or `pytest benchmarks`).  Targets live here as documentation, not as
assertions: compare the medians that pytest-benchmark prints.
CPU targets: GAE B=256, T=1024, float32 (whitened, as verl) >= 100x verl's
compute_gae_advantage_return and >= 10x the best vectorised torch; GRPO advantages for
4096 samples in groups of 8 broadcast over T=512 >= 3x verl's vectorised GRPO.
"""

import numpy as np
import pytest
import torch

from rlfuse.bench.advantages import _gae_chunked_whiten, _gae_scan_whiten, _grpo_eager, _verl
from rlfuse.ops import gae, group_advantages

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GAE_CASES = [(256, 1024)] if DEVICE == "cpu" else [(1024, 4096)]
GRPO_CASES = [(4096, 8, 512)] if DEVICE == "cpu" else [(16384, 16, 2048)]
GAE_VARIANTS = ["rlfuse", "verl", "eager_chunk", "eager_scan", "compile"]
GRPO_VARIANTS = ["rlfuse", "verl", "eager", "compile"]

_COMPILED = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _gae_fn(variant):
    if variant == "rlfuse":
        return lambda r, v, m: gae(r, v, m, gamma=1.0, lam=0.95, whiten=True)
    if variant == "verl":
        verl = _verl()
        if verl is None:
            pytest.skip("verl not installed")
        return lambda r, v, m: verl.compute_gae_advantage_return(r, v, m, 1.0, 0.95)
    if variant == "eager_chunk":
        return lambda r, v, m: _gae_chunked_whiten(r, v, m, 1.0, 0.95)
    if variant == "eager_scan":
        return lambda r, v, m: _gae_scan_whiten(r, v, m, 1.0, 0.95)
    if "gae" not in _COMPILED:
        _COMPILED["gae"] = torch.compile(_gae_chunked_whiten, dynamic=False)
    fn = _COMPILED["gae"]
    return lambda r, v, m: fn(r, v, m, 1.0, 0.95)


@pytest.mark.parametrize("B,T", GAE_CASES)
@pytest.mark.parametrize("variant", GAE_VARIANTS)
def test_gae(benchmark, variant, B, T):
    lengths = torch.randint(T // 2, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64).to(DEVICE)
    r = torch.randn(B, T, device=DEVICE) * mask
    v = torch.randn(B, T, device=DEVICE)
    f = _gae_fn(variant)
    f(r, v, mask)

    def run():
        f(r, v, mask)
        _sync()

    benchmark.group = f"gae whiten B={B} T={T} float32"
    benchmark.pedantic(run, rounds=10 if variant != "verl" else 3, warmup_rounds=1)


@pytest.mark.parametrize("B,n,T", GRPO_CASES)
@pytest.mark.parametrize("variant", GRPO_VARIANTS)
def test_grpo(benchmark, variant, B, n, T):
    lengths = torch.randint(1, T + 1, (B,))
    mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64).to(DEVICE)
    tok = torch.zeros(B, T)
    tok[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,)).float()
    tok = tok.to(DEVICE)
    index = np.repeat(np.arange(B // n), n)
    ids = torch.from_numpy(index).to(DEVICE)
    if variant == "rlfuse":
        def f():
            return group_advantages(tok, group_ids=ids, mask=mask, semantics="verl")
    elif variant == "verl":
        verl = _verl()
        if verl is None:
            pytest.skip("verl not installed")

        def f():
            return verl.compute_grpo_vectorized_outcome_advantage(tok, mask, index)
    elif variant == "eager":
        def f():
            return _grpo_eager(tok, mask, n)
    else:
        if "grpo" not in _COMPILED:
            _COMPILED["grpo"] = torch.compile(_grpo_eager, dynamic=False)
        cf = _COMPILED["grpo"]

        def f():
            return cf(tok, mask, n)
    f()

    def run():
        f()
        _sync()

    benchmark.group = f"grpo broadcast B={B} n={n} T={T} float32"
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
