"""Count the host-side work of an op's Python layer: the aten ops it dispatches, which of them
would synchronise a GPU stream, and the Triton launches.

On a GPU the small ops (policy_loss, value_loss, gae, group_advantages) are bound by this
work: each aten op that computes is a kernel launch (~5 us of host time), and a sync waits for
the whole stream.  Here the Triton backend runs under ``TRITON_INTERPRET=1`` on CPU tensors
with the same Python layer as on a GPU, so its counts are those of a GPU call (the CUDA
backend shares that layer; only the kernel call differs).  What the interpreter does inside a
launch is not counted: each launch counts once.

    with count_host_ops() as c:
        policy_loss(..., backend="triton")
    c.summary()  # {"aten", "compute", "views", "syncs", "h2d", "launches"}: counts

``aten`` counts every dispatched aten op (views included: each costs host time);
``compute`` those that launch a GPU kernel or copy (not views, not ``empty``); ``syncs`` the
ones that read device data on the host (``item``/``bool``/``int``/``float`` of a tensor,
``nonzero``, ``unique``, boolean indexing, ``tolist``); ``h2d`` the tensors made from host
data (``torch.tensor(data, device=...)``: on a GPU a copy from pageable memory, which waits for
the stream as a sync does); ``launches`` the Triton kernels.
"""

from __future__ import annotations

import collections
import contextlib
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from rlfuse import _backend

_ALLOCS = {"empty.memory_format", "empty_strided.default", "empty_like.default",
           "new_empty.default", "new_empty_strided.default"}
_SYNCS = {"_local_scalar_dense.default", "nonzero.default", "_unique2.default",
          "unique_dim.default", "unique_consecutive.default", "masked_select.default",
          "equal.default", "is_nonzero.default", "item.default", "allclose.default",
          "repeat_interleave.Tensor"}


def _name(func) -> str:
    return f"{func.overloadpacket.__name__}.{func._overloadname}"


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self.launches: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            name = _name(func)
            self.ops.append(name)
            if name in _SYNCS or (name == "index.Tensor" and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if len(args) > 1 else []) if i is not None)):
                self.syncs.append(name)
        return func(*args, **kwargs)

    def summary(self) -> dict:
        views = sum(1 for n in self.ops if _is_view(n))
        allocs = sum(1 for n in self.ops if n in _ALLOCS)
        return {"aten": len(self.ops), "compute": len(self.ops) - views - allocs,
                "views": views, "syncs": len(self.syncs),
                "h2d": sum(1 for n in self.ops if n == "lift_fresh.default"),
                "launches": len(self.launches)}

    def table(self) -> collections.Counter:
        return collections.Counter(self.ops)


_VIEW_CACHE: dict = {}


def _is_view(name: str) -> bool:
    if name not in _VIEW_CACHE:
        packet, overload = name.rsplit(".", 1)
        _VIEW_CACHE[name] = bool(getattr(getattr(torch.ops.aten, packet), overload).is_view)
    return _VIEW_CACHE[name]


class _Launch:
    """A Triton kernel whose launches are counted once and run with the counter paused."""

    def __init__(self, kernel, counter, name):
        self._kernel, self._counter, self._name = kernel, counter, name

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            self._counter.launches.append(self._name)
            self._counter.paused += 1
            try:
                with _disable_current_modes():
                    return launch(*args, **kwargs)
            finally:
                self._counter.paused -= 1

        return run

    def __call__(self, *args, **kwargs):  # a @triton.jit helper called inside a kernel
        return self._kernel(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._kernel, name)


@contextlib.contextmanager
def count_host_ops(families=("policy_loss", "advantage")):
    """Count what the ops called inside the block dispatch (see the module docstring).

    The ops take their eager path (as outside the block: a dispatch mode would otherwise send
    them to their registered torch.library op), and ``Tensor.tolist`` counts as a sync."""
    counter = _Counter()
    patched = []
    for fam in families:
        mod = importlib.import_module(f"rlfuse.kernels.{fam}")
        for attr, obj in list(vars(mod).items()):
            if hasattr(obj, "__getitem__") and hasattr(obj, "run") and attr.startswith("_"):
                patched.append((mod, attr, obj))
                setattr(mod, attr, _Launch(obj, counter, attr))
    orig_needed = _backend.library_op_needed
    orig_tolist = torch.Tensor.tolist

    def tolist(self):
        if not counter.paused:
            counter.syncs.append("tolist")
        return orig_tolist(self)

    _backend.library_op_needed = lambda *tensors: False
    torch.Tensor.tolist = tolist
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = orig_tolist
        _backend.library_op_needed = orig_needed
        for mod, attr, obj in patched:
            setattr(mod, attr, obj)
