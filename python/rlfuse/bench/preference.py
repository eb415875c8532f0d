"""Benchmark of preference_loss_from_hidden (DPO from hidden states) against the materialised
path, and of the per-pair loss kernel against the log-prob step it sits on.

Case: P pairs, each completion T tokens (chosen and rejected stacked: 2P x T positions),
hidden size H, vocabulary V; ``loss_type="sigmoid"``, reference log-probs precomputed.
Forward + backward to ``hidden`` and the lm_head ``weight``.

  rlfuse        preference_loss_from_hidden (chunked linear log-probs + fused pair kernel)
  eager         logits = hidden @ weight.T -> log_softmax -> gather -> masked sums -> the DPO
                sigmoid loss (TRL's math), all materialised
  compile       torch.compile of ``eager`` (with ``compile``)
  liger         Liger-Kernel's LigerFusedLinearDPOLoss (chunked torch, float32 logits per
                chunk) with use_ref_model=False: the same policy work; its loss omits the
                reference terms (it cannot take precomputed reference log-probs)

Peak extra memory is measured in a fresh subprocess per variant (peak RSS on the CPU after a
warm-up, see rlfuse.bench.linear_logprob); it includes the returned gradients.  A second
row times the per-pair loss alone (``preference_loss`` forward + backward on [P] inputs,
each backend) against the whole rlfuse step: "loss_kernel_share" is their ratio (target
< 1%).  The materialised path needs about 3 x 2PT x V x 4 bytes (25 GB at the issue's
P=64, T=512, V=32000); a variant that would not fit in the free memory is reported as
skipped rather than run.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from rlfuse.bench.harness import Row
from rlfuse.bench.linear_logprob import interleaved, memory_subprocess, peak_extra_bytes
from rlfuse.ops import preference_loss, preference_loss_from_hidden

NAME = "preference"
BETA = 0.1

# (P pairs, T tokens per completion, H, V, dtype)
CPU_CASES = [(4, 512, 1024, 32000, torch.float32), (64, 512, 1024, 32000, torch.float32)]
CPU_QUICK = [(2, 128, 256, 8000, torch.float32)]
GPU_CASES = [(64, 512, 4096, 128256, torch.bfloat16)]
GPU_QUICK = [(16, 512, 4096, 128256, torch.bfloat16)]


def make_inputs(P, T, H, V, dtype, device, seed=0):
    """Stacked [2P, T] completions with ragged lengths (mask), hidden states, lm_head, and
    reference sequence log-probs."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    ids = torch.randint(0, V, (2 * P, T), generator=g).to(device)
    lens = torch.randint(T // 2, T + 1, (2 * P,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)).to(device)
    ref = (-torch.rand(2 * P, generator=g) * 2 * T).to(device)
    return hidden, weight, ids, mask, ref[:P].contiguous(), ref[P:].contiguous()


def eager_dpo(hidden, weight, ids, mask, ref_c, ref_r):
    """The materialised path: full logits, log_softmax, gather, masked sums, TRL's loss."""
    P = ref_c.numel()
    logits = hidden @ weight.t()
    lp = torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    s = (lp * mask).sum(-1)
    delta = (s[:P] - ref_c) - (s[P:] - ref_r)
    return -torch.nn.functional.logsigmoid(BETA * delta).mean()


def _liger(P):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    return LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False)


