"""Backend discovery and selection shared by every op family.

Backends:
    "cpu"     C++ with OpenMP in rlfuse._C (built for several ISA levels, one picked at run time)
    "cuda"    C++/CUDA in rlfuse._cuda (built when nvcc was found at install time)
    "triton"  Triton kernels in rlfuse.kernels (GPU; on the CPU only under TRITON_INTERPRET=1)
    "torch"   the plain-torch reference implementation (the specification)

The default is picked from the tensors' device; ``backend=`` and the ``RLFUSE_BACKEND``
environment variable override it.  Asking for a backend that cannot run here raises
``RuntimeError`` naming what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import platform
import threading

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")

# Dtype codes shared with csrc/include/rlfuse/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}


def _try_import(name: str):
    """Import rlfuse.<name> (an extension module); return (module, error string)."""
    try:
        return importlib.import_module(f"rlfuse.{name}"), None
    except ImportError as exc:  # not built, or built for another platform
        return None, f"{type(exc).__name__}: {exc}"


# Probed once at import so that dispatch is plain attribute lookups (traceable by
# torch.compile); triton itself is imported only when a Triton kernel is first used.
_EXTENSIONS = {name: _try_import(name) for name in ("_C", "_cuda")}
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def _load(name: str):
    return _EXTENSIONS[name]


def cpu_module():
    mod, err = _load("_C")
    if mod is None:
        raise RuntimeError(
            "rlfuse backend 'cpu' is unavailable: the extension rlfuse._C failed to import "
            f"({err}). Reinstall with `pip install --no-build-isolation -e .`."
        )
    return mod


def cuda_module():
    mod, err = _load("_cuda")
    if mod is None:
        raise RuntimeError(
            "rlfuse backend 'cuda' is unavailable: rlfuse._cuda was not built (no nvcc at "
            f"install time, or RLFUSE_CUDA=OFF) or failed to import ({err})."
        )
    return mod


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_error() -> str | None:
    return None if _TRITON_FOUND else "triton is not installed"


# The Triton interpreter patches triton.language globally while it runs a kernel, so two
# Python threads interpreting kernels at once break each other: interpreted launches are
# serialised (compiled GPU launches are not affected).
_INTERPRETER_LOCK = threading.RLock()


class _Serialised:
    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        if callable(obj) and hasattr(obj, "__getitem__"):  # a @triton.jit kernel: kernel[grid]
            return _SerialisedKernel(obj)
        return _locked(obj) if callable(obj) else obj


class _SerialisedKernel:
    def __init__(self, kernel):
        self._kernel = kernel

    def __getitem__(self, grid):
        return _locked(self._kernel[grid])

    def __getattr__(self, name):
        return getattr(self._kernel, name)


def _locked(fn):
    @functools.wraps(fn)
    def locked(*args, **kwargs):
        with _INTERPRETER_LOCK:
            return fn(*args, **kwargs)

    return locked


def triton_kernels(family: str):
    """Import rlfuse.kernels.<family> (Triton), or raise a clear error."""
    err = _triton_error()
    if err is not None:
        raise RuntimeError(f"rlfuse backend 'triton' is unavailable: {err}")
    module = importlib.import_module(f"rlfuse.kernels.{family}")
    return _Serialised(module) if triton_interpreted() else module


def available(backend: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``backend`` can run ops on tensors of ``device``."""
    device = torch.device(device)
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and _load("_C")[0] is not None
    if backend == "cuda":
        return device.type == "cuda" and _load("_cuda")[0] is not None
    if backend == "triton":
        if _triton_error() is not None:
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """Pick the backend for one call: argument, then RLFUSE_BACKEND, then by device."""
    chosen = backend if backend is not None else os.environ.get("RLFUSE_BACKEND") or None
    if chosen is None:
        if device.type == "cpu":
            chosen = "cpu" if available("cpu", device) else "torch"
        elif device.type == "cuda":
            if available("cuda", device):
                chosen = "cuda"
            elif available("triton", device):
                chosen = "triton"
            else:
                chosen = "torch"
        else:
            chosen = "torch"
        return chosen
    if chosen not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {chosen!r}")
    if not available(chosen, device):
        if chosen == "cpu":
            if device.type != "cpu":
                raise RuntimeError(f"{op}: backend 'cpu' cannot run on {device} tensors")
            cpu_module()  # raises with the import error
        if chosen == "cuda":
            if device.type != "cuda":
                raise RuntimeError(f"{op}: backend 'cuda' needs CUDA tensors, got {device}")
            cuda_module()
        if chosen == "triton":
            err = _triton_error()
            if err is not None:
                raise RuntimeError(f"{op}: backend 'triton' is unavailable: {err}")
            raise RuntimeError(
                f"{op}: backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU "
                f"tensors), got {device}"
            )
        raise RuntimeError(f"{op}: backend {chosen!r} is unavailable for {device}")
    return chosen


