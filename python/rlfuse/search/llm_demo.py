"""The embedded default of ``rlfuse search`` and the ``search_llm`` benchmark: a tiny model
warmed up on a synthetic task, then MCTS against best-of-N, majority vote and beam search
at the same generated-token budget.

    model, tok = default_model()                  # tiny Llama, supervised warm-up on ChainTask
    report = compare(model, tok, ChainTask(), problems, num_simulations=32, num_candidates=4)

Every method gets a verifier (the task's ``is_correct``) as terminal reward; the budget of
each problem is what MCTS generated on it.  ``report`` holds accuracy and tokens per method,
the search's wall time split into model forward time and the rest, and the prefix-reuse
counters.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from rlfuse.search.llm import StepSearch, beam_search, best_of_n, majority_vote

__all__ = ["compare", "default_model", "held_out_problems", "mcts_search", "warmup",
           "warmup_examples"]


def warmup_examples(task, *, steps: int = 400, batch_size: int = 64, seed: int = 0) -> list[dict]:
    """The examples :func:`warmup` trains on with these settings."""
    return task.dataset(max(1000, steps * batch_size // 4), seed=seed)


def held_out_problems(task, n: int, *, seed: int = 1000, warmup_steps: int = 400,
                      warmup_seed: int = 0) -> list[dict]:
    """``n`` problems drawn from ``seed`` whose prompts are not among the warm-up examples of
    :func:`default_model` (``warmup_steps``, ``warmup_seed``): the evaluation set of
    ``rlfuse search`` and ``rlfuse bench search_llm``."""
    seen = warmup_examples(task, steps=warmup_steps, seed=warmup_seed) if warmup_steps else []
    return task.dataset(n, seed=seed, exclude=seen)


def warmup(model, tokenizer, task, *, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
           seed: int = 0) -> list[float]:
    """Supervised warm-up on ``task``'s solutions (:func:`warmup_examples`) through
    :func:`rlfuse.trainers.sft.supervised_warmup`; returns the loss of every step."""
    from rlfuse.trainers.sft import supervised_warmup

    examples = warmup_examples(task, steps=steps, batch_size=batch_size, seed=seed)
    losses = supervised_warmup(model, tokenizer, examples, steps=steps, batch_size=batch_size,
                               learning_rate=lr, seed=seed)
    model.eval()
    return losses


def default_model(*, task=None, hidden_size: int = 64, num_layers: int = 2,
                  warmup_steps: int = 400, seed: int = 0):
    """The tiny character-level Llama warmed up on ``task`` (default: ``ChainTask()``);
    returns ``(model, tokenizer, losses)``."""
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer
    from rlfuse.tasks import ChainTask

    task = task or ChainTask()
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    losses = warmup(model, tok, task, steps=warmup_steps, seed=seed) if warmup_steps else []
    return model, tok, losses


def _accuracy(rewards) -> float:
    return sum(1.0 for r in rewards if r >= 1.0) / max(len(rewards), 1)


def mcts_search(model, tokenizer, task, problems, *, num_simulations: int = 32,
                num_candidates: int = 4, parallel: int = 4, max_new_tokens_per_step: int = 16,
                temperature: float = 1.0, value_fn=None, seed: int = 0,
                backend: Optional[str] = None, **search_kwargs) -> StepSearch:
    """The :class:`StepSearch` that :func:`compare` runs: the task's verifier as terminal
    reward, depth = the problems' most steps plus the EOS step."""
    reward_fn = lambda p, c: float(task.is_correct(c, p["answer"]))  # noqa: E731
    steps = max(len(task.steps(p["solution"])) for p in problems)
    max_depth = steps + 1                     # the steps, then the EOS "step"
    sampling = dict(temperature=temperature, max_new_tokens_per_step=max_new_tokens_per_step)
    return StepSearch(model, tokenizer, reward_fn=reward_fn, value_fn=value_fn,
                      step_delimiter=task.step_delimiter, num_candidates=num_candidates,
                      num_simulations=num_simulations, parallel=parallel,
                      max_depth=max_depth, sampling=sampling, seed=seed, backend=backend,
                      **search_kwargs)