def variant_fn(name, hidden, weight, ids, mask, ref_c, ref_r, compiled=None):
    """A closure running one forward + backward of ``name``."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if name == "rlfuse" or name.startswith("rlfuse["):
        backend = name[7:-1] if name.startswith("rlfuse[") else None
        return lambda: torch.autograd.grad(preference_loss_from_hidden(
            h, w, ids, mask=mask, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=BETA,
            backend=backend)[0], (h, w))
    if name == "eager":
        return lambda: torch.autograd.grad(eager_dpo(h, w, ids, mask, ref_c, ref_r), (h, w))
    if name == "compile":
        f = compiled or torch.compile(eager_dpo, dynamic=False)
        return lambda: torch.autograd.grad(f(h, w, ids, mask, ref_c, ref_r), (h, w))
    if name == "liger":
        fn = _liger(ref_c.numel())
        target = ids.masked_fill(~mask.bool(), -100)
        return lambda: torch.autograd.grad(fn(w, h, target)[0], (h, w))
    raise ValueError(name)


def _needed_bytes(name, P, T, H, V, esize) -> int:
    N = 2 * P * T
    io = (2 * N * H + 2 * V * H) * esize  # inputs and their gradients
    if name in ("eager", "compile"):
        return io + 3 * N * V * 4  # logits, log_softmax, their gradient (float32)
    return io + (64 << 20) + 2 * T * V * 4 * 4


def _free_bytes() -> int:
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def measure_memory(name, P, T, H, V, dtype, device, timeout=1800):
    """Peak extra MB of one forward + backward of ``name`` in a fresh subprocess."""
    return memory_subprocess("rlfuse.bench.preference",
                             [name, P, T, H, V, str(dtype).replace("torch.", ""), device], timeout)


def _loss_only_fns(P, device, backends):
    """Forward + backward of the per-pair loss alone on [P] inputs, per backend."""
    g = torch.Generator(device="cpu").manual_seed(1)
    c = (-torch.rand(P, generator=g) * 500).to(device).requires_grad_()
    r = (-torch.rand(P, generator=g) * 500).to(device).requires_grad_()
    rc = (c.detach() + torch.randn(P, generator=g).to(device))
    rr = (r.detach() + torch.randn(P, generator=g).to(device))
    fns = {}
    for b in backends:  # None: the default dispatch, timed as "rlfuse"
        fns["rlfuse" if b is None else f"loss[{b}]"] = (lambda b=b: torch.autograd.grad(
            preference_loss(c, r, rc, rr, beta=BETA, backend=b)[0], (c, r)))
    return fns


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    repeat = repeat or (5 if quick else 3)
    compiled = torch.compile(eager_dpo, dynamic=False) if compile else None
    extra = [b for b in (backends or []) if b]
    rows: list[Row] = []
    for P, T, H, V, dtype in cases:
        inputs = make_inputs(P, T, H, V, dtype, dev)
        case = f"P={P} T={T} H={H} V={V}"
        dt = str(dtype).replace("torch.", "")
        esize = torch.empty((), dtype=dtype).element_size()
        names = ["rlfuse"] + [f"rlfuse[{b}]" for b in extra] + ["eager"]
        names += (["compile"] if compile else []) + ["liger"]
        notes: dict = {}
        free = _free_bytes() if dev.type == "cpu" else None
        runnable = []
        for n in names:
            need = _needed_bytes(n.split("[")[0], P, T, H, V, esize)
            if free is not None and need > 0.8 * free:
                notes[n] = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} free"
            else:
                runnable.append(n)
        fns = {}
        for n in runnable:
            try:
                fns[n] = variant_fn(n, *inputs, compiled=compiled)
            except Exception as exc:  # a peer missing or failing to build
                notes[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        times, errs = interleaved(fns, dev, repeat=repeat)
        notes.update(errs)
        peak = {}
        for n in runnable:
            if n.startswith("rlfuse[") or n in errs or n not in fns:
                continue
            mb, merr = measure_memory(n, P, T, H, V, dtype, dev.type)
            peak[n] = None if mb is None else round(mb, 1)
            if merr:
                notes[f"{n} memory"] = merr
        notes["peak_extra_mb"] = peak
        if peak.get("rlfuse") and peak.get("eager"):
            notes["mem_rlfuse/eager"] = round(peak["rlfuse"] / peak["eager"], 3)
        if times.get("rlfuse") and times.get("eager"):
            notes["time_rlfuse/eager"] = round(times["rlfuse"] / times["eager"], 3)
        rows.append(Row(NAME, case, dt, "fwd+bwd", {n: times.get(n) for n in names}, 0.0, notes))

        # the per-pair loss kernel alone, against the whole step
        kb = ["cpu", "torch"] if dev.type == "cpu" else ["cuda", "triton", "torch"]
        # "rlfuse": preference_loss with the default backend (its own timing, not a copy
        # of a loss[<backend>] column); loss[<backend>]: each backend named explicitly
        lt, lerr = interleaved(_loss_only_fns(P, dev, [None] + kb), dev, warmup=3, repeat=50)
        lnotes = dict(lerr)
        step = times.get("rlfuse")
        if step:
            for k in ["rlfuse"] + [f"loss[{b}]" for b in kb]:
                if lt.get(k):
                    key = "loss_kernel_share" + ("" if k == "rlfuse" else k[4:])
                    lnotes[key] = f"{100 * lt[k] / step:.4f}%"
        lnotes["rlfuse"] = "preference_loss alone, default backend (the loss[...] columns: "\
                           "each backend named)"
        rows.append(Row(NAME, f"P={P} (loss only)", dt, "fwd+bwd", lt, 0.0, lnotes))
        del inputs, fns
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 9 and sys.argv[1] == "--memory":
        _, _, name, P, T, H, V, dtype_name, device = sys.argv
        inputs = make_inputs(int(P), int(T), int(H), int(V), getattr(torch, dtype_name), device)
        print(json.dumps(peak_extra_bytes(variant_fn(name, *inputs), device)))
    else:
        print("usage: python -m rlfuse.bench.preference --memory NAME P T H V DTYPE DEVICE")
        sys.exit(2)
