"""pytest-benchmark cases for token_logprobs (the same as `rlfuse bench logprob`).

Run with `make bench` (or `pytest benchmarks`).  Targets live here as documentation,
not as assertions: compare the medians that pytest-benchmark prints.
CPU targets (N=2048, V=32000, float32): forward >= 4x TRL's selective_log_softmax and
torch eager, >= 50% of copy bandwidth; forward+backward >= 3x eager autograd.
"""

import pytest
import torch

from rlfuse.bench.logprob import _eager_logprob, _trl
from rlfuse.ops import token_logprobs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(2048, 32000, torch.float32)] if DEVICE == "cpu" else [(4096, 128256, torch.bfloat16)]
VARIANTS = ["rlfuse", "eager", "compile", "trl"]

_COMPILED = {}


def _fn(variant):
    if variant == "rlfuse":
        return token_logprobs
    if variant == "eager":
        return _eager_logprob
    if variant == "compile":
        if "lp" not in _COMPILED:
            _COMPILED["lp"] = torch.compile(_eager_logprob, dynamic=False)
        return _COMPILED["lp"]
    trl = _trl()
    if trl is None:
        pytest.skip("TRL not installed")
    return trl[0]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("N,V,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward(benchmark, variant, N, V, dtype):
    logits = torch.randn(N, V, device=DEVICE).to(dtype)
    ids = torch.randint(0, V, (N,), device=DEVICE)
    f = _fn(variant)
    f(logits, ids)

    def run():
        f(logits, ids)
        _sync()

    benchmark.group = f"logprob fwd N={N} V={V} {dtype}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("N,V,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(benchmark, variant, N, V, dtype):
    logits = torch.randn(N, V, device=DEVICE).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (N,), device=DEVICE)
    f = _fn(variant)

    def run():
        torch.autograd.grad(f(logits, ids).sum(), logits)
        _sync()

    run()
    benchmark.group = f"logprob fwd+bwd N={N} V={V} {dtype}"
    benchmark.pedantic(run, rounds=10, warmup_rounds=1)
