"""Fixes from a review of `rlfuse bench`: the fwd+ent compile variant is one graph, a
failed suite does not leave a stale table, variants are timed interleaved, results are
compared with a float64 reference, --repeat wins under --quick, numeric notes reach
report.md, search_llm's rows are labelled (CPU) on a GPU run, and a linear_logprob variant
failing in a timed round is dropped rather than raised.  Every case is tiny."""

from __future__ import annotations

import json
import os
import sys
import types

import pytest
import torch

from rlfuse import bench
from rlfuse.bench import harness, report
from rlfuse.bench.harness import Row


def _recorder(module, monkeypatch, fake=True, on_call=None):
    """Replace ``module.time_variants`` by one that records each call's variants (and
    repeat) and runs ``on_call(fns)``; with ``fake`` it returns made-up times instead of
    timing."""
    calls = []
    real = harness.time_variants

    def tv(fns, device="cpu", *, warmup=2, repeat=10):
        calls.append({"fns": dict(fns), "repeat": repeat, "warmup": warmup})
        if on_call is not None:
            on_call(fns)
        if fake:
            return {n: 1.0 for n in fns}, {}
        return real(fns, device, warmup=warmup, repeat=repeat)

    monkeypatch.setattr(module, "time_variants", tv)  # raises if the module lacks it
    return calls


# ---------------------------------------------------------------- 1. one compiled graph
def test_logprob_fwd_ent_compile_reads_the_logits_once(monkeypatch):
    from rlfuse.bench import logprob

    monkeypatch.setattr(logprob, "CPU_QUICK", [(8, 64, torch.float32)])
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)  # the traced function itself
    real = torch.log_softmax

    def count(fns):  # run while the inputs are alive: log_softmax calls per variant
        for name in ("compile", "eager_1pass", "eager"):
            if name not in fns:
                continue
            n = {"k": 0}

            def counting(*a, n=n, **k):
                n["k"] += 1
                return real(*a, **k)

            torch.log_softmax = counting
            try:
                out = fns[name]()
            finally:
                torch.log_softmax = real
            calls_out.append((name, n["k"], out))

    calls_out = []
    calls = _recorder(logprob, monkeypatch, on_call=count)
    rows = logprob.run("cpu", quick=True)
    assert [r.mode for r in rows] == ["fwd", "fwd+ent", "fwd+bwd"]
    assert "eager_1pass" in calls[1]["fns"] and "compile" in calls[1]["fns"]
    ent_calls = {name: (k, out) for name, k, out in calls_out
                 if isinstance(out, tuple) and len(out) == 2 and out[0].shape == (8,)}
    assert ent_calls["compile"][0] == 1          # one log_softmax: the logits read once
    assert ent_calls["eager_1pass"][0] == 1
    assert ent_calls["eager"][0] == 2            # two passes, as TRL / verl call them


# ---------------------------------------------------------------- 2. stale results
def test_a_failed_suite_replaces_its_stale_results(monkeypatch, tmp_path):
    state = {"fail": False}

    def run(**kw):
        if state["fail"]:
            raise RuntimeError("boom")
        return [Row("x", "N=1", "float32", "fwd", {"rlfuse": 1.0, "eager": 2.0}, 0.0,
                    {"peak_extra_mb": {"rlfuse": 1.0, "eager": 2.0}})]

    monkeypatch.setitem(sys.modules, "_rlfuse_fake_flaky", types.SimpleNamespace(run=run))
    monkeypatch.setattr(bench, "SUITES", {"flaky": "_rlfuse_fake_flaky"})
    out = str(tmp_path)
    meta = {"cpu": "c", "date": "first"}
    report.run_all(out, ["flaky"], meta, {}, echo=lambda *a: None)
    assert os.path.exists(os.path.join(out, "flaky.json"))
    state["fail"] = True
    report.run_all(out, ["flaky"], {"cpu": "c", "date": "second"}, {}, echo=lambda *a: None)
    left = sorted(os.listdir(out))
    assert "flaky.json" not in left and "flaky.png" not in left
    assert "flaky_memory.png" not in left and "flaky.error.json" in left
    err = json.load(open(os.path.join(out, "flaky.error.json")))
    assert err["error"] == "RuntimeError: boom" and err["meta"]["date"] == "second"
    res, meta2, errors = report.load_results(out)
    assert res == {} and errors == {"flaky": "RuntimeError: boom"}
    text = open(report.write_report(out, res, meta2, errors)).read()
    assert "failed: `RuntimeError: boom`" in text and "| x |" not in text
    # a later success removes the error file again
    state["fail"] = False
    report.run_all(out, ["flaky"], meta, {}, echo=lambda *a: None)
    assert not os.path.exists(os.path.join(out, "flaky.error.json"))
    res, _, errors = report.load_results(out)
    assert list(res) == ["flaky"] and errors == {}


