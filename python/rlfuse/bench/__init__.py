"""The benchmark suite behind ``rlfuse bench``: one module per op family, each with a
``run(device, quick, ...) -> list[Row]`` function, registered in ``SUITES``."""

from __future__ import annotations

import importlib

SUITES = {
    "logprob": "rlfuse.bench.logprob",
    "linear_logprob": "rlfuse.bench.linear_logprob",
    "advantages": "rlfuse.bench.advantages",
    "losses": "rlfuse.bench.losses",
    "search": "rlfuse.bench.search",
    "train": "rlfuse.bench.train",
    "generate": "rlfuse.bench.generate",
    "preference": "rlfuse.bench.preference",
    "search_llm": "rlfuse.bench.search_llm",
    "trl": "rlfuse.bench.trl",
}


def load(name: str):
    if name not in SUITES:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(SUITES)} or 'all'")
    return importlib.import_module(SUITES[name])
