"""Tensors without storage: every public op under ``FakeTensorMode`` and on ``meta`` tensors
gives the output shapes and dtypes of its registered fake implementation (the eager fast
paths that hand ``data_ptr()`` to the C++ kernels route such inputs to the registered
torch.library ops), and the C++ entry points raise ``ValueError`` for a null pointer where
they would have crashed.

The ops run in a fresh interpreter: a crash (SIGSEGV) there fails the test instead of
killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rlfuse import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r'''
import contextlib, sys, torch
from torch._subclasses.fake_tensor import FakeTensorMode
from rlfuse.ops import (discounted_returns, gae, group_advantages, kl_penalty,
    linear_token_logprobs, masked_mean, masked_var, masked_whiten, policy_loss,
    preference_logps, preference_loss, preference_loss_from_hidden, sequence_logprobs,
    token_logprobs, token_rewards, value_loss)

mode, backend = sys.argv[1], sys.argv[2]
be = None if backend == "default" else backend
dev = "meta" if mode == "meta" else "cpu"
B, T, V, H = 4, 6, 11, 5


def f(*s, grad=False):
    return torch.randn(*s, device=dev).requires_grad_(grad)


def cases():
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    m = torch.ones(B, T, device=dev)
    lp = f(B, T, grad=True)
    yield "token_logprobs", lambda: token_logprobs(f(B, T, V, grad=True), ids, backend=be)
    yield "linear_token_logprobs", lambda: linear_token_logprobs(
        f(B, T, H, grad=True), f(V, H, grad=True), ids, backend=be)
    yield "sequence_logprobs logits", lambda: sequence_logprobs(
        ids, logits=f(B, T, V, grad=True), mask=m, backend=be).sum
    yield "sequence_logprobs hidden", lambda: sequence_logprobs(
        ids, hidden=f(B, T, H, grad=True), weight=f(V, H), mask=m, backend=be).sum
    yield "gae", lambda: gae(f(B, T), f(B, T), m, gamma=0.9, lam=0.9, backend=be)[0]
    yield "discounted_returns", lambda: discounted_returns(f(B, T), m, 0.9, backend=be)
    yield "masked_mean", lambda: masked_mean(f(B, T), m, backend=be)
    yield "masked_var", lambda: masked_var(f(B, T), m, backend=be)
    yield "masked_whiten", lambda: masked_whiten(f(B, T), m, backend=be)
    yield "group_advantages", lambda: group_advantages(f(B), group_size=2, backend=be)
    yield "group_advantages [B, T]", lambda: group_advantages(f(B, T), group_size=2, mask=m,
                                                              backend=be)
    yield "token_rewards", lambda: token_rewards(f(B), m, backend=be)
    yield "kl_penalty", lambda: kl_penalty(lp, f(B, T), backend=be)
    yield "policy_loss", lambda: policy_loss(lp, f(B, T), f(B), m, backend=be)[0]
    yield "value_loss", lambda: value_loss(lp, f(B, T), f(B, T), m, backend=be)[0]
    yield "preference_loss", lambda: preference_loss(f(2, grad=True), f(2), f(2), f(2),
                                                     backend=be)[0]
    yield "preference_logps", lambda: preference_logps(f(B, T, H), f(V, H), ids, mask=m,
                                                       backend=be).chosen
    yield "preference_loss_from_hidden", lambda: preference_loss_from_hidden(
        f(B, T, H, grad=True), f(V, H, grad=True), ids, ref_chosen_logps=f(2),
        ref_rejected_logps=f(2), mask=m, backend=be)[0]


with (FakeTensorMode() if mode == "fake" else contextlib.nullcontext()):
    for name, fn in cases():
        try:
            out = fn()
            note = ""
            if out.requires_grad:
                out.sum().backward()
                note = " backward"
            print(f"{name}|{tuple(out.shape)}|{out.dtype}|{type(out).__name__}|{out.device}"
                  f"{note}", flush=True)
        except Exception as e:  # reported (and failed) by the test
            print(f"{name}|ERROR {type(e).__name__}: {e}", flush=True)
'''

# name -> (shape, has a backward)
_EXPECTED = {
    "token_logprobs": ((4, 6), True),
    "linear_token_logprobs": ((4, 6), True),
    "sequence_logprobs logits": ((4,), True),
    "sequence_logprobs hidden": ((4,), True),
    "gae": ((4, 6), False),
    "discounted_returns": ((4, 6), False),
    "masked_mean": ((), False),
    "masked_var": ((), False),
    "masked_whiten": ((4, 6), False),
    "group_advantages": ((4,), False),
    "group_advantages [B, T]": ((4, 6), False),
    "token_rewards": ((4, 6), False),
    "kl_penalty": ((4, 6), True),
    "policy_loss": ((), True),
    "value_loss": ((), True),
    "preference_loss": ((), True),
    "preference_logps": ((2,), False),
    "preference_loss_from_hidden": ((), True),
}


@pytest.mark.parametrize("mode", ["fake", "meta"])
@pytest.mark.parametrize("backend", ["default", "cpu", "torch"])
def test_ops_on_tensors_without_storage(mode, backend):
    if mode == "meta" and backend == "cpu":
        pytest.skip("backend='cpu' refuses meta tensors (a device error, tested elsewhere)")
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode, backend], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    rows = dict(line.split("|", 1) for line in out.stdout.strip().splitlines())
    assert set(rows) == set(_EXPECTED), out.stdout
    for name, (shape, backward) in _EXPECTED.items():
        got = rows[name]
        assert "ERROR" not in got, f"{name}: {got}"
        shp, dtype, kind, device = got.split("|")
        assert shp == str(shape) and dtype == "torch.float32", f"{name}: {got}"
        if mode == "fake":
            assert kind.startswith("FakeTensor") and device.startswith("cpu"), f"{name}: {got}"
        else:
            assert device.startswith("meta"), f"{name}: {got}"
        assert device.endswith(" backward") == backward, f"{name}: {got}"


def test_library_op_needed():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.ones(2)
    assert not _backend.library_op_needed(x, None, torch.nn.Parameter(torch.ones(1)))
    assert _backend.library_op_needed(x, torch.ones(2, device="meta"))
    with FakeTensorMode() as fm:
        assert _backend.library_op_needed(x)  # real inputs, but outputs would be fake
        y = fm.from_tensor(x)
    assert _backend.library_op_needed(y)


_NULL_SCRIPT = r"""
import importlib
from rlfuse import _backend
C = _backend.cpu_module()
pl = importlib.import_module("rlfuse.ops.policy_loss")
ia = [0] * pl._PI_N
ia[pl._PI["B"]], ia[pl._PI["T"]] = 2, 3
calls = [
    lambda: C.token_logprobs_fwd(0, 0, 1, 4, 0, 5, 5, 0, 1, 0, 0, 0, 1.0, -100, 1),
    lambda: C.token_logprobs_bwd(0, 0, 1, 4, 0, 5, 5, 0, 1, 0, 0, 0, 0, 0, 1.0, -100, 1),
    lambda: C.policy_loss_fwd(ia, [0.0] * len(pl._PF)),
    lambda: C.group_advantages(0, 4, 0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 1e-6, -1.0, 1, 1.0, 0, 0,
                               0, 0, 0, 0, 0, 0, 0, 1),
]
for call in calls:
    try:
        call()
        print("no error")
    except ValueError as e:
        print("ValueError", e)
# empty tensors (data_ptr() == 0 legitimately) still run
print("empty", C.token_logprobs_fwd(0, 0, 0, 0, 0, 0, 5, 0, 1, 0, 0, 0, 1.0, -100, 1))
"""


def test_cpu_entry_points_refuse_null_pointers():
    """The last line of defence: a null pointer of a non-empty tensor is a ValueError, not
    a SIGSEGV (in a fresh interpreter)."""
    out = subprocess.run([sys.executable, "-c", _NULL_SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    lines = out.stdout.strip().splitlines()
    want = ["token_logprobs_fwd: logits", "token_logprobs_bwd: logits", "policy_loss_fwd: logp",
            "group_advantages: scores"]
    assert len(lines) == len(want) + 1, out.stdout
    for line, w in zip(lines, want):
        assert line.startswith(f"ValueError rlfuse._C.{w} has no data"), line
    assert lines[-1] == "empty -1"
