"""Every kernel launch runs on its tensors' device, on that device's current stream.

The launchers of rlfuse._cuda take no device argument and Triton launches on the current
device: each call site must make the tensors' device current (``_backend.cuda_launch``,
``_backend.device_guard``), or tensors on cuda:1 are handed to kernels on cuda:0.  Checked
without a GPU: rlfuse._cuda is replaced by a recorder, ``torch.cuda.device`` and
``torch.cuda.current_stream`` by fakes, and the "cuda" backend is forced on CPU tensors, so
that every op of tests/reliability/_cases.py runs its CUDA branch.  The recorder writes no
output, so what an op does after a launch may fail (uninitialised memory is filled with
NaN / the largest integer here, so that the same launches are reached on every run): only
the launches are checked.  The Triton call sites are checked the same way, with the real
kernels under the interpreter.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

from rlfuse import _backend
from rlfuse.search import Phases, Tree
from tests.conftest import TRITON_ON_CPU
from tests.reliability import _cases as C

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
]

CPU = torch.device("cpu")

# the launchers each case reaches (at least)
CUDA_LAUNCHES = {
    "token_logprobs": {"token_logprobs_fwd", "token_logprobs_bwd"},
    "linear_token_logprobs": {"token_logprobs_fwd", "token_logprobs_bwd"},
    "sequence_logprobs / reduce_sequences": {"token_logprobs_fwd"},
    "gae / discounted_returns": {"gae_fwd"},
    "masked_mean / masked_var / masked_whiten": {"masked_row_stats", "masked_whiten_apply"},
    "group_advantages": {"group_stats", "broadcast_rows"},
    "token_rewards": {"token_rewards"},
    "kl_penalty": {"kl_penalty"},
    "policy_loss": {"policy_loss_rows"},
    "value_loss": {"value_loss_rows"},
    "preference_logps / preference_loss": {"token_logprobs_fwd", "preference_loss",
                                           "token_logprobs_bwd"},
    "preference_loss_from_hidden (fused)": {"token_logprobs_fwd", "preference_loss",
                                            "token_logprobs_bwd"},
    C.SEARCH_CASE: {"tree_select", "tree_expand", "tree_backup", "tree_subtree"},
}


class Recorder:
    """The fake torch.cuda.device / current_stream, and the launches seen under them."""

    def __init__(self):
        self.guards: list[torch.device] = []  # the devices made current, innermost last
        self.stream = 1001                    # handle of the current stream
        self.launches: list[tuple] = []       # (name, guard device or None, last argument)

    @contextlib.contextmanager
    def device(self, dev):
        self.guards.append(torch.device(dev))
        try:
            yield
        finally:
            self.guards.pop()

    def current_stream(self, device=None):
        return types.SimpleNamespace(cuda_stream=self.stream)

    def record(self, name, args):
        self.launches.append((name, self.guards[-1] if self.guards else None,
                              args[-1] if args else None))


class FakeCuda:
    """rlfuse._cuda: every launcher records its call and writes nothing."""

    class TreeView:
        def __init__(self, *args):
            pass

    SelectConfig = TreeView

    def __init__(self, rec: Recorder):
        self._rec = rec

    def __getattr__(self, name):
        def launcher(*args):
            self._rec.record(name, args)
            return (0, -1)

        return launcher


@pytest.fixture
def fake_cuda(monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec.device)
    monkeypatch.setattr(torch.cuda, "current_stream", rec.current_stream)
    monkeypatch.setitem(_backend._EXTENSIONS, "_cuda", (FakeCuda(rec), None))
    # "cuda" serves CPU tensors; "cpu" is unavailable, so that Tree.subtree takes its CUDA path
    available = _backend.available
    monkeypatch.setattr(_backend, "available",
                        lambda b, d="cpu": b == "cuda" or (b != "cpu" and available(b, d)))
    return rec


@pytest.fixture
def filled_empty():
    """torch.empty gives NaN / the largest integer (the fakes leave outputs unwritten)."""
    det, warn = (torch.are_deterministic_algorithms_enabled(),
                 torch.is_deterministic_algorithms_warn_only_enabled())
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _check(rec: Recorder, expected: set, what: str, err=None):
    names = {n for n, _, _ in rec.launches}
    assert names >= expected, f"{what}: launched {sorted(names)}, expected {sorted(expected)} " \
                              f"(then raised {err!r})"
    for name, guard, stream in rec.launches:
        assert guard == CPU, f"{what}: _cuda.{name} launched with the current device " \
                             f"{guard} (no guard for the tensors' device {CPU})"
        assert stream == rec.stream, f"{what}: _cuda.{name} got stream {stream}, the " \
                                     f"current one is {rec.stream}"


@pytest.mark.parametrize("name", list(C.CASES))
def test_cuda_launches_run_under_the_device_guard(name, fake_cuda, filled_empty):
    assert set(CUDA_LAUNCHES) == set(C.CASES)
    err = None
    try:
        C.run(name, "cuda", "tiny")
    except Exception as exc:  # the fakes leave outputs unwritten: only launches count
        err = exc
    _check(fake_cuda, CUDA_LAUNCHES[name], name, err)


def test_tree_phases_use_the_current_stream_of_each_call(fake_cuda):
    """Phases looks the stream up at each call, not once when it is built."""
    tree = Tree(2, 3, 8)
    tree.init_roots(torch.zeros(2, 3), torch.zeros(2))
    ph = Phases(tree, rule="puct", W=1, max_depth=4, backend="cuda")
    fake_cuda.stream = 2002  # e.g. a torch.cuda.stream(...) context entered after
    ph.select(1)
    ph.expand(1, torch.zeros(2), torch.ones(2), torch.zeros(2, 3), torch.zeros(2))
    ph.backup(1)
    tree.subtree(torch.zeros(2, dtype=torch.int64))
    _check(fake_cuda, {"tree_select", "tree_expand", "tree_backup", "tree_subtree"},
           "Phases")


class TritonRecorder:
    """A Triton kernel module whose functions and kernel launches record the device made
    current (by the faked ``_backend.device_guard``) and then run."""

    def __init__(self, module, rec: Recorder):
        self._module, self._rec = module, rec

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        if callable(obj) and hasattr(obj, "__getitem__"):  # a kernel: kernel[grid](...)
            return _KernelRecorder(obj, name, self._rec)
        if not callable(obj):
            return obj

        def call(*args, **kwargs):
            self._rec.record(name, ())
            return obj(*args, **kwargs)

        return call


class _KernelRecorder:
    def __init__(self, kernel, name, rec):
        self._kernel, self._name, self._rec = kernel, name, rec

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def call(*args, **kwargs):
            self._rec.record(self._name, ())
            return launch(*args, **kwargs)

        return call


@pytest.mark.skipif(not TRITON_ON_CPU, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", [n for n in C.CASES if n != C.SEARCH_CASE])
def test_triton_launches_run_under_the_device_guard(name, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(_backend, "device_guard", rec.device)
    kernels = _backend.triton_kernels
    monkeypatch.setattr(_backend, "triton_kernels",
                        lambda family: TritonRecorder(kernels(family), rec))
    C.run(name, "triton", "tiny")
    assert rec.launches, f"{name}: no Triton launch"
    for launch, guard, _ in rec.launches:
        assert guard == CPU, f"{name}: Triton {launch} launched with the current device " \
                             f"{guard} (no guard for the tensors' device {CPU})"
