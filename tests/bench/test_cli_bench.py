"""`rlfuse bench`: a suite that fails is reported and the others still run; bad arguments
are argparse errors, not tracebacks."""

from __future__ import annotations

import sys
import types

import pytest

from rlfuse import bench, cli
from rlfuse.bench import harness


def test_bench_all_goes_on_after_a_failing_suite(monkeypatch, capsys):
    ok = types.ModuleType("_rlfuse_fake_ok")
    ok.run = lambda **kw: [harness.Row("ok", "c", "float32", "fwd", {"rlfuse": 1.0}, 0.0)]
    bad = types.ModuleType("_rlfuse_fake_bad")

    def _bad(**kw):
        raise RuntimeError("peer broke")

    bad.run = _bad
    monkeypatch.setitem(sys.modules, "_rlfuse_fake_ok", ok)
    monkeypatch.setitem(sys.modules, "_rlfuse_fake_bad", bad)
    monkeypatch.setattr(bench, "SUITES", {"a_bad": "_rlfuse_fake_bad", "b_ok": "_rlfuse_fake_ok"})
    monkeypatch.setitem(harness._BANDWIDTH, "cpu", 10.0)
    assert cli.main(["bench", "all", "--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert "a_bad: failed: RuntimeError: peer broke" in out.err
    assert "ok" in out.out          # the suite after it ran


@pytest.mark.parametrize("args", [["--threads", "-1"], ["--threads", "0"], ["--repeat", "0"],
                                  ["--repeat", "x"]])
def test_bench_refuses_non_positive_counts(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "logprob", *args])
    assert e.value.code == 2
    assert "expected a positive int" in capsys.readouterr().err


def test_a_variant_that_fails_in_a_timed_round_is_reported_not_raised():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:          # passes the warm-up, fails later
            raise RuntimeError("out of memory")

    times, errors = harness.time_variants({"ok": lambda: None, "flaky": flaky}, warmup=2,
                                          repeat=5)
    assert times["ok"] is not None and times["flaky"] is None
    assert errors["flaky"].startswith("RuntimeError: out of memory")