def compare(model, tokenizer, task, problems, *, num_simulations: int = 32,
            num_candidates: int = 4, parallel: int = 4, beam_width: int = 2,
            max_new_tokens_per_step: int = 16, temperature: float = 1.0,
            value_fn=None, seed: int = 0, backend: Optional[str] = None,
            **search_kwargs) -> dict:
    """MCTS, best-of-N (verifier), majority vote and beam search on ``problems`` with the
    same per-problem generated-token budget (MCTS's).  ``search_kwargs`` go to
    :class:`~rlfuse.search.llm.StepSearch` (``algorithm``, ``c_puct``...).  Returns a dict
    of figures and the MCTS ``results`` (for the exports)."""
    search = mcts_search(model, tokenizer, task, problems, num_simulations=num_simulations,
                         num_candidates=num_candidates, parallel=parallel,
                         max_new_tokens_per_step=max_new_tokens_per_step,
                         temperature=temperature, value_fn=value_fn, seed=seed,
                         backend=backend, **search_kwargs)
    reward_fn, max_depth = search.reward_fn, search.max_depth
    sampling = dict(temperature=temperature, max_new_tokens_per_step=max_new_tokens_per_step)
    t0 = time.perf_counter()
    results = search.run(problems)
    t_mcts = time.perf_counter() - t0
    st = search.stats
    budget = [max(r.tokens_generated, 1) for r in results]
    common = dict(sampling=sampling, step_delimiter=task.step_delimiter, seed=seed + 1)
    t0 = time.perf_counter()
    bon = best_of_n(model, tokenizer, problems, reward_fn=reward_fn, token_budget=budget,
                    max_depth=max_depth, **common)
    t_bon = time.perf_counter() - t0
    maj = [majority_vote([c for c, _ in b.samples])[0] for b in bon]
    maj_rewards = [reward_fn(p, c) for p, c in zip(problems, maj)]
    t0 = time.perf_counter()
    beam = beam_search(model, tokenizer, problems, reward_fn=reward_fn, value_fn=value_fn,
                       beam_width=beam_width, num_candidates=num_candidates,
                       max_depth=max_depth, token_budget=budget, **common)
    t_beam = time.perf_counter() - t0
    model_s = st["model_seconds"]
    return {
        "problems": len(problems),
        "mcts": {"accuracy": _accuracy([r.reward for r in results]),
                 "tokens": sum(r.tokens_generated for r in results), "seconds": t_mcts},
        "best_of_n": {"accuracy": _accuracy([b.reward for b in bon]),
                      "tokens": sum(b.tokens_generated for b in bon), "seconds": t_bon,
                      "samples": sum(len(b.samples) for b in bon)},
        "majority_vote": {"accuracy": _accuracy(maj_rewards),
                          "tokens": sum(b.tokens_generated for b in bon)},
        "beam": {"accuracy": _accuracy([b.reward for b in beam]),
                 "tokens": sum(b.tokens_generated for b in beam), "seconds": t_beam},
        "search": {"wall_seconds": st["wall_seconds"], "model_seconds": model_s,
                   "overhead_seconds": st["overhead_seconds"],
                   "overhead_fraction": st["overhead_seconds"] / st["wall_seconds"],
                   "search_seconds": st["search_seconds"],
                   "search_fraction": st["search_seconds"] / st["wall_seconds"],
                   "forward_calls": st["forward_calls"],
                   "tokens_generated": st["generated"], "tokens_encoded": st["encoded"],
                   "tokens_encoded_naive": st["encoded_naive"],
                   "reencode_reduction": st["encoded_naive"] / max(st["encoded"], 1)},
        "results": results,
    }


