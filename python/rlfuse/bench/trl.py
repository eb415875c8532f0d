"""``rlfuse bench trl``: a short TRL ``GRPOTrainer`` run with and without
:func:`rlfuse.integrations.trl.patch`, step time and peak memory.

The run: the tiny character-level Llama (:func:`rlfuse.models.tiny.tiny_causal_lm`), prompts
and rewards of :class:`rlfuse.tasks.AdditionTask` (plus a digit-fraction shaping reward, so
that groups have reward variance), ``beta > 0`` (reference model, k3 KL), two iterations per
generation (so the ratio and its clipping are live), fixed seeds.  Each variant runs in a
fresh subprocess (no shared allocator or patch state); the variants alternate, so load from
elsewhere on a shared machine hits both alike.

* step time: the median of TRL's own ``step_time`` metric (forward, backward and optimizer
  step of one optimizer step; generation included on the steps that generate), over the
  steps after the first;
* peak memory: the peak RSS (CPU; ``max_memory_allocated`` on CUDA) during training, minus the
  memory in use after the trainer was built.

``rlfuse.bench.trl.grpo_run`` is also what the end-to-end test calls.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

import torch

from rlfuse.bench.harness import Row

NAME = "trl"

# (hidden_size, layers, batch = prompts x generations, completion length, steps)
CPU_CASES = [dict(hidden_size=128, num_layers=2, batch=16, completion=48, steps=6)]
CPU_QUICK = [dict(hidden_size=32, num_layers=2, batch=8, completion=16, steps=3)]
GPU_CASES = [dict(hidden_size=512, num_layers=4, batch=32, completion=128, steps=6)]
GPU_QUICK = CPU_CASES


def _digits(completions, **kwargs):
    """Shaping reward: the fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def grpo_run(patch: bool, *, hidden_size=32, num_layers=2, batch=8, num_generations=4,
             completion=8, steps=3, loss_type="dapo", beta=0.04, learning_rate=1e-3,
             device="cpu", seed=0, workdir=None, measure_memory=False) -> dict:
    """Train GRPOTrainer for ``steps`` optimizer steps; returns the per-step log history
    (``logs``), TRL's ``step_time`` per step and, with ``measure_memory``, the peak extra
    bytes.  ``patch`` applies :func:`rlfuse.integrations.trl.patch` for the run."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import rlfuse.integrations.trl as rl_trl
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
    from rlfuse.tasks import AdditionTask

    task = AdditionTask()
    own_dir = workdir is None
    tmp = tempfile.TemporaryDirectory() if own_dir else None
    workdir = tmp.name if own_dir else workdir
    try:
        tok = tiny_tokenizer()
        model_dir = os.path.join(workdir, "model")
        tiny_causal_lm(tok, hidden_size=hidden_size, num_layers=num_layers,
                       seed=seed).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        ds = Dataset.from_list(task.dataset(batch * steps, seed=seed))
        cfg = GRPOConfig(
            output_dir=os.path.join(workdir, "out"), per_device_train_batch_size=batch,
            num_generations=num_generations, max_completion_length=completion,
            max_steps=steps, learning_rate=learning_rate, logging_steps=1, report_to="none",
            use_cpu=device == "cpu", seed=seed, beta=beta, num_iterations=2,
            save_strategy="no", loss_type=loss_type, disable_tqdm=True)
        if patch:
            rl_trl.patch()
        try:
            trainer = GRPOTrainer(model=model_dir, reward_funcs=[task.reward, _digits],
                                  args=cfg, train_dataset=ds, processing_class=tok)
            base = _reset_peak(device) if measure_memory else None
            trainer.train()
            peak = _peak(device) - base if measure_memory else None
        finally:
            if patch:
                rl_trl.unpatch()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        return {"logs": logs, "step_time": [h.get("step_time") for h in logs],
                "peak_extra_bytes": peak}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    import gc

    from rlfuse.bench.linear_logprob import _reset_peak_rss, _status_bytes

    gc.collect()
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    return _status_bytes("VmRSS")


def _peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from rlfuse.bench.linear_logprob import _status_bytes

    return _status_bytes("VmHWM")


def _child(variant: str, case: dict, device: str, timeout: float = 1200):
    from rlfuse.bench.linear_logprob import json_subprocess

    return json_subprocess("rlfuse.bench.trl", ["--child", variant, json.dumps(case), device],
                           timeout, env_extra={"TOKENIZERS_PARALLELISM": "false"})


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    try:
        import trl  # noqa: F401
    except ImportError:
        return []
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    rounds = repeat or (1 if quick else 2)
    rows = []
    for case in cases:
        steps_ms = {"rlfuse": [], "trl": []}
        peak = {"rlfuse": [], "trl": []}
        notes = {}
        for _ in range(rounds):
            for variant in ("trl", "rlfuse"):  # alternate
                res, err = _child(variant, case, dev.type)
                if err:
                    notes[variant] = err
                    continue
                steps_ms[variant] += [1e3 * t for t in res["step_time"][1:] if t]
                if res["peak_extra_bytes"] is not None:
                    peak[variant].append(res["peak_extra_bytes"] / 2**20)
        times = {v: (statistics.median(s) if s else None) for v, s in steps_ms.items()}
        notes["peak_extra_mb"] = {v: (round(min(p), 1) if p else None) for v, p in peak.items()}
        notes["steps_timed"] = {v: len(s) for v, s in steps_ms.items()}
        label = (f"H={case['hidden_size']} L={case['num_layers']} B={case['batch']} "
                 f"T={case['completion']}")
        rows.append(Row("grpo step", label, "float32", "train", times, 0.0, notes))
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _, _, variant, case_json, device = sys.argv
        case = json.loads(case_json)
        res = grpo_run(variant == "rlfuse", device=device, measure_memory=True, **case)
        print(json.dumps({"step_time": res["step_time"],
                          "peak_extra_bytes": res["peak_extra_bytes"]}))
    else:
        print("usage: python -m rlfuse.bench.trl --child rlfuse|trl CASE_JSON DEVICE")
        sys.exit(2)
