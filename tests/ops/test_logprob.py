"""rlfuse.ops.token_logprobs: parity, gradients, batch invariance, bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlfuse
from rlfuse import _backend
from rlfuse.ops import token_logprobs, token_logprobs_reference
from tests.helpers import HAS_CUDA, TRITON_ON_CPU, backends_and_devices, grad_tol, tol

BACKENDS = backends_and_devices()
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]


def _ref(logits, ids, temperature=1.0, ignore_index=-100):
    """float64 reference values computed from the (already rounded) input."""
    return token_logprobs_reference(
        logits.detach().double(), ids, temperature=temperature, return_entropy=True,
        ignore_index=ignore_index,
    )


def _inputs(shape, V, dtype, device, scale=3.0, ignore_frac=0.0, ignore_index=-100):
    logits = (torch.randn(*shape, V, dtype=torch.float64) * scale).to(dtype).to(device)
    ids = torch.randint(0, V, shape, device=device)
    if ignore_frac > 0:
        ids[torch.rand(shape, device=device) < ignore_frac] = ignore_index
    return logits, ids


def _grads(logits, ids, backend, temperature, g_lp, g_ent, ignore_index=-100):
    x = logits.detach().clone().requires_grad_()
    lp, ent = token_logprobs(
        x, ids, temperature=temperature, return_entropy=True, ignore_index=ignore_index,
        backend=backend,
    )
    (lp * g_lp + ent * g_ent).sum().backward()
    return x.grad


def _ref_grads(logits, ids, temperature, g_lp, g_ent, ignore_index=-100):
    x = logits.detach().double().requires_grad_()
    lp, ent = token_logprobs_reference(
        x, ids, temperature=temperature, return_entropy=True, ignore_index=ignore_index
    )
    (lp * g_lp.double() + ent * g_ent.double()).sum().backward()
    return x.grad


# ------------------------------------------------------------------ parity (fixed shapes)
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_forward_parity(backend, device, dtype):
    small = backend == "triton" and TRITON_ON_CPU
    shape, V = ((3, 5), 300) if small else ((4, 33), 5000)
    logits, ids = _inputs(shape, V, dtype, device, ignore_frac=0.2)
    lp, ent = token_logprobs(logits, ids, temperature=0.7, return_entropy=True, backend=backend)
    rlp, rent = _ref(logits, ids, temperature=0.7)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    assert lp.shape == shape and ent.shape == shape
    torch.testing.assert_close(lp.double().cpu(), rlp.cpu(), **tol(dtype))
    torch.testing.assert_close(ent.double().cpu(), rent.cpu(), **tol(dtype))
    ignored = ids == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_backward_parity(backend, device, dtype):
    small = backend == "triton" and TRITON_ON_CPU
    shape, V = ((2, 4), 257) if small else ((3, 17), 3001)
    logits, ids = _inputs(shape, V, dtype, device, ignore_frac=0.2)
    g_lp = torch.randn(shape, device=device)
    g_ent = torch.randn(shape, device=device)
    got = _grads(logits, ids, backend, 1.3, g_lp, g_ent)
    want = _ref_grads(logits, ids, 1.3, g_lp, g_ent)
    assert got.dtype == dtype and got.shape == logits.shape
    torch.testing.assert_close(got.double().cpu(), want.cpu(), **grad_tol(dtype))
    assert (got[ids == -100] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backward_each_output_alone(backend, device):
    """Upstream gradient on only one output (the other is None in backward)."""
    logits, ids = _inputs((2, 6), 129, torch.float32, device)
    x = logits.clone().requires_grad_()
    lp = token_logprobs(x, ids, backend=backend)
    (lp * 2).sum().backward()
    want = _ref_grads(logits, ids, 1.0, torch.full((2, 6), 2.0), torch.zeros(2, 6))
    torch.testing.assert_close(x.grad.double().cpu(), want.cpu(), **grad_tol(torch.float32))

    x = logits.clone().requires_grad_()
    _, ent = token_logprobs(x, ids, return_entropy=True, backend=backend)
    ent.sum().backward()
    want = _ref_grads(logits, ids, 1.0, torch.zeros(2, 6), torch.ones(2, 6))
    torch.testing.assert_close(x.grad.double().cpu(), want.cpu(), **grad_tol(torch.float32))


# ------------------------------------------------------------------ parity (hypothesis)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    V=st.integers(1, 2100),
    dtype=st.sampled_from(LOW_PRECISION),
    temperature=st.floats(0.25, 4.0),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    int32_ids=st.booleans(),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpu_parity_random_shapes(lead, V, dtype, temperature, scale, int32_ids, ignore_frac, seed):
    torch.manual_seed(seed)
    shape = tuple(lead)
    logits, ids = _inputs(shape, V, dtype, "cpu", scale=scale, ignore_frac=ignore_frac)
    if int32_ids:
        ids = ids.to(torch.int32)
    lp, ent = token_logprobs(logits, ids, temperature=temperature, return_entropy=True)
    rlp, rent = _ref(logits, ids, temperature)
    torch.testing.assert_close(lp.double(), rlp, rtol=3e-5, atol=3e-5 * scale)
    torch.testing.assert_close(ent.double(), rent, rtol=3e-5, atol=3e-5 * scale)
    if logits.numel() and shape:
        g_lp, g_ent = torch.randn(shape), torch.randn(shape)
        got = _grads(logits, ids, "cpu", temperature, g_lp, g_ent)
        want = _ref_grads(logits, ids, temperature, g_lp, g_ent)
        t = grad_tol(dtype)
        torch.testing.assert_close(got.double(), want, rtol=t["rtol"], atol=t["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen_vocab(dtype):
    V = 151936
    logits, ids = _inputs((3,), V, dtype, "cpu", scale=4.0)
    ids[1] = V - 1
    lp, ent = token_logprobs(logits, ids, return_entropy=True)
    rlp, rent = _ref(logits, ids)
    torch.testing.assert_close(lp.double(), rlp, **tol(dtype))
    torch.testing.assert_close(ent.double(), rent, rtol=1e-5, atol=1e-4)
    g = torch.randn(3)
    got = _grads(logits, ids, "cpu", 1.0, g, g)
    want = _ref_grads(logits, ids, 1.0, g, g)
    torch.testing.assert_close(got.double(), want, **grad_tol(dtype))


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(backend):
    logits = torch.randn(3, 4, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (3, 4))
    ids[0, 1] = -100

    def f(x):
        return token_logprobs(x, ids, temperature=0.8, return_entropy=True, backend=backend)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_views_without_copy(backend, device):
    """logits[:, :-1] (the label-shift view), a transposed batch and a strided vocab."""
    full = torch.randn(3, 9, 130, device=device)
    ids = torch.randint(0, 130, (3, 8), device=device)
    view = full[:, :-1]
    assert not view.is_contiguous()
    lp, ent = token_logprobs(view, ids, return_entropy=True, backend=backend)
    rlp, rent = _ref(view, ids)
    torch.testing.assert_close(lp.double().cpu(), rlp.cpu(), **tol(torch.float32))
    torch.testing.assert_close(ent.double().cpu(), rent.cpu(), **tol(torch.float32))

    t = torch.randn(8, 3, 130, device=device).transpose(0, 1)  # [3, 8, V], outer stride < inner
    lp = token_logprobs(t, ids, backend=backend)
    torch.testing.assert_close(lp.double().cpu(), _ref(t, ids)[0].cpu(), **tol(torch.float32))

    sv = torch.randn(3, 8, 260, device=device)[..., ::2]  # vocab stride 2 -> copied
    lp = token_logprobs(sv, ids, backend=backend)
    torch.testing.assert_close(lp.double().cpu(), _ref(sv, ids)[0].cpu(), **tol(torch.float32))

    # Four leading dims that cannot be described by two strides.
    g = torch.randn(2, 3, 4, 5, 40, device=device)[:, :, 1:, ::2]
    gids = torch.randint(0, 40, g.shape[:-1], device=device)
    lp = token_logprobs(g, gids, backend=backend)
    torch.testing.assert_close(lp.double().cpu(), _ref(g, gids)[0].cpu(), **tol(torch.float32))


def test_view_gradient_lands_in_place():
    full = torch.randn(2, 6, 50, requires_grad=True)
    ids = torch.randint(0, 50, (2, 5))
    token_logprobs(full[:, :-1], ids).sum().backward()
    x = full.detach().double().requires_grad_()
    token_logprobs_reference(x[:, :-1], ids).sum().backward()
    torch.testing.assert_close(full.grad.double(), x.grad, **grad_tol(torch.float32))
    assert (full.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_empty_inputs(backend, device):
    logits = torch.randn(0, 7, 10, device=device, requires_grad=True)
    ids = torch.zeros(0, 7, dtype=torch.long, device=device)
    lp, ent = token_logprobs(logits, ids, return_entropy=True, backend=backend)
    assert lp.shape == (0, 7) and ent.shape == (0, 7)
    (lp.sum() + ent.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_single_position_and_vocab_of_one():
    lp, ent = token_logprobs(torch.tensor([2.5]), torch.tensor(0), return_entropy=True)
    assert lp.shape == () and lp.item() == 0.0 and ent.item() == 0.0


# ------------------------------------------------------------------ extreme values
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_large_and_neg_inf_logits(backend, device):
    V = 200
    logits = torch.randn(4, V, dtype=torch.float64) * 1e4
    logits[1, ::3] = float("-inf")  # masked vocabulary entries
    logits[2, 5] = 1e4 + 1.0
    logits[3, :] = float("-inf")
    logits[3, 7] = 0.0  # one finite entry: p = 1, entropy 0
    logits = logits.float().to(device)
    ids = torch.tensor([0, 1, 5, 7], device=device)  # row 1 targets a finite entry
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, ids, return_entropy=True, backend=backend)
    rlp, rent = _ref(logits, ids)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(lp.double().cpu(), rlp.cpu(), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(ent.double().cpu(), rent.cpu(), rtol=1e-6, atol=1e-3)
    (lp.sum() + ent.sum()).backward()
    assert torch.isfinite(x.grad).all()
    want = _ref_grads(logits, ids, 1.0, torch.ones(4), torch.ones(4))
    torch.testing.assert_close(x.grad.double().cpu(), want.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_target_at_neg_inf_and_nan_rows(backend, device):
    logits = torch.randn(3, 50, device=device)
    logits[0, 4] = float("-inf")
    logits[1, 9] = float("nan")
    ids = torch.tensor([4, 0, 1], device=device)
    lp, ent = token_logprobs(logits, ids, return_entropy=True, backend=backend)
    assert lp[0].item() == float("-inf") and torch.isfinite(ent[0])
    assert torch.isnan(lp[1]) and torch.isnan(ent[1])
    assert torch.isfinite(lp[2]) and torch.isfinite(ent[2])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_leading_blocks_without_finite_values(backend, device):
    """A NaN before the first finite logit makes the row NaN, however far into the row the
    first finite value is (the CPU kernel walks rows in 2048-element blocks and skipped the
    leading blocks that hold no finite value, NaN included)."""
    V = 5000
    logits = torch.randn(6, V, dtype=torch.float64)
    logits[0, :2048] = float("nan")  # a whole leading block of NaN
    logits[1, :2048] = float("-inf")  # a masked leading block with one NaN
    logits[1, 7] = float("nan")
    logits[2, :4096] = float("-inf")  # two masked blocks, the NaN in the second
    logits[2, 3000] = float("nan")
    logits[3, :4500] = float("-inf")  # a NaN in the last block, before its first finite value
    logits[3, 4200] = float("nan")
    logits[4, :4096] = float("-inf")  # masked leading blocks without NaN: finite results
    logits[5, 2047] = float("nan")  # NaN next to finite values (always handled)
    logits = logits.float().to(device)
    ids = torch.full((6,), 4700, device=device)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, ids, return_entropy=True, backend=backend)
    nan_rows = [0, 1, 2, 3, 5]
    assert torch.isnan(lp[nan_rows]).all() and torch.isnan(ent[nan_rows]).all(), (lp, ent)
    rlp, rent = _ref(logits, ids)
    torch.testing.assert_close(lp[4].double().cpu(), rlp[4].cpu(), **tol(torch.float32))
    torch.testing.assert_close(ent[4].double().cpu(), rent[4].cpu(), **tol(torch.float32))
    (lp.sum() + ent.sum()).backward()
    assert torch.isnan(x.grad[nan_rows]).all()
    want = _ref_grads(logits[4:5], ids[4:5], 1.0, torch.ones(1), torch.ones(1))
    torch.testing.assert_close(x.grad[4:5].double().cpu(), want.cpu(), **grad_tol(torch.float32))


def test_probability_near_one_gradient():
    """p_y -> 1: the target gradient g (1 - p_y) must be as good as float32 allows, never
    the garbage of rounding p_y to low precision first (Liger #1329)."""
    logits = torch.zeros(3, 1000)
    logits[:, 3] = torch.tensor([7.0, 12.0, 20.0])  # p_y = 0.99..., 0.9939, 0.999998
    ids = torch.tensor([3, 3, 3])
    want = _ref_grads(logits, ids, 1.0, torch.ones(3), torch.zeros(3))[:, 3]
    x32 = logits.clone().requires_grad_()
    token_logprobs_reference(x32, ids).sum().backward()
    torch_err = (x32.grad[:, 3].double() - want).abs()
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype).detach().requires_grad_()
        token_logprobs(x, ids).sum().backward()
        assert (x.grad[:, 3] > 0).all()
        if dtype == torch.float32:
            err = (x.grad[:, 3].double() - want).abs()
            assert (err <= 2 * torch_err + 1e-7).all(), (err, torch_err)
        else:  # one bf16 rounding of the float32 result
            torch.testing.assert_close(x.grad[:, 3].double(), want, rtol=1e-2, atol=3e-6)


