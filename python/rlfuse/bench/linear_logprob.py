"""Benchmark of linear_token_logprobs (fused lm_head + log-prob) against the materialised
path, torch.compile of it, and Liger-Kernel's fused-linear-cross-entropy scheme.

Variants (all compute per-token log-probs of ``hidden @ weight.T`` and, for "fwd+bwd",
the gradients of ``sum(logp * adv)`` w.r.t. hidden and weight):

  rlfuse        linear_token_logprobs (chunked; gradient recomputed in backward)
  eager         logits = hidden @ weight.T; log_softmax(logits).gather(ids)  (materialised)
  compile       torch.compile of ``eager``
  liger-style   Liger-Kernel's LigerFusedLinearCrossEntropy scheme in plain torch (its
                Triton kernels do not run on a CPU): chunks of next_pow2(N / ceil(V / H))
                rows, logits + softmax gradient per chunk *in the forward*, grad_hidden and
                grad_weight accumulated there (grad_weight in the weight's dtype, by addmm,
                as Liger does by default), backward only scales.  It can do this only
                because its loss is a scalar with a known upstream gradient; per-token
                log-probs under an arbitrary later loss (what rlfuse returns) cannot.
  liger         the real LigerFusedLinearCrossEntropyLoss, on CUDA when installed.

Peak memory is measured in a fresh subprocess per variant: after one warm-up
forward+backward (lazy imports, compilation), the peak RSS is reset (Linux clear_refs) and
the peak RSS (CPU) or max_memory_allocated (CUDA) of a second forward+backward, minus the
memory in use before it, is reported ("peak_extra_mb" in Row.notes).  It includes the
returned gradients (grad_weight is V x H) for every variant alike.  "matmul_floor_ms" is the
time of the three matmuls that any exact fused scheme needs at least (logits, grad_hidden,
grad_weight).

Every variant's log-probs ("fwd") and gradients ("fwd+bwd") are compared with a float64
reference computed from the same inputs; a variant beyond the tolerance is named in the
row's notes with its largest error ("liger", whose loss has no per-token weights, is not
compared).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from rlfuse.bench.harness import Row, check_agreement, time_variants
from rlfuse.ops import linear_token_logprobs

NAME = "linear_logprob"

CPU_CASES = [(4096, 1024, 32000, torch.float32)]
CPU_QUICK = [(512, 256, 8000, torch.float32)]
GPU_CASES = [(8192, 4096, 128256, torch.bfloat16), (4096, 4096, 151936, torch.bfloat16)]
GPU_QUICK = [(4096, 4096, 128256, torch.bfloat16)]


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).to(device)
    ids = torch.randint(0, V, (N,), generator=g).to(device)
    adv = torch.randn(N, generator=g).to(device)
    return hidden, weight, ids, adv


def eager_logprobs(hidden, weight, ids):
    logits = hidden @ weight.t()
    return torch.log_softmax(logits.float(), -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


class _LigerStyle(torch.autograd.Function):
    """Liger-Kernel's fused linear cross-entropy scheme in torch: gradients in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, ids, adv):
        N, H = hidden.shape
        V = weight.size(0)
        inc = -(-V // H)
        chunk = 1 << max(0, (-(-N // inc) - 1).bit_length())  # next_pow2(ceil(N / inc))
        grad_h = torch.empty_like(hidden)
        # Liger's default: grad_weight accumulated in the weight's dtype (bf16 addmm for a
        # bf16 model), not in float32
        grad_w = torch.zeros(V, H, dtype=weight.dtype, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            hc = hidden[s:e]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, -1)
            lp = logits.gather(-1, ids[s:e, None]).squeeze(-1) - lse
            a = adv[s:e]
            loss += -(lp * a).sum()
            # d(-sum a * logp)/dlogits = a * (softmax - onehot), written over the logits
            d = logits.sub_(lse[:, None]).exp_()
            d.scatter_add_(-1, ids[s:e, None], -torch.ones_like(lse[:, None]))
            d.mul_(a[:, None])
            d = d.to(hidden.dtype)
            grad_h[s:e] = d @ weight
            grad_w.addmm_(d.t(), hc)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g, grad_w * g, None, None


def _liger_real():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:
        return None
    return LigerFusedLinearCrossEntropyLoss


def variant_fn(name, hidden, weight, ids, adv, compiled=None):
    """A closure that runs one forward+backward of ``name``."""
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if name == "rlfuse":
        return lambda: torch.autograd.grad(
            -(linear_token_logprobs(h, w, ids) * adv).sum(), (h, w))
    if name == "eager":
        return lambda: torch.autograd.grad(-(eager_logprobs(h, w, ids) * adv).sum(), (h, w))
    if name == "compile":
        f = compiled or torch.compile(eager_logprobs, dynamic=False)
        return lambda: torch.autograd.grad(-(f(h, w, ids) * adv).sum(), (h, w))
    if name == "liger-style":
        return lambda: torch.autograd.grad(_LigerStyle.apply(h, w, ids, adv), (h, w))
    if name == "liger":
        cls = _liger_real()
        if cls is None or not h.is_cuda:
            raise RuntimeError("Liger-Kernel needs CUDA (and liger_kernel installed)")
        loss_fn = cls(reduction="sum")
        # Liger's loss has no per-token weights: an unweighted sum (same matmul work).
        return lambda: torch.autograd.grad(loss_fn(w, h, ids), (h, w))
    raise ValueError(name)


def forward_fn(name, hidden, weight, ids, compiled=None):
    if name == "rlfuse":
        return lambda: linear_token_logprobs(hidden, weight, ids)
    if name == "eager":
        return lambda: eager_logprobs(hidden, weight, ids)
    if name == "compile":
        f = compiled or torch.compile(eager_logprobs, dynamic=False)
        return lambda: f(hidden, weight, ids)
    raise ValueError(name)


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so
    the import's and input construction's transients do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn, device) -> dict:
    """Peak extra memory of one ``fn()`` after a warm-up call (lazy imports, torch.compile,
    allocator pools are not the op's memory): max_memory_allocated on CUDA, peak RSS on the
    CPU.  Meant for a fresh process (see :func:`memory_subprocess`)."""
    if device == "cuda":
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return {"peak_extra_bytes": torch.cuda.max_memory_allocated() - base}
    import gc

    fn()
    gc.collect()
    base = _status_bytes("VmRSS")
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    fn()
    return {"peak_extra_bytes": _status_bytes("VmHWM") - base}


def _memory_child(name, N, H, V, dtype_name, device) -> dict:
    """Run in a fresh process: peak extra memory of one forward+backward of ``name``."""
    dtype = getattr(torch, dtype_name)
    return peak_extra_bytes(variant_fn(name, *make_inputs(N, H, V, dtype, device)), device)


def json_subprocess(module: str, args: list, timeout=900, env_extra=None):
    """Run ``python -m module *args`` in a fresh process and return ``(the JSON object on
    its last stdout line, None)``, or ``(None, the error)`` on failure."""
    cmd = [sys.executable, "-m", module, *[str(a) for a in args]]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    # A fixed mmap threshold: freed large blocks go back to the OS, so RSS tracks the live
    # tensors (glibc's dynamic threshold would otherwise keep freed blocks resident).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    for k, v in (env_extra or {}).items():
        env.setdefault(k, v)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"{module} subprocess timed out"
    if out.returncode != 0:
        return None, (out.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def memory_subprocess(module: str, args: list, timeout=900) -> tuple[float | None, str | None]:
    """Run ``python -m module --memory *args`` (which prints peak_extra_bytes as JSON) and
    return the peak extra MB (None and the error on failure)."""
    d, err = json_subprocess(module, ["--memory", *args], timeout)
    if err:
        return None, err
    return d["peak_extra_bytes"] / 2**20, None


def measure_memory(name, N, H, V, dtype, device, timeout=900) -> tuple[float | None, str | None]:
    """Peak extra MB of ``name`` in a fresh subprocess (None and the error on failure)."""
    return memory_subprocess("rlfuse.bench.linear_logprob",
                             [name, N, H, V, str(dtype).replace("torch.", ""), device], timeout)


def interleaved(fns: dict, device, *, warmup: int = 1, repeat: int = 3):
    """Median ms per variant, timing the variants round-robin (one call of each per
    round) so that load from other processes on a shared machine hits all of them alike.
    A variant that raises, in its warm-up or in a timed round, reports its error instead
    (time None) and is dropped from later rounds (:func:`harness.time_variants`)."""
    return time_variants(fns, device, warmup=warmup, repeat=repeat)


def reference(hidden, weight, ids, adv, chunk: int = 1024):
    """float64 log-probs and the gradients of ``-sum(logp * adv)`` w.r.t. hidden and
    weight, computed in row chunks (the float64 logits of one chunk at a time)."""
    h64, w64, a64 = hidden.double(), weight.double(), adv.double()
    lp = torch.empty(h64.size(0), dtype=torch.float64, device=h64.device)
    gh = torch.empty_like(h64)
    gw = torch.zeros_like(w64)
    for s in range(0, h64.size(0), chunk):
        e = min(h64.size(0), s + chunk)
        logsm = torch.log_softmax(h64[s:e] @ w64.t(), -1)
        lp[s:e] = logsm.gather(-1, ids[s:e, None]).squeeze(-1)
        # d(-sum a * logp)/d logits = a * (softmax - onehot)
        d = logsm.exp_()
        d.scatter_add_(-1, ids[s:e, None], -torch.ones_like(lp[s:e, None]))
        d.mul_(a64[s:e, None])
        gh[s:e] = d @ w64
        gw.addmm_(d.t(), h64[s:e])
    return lp, gh, gw


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    repeat = repeat or 5
    compiled = torch.compile(eager_logprobs, dynamic=False) if compile else None
    extra = [b for b in (backends or []) if b]
    rows: list[Row] = []
    for N, H, V, dtype in cases:
        hidden, weight, ids, adv = make_inputs(N, H, V, dtype, dev)
        case = f"N={N} H={H} V={V}"
        dt = str(dtype).replace("torch.", "")
        hh = hidden.detach()
        # a finite gradient-like operand for the matmul floor (uninitialised memory may
        # hold denormals / NaN, which slow some BLAS kernels down)
        d = torch.randn(N, V, device=dev).to(dtype) * 1e-3

        # forward only (no_grad): one matmul + the row kernel vs materialised
        ref_lp, ref_gh, ref_gw = reference(hidden, weight, ids, adv)
        names = ["rlfuse"] + [f"rlfuse[{b}]" for b in extra] + ["eager"]
        names += ["compile"] if compile else []
        fns = {}
        for n in names:
            if n.startswith("rlfuse["):
                fns[n] = (lambda b=n[7:-1]: linear_token_logprobs(hidden, weight, ids,
                                                                  backend=b))
            else:
                fns[n] = forward_fn(n, hidden, weight, ids, compiled)
        fns["_floor"] = lambda: hh @ weight.t()
        with torch.no_grad():
            times, notes = interleaved(fns, dev, repeat=repeat)
            check_agreement(fns, ref_lp, notes, skip=("_floor",))
        floor = times.pop("_floor")
        if floor is not None:
            notes["matmul_floor_ms"] = round(floor, 2)
        del ref_lp
        rows.append(Row(NAME, case, dt, "fwd", times, 0.0, notes))

        # forward + backward
        names = ["rlfuse"] + [f"rlfuse[{b}]" for b in extra] + ["eager"]
        names += (["compile"] if compile else []) + ["liger-style"]
        if dev.type == "cuda" and _liger_real() is not None:
            names.append("liger")
        fns = {}
        for name in names:
            if name.startswith("rlfuse["):
                b = name[7:-1]
                h_ = hidden.detach().requires_grad_()
                w_ = weight.detach().requires_grad_()
                fns[name] = (lambda b=b, h_=h_, w_=w_: torch.autograd.grad(
                    -(linear_token_logprobs(h_, w_, ids, backend=b) * adv).sum(), (h_, w_)))
            else:
                fns[name] = variant_fn(name, hidden, weight, ids, adv, compiled)

        def floor():
            with torch.no_grad():
                return hh @ weight.t(), d @ weight, d.t() @ hh

        fns["_floor"] = floor
        times, notes = interleaved(fns, dev, repeat=repeat)
        check_agreement(fns, (ref_gh, ref_gw), notes, skip=("_floor", "liger"))
        floor = times.pop("_floor")
        if floor is not None:
            notes["matmul_floor_ms"] = round(floor, 2)
        del d, ref_gh, ref_gw
        peak = {}
        for name in names:
            if name.startswith("rlfuse["):
                continue
            mb, merr = measure_memory(name, N, H, V, dtype, dev.type)
            peak[name] = None if mb is None else round(mb, 1)
            if merr:
                notes[f"{name} memory"] = merr
        notes["peak_extra_mb"] = peak
        if peak.get("rlfuse") and peak.get("eager"):
            notes["mem_rlfuse/eager"] = round(peak["rlfuse"] / peak["eager"], 3)
        if times.get("rlfuse") and times.get("eager"):
            notes["time_rlfuse/eager"] = round(times["rlfuse"] / times["eager"], 3)
        if times.get("rlfuse") and notes.get("matmul_floor_ms"):
            notes["time_rlfuse/3_matmuls"] = round(times["rlfuse"] / notes["matmul_floor_ms"], 3)
        rows.append(Row(NAME, case, dt, "fwd+bwd", times, 0.0, notes))
        del hidden, weight
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--memory":
        _, _, name, N, H, V, dtype_name, device = sys.argv
        print(json.dumps(_memory_child(name, int(N), int(H), int(V), dtype_name, device)))
    else:
        print("usage: python -m rlfuse.bench.linear_logprob --memory NAME N H V DTYPE DEVICE")
        sys.exit(2)
