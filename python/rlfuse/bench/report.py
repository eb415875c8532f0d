"""The benchmark report behind ``rlfuse bench all --out DIR``.

Every registered suite (``rlfuse.bench.SUITES``) runs in turn; each writes
``DIR/<suite>.json`` and ``DIR/<suite>.png`` (time per case and variant, from
:func:`rlfuse.bench.harness.write_outputs`), and ``DIR/<suite>_memory.png`` where the suite
measured peak memory.  ``DIR/report.md`` then gathers, per suite, one markdown table:

* the median time of every variant (rlfuse, its other backends, torch eager,
  ``torch.compile``, the installed peers) measured in the same run;
* the ratio ``variant time / rlfuse time`` (> 1: rlfuse is faster);
* peak extra memory per variant, where the suite measures it (``Row.notes["peak_extra_mb"]``);
* for memory-bound ops (rows with ``bytes_moved``), rlfuse's effective GB/s and its share of
  the copy bandwidth measured on the machine at the start of the run;

followed by the notes (failed variants, outputs that differ from the float64 reference,
and the suites' numeric notes such as ``matmul_floor_ms``).  A suite that fails writes
``DIR/<suite>.error.json`` (the error and the run's metadata) and removes the
``<suite>.json`` and plots an earlier run left in DIR, so a rebuilt report never shows a
stale table as current; a suite that succeeds removes an earlier ``<suite>.error.json``.
``python -m rlfuse.bench.report DIR`` rebuilds ``report.md`` and the memory plots from the
JSON files alone, failures included.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from rlfuse.bench.harness import Row, _plot, write_outputs

NOISE_NOTE = (
    "Times are medians of interleaved repetitions; on a shared machine single runs still "
    "vary by tens of percent, so compare ratios within one row rather than across runs. "
    "A share of the copy bandwidth above 100% means the op's data stayed in cache, or the "
    "copy was measured while the machine was busier than during the op."
)


def _variants(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for r in rows:
        for v in r.times_ms:
            if v not in out:
                out.append(v)
    return out


def _fmt(x, spec=".2f") -> str:
    return "–" if x is None else format(x, spec)


def _peak(row: Row) -> dict:
    p = row.notes.get("peak_extra_mb") if isinstance(row.notes, dict) else None
    return p if isinstance(p, dict) else {}


def markdown_table(rows: list[Row], bandwidth_gbps: float | None) -> str:
    """One markdown table for a suite's rows."""
    variants = _variants(rows)
    others = [v for v in variants if v != "rlfuse"]
    mem_vars = [v for v in variants if any(_peak(r).get(v) is not None for r in rows)]
    has_bw = any(r.bytes_moved for r in rows)
    head = ["op", "case", "dtype", "mode"] + [f"{v} ms" for v in variants]
    head += [f"× {v}" for v in others] + [f"{v} peak MB" for v in mem_vars]
    if has_bw:
        head += ["rlfuse GB/s"] + (["% copy bw"] if bandwidth_gbps else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.op, r.case, r.dtype, r.mode]
        cells += [_fmt(r.times_ms.get(v), ".3g" if (r.times_ms.get(v) or 0) < 1 else ".2f")
                  for v in variants]
        cells += [_fmt(r.ratio(v)) for v in others]
        cells += [_fmt(_peak(r).get(v), ".1f") for v in mem_vars]
        if has_bw:
            g = r.gbps()
            cells.append(_fmt(g, ".1f"))
            if bandwidth_gbps:
                cells.append("–" if g is None else f"{100 * g / bandwidth_gbps:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        for k, v in (r.notes or {}).items():
            if k == "peak_extra_mb" or isinstance(v, dict):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = format(v, "g")
            out.append(f"- {r.op} {r.case} {r.dtype} {r.mode}: {k}: {v}")
    return out


def memory_plot(out_dir: str, name: str, rows: list[Row], meta: dict) -> str | None:
    """Bars of peak extra memory per case and variant (``<name>_memory.png``)."""
    with_mem = [r for r in rows if _peak(r)]
    if not with_mem:
        return None
    return _plot(out_dir, name, with_mem, meta, value=lambda r, v: _peak(r).get(v),
                 ylabel="peak extra memory (MB, lower is better)", suffix="_memory")


def write_report(out_dir: str, results: dict, meta: dict, errors: dict | None = None) -> str:
    """Write ``report.md`` for ``results`` (suite name -> rows) and return its path."""
    os.makedirs(out_dir, exist_ok=True)
    bw = meta.get("copy_bandwidth_gbps")
    machine = meta.get("gpu") or meta.get("cpu", "unknown")
    md = [f"# rlfuse benchmark report — {machine}", "",
          f"- date: {meta.get('date')}",
          f"- machine: {meta.get('cpu')}" + (f", GPU {meta['gpu']}" if meta.get("gpu") else ""),
          f"- threads: {meta.get('threads')}; rlfuse CPU ISA: {meta.get('rlfuse_cpu_isa')}",
          f"- torch {meta.get('torch')}, python {meta.get('python')}, {meta.get('platform')}",
          f"- measured copy bandwidth: {bw} GB/s (read + write)", "",
          "Ratios are variant time / rlfuse time (> 1: rlfuse is faster). " + NOISE_NOTE, ""]
    for name, rows in results.items():
        md += [f"## {name}", ""]
        if not rows:
            md += ["(no rows: the suite's peers or device are missing)", ""]
            continue
        md += [markdown_table(rows, bw), ""]
        notes = _notes(rows)
        if notes:
            md += notes + [""]
        for png in (f"{name}.png", f"{name}_memory.png"):
            if os.path.exists(os.path.join(out_dir, png)):
                md += [f"![{png}]({png})", ""]
    for name, err in (errors or {}).items():
        md += [f"## {name}", "", f"failed: `{err}`", ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(md))
    return path


def _remove(out_dir: str, files) -> None:
    for f in files:
        try:
            os.remove(os.path.join(out_dir, f))
        except FileNotFoundError:
            pass


def save_suite(out_dir: str, name: str, rows: list[Row], meta: dict) -> list[str]:
    """Write a suite's ``<name>.json``, ``<name>.png`` and ``<name>_memory.png`` (where
    it measured memory), dropping an earlier run's ``<name>.error.json`` and plots."""
    _remove(out_dir, [f"{name}.error.json", f"{name}_memory.png"])
    written = write_outputs(out_dir, name, rows, meta)
    mem = memory_plot(out_dir, name, rows, meta)
    return written + ([mem] if mem else [])


def save_error(out_dir: str, name: str, error: str, meta: dict) -> str:
    """Record a suite that failed: ``<name>.error.json``, and remove the ``<name>.json``
    and plots of an earlier run, which would otherwise pass for this run's results."""
    os.makedirs(out_dir, exist_ok=True)
    _remove(out_dir, [f"{name}.json", f"{name}.png", f"{name}_memory.png"])
    path = os.path.join(out_dir, f"{name}.error.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "error": error}, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def run_all(out_dir: str, names, meta: dict, run_kwargs: dict, echo=print) -> str:
    """Run the named suites, write their JSON/PNG files and ``report.md``."""
    from rlfuse import bench
    from rlfuse.bench.harness import format_table

    results, errors = {}, {}
    for name in names:
        try:
            rows = bench.load(name).run(**run_kwargs)
        except Exception as exc:  # one broken suite must not lose the others' results
            errors[name] = f"{type(exc).__name__}: {exc}"
            echo(f"\n{name}: failed\n{traceback.format_exc(limit=3)}")
            echo(f"wrote {save_error(out_dir, name, errors[name], meta)}")
            continue
        results[name] = rows
        echo("\n" + format_table(rows, meta.get("copy_bandwidth_gbps")))
        for path in save_suite(out_dir, name, rows, meta):
            echo(f"wrote {path}")
    path = write_report(out_dir, results, meta, errors)
    echo(f"wrote {path}")
    return path


def load_results(out_dir: str) -> tuple[dict, dict, dict]:
    """(suite -> rows, meta, suite -> error) from the ``<suite>.json`` and
    ``<suite>.error.json`` files in ``out_dir``."""
    from rlfuse import bench

    results, meta, errors = {}, {}, {}
    for name in bench.SUITES:
        path = os.path.join(out_dir, f"{name}.json")
        epath = os.path.join(out_dir, f"{name}.error.json")
        if os.path.exists(epath) and (not os.path.exists(path)
                                      or os.path.getmtime(epath) >= os.path.getmtime(path)):
            with open(epath) as f:
                data = json.load(f)
            meta = meta or data.get("meta", {})
            errors[name] = data.get("error", "failed")
            continue
        if not os.path.exists(path):
            continue
        with open(path) as f:
            data = json.load(f)
        meta = meta or data.get("meta", {})
        results[name] = [Row(**{k: d[k] for k in ("op", "case", "dtype", "mode", "times_ms",
                                                  "bytes_moved", "notes")})
                         for d in data["rows"]]
    return results, meta, errors


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m rlfuse.bench.report DIR   (rebuild DIR/report.md from JSON)")
        sys.exit(2)
    res, m, errs = load_results(sys.argv[1])
    for n, rws in res.items():
        memory_plot(sys.argv[1], n, rws, m)
    print(write_report(sys.argv[1], res, m, errs))
