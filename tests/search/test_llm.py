"""Step-level LLM search with a scripted step model: exact search behaviour, baselines,
exports and bad input.  (The Hugging Face path is in test_llm_hf.py.)"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlfuse.search.llm import (ScriptedStepModel, StepSearch, beam_search, best_of_n,
                               majority_vote)
from rlfuse.search.llm_export import (export_jsonl, preference_records, prm_records,
                                      sft_records)

BACKENDS = ["torch", "cpu"]

# Two first steps; under each, two terminal second steps; only "b\nB2" is right.
SCRIPT = {"": [("a\n", -1.0, False), ("b\n", -1.0, False)],
          "a\n": [("A1", -1.0, True), ("A2", -1.0, True)],
          "b\n": [("B1", -1.0, True), ("B2", -1.0, True)]}


def right(problem, completion):
    return float(completion == "b\nB2")


def _search(model, backend="torch", **kw):
    args = dict(reward_fn=right, value_fn="zero", num_candidates=2, num_simulations=8,
                parallel=1, max_depth=4, backend=backend)
    args.update(kw)
    return StepSearch(model, **args)


def _backend_ok(backend):
    if backend == "cpu":
        from rlfuse import _backend

        mod = _backend.cpu_module() if hasattr(_backend, "cpu_module") else None
        if mod is None or not hasattr(mod, "tree_select"):
            pytest.fail("rlfuse._C has no tree kernels (build the tree family)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_puct_behaviour(backend):
    """Worked by hand (PUCT, mctx constants, Q normalised over parent and siblings, ties to
    the lowest action): sims 1-2 expand a and b; 3 -> A1 (0), 4 -> B1 (0), 5 -> A2 (0),
    6 -> B2 (1); then b's Q is the best and 7, 8 revisit the terminal B2."""
    _backend_ok(backend)
    model = ScriptedStepModel(SCRIPT)
    s = _search(model, backend)
    (r,) = s.run(["Q"])
    assert model.calls == [[""], ["a\n"], ["b\n"]]          # which nodes were expanded
    assert r.root_visit_counts == [3, 5]
    steps = {n["step"]: n for n in r.nodes}
    assert [n["step"] for n in r.nodes] == ["", "a\n", "b\n", "A1", "B1", "A2", "B2"]
    assert {k: steps[k]["visits"] for k in ("A1", "B1", "A2", "B2")} == \
        {"A1": 1, "B1": 1, "A2": 1, "B2": 3}
    assert r.nodes[0]["visits"] == 9
    assert steps["B2"]["terminal"] and steps["B2"]["reward"] == 1.0
    assert steps["B2"]["q"] == pytest.approx(1.0)
    assert steps["b\n"]["q"] == pytest.approx(3 / 5)     # returns 0 (own value), 0, 1, 1, 1
    assert steps["a\n"]["q"] == pytest.approx(0.0)
    assert r.completion == "b\nB2" and r.reward == 1.0
    assert r.tokens_generated == 2 * 2 + 2 * 2 + 2 * 2   # 3 expansions x 2 candidates x 2 chars
    assert sorted(t[0] for t in r.traces) == ["a\nA1", "a\nA2", "b\nB1", "b\nB2"]


def test_parallel_simulations_share_one_generation_batch():
    """With W=2 the two simulations of a step take different root actions (virtual loss)
    and both new nodes are expanded by one sample_steps call."""
    model = ScriptedStepModel(SCRIPT)
    s = _search(model, parallel=2, num_simulations=6)
    (r,) = s.run(["Q"])
    assert model.calls == [[""], ["a\n", "b\n"]]
    assert r.root_visit_counts == [3, 3]                     # A1 + B1, then A2 + B2
    assert sorted(t[0] for t in r.traces) == ["a\nA1", "a\nA2", "b\nB1", "b\nB2"]
    assert r.completion == "b\nB2"