# ---------------------------------------------------------------- 4. interleaved
def _interleaving_recorder(module, monkeypatch):
    real = harness.time_variants
    seen = []

    def tv(fns, device="cpu", *, warmup=2, repeat=10):
        log = []

        def wrap(name, fn):
            def w():
                log.append(name)
                return fn()
            return w

        out = real({n: wrap(n, f) for n, f in fns.items()}, device, warmup=warmup,
                   repeat=repeat)
        seen.append((list(fns), log, warmup, repeat))
        return out

    monkeypatch.setattr(module, "time_variants", tv)
    monkeypatch.setattr(harness, "measure", lambda *a, **k: pytest.fail("timed one by one"))
    return seen


def _assert_interleaved(seen):
    """After each variant's warm-up calls, the timed calls cycle through the variants
    (one call of each per round)."""
    assert seen
    for names, log, warmup, repeat in seen:
        timed = log[warmup * len(names):]
        assert timed == names * repeat, (names, log)


def test_losses_variants_are_interleaved(monkeypatch):
    from rlfuse.bench import losses

    monkeypatch.setattr(losses, "CPU_QUICK", [(2, 16)])
    seen = _interleaving_recorder(losses, monkeypatch)
    rows = losses.run("cpu", quick=True, repeat=2, compile=False)
    assert len(rows) == 4 and len(seen) == 4
    _assert_interleaved(seen)


def test_advantages_variants_are_interleaved(monkeypatch):
    from rlfuse.bench import advantages

    monkeypatch.setattr(advantages, "CPU_GAE_QUICK", [(2, 8)])
    monkeypatch.setattr(advantages, "CPU_GRPO_QUICK", [(8, 4, 8)])
    seen = _interleaving_recorder(advantages, monkeypatch)
    rows = advantages.run("cpu", quick=True, repeat=2, compile=False)
    assert [r.op for r in rows] == ["gae", "gae", "grpo"] and len(seen) == 3
    _assert_interleaved(seen)


# ---------------------------------------------------------------- 6. float64 agreement
def test_check_agreement_names_wrong_and_lower_precision_variants():
    want = torch.linspace(-5, 5, 50, dtype=torch.float64)
    w32 = want.float()
    fns = {"rlfuse": lambda: w32, "same": lambda: w32.clone(),
           "wrong": lambda: w32 * 1.01, "bf16": lambda: want.to(torch.bfloat16),
           "failed": lambda: 1 / 0}
    notes = {"failed": "RuntimeError: already reported"}
    harness.check_agreement(fns, want, notes)
    assert "rlfuse vs float64" not in notes and "same vs float64" not in notes
    assert notes["wrong vs float64"].startswith("beyond tolerance: float32 result")
    assert notes["bf16 vs float64"].startswith("lower precision than rlfuse's: bfloat16")
    assert "failed vs float64" not in notes


def test_logprob_rows_compare_with_float64(monkeypatch):
    from rlfuse.bench import logprob

    monkeypatch.setattr(logprob, "CPU_QUICK", [(8, 64, torch.float32)])
    real = logprob._eager_entropy
    monkeypatch.setattr(logprob, "_eager_entropy", lambda z: real(z) * 1.01)
    monkeypatch.setattr(logprob, "_trl", lambda: None)
    _recorder(logprob, monkeypatch)
    rows = logprob.run("cpu", quick=True, compile=False)
    fwd, ent, bwd = rows
    assert not any("vs float64" in k for k in fwd.notes)
    assert "beyond tolerance" in ent.notes["eager vs float64"]
    assert "eager_1pass vs float64" not in ent.notes and "rlfuse vs float64" not in ent.notes
    assert not any("vs float64" in k for k in bwd.notes)


def test_losses_rows_compare_with_float64(monkeypatch):
    from rlfuse.bench import losses

    monkeypatch.setattr(losses, "CPU_QUICK", [(2, 16)])
    monkeypatch.setattr(losses, "_trl", lambda: None)
    monkeypatch.setattr(losses, "_verl", lambda: (
        lambda lp, old, adv, mask, ref: 1.1 * losses.eager_ppo_k3(lp, old, adv, mask, ref)[0],
        lambda v, ov, ret, mask: losses.eager_value(v, ov, ret, mask)))
    _recorder(losses, monkeypatch)
    rows = losses.run("cpu", quick=True, compile=False)
    assert "beyond tolerance" in rows[0].notes["verl vs float64"]
    for r in rows:
        assert "rlfuse vs float64" not in r.notes and "eager vs float64" not in r.notes
    assert "verl vs float64" not in rows[3].notes


