"""Synthetic tasks with verifiable answers, for the embedded trainers, search and tests.

Two arithmetic tasks, written so that a tiny character-level model can learn them:

* :class:`AdditionTask`: ``"47+38="`` -> ``"85"`` (one step);
* :class:`ChainTask`: ``"17+5-8="`` -> ``"17+5=22\\n22-8=14\\n"`` (one line per step, left to
  right; the answer is the result of the last step).  Steps end with ``step_delimiter``
  (``"\\n"``), which is what step-level search splits on.

Every task gives examples as dicts ``{"prompt", "solution", "answer"}`` (the columns a TRL
dataset would have), a verifier :meth:`Task.is_correct` and a reward function with TRL's
signature ``reward(prompts, completions, answer, **kwargs) -> list[float]`` (1.0 when the
completion's final answer is right, else 0.0).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# The answer: ASCII digits with an optional sign, nothing but whitespace around them.  A
# longer run of digits is no answer (Python refuses to convert more than 4300 digits by
# default, and no task here has answers near that length).
_ANSWER = re.compile(r"[+-]?[0-9]+")
MAX_ANSWER_DIGITS = 4300


def extract_answer(completion: str) -> int | None:
    """The integer a completion answers, or None when it has none.

    The answer is the text after the completion's last ``=`` (the whole completion when it
    has no ``=``), which must be an integer in ASCII digits with an optional sign and
    nothing else but whitespace: ``"17+5=22\\n22-8=14\\n"`` and ``" 85 "`` answer 14 and 85;
    ``"=14.5"``, ``"=14 or 15"``, ``"=1,400"``, ``"85<eos>"`` (decode with
    ``skip_special_tokens=True``) and non-ASCII digits answer nothing, and neither does a
    solution cut off inside its last step (``"17+5=22\\n22-8"``: the last step has no
    result yet), nor an integer of more than :data:`MAX_ANSWER_DIGITS` digits."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    tail = completion.rsplit("=", 1)[-1].strip()
    if not _ANSWER.fullmatch(tail) or len(tail.lstrip("+-")) > MAX_ANSWER_DIGITS:
        return None
    try:
        return int(tail)
    except ValueError:       # a lower sys.set_int_max_str_digits limit
        return None


@dataclass(frozen=True)
class Task:
    """Base class: subclasses implement :meth:`example`."""

    step_delimiter: str = "\n"

    def example(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def dataset(self, n: int, seed: int = 0, *, exclude=()) -> list[dict]:
        """``n`` examples drawn from ``seed`` (the same seed gives the same list).

        ``exclude``: prompts (strings) or examples (dicts with a ``"prompt"``) that none of the
        examples may have, e.g. the training set when drawing held-out problems: a draw with
        an excluded prompt is skipped and the next one taken, so the list is the one without
        ``exclude`` less those draws, topped up from the same stream.  ValueError when the
        task has no prompt outside ``exclude`` (after ``max(100_000, 100 * n)`` skipped
        draws in a row)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        if isinstance(exclude, (str, dict)):
            raise TypeError("exclude must be a collection of prompts or examples, got a "
                            f"single {type(exclude).__name__}")
        banned = {e["prompt"] if isinstance(e, dict) else e for e in exclude}
        rng = random.Random(seed)
        if not banned:
            return [self.example(rng) for _ in range(n)]
        out, skipped, limit = [], 0, max(100_000, 100 * n)
        while len(out) < n:
            ex = self.example(rng)
            if ex["prompt"] not in banned:
                out.append(ex)
                skipped = 0
                continue
            skipped += 1
            if skipped >= limit:
                raise ValueError(
                    f"{type(self).__name__}.dataset: no prompt outside exclude in {limit} draws "
                    f"({len(banned)} prompts excluded): the task has too few distinct "
                    "problems for a disjoint set; exclude fewer or use a larger task")
        return out

    def steps(self, completion: str) -> list[str]:
        """The completed steps of a (partial) solution, each with its delimiter; text after
        the last delimiter (a step still being written, or a one-step solution's answer,
        which ends at EOS) is not one."""
        parts = completion.split(self.step_delimiter)
        return [p + self.step_delimiter for p in parts[:-1]]

    def is_correct(self, completion: str, answer) -> bool:
        got = extract_answer(completion)
        return got is not None and got == int(answer)

    def reward(self, prompts, completions, answer, **kwargs) -> list[float]:
        """TRL-style reward function: 1.0 for a right final answer, 0.0 otherwise."""
        if len(completions) != len(answer):
            raise ValueError(
                f"completions ({len(completions)}) and answer ({len(answer)}) differ in length"
            )
        return [1.0 if self.is_correct(c, a) else 0.0 for c, a in zip(completions, answer)]


@dataclass(frozen=True)
class AdditionTask(Task):
    """``a+b=`` with operands of up to ``digits`` digits; the solution is the sum."""

    digits: int = 2

    def __post_init__(self):
        if not isinstance(self.digits, int) or self.digits < 1:
            raise ValueError(f"digits must be a positive int, got {self.digits!r}")

    def example(self, rng: random.Random) -> dict:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        return {"prompt": f"{a}+{b}=", "solution": f"{a + b}", "answer": str(a + b)}


@dataclass(frozen=True)
class ChainTask(Task):
    """``x0 op1 x1 op2 x2 ...=`` with ``terms`` operands below ``max_operand`` and ops in
    ``+ -``, evaluated left to right, one solution line per step."""

    terms: int = 3
    max_operand: int = 20

    def __post_init__(self):
        if not isinstance(self.terms, int) or self.terms < 2:
            raise ValueError(f"terms must be an int >= 2, got {self.terms!r}")
        if not isinstance(self.max_operand, int) or self.max_operand < 2:
            raise ValueError(f"max_operand must be an int >= 2, got {self.max_operand!r}")

    def example(self, rng: random.Random) -> dict:
        xs = [rng.randrange(self.max_operand) for _ in range(self.terms)]
        ops = [rng.choice("+-") for _ in range(self.terms - 1)]
        prompt = str(xs[0]) + "".join(f"{o}{x}" for o, x in zip(ops, xs[1:])) + "="
        acc, lines = xs[0], []
        for o, x in zip(ops, xs[1:]):
            nxt = acc + x if o == "+" else acc - x
            lines.append(f"{acc}{o}{x}={nxt}{self.step_delimiter}")
            acc = nxt
        return {"prompt": prompt, "solution": "".join(lines), "answer": str(acc)}


TASKS = {"addition": AdditionTask, "chain": ChainTask}


def make_task(name: str, **kwargs) -> Task:
    """A task by name (``"addition"`` or ``"chain"``) with its keyword settings."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)