def test_duplicates_are_merged_and_priors_come_from_logprobs():
    script = {"": [("x\n", -1.0, False), ("x\n", -1.0, False), ("y\n", -2.0, False)],
              "x\n": [("X", -0.5, True)], "y\n": [("Y", -0.5, True)]}
    model = ScriptedStepModel(script)
    s = StepSearch(model, reward_fn=lambda p, c: float(c == "y\nY"), value_fn="zero",
                   num_candidates=3, num_simulations=7, parallel=1, max_depth=3,
                   backend="torch")
    (r,) = s.run([{"prompt": "Q"}])
    # all Q are 0 until Y is found, so PUCT follows P / (1 + N): x x y x x x y (by hand)
    assert r.root_visit_counts == [5, 0, 2]                 # slot 1: the merged duplicate
    kids = {n["step"]: n for n in r.children(0)}
    assert set(kids) == {"x\n", "y\n"}
    e = math.exp(-1.0) + math.exp(-2.0)
    assert kids["x\n"]["prior"] == pytest.approx(math.exp(-1.0) / e, rel=1e-5)
    assert kids["y\n"]["prior"] == pytest.approx(math.exp(-2.0) / e, rel=1e-5)
    assert r.completion == "y\nY"
    uniform = StepSearch(ScriptedStepModel(script), reward_fn=lambda p, c: 0.0,
                         value_fn="zero", num_candidates=3, num_simulations=2, prior="uniform",
                         backend="torch").run(["Q"])[0]
    assert [n["prior"] for n in uniform.children(0)] == pytest.approx([0.5, 0.5])


def test_rollout_expansion_values_nodes_by_their_rollouts():
    """Default (value_fn=None): each expansion samples K rollouts; a child's first step is
    an action, its value the mean reward of the rollouts through it."""
    script = {"": [("a\n", -1.0, False), ("b\n", -1.0, False)],
              "a\n": [("A1", -1.0, True), ("A2", -1.0, True)],
              "b\n": [("B2", -1.0, True), ("B1", -1.0, True)]}
    model = ScriptedStepModel(script)
    s = StepSearch(model, reward_fn=right, num_candidates=2, num_simulations=4, parallel=1,
                   max_depth=4, backend="torch")
    assert s.expansion == "rollout"
    (r,) = s.run(["Q"])
    # root rollouts: a\nA1 (0) and b\nB2 (1): root value 0.5; b is expanded second and
    # its own rollouts b\nB2, b\nB1 give it (1 + 1 + 0) / 3
    assert r.nodes[0]["visits"] == 5
    kids = {n["step"]: n for n in r.children(0)}
    b = kids["b\n"]
    assert b["visits"] >= kids["a\n"]["visits"]
    assert ("b\nB2", 1.0, "rollout") in r.traces
    assert r.completion == "b\nB2" and r.reward == 1.0
    # a child's first candidate continues the rollout that created it: its expansion
    # samples K - 1 new rollouts, not K
    assert model.calls[0] == [""] and all(len(c) == 1 for c in model.calls[1:])
    assert r.tokens_generated < 2 * 4 * len(model.calls)


def test_rollout_reuse_saves_exactly_the_inherited_rollouts():
    script = {"": [("a\n", -1.0, False)], "a\n": [("A1", -1.0, True), ("A2", -1.0, True)]}
    model = ScriptedStepModel(script)
    s = StepSearch(model, reward_fn=lambda p, c: float(c == "a\nA2"), num_candidates=2,
                   num_simulations=1, parallel=1, max_depth=3, backend="torch")
    (r,) = s.run(["Q"])
    # root: 2 rollouts "a\n" + "A1" (4 chars each, merged into one action); expanding
    # a\n continues both (A1, A1: merged) and samples none: no new tokens
    assert r.tokens_generated == 8
    kid = r.children(0)[0]
    assert kid["value"] == pytest.approx(0.0) and kid["visits"] == 1


def test_gumbel_and_visit_selection():
    s = _search(ScriptedStepModel(SCRIPT), algorithm="gumbel", gumbel_scale=0.0,
                num_simulations=8)
    (r,) = s.run(["Q"])
    assert r.completion == "b\nB2"
    assert sum(r.root_visit_counts) == 8
    v = _search(ScriptedStepModel(SCRIPT), select="visits").run(["Q"])[0]
    assert v.completion == "b\nB2" and v.reward == 1.0


def test_many_problems_in_one_batch():
    """Two trees in the same batches: each keeps its own problem, prompt and budget."""
    script = {("P", ""): [("p\n", -1.0, True)], ("Q", ""): SCRIPT[""],
              "a\n": SCRIPT["a\n"], "b\n": SCRIPT["b\n"]}
    model = ScriptedStepModel(script)
    res = _search(model, num_simulations=6).run(["P", "Q"])
    assert res[0].prompt == "P" and res[0].completion == "p\n"
    assert res[1].completion == "b\nB2"
    assert res[0].tokens_generated == 2 * 2      # only the root expansion: p\n twice
    assert res[1].tokens_generated > res[0].tokens_generated


