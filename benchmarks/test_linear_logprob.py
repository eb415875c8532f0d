"""pytest-benchmark cases for linear_token_logprobs (the same variants as
`rlfuse bench linear_logprob`; peak memory is reported by that command, not here).

Run with `make bench` (or `pytest benchmarks/test_linear_logprob.py`).  Targets (issue 3)
live here as documentation, not as assertions:
CPU, N=4096, H=1024, V=32000, float32, forward+backward: wall time <= 1.2x the
materialised eager path and faster than the Liger-style chunked scheme; peak extra memory
<= 1/8 of the materialised path's.  GPU, N=8192, H=4096, V=128256, bf16: <= 1.25x the
three matmuls.
"""

import pytest
import torch

from rlfuse.bench.linear_logprob import make_inputs, variant_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(4096, 1024, 32000, torch.float32)] if DEVICE == "cpu" else [
    (8192, 4096, 128256, torch.bfloat16)]
VARIANTS = ["rlfuse", "eager", "compile", "liger-style"]

_COMPILED = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("N,H,V,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(benchmark, variant, N, H, V, dtype):
    inputs = make_inputs(N, H, V, dtype, DEVICE)
    compiled = None
    if variant == "compile":
        from rlfuse.bench.linear_logprob import eager_logprobs

        compiled = _COMPILED.setdefault("f", torch.compile(eager_logprobs, dynamic=False))
    fn = variant_fn(variant, *inputs, compiled=compiled)

    def run():
        fn()
        _sync()

    run()
    benchmark.group = f"linear_logprob fwd+bwd N={N} H={H} V={V} {dtype}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)
