"""Benchmark of token_logprobs against torch eager, torch.compile and TRL.

Eager baseline: ``log_softmax(logits.float() / T).gather(ids)`` (and, for entropy,
``-(softmax * log_softmax).sum()``), the chain TRL and verl run without fused kernels.
"""

from __future__ import annotations

import torch

from rlfuse.bench.harness import Row, time_variants
from rlfuse.ops import token_logprobs

NAME = "logprob"

CPU_CASES = [(2048, 32000, torch.float32), (2048, 32000, torch.bfloat16), (256, 151936, torch.float32)]
CPU_QUICK = [(512, 32000, torch.float32)]
GPU_CASES = [
    (4096, 128256, torch.bfloat16),
    (4096, 128256, torch.float32),
    (4096, 151936, torch.bfloat16),
]
GPU_QUICK = [(4096, 128256, torch.bfloat16)]


def _eager_logprob(logits, ids):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _eager_entropy(logits):
    logsm = torch.log_softmax(logits.float(), dim=-1)
    return -(logsm.exp() * logsm).sum(-1)


def _trl():
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except Exception:  # TRL not installed, or it failed to import
        return None
    return selective_log_softmax, entropy_from_logits


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    repeat = repeat or (5 if quick else 10)
    trl = _trl()
    compiled_lp = torch.compile(_eager_logprob, dynamic=False) if compile else None
    compiled_ent = torch.compile(_eager_entropy, dynamic=False) if compile else None
    extra = [b for b in (backends or []) if b]
    rows: list[Row] = []
    for N, V, dtype in cases:
        g = torch.Generator(device="cpu").manual_seed(0)
        logits = (torch.randn(N, V, generator=g) * 2).to(dtype).to(dev)
        ids = torch.randint(0, V, (N,), generator=g).to(dev)
        case = f"N={N} V={V}"
        nbytes = logits.numel() * logits.element_size()
        dt = str(dtype).replace("torch.", "")

        def timed(fns: dict):
            return time_variants(fns, dev, repeat=repeat)

        # forward
        fns = {"rlfuse": lambda: token_logprobs(logits, ids)}
        for b in extra:
            fns[f"rlfuse[{b}]"] = lambda b=b: token_logprobs(logits, ids, backend=b)
        fns["eager"] = lambda: _eager_logprob(logits, ids)
        if compiled_lp is not None:
            fns["compile"] = lambda: compiled_lp(logits, ids)
        if trl is not None:
            fns["trl"] = lambda: trl[0](logits, ids)
        t, notes = timed(fns)
        rows.append(Row(NAME, case, dt, "fwd", t, nbytes, notes))

        # forward with entropy
        fns = {"rlfuse": lambda: token_logprobs(logits, ids, return_entropy=True)}
        fns["eager"] = lambda: (_eager_logprob(logits, ids), _eager_entropy(logits))
        if compiled_lp is not None:
            fns["compile"] = lambda: (compiled_lp(logits, ids), compiled_ent(logits))
        if trl is not None:
            fns["trl"] = lambda: (trl[0](logits, ids), trl[1](logits))
        t, notes = timed(fns)
        rows.append(Row(NAME, case, dt, "fwd+ent", t, nbytes, notes))

        # forward + backward (gradient w.r.t. the logits)
        x = logits.detach().requires_grad_()

        def fb(f):
            return lambda: torch.autograd.grad(f(x).sum(), x)

        fns = {"rlfuse": fb(lambda z: token_logprobs(z, ids))}
        for b in extra:
            fns[f"rlfuse[{b}]"] = fb(lambda z, b=b: token_logprobs(z, ids, backend=b))
        fns["eager"] = fb(lambda z: _eager_logprob(z, ids))
        if compiled_lp is not None:
            fns["compile"] = fb(lambda z: compiled_lp(z, ids))
        if trl is not None:
            fns["trl"] = fb(lambda z: trl[0](z, ids))
        t, notes = timed(fns)
        # forward read + backward read + gradient write
        rows.append(Row(NAME, case, dt, "fwd+bwd", t, 3 * nbytes, notes))
        del logits, x
    return rows