# -- bad input ----------------------------------------------------------------------------

def test_bad_input():
    m = ScriptedStepModel(SCRIPT)
    with pytest.raises(ValueError, match="problems is empty"):
        _search(m).run([])
    with pytest.raises(ValueError, match="num_candidates"):
        _search(m, num_candidates=0)
    with pytest.raises(ValueError, match="num_simulations"):
        _search(m, num_simulations=0)
    with pytest.raises(ValueError, match="algorithm"):
        _search(m, algorithm="alphazero")
    with pytest.raises(TypeError, match="reward_fn"):
        _search(m, reward_fn=None)
    with pytest.raises(TypeError, match=r"problems\[1\]"):
        _search(m).run(["Q", 3])
    with pytest.raises(ValueError, match="expansion='rollout'"):
        _search(m, value_fn=lambda p: [0.0] * len(p), expansion="rollout")
    with pytest.raises(ValueError, match="tokenizer is required"):
        StepSearch(torch.nn.Linear(2, 2), reward_fn=right)


def test_value_fn_wrong_shape_or_nan_names_the_sample():
    m = ScriptedStepModel(SCRIPT)
    with pytest.raises(ValueError, match=r"value_fn returned shape \(3,\) for 1 prefixes"):
        _search(m, value_fn=lambda p: [0.0, 0.0, 0.0]).run(["Q"])
    with pytest.raises(ValueError, match=r"value_fn returned nan for sample 1 \(problem 1"):
        _search(ScriptedStepModel({("P", ""): SCRIPT[""], ("Q", ""): SCRIPT[""]}),
                value_fn=lambda p: [0.5, float("nan")]).run(["P", "Q"])
    with pytest.raises(TypeError, match="value_fn must return"):
        _search(ScriptedStepModel(SCRIPT), value_fn=lambda p: "high").run(["Q"])


def test_reward_fn_nan_or_not_a_number():
    with pytest.raises(ValueError, match="reward_fn returned nan for problem 0"):
        _search(ScriptedStepModel(SCRIPT), reward_fn=lambda p, c: float("nan")).run(["Q"])
    with pytest.raises(TypeError, match="reward_fn returned str for problem 0"):
        _search(ScriptedStepModel(SCRIPT), reward_fn=lambda p, c: "yes").run(["Q"])


def test_rollout_rewards_are_checked_one_by_one():
    """Rollout expansion scores a state's rollouts in one pass (_Evaluator.rewards): the
    calls of reward_fn are timed together, then each result is checked in order and the
    first bad one raises, naming its completion."""
    seen = []

    def fn(problem, completion):
        seen.append(completion)
        return float("nan") if len(seen) == 3 else (0.0 if len(seen) != 4 else "bad")

    search = _search(ScriptedStepModel(SCRIPT), value_fn=None, reward_fn=fn, num_candidates=4)
    with pytest.raises(ValueError, match="reward_fn returned nan for problem 0") as err:
        search.run(["Q"])
    assert len(seen) == 4 and repr(seen[2][:60]) in str(err.value)

    from rlfuse.search.llm import _Evaluator

    ev = _Evaluator(ScriptedStepModel(SCRIPT), ["P", "Q"], lambda p, c: len(c) + 0.5, None, 4)
    assert ev.rewards(1, ["ab", "", "abc"], "rollout") == [2.5, 0.5, 3.5]
    assert ev.reward(1, "x") == 1.5
    assert ev.traces[1] == [("ab", 2.5, "rollout"), ("", 0.5, "rollout"),
                            ("abc", 3.5, "rollout"), ("x", 1.5, "tree")]
    assert ev.rewards(0, []) == [] and ev.traces[0] == []
    with pytest.raises(TypeError, match="reward_fn returned NoneType for problem 0"):
        _Evaluator(ScriptedStepModel(SCRIPT), ["P"], lambda p, c: None, None, 4).rewards(
            0, ["a"])


# -- baselines ------------------------------------------------------------------------------

def test_best_of_n_budget_and_selection():
    script = {"": [("a\n", -1.0, False)], "a\n": [("A2", -1.0, True)]}
    model = ScriptedStepModel(script)           # every sample is "a\nA2": 4 tokens
    (r,) = best_of_n(model, problems=["Q"], reward_fn=right, n=3)
    assert len(r.samples) == 3 and r.tokens_generated == 12 and r.reward == 0.0
    (r,) = best_of_n(ScriptedStepModel(script), problems=["Q"], reward_fn=right,
                     token_budget=9, batch=4)
    assert len(r.samples) == 3 and r.tokens_generated == 12   # stops once the budget is met
    with pytest.raises(ValueError, match="exactly one of n and token_budget"):
        best_of_n(model, problems=["Q"], reward_fn=right)
    with pytest.raises(ValueError, match=r"token_budget\[1\]"):
        best_of_n(model, problems=["Q", "R"], reward_fn=right, token_budget=[3, 0])


