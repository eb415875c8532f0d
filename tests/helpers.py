"""Shared test utilities."""

from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_ON_CPU = os.environ.get("TRITON_INTERPRET") == "1"


def backends_and_devices(include_torch: bool = True):
    """(backend, device) pairs that can run here."""
    out = [("cpu", "cpu")]
    if include_torch:
        out.append(("torch", "cpu"))
    try:
        import triton  # noqa: F401

        out.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    except ImportError:
        pass
    if HAS_CUDA:
        out.append(("cuda", "cuda"))
    return out


def tol(dtype: torch.dtype) -> dict:
    """Tolerances for float32-accumulated results of inputs in ``dtype``."""
    if dtype == torch.float64:
        return dict(rtol=1e-10, atol=1e-10)
    return dict(rtol=2e-5, atol=2e-5)


def grad_tol(dtype: torch.dtype) -> dict:
    """Gradients are written in the input dtype, so low precision rounds them."""
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-4, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-4),
        torch.bfloat16: dict(rtol=1.6e-2, atol=2e-3),
    }[dtype]


def require_peer(module: str):
    """Import a peer library for an oracle test.

    Locally a missing peer skips the test; under CI (``CI`` set) it fails, because
    `make test` installs every peer and those comparisons must run there.
    """
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except Exception as exc:
        if os.environ.get("CI"):
            raise AssertionError(f"peer {module} must be importable in CI: {exc}") from exc
        pytest.skip(f"peer {module} not importable: {exc}")