def test_linear_logprob_rows_compare_with_float64(monkeypatch):
    from rlfuse.bench import linear_logprob as ll

    monkeypatch.setattr(ll, "CPU_QUICK", [(8, 4, 32, torch.float32)])
    monkeypatch.setattr(ll, "measure_memory", lambda *a, **k: (1.0, None))
    real = ll.eager_logprobs
    monkeypatch.setattr(ll, "eager_logprobs", lambda h, w, i: real(h, w, i) * 1.01)
    _recorder(ll, monkeypatch)
    fwd, bwd = ll.run("cpu", quick=True, compile=False)
    assert "beyond tolerance" in fwd.notes["eager vs float64"]
    assert "beyond tolerance" in bwd.notes["eager vs float64"]
    for r in (fwd, bwd):
        assert "rlfuse vs float64" not in r.notes
    assert "liger-style vs float64" not in bwd.notes


def test_liger_style_accumulates_grad_weight_in_the_weight_dtype(monkeypatch):
    from rlfuse.bench import linear_logprob as ll

    seen = []
    real = torch.Tensor.addmm_

    def addmm_(self, a, b, **kw):
        seen.append((self.dtype, a.dtype, b.dtype))
        return real(self, a, b, **kw)

    monkeypatch.setattr(torch.Tensor, "addmm_", addmm_)
    h, w, ids, adv = ll.make_inputs(8, 4, 32, torch.bfloat16, "cpu")
    ll.variant_fn("liger-style", h, w, ids, adv)()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen)


# ---------------------------------------------------------------- 7. --repeat wins
def test_explicit_repeat_wins_for_the_quick_grpo_row(monkeypatch):
    from rlfuse.bench import advantages

    monkeypatch.setattr(advantages, "CPU_GAE_QUICK", [(2, 8)])
    monkeypatch.setattr(advantages, "CPU_GRPO_QUICK", [(8, 4, 8)])
    calls = _recorder(advantages, monkeypatch)
    advantages.run("cpu", quick=True, repeat=7, compile=False)
    grpo = [c for c in calls if "rlfuse[group_size]" in c["fns"]]
    assert [c["repeat"] for c in grpo] == [7]
    calls.clear()
    advantages.run("cpu", quick=True, compile=False)
    assert [c["repeat"] for c in calls if "rlfuse[group_size]" in c["fns"]] == [3]


# ---------------------------------------------------------------- 8. numeric notes
def test_numeric_notes_reach_the_report(tmp_path):
    row = Row("linear", "N=8", "float32", "fwd+bwd", {"rlfuse": 2.0, "eager": 3.0}, 0.0,
              {"matmul_floor_ms": 1.25, "mem_rlfuse/eager": 0.5, "time_rlfuse/eager": 0.6667,
               "time_rlfuse/3_matmuls": 1.6, "peak_extra_mb": {"rlfuse": 1.0},
               "compile": "RuntimeError: x"})
    text = open(report.write_report(str(tmp_path), {"linear": [row]}, {"cpu": "c"})).read()
    for line in ("matmul_floor_ms: 1.25", "mem_rlfuse/eager: 0.5", "time_rlfuse/eager: 0.6667",
                 "time_rlfuse/3_matmuls: 1.6", "compile: RuntimeError: x"):
        assert f"- linear N=8 float32 fwd+bwd: {line}" in text
    assert "peak_extra_mb:" not in text


# ---------------------------------------------------------------- 9. search_llm device
@pytest.mark.parametrize("device, labelled", [("cpu", False), ("cuda", True)])
def test_search_llm_rows_say_cpu_on_a_gpu_run(monkeypatch, device, labelled):
    from rlfuse.bench import search_llm
    from rlfuse.search import llm_demo

    monkeypatch.setattr(llm_demo, "default_model", lambda **kw: (None, None, []))
    monkeypatch.setattr(llm_demo, "held_out_problems", lambda *a, **kw: [])
    monkeypatch.setattr(search_llm, "_searches", lambda *a: [
        Row("search_llm", "chain B=8", "f32", "mcts", {"rlfuse": 1.0}, 0.0, {})])
    row, = search_llm.run(device, quick=True)
    assert row.case.endswith("(CPU)") == labelled
    assert ("device" in row.notes) == labelled


# ---------------------------------------------------------------- 10. a failing round
def test_linear_logprob_interleaved_drops_a_variant_failing_in_a_timed_round():
    from rlfuse.bench import linear_logprob as ll

    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 2:          # passes the warm-up and a round, fails later
            raise RuntimeError("out of memory")

    times, errors = ll.interleaved({"ok": lambda: None, "flaky": flaky}, "cpu", repeat=4)
    assert times["ok"] is not None and times["flaky"] is None
    assert errors["flaky"].startswith("RuntimeError: out of memory")
    assert calls["n"] == 3          # dropped after the failure
