"""pytest-benchmark cases for preference_loss_from_hidden and the per-pair loss kernel (the
same variants as `rlfuse bench preference`; peak memory is reported by that command).

Run with `make bench` (or `pytest benchmarks/test_preference.py`).  Targets (issue 6) live
here as documentation, not as assertions: CPU, 64 pairs of 512 completion tokens each,
H=1024, V=32000, forward+backward: peak extra memory <= 1/8 of the materialised path
(logits -> log_softmax -> gather -> sums -> loss), wall time <= 1.2x of it; the per-pair
loss kernel < 1% of the log-prob step.  The CPU case here is 4 pairs (the materialised path
at 64 pairs needs ~25 GB).
"""

import pytest
import torch

from rlfuse.bench.preference import _loss_only_fns, eager_dpo, make_inputs, variant_fn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [(4, 512, 1024, 32000, torch.float32)] if DEVICE == "cpu" else [
    (64, 512, 4096, 128256, torch.bfloat16)]
VARIANTS = ["rlfuse", "eager", "compile", "liger"]

_COMPILED = {}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("P,T,H,V,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward(benchmark, variant, P, T, H, V, dtype):
    inputs = make_inputs(P, T, H, V, dtype, DEVICE)
    compiled = None
    if variant == "compile":
        compiled = _COMPILED.setdefault("f", torch.compile(eager_dpo, dynamic=False))
    if variant == "liger":
        pytest.importorskip("liger_kernel.chunked_loss")
    fn = variant_fn(variant, *inputs, compiled=compiled)

    def run():
        fn()
        _sync()

    run()
    benchmark.group = f"preference fwd+bwd P={P} T={T} H={H} V={V} {dtype}"
    benchmark.pedantic(run, rounds=3, warmup_rounds=0)


@pytest.mark.parametrize("backend", ["cpu", "torch"] if DEVICE == "cpu" else
                         ["cuda", "triton", "torch"])
def test_loss_kernel_alone(benchmark, backend):
    fn = _loss_only_fns(64, DEVICE, [backend])[f"loss[{backend}]"]

    def run():
        fn()
        _sync()

    run()
    benchmark.group = "preference loss only, 64 pairs, fwd+bwd"
    benchmark(run)
