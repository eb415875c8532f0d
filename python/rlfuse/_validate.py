"""Input checks shared by the ops.  Every message names the offending argument.

Checks run in Python before any kernel, and touch metadata only (no device sync),
so they are cheap and trace cleanly under torch.compile.  The helpers at the end serve the
data checks of the GPU paths instead: small device tensors, read once per call.
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def tensor(op: str, name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(op: str, name: str, x) -> torch.Tensor:
    tensor(op, name, x)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    return x


def int_tensor(op: str, name: str, x) -> torch.Tensor:
    tensor(op, name, x)
    if x.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: {name} must be an integer tensor (int64 or int32), got {x.dtype}")
    return x


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; "
                "move them to one device"
            )


def shape_equals(op: str, name: str, x: torch.Tensor, shape, what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def positive_float(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {v}")
    return v


def integer(op: str, name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    return int(v)


def temperature(op: str, v) -> float:
    """A temperature: finite, > 0, and with a finite reciprocal (no subnormals)."""
    v = positive_float(op, "temperature", v)
    if not math.isfinite(1.0 / v):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {v}")
    return v


def ids_for_ignore_index(ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Widen narrow integer ids to int64 when ``ignore_index`` does not fit their dtype,
    so that ``ids == ignore_index`` cannot match a wrapped value (torch casts the Python
    int to the tensor's dtype)."""
    if ids.dtype != torch.int64:
        info = torch.iinfo(ids.dtype)
        if not (info.min <= ignore_index <= info.max):
            return ids.to(torch.int64)
    return ids


# ---- Data checks of the GPU paths -----------------------------------------------------
# On a GPU every check of tensor values that decides on the host is a device sync, so the
# GPU paths compute their checks as small device tensors, read them all in one go with the
# results they need on the host (one sync per call), and only when a check fails look for
# the first bad position (with torch, for the message naming it).


def mask_flags(mask) -> list:
    """0-d device tensors telling whether ``mask`` holds a value other than 0 and 1 (read
    them with :func:`read`, judge them with :func:`mask_bad`): none for a bool mask (or
    None); the min and max of an integer mask (one pass over it); for a floating mask, whether
    m (m - 1) is nonzero anywhere (0 exactly for m in {0, 1}; nonzero, inf or NaN for any
    other value)."""
    if mask is None or mask.dtype == torch.bool or mask.numel() == 0:
        return []
    if mask.is_floating_point():
        return [(mask * (mask - 1)).any()]
    return list(mask.aminmax())


def mask_bad(values) -> bool:
    """Whether the host values of :func:`mask_flags` say the mask is not 0/1."""
    if not values:
        return False
    if len(values) == 1:
        return values[0] != 0
    return values[0] < 0 or values[1] > 1


def read(tensors) -> list:
    """The host values of 0-d tensors, read in one go (one device sync on a GPU)."""
    if not tensors:
        return []
    if len(tensors) == 1:
        return [tensors[0].item()]
    return torch.stack(tensors).tolist()
