"""Training data from step-search trees, as JSONL with the column names TRL uses.

* :func:`sft_records`: correct full traces, ``{"prompt", "completion", "solution",
  "reward"}``: ``completion`` is the prompt-completion column of TRL's SFT trainer,
  ``solution`` (the same text) the column of :mod:`rlfuse.tasks` that
  :func:`rlfuse.trainers.sft.supervised_warmup` reads; one record per distinct trace.
* :func:`preference_records`: ``{"prompt", "chosen", "rejected", "kind", "margin"}`` (the
  DPO columns).  ``kind="step"``: two sibling steps of one expanded node whose Q values
  differ by at least ``margin`` (the prompt is the problem's prompt plus the steps before
  them; chosen has the higher Q).  ``kind="trace"``: a correct and an incorrect full trace
  of the same problem.
* :func:`prm_records`: per-step value targets for process reward models,
  ``{"prompt", "completions": [step, ...], "labels": [bool, ...], "values": [float, ...]}``
  (TRL's stepwise PRM format plus the float targets): for every full trace in a tree, each
  step's target is its Q value (the mean return the search backed up through that step;
  the last step's is the trace's reward), ``labels`` is ``value >= threshold``.

:func:`export_jsonl` writes all three into a directory.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

__all__ = ["export_jsonl", "preference_records", "prm_records", "sft_records", "write_jsonl"]


def _check(results):
    from rlfuse.search.llm import SearchResult

    if isinstance(results, SearchResult):
        raise TypeError("pass a list of SearchResult, not one")
    for i, r in enumerate(results):
        if not isinstance(r, SearchResult):
            raise TypeError(f"results[{i}] must be a SearchResult, got {type(r).__name__}")
    return results


def sft_records(results: Sequence, *, min_reward: float = 1.0) -> list[dict]:
    """Distinct full traces (tree terminals and rollouts) whose reward >= ``min_reward``."""
    out = []
    for r in _check(results):
        seen = set()
        for comp, reward, _src in r.traces:
            if reward >= min_reward and comp not in seen:
                seen.add(comp)
                out.append({"prompt": r.prompt, "completion": comp, "solution": comp,
                            "reward": reward})
    return out


def preference_records(results: Sequence, *, margin: float = 0.5, min_visits: int = 1,
                       correct_reward: float = 1.0, traces_per_problem: int = 1) -> list[dict]:
    """Sibling-step pairs (Q difference >= ``margin``, both visited >= ``min_visits``
    times) and up to ``traces_per_problem`` correct/incorrect full-trace pairs."""
    out = []
    for r in _check(results):
        kids: dict[int, list] = {}
        for n in r.nodes[1:]:
            kids.setdefault(n["parent"], []).append(n)
        for pid, ch in kids.items():
            ch = [c for c in ch if c["visits"] >= min_visits]
            if len(ch) < 2:
                continue
            best = max(ch, key=lambda c: (c["q"], c["visits"]))
            worst = min(ch, key=lambda c: (c["q"], -c["visits"]))
            if best["q"] - worst["q"] >= margin and best["step"] != worst["step"]:
                prefix = "".join(n["step"] for n in r.path(pid)) if pid else ""
                out.append({"prompt": r.prompt + prefix, "chosen": best["step"],
                            "rejected": worst["step"], "kind": "step",
                            "margin": best["q"] - worst["q"]})
        good = list(dict.fromkeys(c for c, rw, _ in r.traces if rw >= correct_reward))
        bad = list(dict.fromkeys(c for c, rw, _ in r.traces if rw < correct_reward))
        for g, b in list(zip(good, bad))[:traces_per_problem]:
            out.append({"prompt": r.prompt, "chosen": g, "rejected": b, "kind": "trace",
                        "margin": None})
    return out


def prm_records(results: Sequence, *, threshold: float = 0.5) -> list[dict]:
    """One record per terminal node: its steps and their Q values from the tree."""
    out = []
    for r in _check(results):
        for n in r.nodes:
            if not n["terminal"]:
                continue
            path = r.path(n["id"])
            steps = [p["step"] for p in path]
            if not steps or not any(steps):
                continue
            values = [float(p["q"]) for p in path]
            out.append({"prompt": r.prompt, "completions": steps,
                        "labels": [v >= threshold for v in values], "values": values})
    return out


def write_jsonl(path: str, records: Iterable[dict]) -> int:
    """Write ``records`` one JSON object per line; returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def export_jsonl(results: Sequence, out_dir: str, **kwargs) -> dict:
    """Write ``sft.jsonl``, ``dpo.jsonl`` and ``prm.jsonl`` into ``out_dir`` (created if
    needed); returns ``{name: (path, records)}``.  ``kwargs`` go to the three builders
    (``min_reward``, ``margin``, ``threshold``...) by name."""
    os.makedirs(out_dir, exist_ok=True)
    pick = lambda *names: {k: kwargs[k] for k in names if k in kwargs}  # noqa: E731
    parts = {
        "sft": sft_records(results, **pick("min_reward")),
        "dpo": preference_records(results, **pick("margin", "min_visits", "correct_reward",
                                                  "traces_per_problem")),
        "prm": prm_records(results, **pick("threshold")),
    }
    out = {}
    for name, recs in parts.items():
        path = os.path.join(out_dir, f"{name}.jsonl")
        out[name] = (path, write_jsonl(path, recs))
    return out