# Tensor types whose data the kernels may read through data_ptr().
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def library_op_needed(*tensors) -> bool:
    """Whether an op must go through its registered ``torch.library`` op instead of the eager
    fast path that hands ``data_ptr()`` to the kernels: under ``torch.compile`` tracing, under
    an active ``TorchDispatchMode`` (``FakeTensorMode`` among them: the outputs it allocates
    have no storage), and for inputs without real storage, a ``meta`` tensor, a
    ``FakeTensor`` or any other tensor subclass.  The registered op's fake implementation
    then gives the output shapes where a kernel would have been handed a null pointer.
    ``None`` entries are skipped.  About 0.1 us per tensor."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or t.is_meta):
            return True
    return False


def num_threads() -> int:
    """Threads for the CPU kernels: follows torch.set_num_threads."""
    return max(1, torch.get_num_threads())


# Elements of work per CPU thread below which another OpenMP thread costs more than it
# saves (waking a thread is ~5-50 us, far more on a loaded machine; a kernel streams ~32k
# float elements in a few us).  Results never depend on the thread count.
THREAD_GRAIN = 32768


def threads_for(work: int) -> int:
    """Threads for a CPU kernel over ``work`` elements: one per THREAD_GRAIN, at most
    :func:`num_threads`."""
    return max(1, min(num_threads(), int(work) // THREAD_GRAIN))


def cuda_stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@contextlib.contextmanager
def cuda_launch(device: torch.device):
    """Context of a call into rlfuse._cuda on tensors of ``device``; gives the handle of
    that device's current stream (looked up at each call, so that a stream made current
    after an object was built is used).

    The extension's launchers take no device argument: they launch on the current CUDA
    device, so ``device`` is made current for the call (tensors on cuda:1 while cuda:0 is
    current would otherwise be read by kernels on the wrong device).  Every call site of
    rlfuse._cuda goes through here (tests/reliability/test_device_guard.py)."""
    with torch.cuda.device(device):
        yield cuda_stream(device)


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the current
    device too), a no-op context otherwise (CPU tensors, the Triton interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def info() -> dict:
    """Versions, and which backends are built and usable on this machine."""
    out = {
        "rlfuse": importlib.import_module("rlfuse").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    c, c_err = _load("_C")
    out["backends"] = {
        "cpu": {
            "built": c is not None,
            "available": c is not None,
            "isa": c.active_isa() if c is not None else None,
            "openmp": bool(c.openmp()) if c is not None else None,
            "threads": num_threads(),
            "error": c_err,
        },
    }
    cu, cu_err = _load("_cuda")
    has_gpu = torch.cuda.is_available()
    out["backends"]["cuda"] = {
        "built": cu is not None,
        "available": cu is not None and has_gpu,
        "device": torch.cuda.get_device_name(0) if has_gpu else None,
        "error": cu_err,
    }
    terr = _triton_error()
    out["backends"]["triton"] = {
        "built": terr is None,
        "available": terr is None and (has_gpu or triton_interpreted()),
        "interpreted": triton_interpreted(),
        "error": terr,
    }
    out["backends"]["torch"] = {"built": True, "available": True}
    return out
