"""Shared input builders for the reliability tests: memory layouts, masks with holes, extreme
values, and per-backend example budgets."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

from tests.helpers import HAS_CUDA, TRITON_ON_CPU

# Backends that run on this machine (Triton under the interpreter on CPU tensors).
BACKENDS = ["cpu", "torch"] + (["triton"] if TRITON_ON_CPU or HAS_CUDA else [])
DEVICE = {"cpu": "cpu", "torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}
# The backends that take the CPU tensors that the error-table rows and the thread cases
# build: Triton only under the interpreter (compiled Triton needs CUDA tensors and refuses
# CPU ones with a RuntimeError before any check runs).
CPU_BACKENDS = [b for b in BACKENDS if DEVICE[b] == "cpu"]

LAYOUTS = ("contiguous", "offset", "strided", "transposed")
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32)


def budget(backend: str, cap: int = 8):
    """Hypothesis settings for one backend: the loaded profile's example count, cut for the
    Triton interpreter (one interpreted launch costs ~100x a compiled one)."""
    n = settings.default.max_examples
    if backend == "triton" and TRITON_ON_CPU:
        n = max(3, min(n // 3, cap if n <= 25 else n // 3))
    return settings(max_examples=n)


def laid_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``x`` in another memory layout: a view with a storage offset, a strided
    view of the last dimension, or (for >= 2-D) a transposed copy viewed back.  The result
    compares equal to ``x`` element by element."""
    if layout == "contiguous" or x.dim() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    if layout == "offset":
        flat = torch.empty(x.numel() + 3, dtype=x.dtype, device=x.device)
        flat.fill_(float("nan") if x.is_floating_point() else 7)
        out = flat[3:].view(x.shape)
        out.copy_(x)
        return out
    if layout == "strided":
        big = torch.empty(*x.shape[:-1], 2 * x.shape[-1] + 1, dtype=x.dtype, device=x.device)
        big.fill_(float("nan") if x.is_floating_point() else 7)
        out = big[..., 1::2]
        out.copy_(x)
        return out
    if layout == "transposed":
        if x.dim() < 2:
            return laid_out(x, "strided")
        return x.transpose(0, 1).clone(memory_format=torch.contiguous_format).transpose(0, 1)
    raise ValueError(layout)


def holes_mask(B: int, T: int, gen: torch.Generator, kind: str) -> torch.Tensor:
    """bool [B, T]: right/left padding, random holes, empty rows, or all valid."""
    if B * T == 0:
        return torch.zeros(B, T, dtype=torch.bool)
    if kind == "right":
        L = torch.randint(0, T + 1, (B,), generator=gen)
        return torch.arange(T)[None] < L[:, None]
    if kind == "left":
        L = torch.randint(0, T + 1, (B,), generator=gen)
        return torch.arange(T)[None] >= (T - L)[:, None]
    if kind == "holes":
        m = torch.rand(B, T, generator=gen) > 0.4
        m[0] = False  # an empty row
        return m
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    raise ValueError(kind)


MASK_KINDS = ("right", "left", "holes", "full")


def values(shape, gen, kind: str, dtype=torch.float64) -> torch.Tensor:
    """float64 values of one magnitude class: normal, large (1e4), tiny (subnormal in
    float32), or mixed with exact zeros."""
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    if kind == "large":
        x = x * 1e4
    elif kind == "subnormal":
        x = x * 1e-40
    elif kind == "zeros":
        x = torch.where(torch.rand(tuple(shape), generator=gen) < 0.5, torch.zeros_like(x), x)
    return x.to(dtype)


MAGNITUDES = ("normal", "large", "subnormal", "zeros")

seeds = st.integers(0, 2**31 - 1)
