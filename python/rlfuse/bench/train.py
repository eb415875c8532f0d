"""Benchmark ``train``: one GRPO step of rlfuse's ``GRPOTrainer`` against TRL's
``GRPOTrainer`` on the same tiny model and settings (CPU or one GPU).

Both trainers load the same saved tiny Llama (untrained, so almost every completion runs
to ``max_completion_length`` in both), sample ``num_generations`` completions for each
prompt (TRL with ``generate``; rlfuse with its defaults: ``rlfuse.models.generate.sample``,
one prefill per prompt, and log-prob forwards that encode each prompt once), use
``beta > 0`` (a reference model) and the ``dapo`` loss, and make one optimizer step per
generation batch.  Each variant runs in its own subprocess
(``python -m rlfuse.bench.train --child ...``), alternately, ``repeat`` times, so that
peak memory is measured per process and load on a shared machine hits both alike:

* step time: the fastest of the measured steps (after warm-up steps) over all repeats
  (load from other jobs on a shared machine only adds time; the median is in the notes),
  generation, reward, reference log-probs, forward, backward and optimizer included;
* peak memory: the growth of the process's peak RSS over the measured steps (the
  high-water mark is reset after the warm-up steps through ``/proc/self/clear_refs``, so
  lazy imports and first-call allocations do not count; CPU) or
  ``torch.cuda.max_memory_allocated`` over those steps (GPU);
* for rlfuse, the share of step time in generation, model forward / backward and the
  rlfuse ops (``linear_token_logprobs`` and ``policy_loss``, forward and backward, timed
  by autograd hooks around them, plus ``group_advantages``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from rlfuse.bench.harness import Row

NAME = "train"

# (hidden, layers, per_device_train_batch_size, num_generations, max_completion_length)
CPU_CASE = dict(hidden=128, layers=2, batch=32, generations=8, completion=32, steps=6, warmup=1)
CPU_QUICK = dict(hidden=64, layers=2, batch=16, generations=8, completion=16, steps=2, warmup=1)
GPU_CASE = dict(hidden=512, layers=4, batch=64, generations=8, completion=128, steps=4, warmup=2)


# --------------------------------------------------------------------------------------
# op timing: autograd identity nodes around an op record when its backward starts / ends
# --------------------------------------------------------------------------------------
class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, box, key):
        ctx.box, ctx.key = box, key
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.box.setdefault(ctx.key, time.perf_counter())
        return g, None, None


class OpTimer:
    """Patches ``linear_token_logprobs``, ``policy_loss`` and ``group_advantages`` to add
    their forward and backward wall time to ``self.seconds``."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = []

    def _wrap_diff(self, mod, name, n_inputs):
        orig = getattr(mod, name)
        timer = self

        def wrapped(*args, **kw):
            box = {}
            args = list(args)
            for i in range(n_inputs):
                if isinstance(args[i], torch.Tensor) and args[i].requires_grad:
                    args[i] = _Mark.apply(args[i], box, "end")
            t0 = time.perf_counter()
            out = orig(*args, **kw)
            timer.seconds += time.perf_counter() - t0
            first = out[0] if isinstance(out, tuple) else out
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first = _Mark.apply(first, box, "start")
                timer._pending.append(box)
                out = (first, *out[1:]) if isinstance(out, tuple) else first
            return out
        setattr(mod, name, wrapped)
        self._saved.append((mod, name, orig))

    def _wrap_plain(self, mod, name):
        orig = getattr(mod, name)
        timer = self

        def wrapped(*args, **kw):
            t0 = time.perf_counter()
            out = orig(*args, **kw)
            timer.seconds += time.perf_counter() - t0
            return out
        setattr(mod, name, wrapped)
        self._saved.append((mod, name, orig))

    def collect(self):
        """Add the backward intervals recorded since the last call."""
        for box in self._pending:
            if "start" in box and "end" in box:
                self.seconds += max(0.0, box["end"] - box["start"])
        self._pending = []

    def __enter__(self):
        import rlfuse.ops as ops_pkg
        from rlfuse.ops import linear_logprob

        self._pending = []
        self._wrap_diff(linear_logprob, "linear_token_logprobs", 2)
        self._wrap_diff(ops_pkg, "policy_loss", 1)
        self._wrap_plain(ops_pkg, "group_advantages")
        return self

    def __exit__(self, *exc):
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)


