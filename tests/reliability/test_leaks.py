"""No leaks: 10,000 calls of every public op (forward and backward, tiny inputs, cpu backend)
keep the resident set flat.

After a warm-up (allocator pools, caches, lazily built kernels), the growth of RSS over the
10,000 calls must stay under ``LIMIT``: a leak of 256 bytes per call (smaller than one
leaked tensor) would exceed it.  ``test_detector_catches_a_small_leak`` shows that the
measurement does fail on such a leak.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tests.reliability import _cases as C

CALLS = 10_000
WARMUP = 300
LIMIT = 2 << 20  # bytes of RSS growth over CALLS calls

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                                reason="reads RSS from /proc/self/statm (Linux)")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(fn, calls=CALLS, warmup=WARMUP) -> int:
    for _ in range(warmup):
        fn()
    gc.collect()
    before = _rss()
    for _ in range(calls):
        fn()
    gc.collect()
    return _rss() - before


@pytest.fixture
def one_thread():
    # the leak does not depend on the thread count; one thread keeps 10,000 tiny calls fast
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_detector_catches_a_small_leak():
    kept = []
    growth = rss_growth(lambda: kept.append(bytearray(256)))
    assert growth > LIMIT, f"a 256-byte-per-call leak grew RSS by only {growth} bytes"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(C.CASES))
def test_ten_thousand_calls_keep_rss_flat(name, one_thread):
    C.run(name, "cpu", "tiny")
    growth = rss_growth(lambda: C.run(name, "cpu", "tiny"))
    assert growth < LIMIT, f"{name}: RSS grew by {growth / 2**20:.2f} MiB over {CALLS} calls"
