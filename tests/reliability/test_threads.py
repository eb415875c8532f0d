"""Thread safety and thread-count invariance of every public op.

- The same op called from several Python threads at once returns, in every thread, exactly
  what a lone call returns (cpu, torch and Triton-interpreter backends).
- The number of OpenMP threads (``torch.set_num_threads`` in process, ``OMP_NUM_THREADS``
  in a fresh interpreter) does not change any result, bitwise: outputs and gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from rlfuse import _backend
from rlfuse.search import tree as search_tree
from tests.reliability import _cases as C
from tests.reliability._inputs import CPU_BACKENDS

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def full_threads(monkeypatch):
    # the CPU kernels keep inputs below 32768 elements per thread on fewer threads
    # (rlfuse._backend.threads_for); make them split these inputs over every thread
    monkeypatch.setattr(_backend, "THREAD_GRAIN", 64)
    # the tree kernels run on one thread below THREAD_MIN_PAIRS (tree, action) pairs
    monkeypatch.setattr(search_tree, "THREAD_MIN_PAIRS", 0)


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name,backend", [
    (n, b) for n in C.CASES for b in CPU_BACKENDS if b in C.CASE_BACKENDS.get(n, CPU_BACKENDS)])
def test_concurrent_python_threads(name, backend, full_threads):
    size = "tiny" if backend == "triton" else "medium"
    want = C.digest(C.run(name, backend, size))
    n_threads, reps = 4, 1
    barrier = threading.Barrier(n_threads)
    got, errors = [], []

    def work():
        try:
            barrier.wait()
            for _ in range(reps):
                got.append(C.digest(C.run(name, backend, size)))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(got) == n_threads * reps
    assert set(got) == {want}, f"{name} ({backend}): a concurrent call differs from a lone one"


# linear_token_logprobs does its lm_head matmuls with torch (MKL here), whose sgemm picks a
# different kernel by thread count unless MKL's strict reproducibility mode is on
# (measured: [64, 16] x [16, 97] differs at 4+ threads by 1 ulp).  It is checked in a fresh
# interpreter with MKL_CBWR=AUTO,STRICT, which makes MKL's gemm thread-count invariant.
BLAS_CASES = {"linear_token_logprobs", "preference_logps / preference_loss",
              "preference_loss_from_hidden (fused)"}
STRICT_BLAS = {"MKL_CBWR": "AUTO,STRICT"}


@pytest.mark.parametrize("name", [n for n in C.CASES if n not in BLAS_CASES])
def test_set_num_threads_bitwise(name, full_threads, restore_threads):
    digests = {}
    for n in (1, 2, 3, 4):
        torch.set_num_threads(n)
        digests[n] = C.digest(C.run(name, "cpu"))
    assert len(set(digests.values())) == 1, f"{name}: results depend on the thread count"


def _subprocess(args, **env) -> list:
    out = subprocess.run([sys.executable, "-m", "tests.reliability._cases", *args], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()


@pytest.mark.slow
def test_omp_num_threads_bitwise(full_threads, restore_threads):
    """Fresh interpreters with OMP_NUM_THREADS=1 and 2 (and MKL's strict mode) give the same
    digests as each other and as this process; the first also sweeps torch.set_num_threads
    1-4 over the BLAS-backed ops."""
    runs, sweep = {}, {}
    for omp in (1, 2):
        args = ["medium"] + (["--threads", "1,2,3,4", "--only", ",".join(BLAS_CASES)]
                             if omp == 1 else [])
        lines = _subprocess(args, OMP_NUM_THREADS=str(omp), **STRICT_BLAS)
        assert int(lines[0]) == omp  # the variable reached torch's thread pool
        runs[omp] = dict(line.rsplit(" ", 1) for line in lines[1:1 + len(C.CASES)])
        for line in lines[1 + len(C.CASES):]:  # "threads name digest" (names hold spaces)
            n, rest = line.split(" ", 1)
            name, d = rest.rsplit(" ", 1)
            sweep.setdefault(name, {})[n] = d
    assert set(runs[1]) == set(C.CASES) and set(sweep) == BLAS_CASES
    for name, by_threads in sweep.items():
        assert len(by_threads) == 4
        assert len(set(by_threads.values())) == 1, f"{name}: results depend on the thread count"
    torch.set_num_threads(3)
    for name in C.CASES:
        assert runs[1][name] == runs[2][name], f"{name}: depends on OMP_NUM_THREADS"
        if name not in BLAS_CASES:  # this process runs without MKL's strict mode
            assert runs[1][name] == C.digest(C.run(name, "cpu")), name