# ------------------------------------------------------------------ batch invariance
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance_bitwise(dtype):
    logits = (torch.randn(64, 4099) * 4).to(dtype)
    ids = torch.randint(0, 4099, (64,))
    full_lp, full_ent = token_logprobs(logits, ids, return_entropy=True)
    for rows in (slice(0, 1), slice(5, 6), slice(10, 13), slice(63, 64)):
        lp, ent = token_logprobs(logits[rows].clone(), ids[rows].clone(), return_entropy=True)
        assert torch.equal(lp, full_lp[rows]) and torch.equal(ent, full_ent[rows])
    # Row order and batch composition do not matter either.
    perm = torch.randperm(64)
    lp, ent = token_logprobs(logits[perm], ids[perm], return_entropy=True)
    assert torch.equal(lp, full_lp[perm]) and torch.equal(ent, full_ent[perm])


def test_thread_count_invariance_bitwise():
    logits = torch.randn(33, 3000, requires_grad=True)
    ids = torch.randint(0, 3000, (33,))
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lp, ent = token_logprobs(logits, ids, return_entropy=True)
            (g,) = torch.autograd.grad((lp + ent).sum(), logits)
            results.append((lp, ent, g))
    finally:
        torch.set_num_threads(old)
    for lp, ent, g in results[1:]:
        assert torch.equal(lp, results[0][0]) and torch.equal(ent, results[0][1])
        assert torch.equal(g, results[0][2])


