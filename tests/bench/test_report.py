"""rlfuse.bench.report: the markdown report computes ratios, memory and bandwidth columns
from the suites' rows, and rebuilds from the JSON files the suites write."""

from __future__ import annotations

import os

import pytest

from rlfuse.bench import report
from rlfuse.bench.harness import Row, write_outputs

META = {"date": "2026-01-01 00:00 UTC", "cpu": "test cpu", "threads": 2, "torch": "x",
        "python": "3", "platform": "linux", "copy_bandwidth_gbps": 40.0}


def _rows():
    return [
        Row("token_logprobs", "N=8 V=16", "float32", "fwd", {"rlfuse": 2.0, "eager": 5.0,
                                                             "trl": None},
            8e6, {"trl": "ImportError: no trl"}),
        Row("linear", "N=8 H=4 V=16", "float32", "fwd+bwd", {"rlfuse": 4.0, "eager": 3.0},
            0.0, {"peak_extra_mb": {"rlfuse": 1.5, "eager": 12.25}}),
    ]


def test_markdown_table_columns():
    table = report.markdown_table(_rows(), 40.0).splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:7] == ["op", "case", "dtype", "mode", "rlfuse ms", "eager ms", "trl ms"]
    assert "× eager" in head and "× trl" in head
    assert "rlfuse peak MB" in head and "eager peak MB" in head
    first = dict(zip(head, [c.strip() for c in table[2].strip("|").split("|")]))
    second = dict(zip(head, [c.strip() for c in table[3].strip("|").split("|")]))
    assert first["× eager"] == "2.50" and first["trl ms"] == "–"
    # 8e6 bytes in 2 ms = 4 GB/s = 10% of the 40 GB/s copy bandwidth
    assert first["rlfuse GB/s"] == "4.0" and first["% copy bw"] == "10%"
    assert second["× eager"] == "0.75" and second["eager peak MB"] == "12.2"
    assert second["rlfuse GB/s"] == "–"


def test_write_report_and_rebuild_from_json(tmp_path):
    out = str(tmp_path)
    rows = _rows()
    write_outputs(out, "logprob", rows, META)
    path = report.write_report(out, {"logprob": rows}, META, {"losses": "RuntimeError: x"})
    text = open(path).read()
    assert "## logprob" in text and "test cpu" in text and "40.0 GB/s" in text
    assert "trl: ImportError: no trl" in text
    assert "## losses" in text and "RuntimeError: x" in text
    res, meta, errs = report.load_results(out)
    assert errs == {}
    assert meta["cpu"] == "test cpu"
    assert [r.times_ms for r in res["logprob"]] == [r.times_ms for r in rows]
    assert report.markdown_table(res["logprob"], 40.0) == report.markdown_table(rows, 40.0)


def test_memory_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = report.memory_plot(str(tmp_path), "x", _rows(), META)
    assert path and os.path.getsize(path) > 0
    assert report.memory_plot(str(tmp_path), "y", _rows()[:1], META) is None
