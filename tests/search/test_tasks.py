"""rlfuse.tasks: the verifier's answer extraction, steps on every task, and held-out problem
sets that exclude the training prompts (the demos' evaluation sets)."""

from __future__ import annotations

import pytest

from rlfuse import tasks
from rlfuse.tasks import AdditionTask, ChainTask, extract_answer


@pytest.mark.parametrize("text, want", [
    ("85", 85), (" 85 ", 85), ("=85", 85), ("= -5", -5), ("=-5", -5), ("=+7", 7),
    ("3+4=7\n7-9=-2\n", -2), ("17+5=22\n22-8=14\n\n", 14), ("47+38=85", 85),
    # a prefix of something else is no answer
    ("=14.5", None), ("=14e3", None), ("=14 or 15", None), ("=1,400", None),
    ("1+2=85abc", None), ("=0x1F", None), ("85<eos>", None), ("85\n86", None),
    ("x=3\ny", None), ("=- 5", None),
    # digits and signs outside ASCII
    ("=\u0663", None), ("=\u22125", None), ("=\uff18\uff15", None),
    # a chain cut off inside its last step: that step has no result yet
    ("17+5=22\n22-0", None), ("17+5=22\n22-8", None), ("17+5=22\n22-8=", None),
    ("", None), ("=", None), ("abc", None),
])
def test_extract_answer_takes_a_whole_ascii_integer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_of_a_huge_number_is_none_not_an_error():
    assert extract_answer("1" * 5000) is None
    assert extract_answer("=-" + "9" * 4301) is None
    assert extract_answer("9" * tasks.MAX_ANSWER_DIGITS) == int("9" * tasks.MAX_ANSWER_DIGITS)
    # the reward of such a completion is 0, and training goes on
    assert ChainTask().reward(["1+1="], ["=" + "9" * 4301], ["2"]) == [0.0]
    with pytest.raises(TypeError, match="completion"):
        extract_answer(5)


def test_verifier_on_the_tasks_own_solutions_and_truncations():
    chain = ChainTask()
    for ex in chain.dataset(200, seed=3):
        sol = ex["solution"]
        assert chain.is_correct(sol, ex["answer"])
        assert chain.is_correct(sol.rstrip("\n"), ex["answer"])
        # a solution cut inside its last step, before the result, answers nothing (not
        # the previous step's result)
        last = chain.steps(sol)[-1]
        start = len(sol) - len(last)
        for cut in range(start + 1, len(sol) - 1 - len(ex["answer"])):
            assert extract_answer(sol[:cut]) is None, sol[:cut]
    add = AdditionTask(digits=2)
    for ex in add.dataset(50, seed=3):
        assert add.is_correct(ex["solution"], ex["answer"])
        assert add.is_correct(ex["prompt"] + ex["solution"], ex["answer"])
        assert not add.is_correct(ex["solution"] + ".5", ex["answer"])


def test_every_task_has_steps():
    add = AdditionTask()
    assert add.steps("85") == [] and add.steps("85\n") == ["85\n"]
    assert ChainTask().steps("1+2=3\n3-1=2\n") == ["1+2=3\n", "3-1=2\n"]
    assert ChainTask().steps("1+2=3\n3-") == ["1+2=3\n"]


def test_dataset_exclude_draws_problems_outside_the_training_set():
    add = AdditionTask(digits=2)
    train = add.dataset(4000, seed=1)
    seen = {e["prompt"] for e in train}
    plain = add.dataset(200, seed=2)
    assert sum(e["prompt"] in seen for e in plain) > 0          # the overlap this removes
    held = add.dataset(200, seed=2, exclude=train)
    assert len(held) == 200 and not {e["prompt"] for e in held} & seen
    assert held == add.dataset(200, seed=2, exclude=seen)       # prompts or examples
    assert held == add.dataset(200, seed=2, exclude=train)      # reproducible
    # the kept draws are those of the plain stream, in order
    kept = [e for e in add.dataset(400, seed=2) if e["prompt"] not in seen][:200]
    assert held == kept
    assert add.dataset(5, seed=2, exclude=[]) == add.dataset(5, seed=2)
    # no prompt left: a clear error, not a hang
    small = AdditionTask(digits=1)
    every = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    with pytest.raises(ValueError, match="too few distinct"):
        small.dataset(3, seed=0, exclude=every)
    assert [e["prompt"] for e in small.dataset(3, seed=0, exclude=every[1:])] == ["0+0="] * 3
    with pytest.raises(TypeError, match="exclude"):
        small.dataset(3, exclude="1+1=")
    with pytest.raises(ValueError, match="n must be"):
        small.dataset(-1)


def test_search_demo_problems_are_held_out_from_the_warmup():
    from rlfuse.search.llm_demo import held_out_problems, warmup_examples

    task = ChainTask()
    # rlfuse search's and rlfuse bench search_llm's settings (full and --quick)
    for n, steps, seed in ((32, 400, 0), (8, 150, 0), (32, 400, 3)):
        seen = {e["prompt"] for e in warmup_examples(task, steps=steps, seed=seed)}
        probs = held_out_problems(task, n, seed=seed + 1000, warmup_steps=steps,
                                  warmup_seed=seed)
        assert len(probs) == n and not {p["prompt"] for p in probs} & seen
    # with no warm-up nothing is excluded
    assert held_out_problems(task, 8, seed=1000, warmup_steps=0) == task.dataset(8, seed=1000)


def test_train_demo_eval_set_is_held_out():
    from rlfuse.trainers.default import DEMO, demo_data

    for task_name in ("addition", "chain"):
        for seed in (0, 1):
            task, train, ev = demo_data(dict(DEMO, task=task_name), seed)
            assert len(train) == DEMO["train_size"] and len(ev) == DEMO["eval_size"]
            assert not {e["prompt"] for e in ev} & {e["prompt"] for e in train}