def test_concurrent_python_threads():
    logits = torch.randn(16, 2000)
    ids = torch.randint(0, 2000, (16,))
    want = token_logprobs(logits, ids)
    errors = []

    def work():
        for _ in range(20):
            if not torch.equal(token_logprobs(logits, ids), want):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("isa", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_every_isa_build(isa):
    c = _backend.cpu_module()
    old = c.active_isa()
    if not c.set_isa(isa):
        pytest.skip(f"this CPU lacks {isa}")
    try:
        logits, ids = _inputs((5, 7), 2051, torch.float32, "cpu", ignore_frac=0.2)
        lp, ent = token_logprobs(logits, ids, return_entropy=True)
        rlp, rent = _ref(logits, ids)
        torch.testing.assert_close(lp.double(), rlp, **tol(torch.float32))
        torch.testing.assert_close(ent.double(), rent, **tol(torch.float32))
        g = torch.randn(5, 7)
        got = _grads(logits, ids, "cpu", 1.0, g, g)
        torch.testing.assert_close(
            got.double(), _ref_grads(logits, ids, 1.0, g, g), **grad_tol(torch.float32)
        )
    finally:
        c.set_isa(old)


def _low_temperature_case(dtype):
    """T = 1e-3: rows 0-3 have p = 1 at their target (the argmax, the runner-up far behind),
    so the float64 gradient is below 1e-9; rows 4-7 have near ties (gaps of T / 2 to 4 T)
    with the target on the top logit or the runner-up."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1000, generator=g, dtype=torch.float64) * 3
    ids = x.argmax(-1)
    for r in range(4, 8):
        x[r, :5] = x[r].max() + 1.0 - torch.tensor([0.0, 0.5e-3, 1e-3, 2e-3, 4e-3]).double()
    ids[4:6] = 0
    ids[6:] = 1
    x = x.to(dtype)
    g_lp = torch.randn(8, generator=g)
    g_ent = torch.randn(8, generator=g)
    want = _ref_grads(x, ids, 1e-3, g_lp, g_ent)
    return x, ids, g_lp, g_ent, want


def _check_low_temperature_grads(got, want, dtype):
    got = got.double().cpu()
    # p = 1 rows: as float64 (before the fix, float32: 0.1 off at the target on FMA
    # builds).  float64 resolves log p only to ulp(lse) ~ 2e-12, times 1 / T.
    err = (got[:4] - want[:4]).abs().max()
    assert err <= (1e-6 if dtype == torch.float32 else 1e-8), err
    # near ties: a few ulp of z = x / T ~ 1e4 in float32 (~1e-3 relative in p; torch's
    # float32 log_softmax is within a factor 3 of this)
    scale = want[4:].abs().amax(-1, keepdim=True)
    rel = 5e-3 if dtype == torch.float32 else 1e-11
    assert ((got[4:] - want[4:]).abs() <= rel * scale).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_low_temperature_gradient_every_isa(isa, dtype):
    """The backward forms log p = x / T - lse with x / T rounded first, as the forward rounds
    m / T into lse; a contracted x * (1/T) - lse (an FMA on the x86-64-v3/v4 builds) made the
    gradient at a target with p = 1 -0.107 instead of 0 at T = 1e-3."""
    c = _backend.cpu_module()
    old = c.active_isa()
    if not c.set_isa(isa):
        pytest.skip(f"this CPU lacks {isa}")
    try:
        x, ids, g_lp, g_ent, want = _low_temperature_case(dtype)
        got = _grads(x, ids, "cpu", 1e-3, g_lp.to(dtype), g_ent.to(dtype))
        _check_low_temperature_grads(got, want, dtype)
        # logits only (no entropy gradient): the target term alone
        xx = x.clone().requires_grad_()
        token_logprobs(xx, ids, temperature=1e-3).sum().backward()
        assert xx.grad[:4].abs().max() <= (1e-6 if dtype == torch.float32 else 1e-8)
    finally:
        c.set_isa(old)


@pytest.mark.skipif(not TRITON_ON_CPU, reason="emulates GPU fma under the Triton interpreter")
def test_low_temperature_gradient_triton_with_gpu_fma(monkeypatch):
    """The interpreter evaluates tl.fma(a, b, c) as a * b + c with two roundings; on a GPU
    it is one rounding.  Emulating that, the Triton kernels must still pair the forward's
    lse with the backward's x / T - lse (a fused lse = fma(M, 1/T, log S) with a fused
    fma(x, 1/T, -lse) in the backward gave ~0.1 at a target with p = 1, T = 1e-3)."""
    import numpy as np
    from triton.runtime import interpreter

    def fma_one_rounding(self, a, b, c):
        if a.data.dtype == np.float32:  # exact product in float64, then one add
            r = a.data.astype(np.float64) * b.data.astype(np.float64) + c.data.astype(np.float64)
            return interpreter.TensorHandle(r.astype(np.float32), c.dtype.scalar)
        return interpreter.TensorHandle(a.data * b.data + c.data, c.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_fma", fma_one_rounding)
    x, ids, g_lp, g_ent, want = _low_temperature_case(torch.float32)
    got = _grads(x, ids, "triton", 1e-3, g_lp, g_ent)
    _check_low_temperature_grads(got, want, torch.float32)


# ------------------------------------------------------------------ poisoned outputs
def test_backward_writes_every_element(monkeypatch):
    """dlogits comes from torch.empty; fill fresh allocations with NaN to expose holes."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    logits, ids = _inputs((4, 6), 333, torch.float32, "cpu", ignore_frac=0.3)
    x = logits.clone().requires_grad_()
    lp, ent = token_logprobs(x, ids, return_entropy=True)
    assert not torch.isnan(lp).any() and not torch.isnan(ent).any()
    (lp.sum() + ent.sum()).backward()
    assert not torch.isnan(x.grad).any()


