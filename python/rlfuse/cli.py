"""Command line: ``rlfuse info``, ``rlfuse bench <suite>``, ``rlfuse train <algorithm>`` and
``rlfuse search``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from rlfuse import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"rlfuse {data['rlfuse']}  python {data['python']}  torch {data['torch']}  "
          f"triton {data['triton'] or '-'}  ({data['machine']})")
    print("backends:")
    for name, b in data["backends"].items():
        state = "available" if b["available"] else ("built" if b["built"] else "not built")
        extra = []
        if name == "cpu" and b["available"]:
            extra.append(f"isa={b['isa']} openmp={b['openmp']} threads={b['threads']}")
        if name == "cuda" and b.get("device"):
            extra.append(b["device"])
        if name == "triton" and b.get("interpreted"):
            extra.append("TRITON_INTERPRET=1")
        if b.get("error") and not b["available"]:
            extra.append(b["error"])
        print(f"  {name:7s} {state:10s} {' '.join(extra)}")
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {v}")
    return v


def _cmd_bench(args) -> int:
    import torch

    from rlfuse import bench
    from rlfuse.bench import harness

    names = sorted(bench.SUITES) if args.suite == "all" else [args.suite]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("rlfuse bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = harness.machine_description(device)
    bw = harness.copy_bandwidth(device)
    meta["copy_bandwidth_gbps"] = round(bw, 1)
    print(f"# {meta.get('gpu') or meta['cpu']}  threads={meta['threads']}  "
          f"torch {meta['torch']}  {meta['date']}")
    print(f"# measured copy bandwidth: {bw:.1f} GB/s (read + write); ratios are "
          "variant time / rlfuse time (>1: rlfuse faster)")
    run_kwargs = dict(device=device, quick=args.quick, repeat=args.repeat,
                      compile=not args.no_compile,
                      backends=args.backends.split(",") if args.backends else None)
    if args.suite == "all" and args.out:  # every suite, then DIR/report.md
        from rlfuse.bench import report

        report.run_all(args.out, names, meta, run_kwargs)
        return 0
    failed = []
    for name in names:
        try:                # a suite that fails is reported; the others still run
            rows = bench.load(name).run(**run_kwargs)
        except Exception as exc:  # noqa: BLE001
            failed.append(name)
            print(f"\n{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            if args.out:
                from rlfuse.bench import report

                err = f"{type(exc).__name__}: {exc}"
                print(f"wrote {report.save_error(args.out, name, err, meta)}")
            continue
        print()
        print(harness.format_table(rows, bw))
        for r in rows:
            for variant, err in r.notes.items():
                print(f"  note: {r.case} {r.dtype} {r.mode} {variant}: {err}")
        if args.out:  # as ``bench all --out``: JSON, time and memory plots
            from rlfuse.bench import report

            for path in report.save_suite(args.out, name, rows, meta):
                print(f"wrote {path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlfuse", description="rlfuse: fused RL kernels for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions and available backends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    from rlfuse.bench import SUITES

    p = sub.add_parser("bench", help="time rlfuse ops against torch and peers")
    p.add_argument("suite", choices=sorted(SUITES) + ["all"], help="which benchmark")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if present")
    p.add_argument("--quick", action="store_true", help="small cases, few repeats")
    p.add_argument("--repeat", type=_positive_int, default=None,
                   help="timed repetitions per variant")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile variants")
    p.add_argument("--backends", default=None,
                   help="also time these rlfuse backends, comma separated (e.g. cuda,triton)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch/OpenMP threads")
    p.add_argument("--out", default=None, help="write <suite>.json and <suite>.png here (all: also report.md)")
    p.set_defaults(func=_cmd_bench)

    from rlfuse.search import llm_demo

    p = sub.add_parser("search", help="step-level MCTS over a LM vs best-of-N and beam")
    llm_demo.add_arguments(p)
    p.set_defaults(func=llm_demo.main)

    from rlfuse.trainers.cli import add_parser as _add_train_parser

    _add_train_parser(sub)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "parse_unknown", False):
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