def format_report(rep: dict) -> str:
    """The comparison as a small text table."""
    lines = [f"{'method':15s} {'accuracy':>9s} {'tokens':>8s}"]
    for name in ("mcts", "best_of_n", "majority_vote", "beam"):
        m = rep[name]
        lines.append(f"{name:15s} {m['accuracy']:9.3f} {m['tokens']:8d}")
    s = rep["search"]
    lines.append(
        f"mcts: {s['wall_seconds']:.1f} s wall, {s['model_seconds']:.1f} s in model forwards "
        f"({s['forward_calls']} calls), overhead {100 * s['overhead_fraction']:.1f}% "
        f"({100 * s['search_fraction']:.1f}% outside the generation calls); "
        f"prefix tokens re-encoded {s['tokens_encoded']} vs {s['tokens_encoded_naive']} when "
        f"re-sending every prefix ({s['reencode_reduction']:.1f}x fewer)")
    return "\n".join(lines)


def main(args) -> int:
    """``rlfuse search``: see :func:`add_arguments`."""
    import json
    import os

    from rlfuse.search.llm_export import export_jsonl
    from rlfuse.tasks import make_task

    # the arguments are checked before the warm-up (a minute with the default model)
    for name in ("simulations", "candidates", "parallel", "problems"):
        if getattr(args, name) < 1:
            raise SystemExit(f"rlfuse search: --{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "seed"):
        if getattr(args, name) < 0:
            raise SystemExit(f"rlfuse search: --{name.replace('_', '-')} must be >= 0, got "
                             f"{getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"rlfuse search: --threads must be >= 1, got {args.threads}")
    if args.out is not None:     # a path that cannot take the files fails now, not after the search
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"rlfuse search: --out {args.out!r} is not a usable directory: "
                             f"{exc.strerror or exc}") from None
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise SystemExit(f"rlfuse search: --out {args.out!r} is not writable")
    if args.threads:
        torch.set_num_threads(args.threads)
    task = make_task(args.task)
    # held out: none of the default model's warm-up prompts (a model from a path brings its
    # own training data, which is unknown here)
    problems = held_out_problems(
        task, args.problems, seed=args.seed + 1000,
        warmup_steps=args.warmup_steps if args.model == "default" else 0, warmup_seed=args.seed)
    t0 = time.perf_counter()
    if args.model == "default":
        model, tok, losses = default_model(task=task, warmup_steps=args.warmup_steps,
                                           seed=args.seed)
        print(f"tiny model warmed up on {args.task}: {len(losses)} steps, final loss "
              f"{losses[-1] if losses else float('nan'):.3f} ({time.perf_counter() - t0:.0f} s)")
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    rep = compare(model, tok, task, problems, num_simulations=args.simulations,
                  num_candidates=args.candidates, parallel=args.parallel, seed=args.seed)
    print(f"{args.task}: {len(problems)} problems, {args.simulations} simulations, "
          f"{args.candidates} candidates, {args.parallel} parallel; budgets per problem = "
          "the tokens MCTS generated on it")
    print(format_report(rep))
    if args.out:
        written = export_jsonl(rep["results"], args.out)
        for name, (path, n) in written.items():
            print(f"wrote {path} ({n} records)")
        summary = {k: v for k, v in rep.items() if k != "results"}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def add_arguments(p) -> None:
    from rlfuse.tasks import TASKS

    p.add_argument("--task", default="chain", choices=sorted(TASKS), help="synthetic task")
    p.add_argument("--model", default="default",
                   help="'default' (tiny model warmed up on the task) or a path to a HF model")
    p.add_argument("--simulations", type=int, default=32, help="simulations per problem")
    p.add_argument("--candidates", type=int, default=4, help="candidate steps per expansion")
    p.add_argument("--parallel", type=int, default=4, help="simulations per tree per step")
    p.add_argument("--problems", type=int, default=32, help="number of problems")
    p.add_argument("--warmup-steps", type=int, default=400, help="default model's warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write sft/dpo/prm JSONL and summary.json here")