# --------------------------------------------------------------------------------------
# the two children
# --------------------------------------------------------------------------------------
def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _memory_start(device) -> float:
    """Reset the peak-memory counter; returns the baseline (bytes on GPU, KiB of RSS)."""
    from rlfuse.bench.linear_logprob import _reset_peak_rss

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    base = _status_kib("VmRSS")
    _reset_peak_rss()
    return base


def _memory_peak_mib(device, base) -> float:
    if torch.device(device).type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return (_status_kib("VmHWM") - base) / 1024


def _process_peak_mib(device) -> float:
    """Peak of the whole process over the measured steps (RSS with imported libraries on
    CPU; allocated tensors on GPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kib("VmHWM") / 1024


def _dataset(n):
    from rlfuse.tasks import AdditionTask

    return [{"prompt": e["prompt"], "answer": e["answer"]} for e in AdditionTask(2).dataset(n)]


def _reward(prompts, completions, answer, **kw):
    from rlfuse.tasks import AdditionTask

    return AdditionTask(2).reward(prompts, completions, answer)


def _common(case):
    return dict(per_device_train_batch_size=case["batch"], num_generations=case["generations"],
                max_completion_length=case["completion"], learning_rate=1e-5, beta=0.04,
                temperature=1.0, loss_type="dapo", max_steps=case["steps"] + case["warmup"],
                seed=0)


def child_rlfuse(model_dir, case, device):
    from rlfuse.trainers import GRPOConfig, GRPOTrainer

    out = tempfile.mkdtemp(prefix="rlfuse_bench_train_")
    cfg = GRPOConfig(output_dir=out, progress=False, plot=False, save_steps=0, top_k=0,
                     report_to="none", device=device, **_common(case))
    tr = GRPOTrainer(model_dir, _reward, args=cfg, train_dataset=_dataset(256))
    dev = torch.device(device)
    mem = {}
    steps, shares = [], []
    with OpTimer() as timer:
        orig_round = tr._train_round

        def timed_round():
            if len(steps) == case["warmup"]:      # peak over the measured steps only
                mem["base"] = _memory_start(device)
            tr.timers.clear()
            timer.seconds = 0.0
            t0 = time.perf_counter()
            res = orig_round()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            timer.collect()
            dt = time.perf_counter() - t0
            steps.append(dt)
            t = dict(tr.timers)
            shares.append({
                "generation": t.get("generate", 0.0) / dt,
                "rlfuse_ops": timer.seconds / dt,
                "reward": t.get("reward", 0.0) / dt,
                "model_forward_backward": (t.get("policy_forward", 0.0) + t.get("backward", 0.0)
                                           + t.get("ref_logprobs", 0.0)
                                           + t.get("policy_loss_op", 0.0)
                                           - timer.seconds + t.get("advantages", 0.0)) / dt,
                "optimizer": t.get("optimizer", 0.0) / dt,
            })
            return res
        tr._train_round = timed_round
        tr.train()
    peak = _memory_peak_mib(device, mem["base"])
    w = case["warmup"]
    share = {k: statistics.mean(s[k] for s in shares[w:]) for k in shares[w]}
    from rlfuse.models.decode import _why_not

    why = _why_not(tr.model, 256)
    decode = "lean decoder" if why is None else f"the model's forward ({why})"
    return {"step_s": steps[w:], "peak_mib": peak, "process_peak_mib": _process_peak_mib(device),
            "shares": share, "decode": decode}


def child_trl(model_dir, case, device):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    out = tempfile.mkdtemp(prefix="trl_bench_train_")
    cfg = GRPOConfig(output_dir=out, use_cpu=torch.device(device).type == "cpu",
                     report_to="none", save_strategy="no", logging_steps=10**6, bf16=False,
                     disable_tqdm=True, top_k=0, **_common(case))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tr = GRPOTrainer(model=model_dir, reward_funcs=_reward, args=cfg,
                     train_dataset=Dataset.from_list(_dataset(256)), processing_class=tok)
    steps = []

    mem = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if len(steps) == case["warmup"]:      # peak over the measured steps only
                mem["base"] = _memory_start(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available() and torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.t0)

    tr.add_callback(Timer())
    tr.train()
    peak = _memory_peak_mib(device, mem["base"])
    return {"step_s": steps[case["warmup"]:], "peak_mib": peak,
            "process_peak_mib": _process_peak_mib(device)}


# --------------------------------------------------------------------------------------
# the suite
# --------------------------------------------------------------------------------------
def _save_model(case, path):
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=case["hidden"], num_layers=case["layers"],
                           num_heads=4, max_position_embeddings=256)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def _run_child(variant, model_dir, case, device, threads):
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        cmd = [sys.executable, "-m", "rlfuse.bench.train", "--child", variant, "--model",
               model_dir, "--case", json.dumps(case), "--device", device, "--json", f.name]
        env = dict(os.environ)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            return None, f"{variant} failed: {tail[0][:200]}"
        return json.load(open(f.name)), None


def run(device="cpu", quick=False, repeat=None, compile=True, backends=None, threads=None):
    """Rows: GRPO step time (ms) of rlfuse and TRL; notes: peak memory and time shares."""
    device = str(device)
    threads = threads or torch.get_num_threads()     # `rlfuse bench --threads N` sets it
    case = dict(GPU_CASE if device.startswith("cuda") else (CPU_QUICK if quick else CPU_CASE))
    repeat = repeat or (1 if quick else 2)
    try:
        import trl  # noqa: F401

        variants = ["rlfuse", "trl"]
    except Exception:
        variants = ["rlfuse"]
    results = {v: [] for v in variants}
    notes = {}
    with tempfile.TemporaryDirectory(prefix="rlfuse_bench_model_") as model_dir:
        _save_model(case, model_dir)
        for _ in range(repeat):
            for v in variants:                   # alternate the variants
                res, err = _run_child(v, model_dir, case, device, threads)
                if err:
                    notes[v] = err
                elif res:
                    results[v].append(res)
    # the fastest measured step of each variant: load from other jobs only ever adds time
    all_steps = {v: [t for r in results[v] for t in r["step_s"]] for v in variants}
    times = {v: (min(all_steps[v]) * 1e3 if all_steps[v] else None) for v in variants}
    label = (f"hidden={case['hidden']} layers={case['layers']} batch={case['batch']} "
             f"G={case['generations']} C={case['completion']}")
    rows = [Row("grpo step", label, "float32", "train step", times, 0.0, dict(notes))]
    rows[0].notes["median_step_ms"] = ", ".join(
        f"{v} {statistics.median(ts) * 1e3:.0f}" for v, ts in all_steps.items() if ts)
    peaks = {v: (statistics.median(r["peak_mib"] for r in results[v]) if results[v] else None)
             for v in variants}
    rows[0].notes["peak_memory_growth_mib"] = ", ".join(
        f"{v} {p:.0f}" for v, p in peaks.items() if p is not None)
    rows[0].notes["process_peak_mib"] = ", ".join(
        f"{v} {statistics.median(r['process_peak_mib'] for r in results[v]):.0f}"
        for v in variants if results[v])
    if results["rlfuse"]:
        sh = results["rlfuse"][-1]["shares"]
        rows[0].notes["rlfuse_time_shares"] = ", ".join(f"{k} {v:.0%}" for k, v in sh.items())
        rows[0].notes["rlfuse_decode_steps"] = results["rlfuse"][0].get("decode", "?")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--child", choices=["rlfuse", "trl"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--case", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    case = json.loads(a.case)
    fn = child_rlfuse if a.child == "rlfuse" else child_trl
    res = fn(a.model, case, a.device)
    with open(a.json, "w") as f:
        json.dump(res, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