def test_majority_vote():
    comps = ["1+1=3\n", "1+1=2\n", "x=2\n", "no answer"]
    assert majority_vote(comps) == ("1+1=2\n", 2)
    assert majority_vote(["a", "b"], answer_fn=lambda c: None) == ("a", None)
    with pytest.raises(ValueError, match="empty"):
        majority_vote([])


def test_beam_search_keeps_the_best_valued_prefixes():
    script = {"": [("a\n", -1.0, False), ("b\n", -1.0, False), ("c\n", -1.0, False)],
              "a\n": [("A", -1.0, True)], "b\n": [("B2", -1.0, True)],
              "c\n": [("C", -1.0, True)]}
    values = {"Qa\n": 0.1, "Qb\n": 0.9, "Qc\n": 0.5}
    model = ScriptedStepModel(script)
    (r,) = beam_search(model, problems=["Q"], reward_fn=lambda p, c: float(c == "b\nB2"),
                       value_fn=lambda ps: [values[p] for p in ps], beam_width=2,
                       num_candidates=3, max_depth=3)
    assert model.calls == [[""], ["b\n", "c\n"]]        # a (0.1) was dropped
    assert r.completion == "b\nB2" and r.reward == 1.0
    assert sorted(c for c, _ in r.samples) == ["b\nB2", "c\nC"]


# -- exports --------------------------------------------------------------------------------

def test_exports(tmp_path):
    (r,) = _search(ScriptedStepModel(SCRIPT)).run(["Q"])
    sft = sft_records([r])
    assert sft == [{"prompt": "Q", "completion": "b\nB2", "solution": "b\nB2", "reward": 1.0}]
    dpo = preference_records([r])
    step = [d for d in dpo if d["kind"] == "step"]
    trace = [d for d in dpo if d["kind"] == "trace"]
    assert {"prompt": "Q", "chosen": "b\n", "rejected": "a\n"}.items() <= step[0].items()
    assert any(d["prompt"] == "Qb\n" and d["chosen"] == "B2" and d["rejected"] == "B1"
               for d in step)
    assert trace == [{"prompt": "Q", "chosen": "b\nB2", "rejected": "a\nA1", "kind": "trace",
                      "margin": None}]
    prm = prm_records([r])
    good = next(p for p in prm if p["completions"] == ["b\n", "B2"])
    assert good["values"] == pytest.approx([0.6, 1.0]) and good["labels"] == [True, True]
    bad = next(p for p in prm if p["completions"] == ["a\n", "A1"])
    assert bad["labels"] == [False, False]
    written = export_jsonl([r], str(tmp_path / "out"))
    assert {k: n for k, (_, n) in written.items()} == {"sft": 1, "dpo": len(dpo),
                                                      "prm": len(prm)}
    rows = [json.loads(line) for line in open(written["dpo"][0])]
    assert rows == json.loads(json.dumps(dpo))
    with pytest.raises(TypeError, match="list of SearchResult"):
        sft_records(r)


def test_visit_selection_without_a_finished_trace_returns_the_partial_path():
    """Step expansion with a value function and too few simulations to reach a terminal:
    no trace is scored, so the answer is the most visited path, with reward nan."""
    values = {"Q": 0.5, "Qa\n": 0.2, "Qb\n": 0.9}
    s = _search(ScriptedStepModel(SCRIPT), value_fn=lambda ps: [values[p] for p in ps],
                num_simulations=2)
    (r,) = s.run(["Q"])
    assert r.traces == [] and r.completion in ("a\n", "b\n") and math.isnan(r.reward)
    assert r.completion == max(r.children(0), key=lambda n: (n["visits"], n["q"]))["step"]


# -- per-run counts, beam scores, argument checks (a review's findings) ---------------------

def test_tokens_generated_are_this_runs_when_a_search_is_reused():
    script = {"": [("a\n", -0.5, False), ("b", -1.0, True)], "a\n": [("c", -0.2, True)]}
    search = StepSearch(ScriptedStepModel(script), reward_fn=lambda p, c: 1.0,
                        num_candidates=2, num_simulations=4, max_depth=3)
    runs = [search.run(["Q"])[0].tokens_generated for _ in range(3)]
    assert runs[0] > 0 and runs == [runs[0]] * 3
    assert search.stats["generated"] == runs[0]


