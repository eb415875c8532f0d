"""Benchmark of token_logprobs against torch eager, torch.compile and TRL.

Eager baseline: ``log_softmax(logits.float() / T).gather(ids)`` (and, for entropy,
``-(softmax * log_softmax).sum()``), the chain TRL and verl run without fused kernels.

The "fwd+ent" row (log-probs and entropy of the same logits):

  eager         two passes, log-prob then entropy, each with its own log_softmax: the way
                TRL (``selective_log_softmax`` + ``entropy_from_logits``) and verl call them
  eager_1pass   one log_softmax, log-prob gathered from it and entropy summed over it
  compile       ``torch.compile`` of that single-pass function (one graph, reads the
                logits once)
  trl           ``selective_log_softmax_and_entropy`` where the installed TRL has it (one
                fused Triton pass on CUDA; on the CPU it runs the two calls), else the two
                calls

Every variant's output (and, for "fwd+bwd", its gradient) is compared with a float64
reference computed from the same logits; a variant beyond the tolerance is named in the
row's notes with its largest error (e.g. TRL's bf16 log_softmax on bf16 logits), so that a
faster variant that does less precise work is visible as such.
"""

from __future__ import annotations

import torch

from rlfuse.bench.harness import Row, check_agreement, time_variants
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


def _eager_logprob_entropy(logits, ids):
    """Log-prob and entropy from one log_softmax (a single pass over the logits)."""
    logsm = torch.log_softmax(logits.float(), dim=-1)
    return (logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1),
            -(logsm.exp() * logsm).sum(-1))


def _trl():
    """(selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy or
    None) from the installed TRL, or None."""
    try:
        from trl.trainer import utils
    except Exception:  # TRL not installed, or it failed to import
        return None
    try:
        return (utils.selective_log_softmax, utils.entropy_from_logits,
                getattr(utils, "selective_log_softmax_and_entropy", None))
    except AttributeError:
        return None


def _trl_lp_ent(trl):
    """TRL's log-prob + entropy: its single-pass function when it has one, else the two
    calls its trainers made before it."""
    if trl[2] is not None:
        return lambda z, ids: trl[2](z, ids)
    return lambda z, ids: (trl[0](z, ids), trl[1](z))


def reference(logits, ids):
    """float64 log-probs, entropies and d(sum logp)/d logits of ``logits``."""
    x = logits.detach().double().requires_grad_()
    logsm = torch.log_softmax(x, dim=-1)
    lp = logsm.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    grad, = torch.autograd.grad(lp.sum(), x)
    return lp.detach(), ent.detach(), grad


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    repeat = repeat or (5 if quick else 10)
    trl = _trl()
    compiled_lp = torch.compile(_eager_logprob, dynamic=False) if compile else None
    compiled_lp_ent = (torch.compile(_eager_logprob_entropy, dynamic=False) if compile
                       else None)
    trl_lp_ent = _trl_lp_ent(trl) if trl is not None else None
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
        ref_lp, ref_ent, ref_grad = reference(logits, ids)
        t, notes = timed(fns)
        check_agreement(fns, ref_lp, notes)
        rows.append(Row(NAME, case, dt, "fwd", t, nbytes, notes))

        # forward with entropy
        fns = {"rlfuse": lambda: token_logprobs(logits, ids, return_entropy=True)}
        for b in extra:
            fns[f"rlfuse[{b}]"] = lambda b=b: token_logprobs(logits, ids, return_entropy=True,
                                                             backend=b)
        fns["eager"] = lambda: (_eager_logprob(logits, ids), _eager_entropy(logits))
        fns["eager_1pass"] = lambda: _eager_logprob_entropy(logits, ids)
        if compiled_lp_ent is not None:
            fns["compile"] = lambda: compiled_lp_ent(logits, ids)
        if trl_lp_ent is not None:
            fns["trl"] = lambda: trl_lp_ent(logits, ids)
        t, notes = timed(fns)
        check_agreement(fns, (ref_lp, ref_ent), notes)
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
        check_agreement(fns, ref_grad, notes)
        # forward read + backward read + gradient write
        rows.append(Row(NAME, case, dt, "fwd+bwd", t, 3 * nbytes, notes))
        del logits, x, ref_lp, ref_ent, ref_grad
    return rows