# ------------------------------------------------------------------ torch.library / compile
def test_opcheck():
    logits = torch.randn(3, 5, 40, requires_grad=True)
    ids = torch.randint(0, 40, (3, 5))
    for ent in (False, True):
        torch.library.opcheck(
            torch.ops.rlfuse.token_logprobs.default, (logits, ids, 0.9, -100, ent, "cpu")
        )
    lse = torch.randn(3, 5)
    H = torch.rand(3, 5)
    torch.library.opcheck(
        torch.ops.rlfuse.token_logprobs_backward.default,
        (logits.detach(), ids, lse, H, torch.randn(3, 5), torch.randn(3, 5), 0.9, -100, "cpu"),
    )


def test_torch_compile_fullgraph():
    def f(logits, ids, adv):
        lp, ent = token_logprobs(logits, ids, temperature=0.9, return_entropy=True)
        return -(lp * adv).mean() - 0.01 * ent.mean()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    logits = torch.randn(2, 7, 64, requires_grad=True)
    ids = torch.randint(0, 64, (2, 7))
    adv = torch.randn(2, 7)
    loss = compiled(logits, ids, adv)
    (g,) = torch.autograd.grad(loss, logits)
    loss_e = f(logits, ids, adv)
    (g_e,) = torch.autograd.grad(loss_e, logits)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, g_e)