def test_beam_zero_ranks_by_the_whole_prefix_mean_logprob():
    """value_fn='zero' scores a beam by the mean token log-prob of its whole prefix (the
    docstring): a\\nx\\n and a\\ny\\n (-1.05, -1.1 per token) beat b\\nu\\n (-3.25), although
    u\\n alone (-1.5) beats x\\n (-2.0)."""
    S = {"": [("a\n", -0.1, False), ("b\n", -5.0, False)],
         "a\n": [("x\n", -2.0, False), ("y\n", -2.1, False)],
         "b\n": [("u\n", -1.5, False), ("v\n", -1.6, False)],
         "a\nx\n": [("A", -1.0, True)], "a\ny\n": [("A", -1.0, True)],
         "b\nu\n": [("B", -1.0, True)], "b\nv\n": [("B", -1.0, True)]}
    m = ScriptedStepModel(S)
    beam_search(m, None, ["Q"], reward_fn=lambda p, c: 0.0, value_fn="zero", beam_width=2,
                num_candidates=2, max_depth=4)
    assert sorted(m.calls[2]) == ["a\nx\n", "a\ny\n"]


def test_rollouts_stop_at_max_depth_steps():
    """A rollout goes to the end or to max_depth steps in all, as the tree's nodes do."""
    script = {"": [("a\n", -0.5, False)], "a\n": [("b\n", -0.5, False)],
              "a\nb\n": [("c\n", -0.5, False)], "a\nb\nc\n": [("d", -0.5, True)]}
    seen = []
    search = StepSearch(ScriptedStepModel(script), reward_fn=lambda p, c: seen.append(c) or 0.0,
                        num_candidates=1, num_simulations=3, max_depth=2)
    search.run(["Q"])
    assert seen and max(c.count("\n") for c in seen) <= 2


@pytest.mark.parametrize("kw, err, match", [
    (dict(sampling="hot"), TypeError, "sampling"),
    (dict(sampling={"max_new_tokens_per_step": 0}), ValueError, "max_new_tokens_per_step"),
    (dict(kv_reuse="no"), TypeError, "kv_reuse"),
    (dict(seed=None), TypeError, "seed"),
])
def test_step_search_checks_its_generation_arguments(kw, err, match):
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=16, num_layers=1)
    with pytest.raises(err, match=match):
        StepSearch(model, tok, reward_fn=lambda p, c: 0.0, **kw)


def test_best_of_n_checks_max_depth_and_takes_numpy_budgets():
    import numpy as np

    m = ScriptedStepModel({"": [("a", -0.5, True)]})
    with pytest.raises(ValueError, match="max_depth"):
        best_of_n(m, None, ["Q"], reward_fn=lambda p, c: 1.0, n=2, max_depth=0)
    (r,) = best_of_n(m, None, ["Q"], reward_fn=lambda p, c: 1.0, token_budget=np.int64(3))
    assert r.tokens_generated >= 3
    with pytest.raises(TypeError, match="token_budget"):
        best_of_n(m, None, ["Q"], reward_fn=lambda p, c: 1.0, token_budget=3.5)


def test_cli_search_checks_its_arguments_before_the_warmup():
    import argparse

    from rlfuse.search import llm_demo

    p = argparse.ArgumentParser()
    llm_demo.add_arguments(p)
    for bad in (["--problems", "0"], ["--simulations", "-1"], ["--threads", "0"]):
        with pytest.raises(SystemExit, match="must be"):
            llm_demo.main(p.parse_args(bad))


def test_cli_search_refuses_an_unknown_task_and_an_unusable_out(tmp_path, capsys, monkeypatch):
    from rlfuse.cli import main
    from rlfuse.search import llm_demo

    with pytest.raises(SystemExit) as e:           # argparse: usage and exit status 2
        main(["search", "--task", "foo"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'foo'" in err and "Traceback" not in err

    def no_warmup(*a, **k):
        raise AssertionError("the warm-up ran before --out was checked")

    monkeypatch.setattr(llm_demo, "default_model", no_warmup)
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        with pytest.raises(SystemExit, match="--out .* is not a usable directory"):
            main(["search", "--out", str(out)])
    assert a_file.read_text() == "x"
