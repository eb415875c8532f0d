"""No leaks: 10,000 calls of every public op (forward and backward, tiny inputs, cpu backend)
keep memory flat.

After a warm-up (allocator pools, caches, lazily built kernels), three measures must stay
flat over the 10,000 calls:

- bytes in use by malloc (glibc ``mallinfo2``: what C++, torch's CPU allocator and numpy
  hold; freed memory that the allocator keeps does not count, so a leak cannot hide in it),
  under 1 MiB: a leak of ~100 bytes per call fails;
- Python objects (``sys.getallocatedblocks``), under 1,000: one leaked object per call fails;
- the resident set (RSS), under 8 MiB (what a user watches; coarser, since freed pages need
  not go back to the system).

``test_detector_catches_planted_leaks`` shows that the measures fail on a small leaked tensor
per call and on a 256-byte Python buffer per call.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest
import torch

from tests.reliability import _cases as C

CALLS = 10_000
WARMUP = 100
HEAP_LIMIT = 1 << 20
BLOCK_LIMIT = 1000
RSS_LIMIT = 8 << 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc():
    try:
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


LIBC = _libc()
pytestmark = pytest.mark.skipif(
    LIBC is None or not os.path.exists("/proc/self/statm"),
    reason="needs glibc >= 2.33 (mallinfo2) and /proc (Linux)")


def _heap() -> int:
    m = LIBC.mallinfo2()
    return m.uordblks + m.hblkhd


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def growth(fn, calls=CALLS, warmup=WARMUP) -> dict:
    for _ in range(warmup):
        fn()
    gc.collect()
    before = (_heap(), sys.getallocatedblocks(), _rss())
    for _ in range(calls):
        fn()
    gc.collect()
    after = (_heap(), sys.getallocatedblocks(), _rss())
    return dict(zip(("heap", "blocks", "rss"), (a - b for a, b in zip(after, before))))


def leaks(g: dict) -> list:
    limits = dict(heap=HEAP_LIMIT, blocks=BLOCK_LIMIT, rss=RSS_LIMIT)
    return [f"{k} +{g[k]}" for k in limits if g[k] >= limits[k]]


@pytest.fixture
def one_thread():
    # the leak does not depend on the thread count; one thread keeps 10,000 tiny calls fast
    # (and keeps every allocation in the main malloc arena, which mallinfo2 reports)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_detector_catches_planted_leaks():
    kept = []
    tensor = growth(lambda: kept.append(torch.empty(32)), calls=CALLS)
    assert leaks(tensor), f"a 128-byte tensor per call went unnoticed: {tensor}"
    kept.clear()
    buf = growth(lambda: kept.append(bytearray(256)), calls=CALLS)
    assert leaks(buf), f"a 256-byte buffer per call went unnoticed: {buf}"


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in C.CASES if n != C.SEARCH_CASE])
def test_ten_thousand_calls_keep_memory_flat(name, one_thread):
    C.run(name, "cpu", "tiny")
    g = growth(lambda: C.run(name, "cpu", "tiny"))
    assert not leaks(g), f"{name}: grew over {CALLS} calls: {leaks(g)} ({g})"


@pytest.mark.slow
def test_ten_thousand_searches_keep_memory_flat(one_thread):
    """10,000 tiny searches (2 trees, 3 actions, 4 simulations, 2 in parallel), alternately
    puct_search followed by a subtree extraction, and gumbel_search (~1.5 ms each: one
    search per call rather than _cases' three, to keep the test near 15 s)."""
    from rlfuse.search import gumbel_search, puct_search

    B, K, n, W = C.SEARCH_SIZES["tiny"]
    env = C.hash_env(K)
    root = env.root(B)
    gen = torch.Generator().manual_seed(0)
    count = [0]

    def call():
        count[0] += 1
        if count[0] % 2:
            p = puct_search(root, env.step, n, parallel=W, generator=gen)
            p.tree.subtree(p.action)
        else:
            gumbel_search(root, env.step, n, parallel=W, max_num_considered_actions=4,
                          generator=gen)
    g = growth(call)
    assert not leaks(g), f"searches grew over {CALLS} calls: {leaks(g)} ({g})"