@pytest.mark.slow
def test_torch_compile_inductor():
    f = torch.compile(lambda x, i: token_logprobs(x, i).sum(), fullgraph=True)
    x = torch.randn(4, 100)
    i = torch.randint(0, 100, (4,))
    torch.testing.assert_close(f(x, i), token_logprobs(x, i).sum())


def test_no_grad_and_inference_mode():
    logits = torch.randn(2, 30, requires_grad=True)
    ids = torch.randint(0, 30, (2,))
    with torch.no_grad():
        lp = token_logprobs(logits, ids)
    assert not lp.requires_grad
    with torch.inference_mode():
        lp2 = token_logprobs(logits.detach(), ids)
    assert torch.equal(lp, lp2)


# ------------------------------------------------------------------ dispatch
def test_backend_env_override(monkeypatch):
    logits, ids = _inputs((2,), 20, torch.float32, "cpu")
    monkeypatch.setenv("RLFUSE_BACKEND", "torch")
    assert _backend.resolve(None, torch.device("cpu"), "x") == "torch"
    a = token_logprobs(logits, ids)
    monkeypatch.setenv("RLFUSE_BACKEND", "cpu")
    assert _backend.resolve(None, torch.device("cpu"), "x") == "cpu"
    torch.testing.assert_close(a, token_logprobs(logits, ids))
    monkeypatch.setenv("RLFUSE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        token_logprobs(logits, ids)


def test_unavailable_backend_is_a_clear_error():
    logits, ids = _inputs((2,), 20, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cuda"):
        token_logprobs(logits, ids, backend="cuda")
    if not TRITON_ON_CPU:
        with pytest.raises(RuntimeError, match="triton"):
            token_logprobs(logits, ids, backend="triton")


def test_default_backend_on_cpu_is_cpp():
    assert _backend.resolve(None, torch.device("cpu"), "x") == "cpu"


def test_info_reports_backends():
    info = rlfuse.info()
    assert info["backends"]["cpu"]["available"] is True
    assert info["backends"]["cpu"]["isa"].startswith(("x86-64", "baseline"))
    assert info["backends"]["cuda"]["available"] is HAS_CUDA or not info["backends"]["cuda"]["built"]


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_ids_out_of_range(backend):
    logits = torch.randn(2, 3, 10)
    for bad in (10, -1, 1000):
        ids = torch.zeros(2, 3, dtype=torch.long)
        ids[1, 2] = bad
        with pytest.raises(ValueError, match="token_ids"):
            token_logprobs(logits, ids, backend=backend)


def test_bad_arguments():
    logits = torch.randn(2, 3, 10)
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.long(), ids)
    with pytest.raises(TypeError, match="logits"):
        token_logprobs(logits.numpy(), ids)
    with pytest.raises(TypeError, match="token_ids"):
        token_logprobs(logits, ids.float())
    with pytest.raises(TypeError, match="token_ids"):
        token_logprobs(logits, ids.bool())
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(logits, ids[:, :2])
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(logits, ids.unsqueeze(-1))
    for t in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, ids, temperature=t)
    with pytest.raises(TypeError, match="temperature"):
        token_logprobs(logits, ids, temperature="hot")
    with pytest.raises(TypeError, match="ignore_index"):
        token_logprobs(logits, ids, ignore_index=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        token_logprobs(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(TypeError, match="return_entropy"):
        token_logprobs(logits, ids, return_entropy=1)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_mismatched_devices():
    logits = torch.randn(2, 10, device="cuda")
    with pytest.raises(ValueError, match="token_ids"):
        token_logprobs(logits, torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------ GPU-only checks
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_gpu_large_vocab(backend, dtype):
    if backend == "cuda" and not _backend.available("cuda", "cuda"):
        pytest.skip("rlfuse._cuda not built")
    logits, ids = _inputs((8, 64), 128256, dtype, "cuda", ignore_frac=0.1)
    lp, ent = token_logprobs(logits, ids, return_entropy=True, backend=backend)
    rlp, rent = _ref(logits, ids)
    torch.testing.assert_close(lp.double(), rlp, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(ent.double(), rent, rtol=2e-5, atol=1e-4)
    g_lp, g_ent = torch.randn(8, 64, device="cuda"), torch.randn(8, 64, device="cuda")
    got = _grads(logits, ids, backend, 1.0, g_lp, g_ent)
    want = _ref_grads(logits, ids, 1.0, g_lp, g_ent)
    torch.testing.assert_close(got.double(), want, **grad_tol(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_batch_invariance(backend):
    if backend == "cuda" and not _backend.available("cuda", "cuda"):
        pytest.skip("rlfuse._cuda not built")
    logits = torch.randn(256, 32000, device="cuda")
    ids = torch.randint(0, 32000, (256,), device="cuda")
    full = token_logprobs(logits, ids, return_entropy=True, backend=backend)
    part = token_logprobs(logits[7:9].clone(), ids[7:9].clone(), return_entropy=True, backend=backend)
    assert torch.equal(full[0][7:9], part[0]) and torch.equal(full[1][7:9], part[1])


def test_ignore_index_outside_int32_range_with_int32_ids():
    """torch wraps a Python int to the tensor's dtype in ==; a huge ignore_index must not
    turn id 0 into an ignored position."""
    from rlfuse.ops import linear_token_logprobs, sequence_logprobs

    logits = torch.randn(2, 5)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    for backend in ("cpu", "torch"):
        lp = token_logprobs(logits, ids, ignore_index=2**40, backend=backend)
        torch.testing.assert_close(lp, token_logprobs(logits, ids.long(), backend=backend))
        assert (lp != 0).all()
    h, w = torch.randn(2, 3), torch.randn(4, 3)
    lp = linear_token_logprobs(h, w, ids, ignore_index=2**40)
    assert (lp != 0).all()
    res = sequence_logprobs(ids.view(1, 2), logits=logits.view(1, 2, 5), ignore_index=2**32)
    assert int(res.count[0]) == 2


def test_subnormal_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), temperature=1e-320)
