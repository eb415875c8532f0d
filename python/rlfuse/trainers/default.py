"""The embedded default run behind ``rlfuse train grpo|ppo|dpo`` with no model: a tiny
character-level Llama and tokenizer built locally, a synthetic arithmetic task with
verifiable answers, a supervised warm-up, the RL phase, and a before/after accuracy
table on held-out problems.

Files in ``output_dir``: ``sft_model/`` (the warmed-up model, reused by ``--resume``),
``metrics.jsonl``, ``training_curves.png``, ``checkpoint-*/``, ``eval.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from rlfuse.trainers.config import DPOConfig, GRPOConfig, PPOConfig

__all__ = ["DEFAULTS", "DEMO", "check_demo", "completion_length", "demo_data", "evaluate",
           "run"]

# Config fields of the embedded default (anything here can be overridden by the CLI).
# lr_scheduler_type="constant" and GRPO's use_bias_correction_kl=False are the settings
# the documented demo results were measured with (the configs' defaults are TRL's now).
DEFAULTS = {
    "grpo": dict(output_dir="rlfuse_output/grpo", learning_rate=5e-5,
                 per_device_train_batch_size=64, num_generations=8, max_completion_length=6,
                 temperature=1.0, beta=0.02, max_steps=100, logging_steps=1, save_steps=25,
                 max_grad_norm=1.0, seed=0, lr_scheduler_type="constant",
                 use_bias_correction_kl=False),
    "ppo": dict(output_dir="rlfuse_output/ppo", learning_rate=3e-4,
                per_device_train_batch_size=32, gradient_accumulation_steps=2,
                max_completion_length=6, num_ppo_epochs=2, kl_coef=0.02, gamma=1.0,
                lam=0.95, vf_coef=0.5, cliprange_value=0.2, max_steps=60, save_steps=20,
                seed=0, lr_scheduler_type="constant"),
    "dpo": dict(output_dir="rlfuse_output/dpo", learning_rate=5e-4,
                per_device_train_batch_size=32, beta=0.1, max_steps=60, save_steps=20, seed=0,
                lr_scheduler_type="constant"),
}
CONFIGS = {"grpo": GRPOConfig, "ppo": PPOConfig, "dpo": DPOConfig}

# Settings of the demo itself (not trainer config fields).
# threads: torch intra-op threads for the tiny default model; at ~0.1 M parameters every op
# is a few microseconds of work and extra threads only add wake-up overhead (on a loaded
# 2-core machine the warm-up ran many times slower with 2 threads than with 1).
DEMO = dict(task="addition", digits=2, hidden_size=64, num_layers=2, sft_steps=1200,
            sft_batch_size=32, sft_learning_rate=3e-3, train_size=4000, eval_size=200,
            threads=1)


def check_demo(settings: dict) -> None:
    """Raise :class:`~rlfuse.trainers.config.ConfigError` naming the setting when a demo
    setting (:data:`DEMO`, or the CLI's ``--task --sft-steps --hidden-size --eval-size``)
    is unknown or out of range; run before anything is created."""
    import math
    import numbers

    from rlfuse.tasks import TASKS
    from rlfuse.trainers.config import ConfigError

    unknown = sorted(set(settings) - set(DEMO))
    if unknown:
        raise ConfigError(f"demo: unknown settings {unknown}; known: {sorted(DEMO)}")

    def integer(name, low):
        v = settings[name]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
            flag = name.replace("_", "-")
            raise ConfigError(f"{name} (--{flag}) must be an int >= {low}, got {v!r}")

    if settings["task"] not in TASKS:
        raise ConfigError(f"task (--task) must be one of {sorted(TASKS)}, got "
                          f"{settings['task']!r}")
    for name, low in (("digits", 1), ("hidden_size", 1), ("num_layers", 1), ("sft_steps", 0),
                      ("sft_batch_size", 1), ("train_size", 1), ("eval_size", 1)):
        integer(name, low)
    if settings["hidden_size"] % 8:
        raise ConfigError("hidden_size (--hidden-size) must be a positive multiple of 8 (the "
                          f"tiny model's 4 attention heads of an even width), got "
                          f"{settings['hidden_size']}")
    lr = settings["sft_learning_rate"]
    if (isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr)
            or lr <= 0):
        raise ConfigError(f"sft_learning_rate must be a finite number > 0, got {lr!r}")
    if settings["threads"] is not None:
        integer("threads", 0)


def demo_data(settings: dict, seed: int):
    """``(task, train_rows, eval_rows)`` of the demo: ``train_size`` problems from ``seed +
    1``, then ``eval_size`` held-out ones from ``seed + 2`` with none of the training
    prompts (ConfigError when the task has too few distinct problems for that)."""
    from rlfuse.tasks import make_task
    from rlfuse.trainers.config import ConfigError

    task_kw = {"digits": settings["digits"]} if settings["task"] == "addition" else {}
    task = make_task(settings["task"], **task_kw)
    train_rows = task.dataset(settings["train_size"], seed=seed + 1)
    try:
        eval_rows = task.dataset(settings["eval_size"], seed=seed + 2, exclude=train_rows)
    except ValueError as exc:
        raise ConfigError(f"eval_size: {exc}") from None
    return task, train_rows, eval_rows


def completion_length(configured: int, user_set: bool, needed: int):
    """``(max_completion_length, warning or None)``: the demo's own default is raised to
    ``needed`` (its longest solution + 2); a value the user set is kept, with a warning when
    it is below ``needed``."""
    if not user_set:
        return max(configured, needed), None
    if configured < needed:
        return configured, (
            f"max_completion_length={configured} is below the {needed} tokens the demo allows "
            "this task's completions (its longest solution + 2): completions cut short earn "
            "no reward; the value is kept")
    return configured, None


@torch.no_grad()
def evaluate(model, tokenizer, task, examples, *, max_new_tokens, temperature=None,
             batch_size=256, seed=1234) -> float:
    """Accuracy of ``model`` on ``examples`` (greedy, or sampled at ``temperature``)."""
    from rlfuse.trainers.base import encode_prompts

    was = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            ids, mask = encode_prompts(tokenizer, [e["prompt"] for e in chunk], None, device)
            kw = dict(do_sample=False) if temperature is None else dict(
                do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            out = model.generate(input_ids=ids, attention_mask=mask,
                                 max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kw)
            texts = tokenizer.batch_decode(out[:, ids.size(1):], skip_special_tokens=True)
            correct += sum(task.is_correct(t, e["answer"]) for t, e in zip(texts, chunk))
    model.train(was)
    return correct / max(1, len(examples))


def _preference_pairs(model, tokenizer, task, examples, *, max_new_tokens, seed):
    """prompt/chosen/rejected rows: the right solution against a sampled wrong one (or a
    perturbed answer when the model's samples are all right)."""
    import random

    from rlfuse.trainers.base import encode_prompts

    rng = random.Random(seed)
    rows = []
    device = next(model.parameters()).device
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(examples), 256):
            chunk = examples[i:i + 256]
            ids, mask = encode_prompts(tokenizer, [e["prompt"] for e in chunk], None, device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                 temperature=1.0, top_k=0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            texts = tokenizer.batch_decode(out[:, ids.size(1):], skip_special_tokens=True)
            for t, e in zip(texts, chunk):
                wrong = t if not task.is_correct(t, e["answer"]) else None
                if wrong is None or wrong.strip() == "":
                    wrong = str(int(e["answer"]) + rng.choice([-10, -1, 1, 10]))
                rows.append({"prompt": e["prompt"], "chosen": e["solution"], "rejected": wrong})
    return rows


def run(algorithm: str = "grpo", overrides: dict | None = None, *, model_path=None,
        resume: bool = False, demo: dict | None = None) -> dict:
    """Run the embedded default (or, with ``model_path``, the same task on that model)."""
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
    from rlfuse.trainers.base import check_output_dir, dist_info, load_model_and_tokenizer
    from rlfuse.trainers.sft import supervised_warmup

    if algorithm not in CONFIGS:
        raise ValueError(f"algorithm must be one of {sorted(CONFIGS)}, got {algorithm!r}")
    settings = dict(DEMO, **(demo or {}))
    check_demo(settings)
    values = dict(DEFAULTS[algorithm], **(overrides or {}))
    args = CONFIGS[algorithm].from_dict(values)      # validated before any model exists
    rank, _world, owns_pg = dist_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)
    task, train_rows, eval_rows = demo_data(settings, args.seed)
    max_new = max(len(e["solution"]) for e in train_rows + eval_rows) + 2
    if algorithm != "dpo":
        args.max_completion_length, warning = completion_length(
            args.max_completion_length, "max_completion_length" in (overrides or {}), max_new)
        if warning and rank == 0:
            print(f"rlfuse train: warning: {warning}", file=sys.stderr)

    if not resume:       # before the warm-up: a stale output_dir fails in seconds
        check_output_dir(args.output_dir, args.overwrite_output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    sft_dir = os.path.join(args.output_dir, "sft_model")
    t0 = time.perf_counter()
    if model_path is not None:
        model, tok = load_model_and_tokenizer(model_path)
    else:
        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        tok = tiny_tokenizer()
        model = tiny_causal_lm(tok, hidden_size=settings["hidden_size"],
                               num_layers=settings["num_layers"], seed=args.seed)
    acc = {"initial": (evaluate(model, tok, task, eval_rows, max_new_tokens=max_new),
                       evaluate(model, tok, task, eval_rows, max_new_tokens=max_new,
                                temperature=1.0))}
    if resume and os.path.isdir(sft_dir):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(sft_dir)
        say(f"loaded the warmed-up model from {sft_dir}")
    elif settings["sft_steps"] > 0:
        say(f"supervised warm-up: {settings['sft_steps']} steps on {settings['task']} ...")
        supervised_warmup(model, tok, train_rows, steps=settings["sft_steps"],
                          batch_size=settings["sft_batch_size"],
                          learning_rate=settings["sft_learning_rate"], seed=args.seed,
                          log_every=0)
        if rank == 0:
            model.save_pretrained(sft_dir + ".tmp")
            tok.save_pretrained(sft_dir + ".tmp")
            if os.path.isdir(sft_dir):
                import shutil

                shutil.rmtree(sft_dir)
            os.rename(sft_dir + ".tmp", sft_dir)
    t_sft = time.perf_counter() - t0
    if settings["sft_steps"] > 0 or (resume and os.path.isdir(sft_dir)):
        acc["warm-up"] = (evaluate(model, tok, task, eval_rows, max_new_tokens=max_new),
                          evaluate(model, tok, task, eval_rows, max_new_tokens=max_new,
                                   temperature=1.0))
        say(f"warm-up done in {t_sft:.0f} s; held-out accuracy greedy {acc['warm-up'][0]:.1%}, "
            f"sampled {acc['warm-up'][1]:.1%}")

    from rlfuse.trainers.grpo import copy_reference

    if algorithm == "grpo":
        from rlfuse.trainers.grpo import GRPOTrainer

        ref = copy_reference(model) if args.beta > 0 else None
        trainer = GRPOTrainer(model, task.reward, args=args, train_dataset=train_rows,
                              tokenizer=tok, ref_model=ref)
    elif algorithm == "ppo":
        from rlfuse.trainers.ppo import PPOTrainer

        trainer = PPOTrainer(model, task.reward, args=args, train_dataset=train_rows,
                             tokenizer=tok,
                             ref_model=copy_reference(model) if args.kl_coef > 0 else None)
    else:
        from rlfuse.trainers.dpo import DPOTrainer

        pairs = _preference_pairs(model, tok, task, train_rows[:1000], max_new_tokens=max_new,
                                  seed=args.seed)
        trainer = DPOTrainer(model, copy_reference(model), args=args, train_dataset=pairs,
                             tokenizer=tok)
    t1 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    t_rl = time.perf_counter() - t1
    model = trainer.full_model()          # gathered when the run was sharded (fsdp)
    acc[algorithm.upper()] = (evaluate(model, tok, task, eval_rows, max_new_tokens=max_new),
                              evaluate(model, tok, task, eval_rows, max_new_tokens=max_new,
                                       temperature=1.0))
    if rank == 0:
        n = len(eval_rows)
        print()
        print(f"held-out accuracy ({n} {settings['task']} problems)   greedy   sampled (T=1)")
        for name, (g, s) in acc.items():
            label = f"after {name}" if name != "initial" else "initial model"
            print(f"  {label:<38s} {g:7.1%}  {s:8.1%}")
        print(f"warm-up {t_sft:.0f} s, {algorithm} {result['global_step']} steps {t_rl:.0f} s; "
              f"metrics: {os.path.join(args.output_dir, 'metrics.jsonl')}")
        with open(os.path.join(args.output_dir, "eval.json"), "w") as f:
            json.dump({"accuracy": {k: {"greedy": g, "sampled": s} for k, (g, s) in acc.items()},
                       "warmup_seconds": t_sft, "rl_seconds": t_rl, "steps": result["global_step"],
                       "eval_size": n}, f, indent=1)
    result["accuracy"] = acc
    if owns_pg:
        # every process reaches the end before the process group goes (a gloo group left
        # to the interpreter's exit can abort it)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return result
