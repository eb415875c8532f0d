"""Timing, bandwidth and reporting shared by every op benchmark.

Each op benchmark yields :class:`Row`s: one case (shape, dtype, mode) with the median time
of every variant measured in the same run (rlfuse, torch eager, torch.compile, peers).
Ratios are ``variant_time / rlfuse_time`` (> 1 means rlfuse is faster).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch


@dataclasses.dataclass
class Row:
    op: str
    case: str            # e.g. "N=2048 V=32000"
    dtype: str
    mode: str            # "fwd" or "fwd+bwd"
    times_ms: dict       # variant -> median ms (None when the variant failed)
    bytes_moved: float   # minimum memory traffic of the op, for GB/s
    notes: dict = dataclasses.field(default_factory=dict)

    def ratio(self, variant: str) -> float | None:
        base, ours = self.times_ms.get(variant), self.times_ms.get("rlfuse")
        if base is None or ours is None or ours == 0:
            return None
        return base / ours

    def gbps(self, variant: str = "rlfuse") -> float | None:
        t = self.times_ms.get(variant)
        if not t or not self.bytes_moved:
            return None
        return self.bytes_moved / (t * 1e-3) / 1e9


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(
    fn: Callable[[], object],
    device: torch.device | str = "cpu",
    *,
    warmup: int = 2,
    repeat: int = 10,
    min_seconds: float = 0.0,
) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or (time.perf_counter() - start) < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeat:
            break
    return statistics.median(times) * 1e3


def try_measure(fn, device, **kw) -> tuple[float | None, str | None]:
    """Like :func:`measure` but a failing variant reports its error instead of aborting."""
    try:
        return measure(fn, device, **kw), None
    except Exception as exc:  # a peer or torch.compile may fail on some setups
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def time_variants(
    fns: dict, device: torch.device | str = "cpu", *, warmup: int = 2, repeat: int = 10
) -> tuple[dict, dict]:
    """Median ms of every variant, measured interleaved (one call of each per round), so
    that load from elsewhere on a noisy machine hits all variants alike.  A variant that
    raises is reported in the second dict and dropped from later rounds."""
    times: dict = {name: [] for name in fns}
    errors: dict = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            _sync(device)
        except Exception as exc:  # a peer or torch.compile may fail on some setups
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    live = [n for n in fns if n not in errors]
    for _ in range(repeat):
        for name in list(live):
            t0 = time.perf_counter()
            try:
                fns[name]()
                _sync(device)
            except Exception as exc:  # noqa: BLE001 (fails only later: reported, dropped)
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                live.remove(name)
                times[name].clear()
                continue
            times[name].append(time.perf_counter() - t0)
    out = {n: (statistics.median(times[n]) * 1e3 if times[n] else None) for n in fns}
    return out, errors


# tolerance against the float64 reference (abs and rel, as torch.allclose) by the
# result's dtype: float32 math, or the rounding of a bf16 / fp16 result
_TOL = {torch.float64: 1e-6, torch.float32: 1e-4}
_LOW_TOL = 1e-2


def check_agreement(fns: dict, want, notes: dict, skip=(), tol: dict | None = None) -> None:
    """Run each variant once and compare its result (a tensor or a tuple of tensors, in
    the order of ``want``; extra results are ignored) with the float64 reference, within
    ``rtol = tol`` and ``atol = tol * max|reference|`` for the result's dtype.  Named in
    ``notes``: a variant beyond that tolerance, and a variant whose result has a lower
    precision dtype than rlfuse's (it did less precise work), each with its largest error.
    ``tol`` overrides the tolerance per result dtype; variants in ``skip`` (different
    work) and variants already in ``notes`` (failed) are not compared."""
    tols = {**_TOL, **(tol or {})}
    if not isinstance(want, (tuple, list)):
        want = (want,)
    base = None
    for name, fn in fns.items():
        if name in notes or name in skip:  # failed while timed: already reported
            continue
        try:
            got = fn()
            got = got if isinstance(got, (tuple, list)) else (got,)
            dtypes = [g_.dtype for g_ in got]
            if base is None:
                base = dtypes  # rlfuse comes first
            worse, lower = [], []
            for g_, w_, bd in zip(got, want, base):
                w_ = w_.to(g_.device)
                err = (g_.detach().double() - w_).abs().max().item()
                tl = tols.get(g_.dtype, _LOW_TOL)
                top = w_.abs().max().item() if w_.numel() else 0.0
                close = torch.allclose(g_.detach().double(), w_, rtol=tl,
                                       atol=tl * (top or 1.0))
                less = g_.dtype.itemsize < bd.itemsize
                if not close or less:
                    (worse if not close else lower).append(
                        f"{str(g_.dtype).replace('torch.', '')} result, max abs error "
                        f"{err:.3g} (max |reference| {top:.3g})")
            if worse:
                notes[f"{name} vs float64"] = "beyond tolerance: " + "; ".join(worse + lower)
            elif lower:
                notes[f"{name} vs float64"] = ("lower precision than rlfuse's: "
                                               + "; ".join(lower))
        except Exception as exc:  # noqa: BLE001 - informational
            notes[f"{name} vs float64"] = f"{type(exc).__name__}: {str(exc)[:200]}"


_BANDWIDTH: dict = {}


def copy_bandwidth(device: torch.device | str = "cpu", nbytes: int = 256 << 20) -> float:
    """Measured copy bandwidth in GB/s, counting the read and the write (as STREAM copy)."""
    key = str(torch.device(device))
    if key not in _BANDWIDTH:
        n = nbytes // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = measure(lambda: dst.copy_(src), device, warmup=2, repeat=10)
        _BANDWIDTH[key] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _BANDWIDTH[key]


def machine_description(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    desc = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    if device.type == "cuda":
        desc["gpu"] = torch.cuda.get_device_name(device)
    try:
        from rlfuse import _backend

        c = _backend._load("_C")[0]
        desc["rlfuse_cpu_isa"] = c.active_isa() if c is not None else None
    except Exception:  # pragma: no cover - informational only
        pass
    return desc


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: list[Row], bandwidth_gbps: float | None = None) -> str:
    """Plain-text table: one line per case, a time and a ratio per variant."""
    variants: list[str] = []
    for r in rows:
        for v in r.times_ms:
            if v not in variants:
                variants.append(v)
    header = ["op", "case", "dtype", "mode"] + [f"{v} ms" for v in variants]
    header += [f"x {v}" for v in variants if v != "rlfuse"]
    header += ["GB/s"]
    if bandwidth_gbps:
        header += ["% copy bw"]
    lines = [header]
    for r in rows:
        line = [r.op, r.case, r.dtype, r.mode]
        for v in variants:
            t = r.times_ms.get(v)
            line.append("-" if t is None else f"{t:.2f}")
        for v in variants:
            if v == "rlfuse":
                continue
            q = r.ratio(v)
            line.append("-" if q is None else f"{q:.2f}")
        g = r.gbps()
        line.append("-" if g is None else f"{g:.1f}")
        if bandwidth_gbps:
            line.append("-" if g is None else f"{100 * g / bandwidth_gbps:.0f}%")
        lines.append(line)
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = []
    for k, row in enumerate(lines):
        out.append("  ".join(str(c).rjust(w) if k else str(c).ljust(w) for c, w in zip(row, widths)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_outputs(out_dir: str, name: str, rows: list[Row], meta: dict) -> list[str]:
    """Write ``<name>.json`` and, when matplotlib is installed, ``<name>.png``."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    path = os.path.join(out_dir, f"{name}.json")
    payload = {
        "meta": meta,
        "rows": [
            dict(dataclasses.asdict(r), ratios={v: r.ratio(v) for v in r.times_ms}, gbps=r.gbps())
            for r in rows
        ],
    }
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)
    written.append(path)
    png = _plot(out_dir, name, rows, meta)
    if png:
        written.append(png)
    return written


def _plot(out_dir: str, name: str, rows: list[Row], meta: dict, value=None,
          ylabel: str = "median time (ms, lower is better)", suffix: str = "") -> str | None:
    """Bars of ``value(row, variant)`` (default: the median time) per case and variant,
    written to ``<name><suffix>.png``."""
    value = value or (lambda r, v: r.times_ms.get(v))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    variants: list[str] = []
    for r in rows:
        for v in r.times_ms:
            if v not in variants:
                variants.append(v)
    labels = [f"{r.case}\n{r.dtype} {r.mode}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4.5))
    width = 0.8 / max(len(variants), 1)
    for k, v in enumerate(variants):
        vals = [value(r, v) or 0.0 for r in rows]
        ax.bar([i + k * width for i in range(len(rows))], vals, width, label=v)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"rlfuse bench {name}{suffix.replace('_', ' ')} - "
                 f"{meta.get('gpu') or meta.get('cpu', '')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
