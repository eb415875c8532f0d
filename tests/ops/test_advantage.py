"""rlfuse.ops advantage family: GAE, discounted returns, masked moments / whitening, group
advantages and token rewards.  Parity with the float64 reference on every backend and
layout, the semantics switches, edge cases, determinism and bad input."""

from __future__ import annotations

import math
import platform

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlfuse import _backend
from rlfuse.ops import advantage as adv_mod
from rlfuse.ops import (
    discounted_returns,
    discounted_returns_reference,
    gae,
    gae_reference,
    group_advantages,
    group_advantages_reference,
    masked_mean,
    masked_mean_reference,
    masked_var,
    masked_var_reference,
    masked_whiten,
    masked_whiten_reference,
    token_rewards,
    token_rewards_reference,
)
from rlfuse.ops.advantage import GROUP_METHODS, GROUP_SEMANTICS
from tests.helpers import HAS_CUDA, TRITON_ON_CPU, backends_and_devices

# The Triton interpreter converts 1-element arrays to indices with a NumPy deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

BACKENDS = backends_and_devices()
KERNEL_BACKENDS = [(b, d) for b, d in BACKENDS if b != "torch"]


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=3e-5, atol=3e-5)


def _small(backend):
    return backend == "triton" and TRITON_ON_CPU


def _mask(kind, B, T, gen=None):
    """0/1 masks of several layouts (bool)."""
    if kind == "right":
        L = torch.randint(0, T + 1, (B,), generator=gen)
        return torch.arange(T)[None] < L[:, None]
    if kind == "left":
        L = torch.randint(0, T + 1, (B,), generator=gen)
        return torch.arange(T)[None] >= (T - L)[:, None]
    if kind == "holes":
        return torch.rand(B, T, generator=gen) > 0.35
    if kind == "full":
        return torch.ones(B, T, dtype=torch.bool)
    raise ValueError(kind)


def _poison_masked(r, m):
    """Garbage at masked positions: must never reach a valid output."""
    r = r.clone()
    r[~m] = float("nan")
    return r


def _gae_inputs(B, T, dtype, device, kind, gen=None):
    m = _mask(kind, B, T, gen)
    r = torch.randn(B, T, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, generator=gen, dtype=torch.float64)
    r, v = _poison_masked(r, m), _poison_masked(v, m)
    lv = torch.randn(B, generator=gen, dtype=torch.float64)
    return (r.to(dtype).to(device), v.to(dtype).to(device), m.to(device), lv.to(dtype).to(device))


def _ref_gae(r, v, m, lv, **kw):
    a, rt = gae_reference(r.double().cpu(), v.double().cpu(), None if m is None else m.cpu(),
                          last_values=None if lv is None else lv.double().cpu(), **kw)
    return a, rt


# ======================================================================================
# GAE
# ======================================================================================
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["right", "left", "holes", "full"])
@pytest.mark.parametrize("semantics", ["skip_masked", "zero_masked"])
def test_gae_parity_padded(backend, device, dtype, kind, semantics):
    B, T = (3, 21) if _small(backend) else (11, 203)
    r, v, m, lv = _gae_inputs(B, T, dtype, device, kind)
    kw = dict(gamma=0.97, lam=0.9, semantics=semantics)
    a, rt = gae(r, v, m, last_values=lv, backend=backend, **kw)
    ra, rrt = _ref_gae(r, v, m, lv, **kw)
    assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert a.shape == r.shape and rt.shape == r.shape
    torch.testing.assert_close(a.double().cpu(), ra, **_tol(dtype))
    torch.testing.assert_close(rt.double().cpu(), rrt, **_tol(dtype))
    assert (a[~m] == 0).all() and (rt[~m] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("semantics", ["skip_masked", "zero_masked"])
def test_gae_parity_packed(backend, device, dtype, semantics):
    lens = [0, 5, 1, 17, 0, 9] if _small(backend) else [0, 5, 1, 300, 0, 77, 128, 3]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int64)
    N = int(cu[-1])
    m = torch.rand(N) > 0.3
    r = _poison_masked(torch.randn(N, dtype=torch.float64), m).to(dtype)
    v = _poison_masked(torch.randn(N, dtype=torch.float64), m).to(dtype)
    lv = torch.randn(len(lens), dtype=dtype)
    kw = dict(gamma=0.99, lam=0.95, semantics=semantics)
    for mask, last in ((m, lv), (None, None)):
        rr = r if mask is not None else r.nan_to_num()
        vv = v if mask is not None else v.nan_to_num()
        a, rt = gae(rr.to(device), vv.to(device), None if mask is None else mask.to(device),
                    last_values=None if last is None else last.to(device),
                    cu_seqlens=cu.to(device), backend=backend, **kw)
        ra, rrt = gae_reference(rr.double(), vv.double(), mask, cu_seqlens=cu,
                                last_values=None if last is None else last.double(), **kw)
        torch.testing.assert_close(a.double().cpu(), ra, **_tol(dtype))
        torch.testing.assert_close(rt.double().cpu(), rrt, **_tol(dtype))
    # int32 cu_seqlens
    a32, _ = gae(r.nan_to_num().to(device), v.nan_to_num().to(device), None,
                 cu_seqlens=cu.to(torch.int32).to(device), backend=backend, **kw)
    ra, _ = gae_reference(r.nan_to_num().double(), v.nan_to_num().double(), None,
                          cu_seqlens=cu, **kw)
    torch.testing.assert_close(a32.double().cpu(), ra, **_tol(dtype))


@given(
    B=st.integers(0, 6),
    T=st.integers(0, 70),
    kind=st.sampled_from(["right", "left", "holes", "full"]),
    semantics=st.sampled_from(["skip_masked", "zero_masked"]),
    gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]),
    lam=st.sampled_from([0.0, 0.3, 0.95, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    mask_dtype=st.sampled_from([torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                                torch.int64, torch.float16, torch.float32, torch.float64]),
    bootstrap=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_gae_cpu_random(B, T, kind, semantics, gamma, lam, dtype, mask_dtype, bootstrap, seed):
    gen = torch.Generator().manual_seed(seed)
    r, v, m, lv = _gae_inputs(B, T, dtype, "cpu", kind, gen)
    kw = dict(gamma=gamma, lam=lam, semantics=semantics)
    a, rt = gae(r, v, m.to(mask_dtype), last_values=lv if bootstrap else None, **kw)
    ra, rrt = _ref_gae(r, v, m, lv if bootstrap else None, **kw)
    torch.testing.assert_close(a.double(), ra, **_tol(dtype))
    torch.testing.assert_close(rt.double(), rrt, **_tol(dtype))


def test_gae_semantics_differ_exactly_where_they_should():
    """mask [1, 1, 0, 0, 1]: verl carries A and V over the gap, OpenRLHF recurses through it
    with V = r = 0.  With right padding only (no gap) both agree."""
    r = torch.tensor([[0.0, 0.0, 0.5, 0.5, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0, 0, 1]])
    g, l = 0.9, 0.8
    skip, _ = gae(r, v, m, gamma=g, lam=l, semantics="skip_masked")
    zero, _ = gae(r, v, m, gamma=g, lam=l, semantics="zero_masked")
    # by hand: t=4: delta = 1 - 0.1; skip: t=1 sees nv = 0.1 and A_next = A_4
    a4 = 1.0 - 0.1
    a1_skip = (0.0 + g * 0.1 - 0.4) + g * l * a4
    a0_skip = (0.0 + g * 0.4 - 0.5) + g * l * a1_skip
    # zero: t=3: delta = 0 + g*0.1 - 0; t=2: delta = 0 + g*0 - 0
    a3 = g * 0.1 + g * l * a4
    a2 = 0.0 + g * l * a3
    a1_zero = (0.0 + g * 0.0 - 0.4) + g * l * a2
    a0_zero = (0.0 + g * 0.4 - 0.5) + g * l * a1_zero
    torch.testing.assert_close(skip[0], torch.tensor([a0_skip, a1_skip, 0, 0, a4],
                                                     dtype=torch.float64))
    torch.testing.assert_close(zero[0], torch.tensor([a0_zero, a1_zero, 0, 0, a4],
                                                     dtype=torch.float64))
    assert skip[0, 4] == zero[0, 4] and (skip[0, :2] != zero[0, :2]).all()
    # right padding: identical
    m2 = torch.tensor([[1, 1, 1, 0, 0]])
    s2, sr = gae(r, v, m2, gamma=g, lam=l, semantics="skip_masked")
    z2, zr = gae(r, v, m2, gamma=g, lam=l, semantics="zero_masked")
    assert torch.equal(s2, z2) and torch.equal(sr, zr)
    # aliases
    assert torch.equal(gae(r, v, m, gamma=g, lam=l, semantics="verl")[0], skip)
    assert torch.equal(gae(r, v, m, gamma=g, lam=l, semantics="openrlhf")[0], zero)


def test_gae_left_padding_equals_right_padding():
    B, T = 4, 33
    r = torch.randn(B, T, dtype=torch.float64)
    v = torch.randn(B, T, dtype=torch.float64)
    L = torch.tensor([33, 10, 1, 0])
    right = torch.arange(T)[None] < L[:, None]
    left = torch.arange(T)[None] >= (T - L)[:, None]
    # shift each row so that the valid tokens line up
    rl, vl = torch.zeros_like(r), torch.zeros_like(v)
    for b in range(B):
        n = int(L[b])
        rl[b, T - n:] = r[b, :n]
        vl[b, T - n:] = v[b, :n]
    for sem in ("skip_masked", "zero_masked"):
        a_r, _ = gae(r, v, right, gamma=0.9, lam=0.9, semantics=sem)
        a_l, _ = gae(rl, vl, left, gamma=0.9, lam=0.9, semantics=sem)
        for b in range(B):
            n = int(L[b])
            torch.testing.assert_close(a_l[b, T - n:], a_r[b, :n], rtol=1e-12, atol=1e-12)


def test_gae_bootstrap_last_values():
    """last_values is the value after the last valid token, also with trailing padding."""
    r = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.25, 9.0]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 0]])
    for sem in ("skip_masked", "zero_masked"):
        a, ret = gae(r, v, m, gamma=0.5, lam=1.0, last_values=torch.tensor([4.0],
                     dtype=torch.float64), semantics=sem)
        a1 = 2.0 + 0.5 * 4.0 - 0.25
        a0 = (1.0 + 0.5 * 0.25 - 0.5) + 0.5 * a1
        torch.testing.assert_close(a[0], torch.tensor([a0, a1, 0.0], dtype=torch.float64))
        torch.testing.assert_close(ret[0], torch.tensor([a0 + 0.5, a1 + 0.25, 0.0],
                                                        dtype=torch.float64))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gae_whiten(backend, device):
    B, T = (3, 19) if _small(backend) else (16, 100)
    r, v, m, _ = _gae_inputs(B, T, torch.float32, device, "holes")
    a, rt = gae(r, v, m, gamma=1.0, lam=0.95, whiten=True, backend=backend)
    ra, rrt = _ref_gae(r, v, m, None, gamma=1.0, lam=0.95, whiten=True)
    torch.testing.assert_close(a.double().cpu(), ra, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rt.double().cpu(), rrt, **_tol(torch.float32))
    valid = a[m].double()
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4


def test_gae_extreme_parameters():
    r = torch.randn(3, 40, dtype=torch.float64)
    v = torch.randn(3, 40, dtype=torch.float64)
    m = _mask("holes", 3, 40)
    for g, l in ((0.0, 0.0), (1.0, 1.0), (0.0, 1.0), (1.0, 0.0)):
        for sem in ("skip_masked", "zero_masked"):
            a, rt = gae(r, v, m, gamma=g, lam=l, semantics=sem)
            ra, rrt = gae_reference(r, v, m, gamma=g, lam=l, semantics=sem)
            torch.testing.assert_close(a, ra, rtol=1e-12, atol=1e-12)
    # gamma = lam = 1 without values: A_t is the sum of the remaining valid rewards
    a, _ = gae(r, torch.zeros_like(r), None, gamma=1.0, lam=1.0)
    torch.testing.assert_close(a, r.flip(-1).cumsum(-1).flip(-1), rtol=1e-12, atol=1e-12)


_ISAS = (["x86-64-v2", "x86-64-v3", "x86-64-v4"]
         if platform.machine().lower() in ("x86_64", "amd64") else ["baseline"])


@pytest.mark.parametrize("isa", _ISAS)
def test_every_isa_build(isa):
    C = _backend.cpu_module()
    old = C.active_isa()
    if not C.set_isa(isa):
        pytest.skip(f"this CPU (or build) lacks {isa}")
    try:
        for dtype in (torch.float32, torch.float64):
            r, v, m, lv = _gae_inputs(5, 77, dtype, "cpu", "holes")
            for sem in ("skip_masked", "zero_masked"):
                a, rt = gae(r, v, m.to(torch.int64), gamma=0.99, lam=0.9, last_values=lv,
                            semantics=sem)
                ra, rrt = _ref_gae(r, v, m, lv, gamma=0.99, lam=0.9, semantics=sem)
                torch.testing.assert_close(a.double(), ra, **_tol(dtype))
                torch.testing.assert_close(rt.double(), rrt, **_tol(dtype))
            x = torch.randn(6, 45, dtype=dtype)
            for xm in (torch.rand(6, 45) > 0.2, (torch.rand(6, 45) > 0.2).to(torch.int64)):
                torch.testing.assert_close(masked_whiten(x, xm).double(),
                                           masked_whiten_reference(x.double(), xm),
                                           **_tol(dtype))
            a, _ = gae(r, v, m.to(torch.int64), gamma=0.99, lam=0.9, last_values=lv, whiten=True)
            ra, _ = _ref_gae(r, v, m, lv, gamma=0.99, lam=0.9, whiten=True)
            torch.testing.assert_close(a.double(), ra, rtol=1e-4, atol=1e-4)
            tok = torch.randn(8, 37, dtype=dtype)
            tm = torch.rand(8, 37) > 0.3
            got = group_advantages(tok, group_size=4, mask=tm)
            want = group_advantages_reference(tok.double(), group_size=4, mask=tm)
            torch.testing.assert_close(got.double(), want, **_tol(dtype))
    finally:
        C.set_isa(old)


# ======================================================================================
# Discounted returns
# ======================================================================================
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("semantics", ["skip_masked", "zero_masked"])
def test_discounted_returns(backend, device, semantics):
    B, T = (3, 18) if _small(backend) else (9, 150)
    m = _mask("holes", B, T)
    r = _poison_masked(torch.randn(B, T, dtype=torch.float64), m)
    got = discounted_returns(r.float().to(device), m.to(device), 0.9, semantics=semantics,
                             backend=backend)
    want = discounted_returns_reference(r.float().double(), m, 0.9, semantics=semantics)
    torch.testing.assert_close(got.double().cpu(), want, **_tol(torch.float32))
    # gamma = 1: reverse cumulative sum of the valid rewards (both semantics)
    g1 = discounted_returns(r.to(device), m.to(device), 1.0, semantics=semantics, backend=backend)
    rz = torch.where(m, r, torch.zeros_like(r))
    want1 = torch.where(m, rz.flip(-1).cumsum(-1).flip(-1), torch.zeros_like(r))
    torch.testing.assert_close(g1.cpu(), want1, rtol=1e-10, atol=1e-10)


# ======================================================================================
# Masked moments and whitening
# ======================================================================================
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_moments_and_whiten(backend, device, dtype):
    shape = (3, 5, 7) if _small(backend) else (4, 33, 65)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1.5)
    m = torch.rand(shape) > 0.3
    x = _poison_masked(x, m).to(dtype)
    xd, md = x.to(device), m.to(device)
    tol = _tol(dtype)
    torch.testing.assert_close(masked_mean(xd, md, backend=backend).double().cpu(),
                               masked_mean_reference(x.double(), m), **tol)
    for unbiased in (True, False):
        torch.testing.assert_close(
            masked_var(xd, md, unbiased=unbiased, backend=backend).double().cpu(),
            masked_var_reference(x.double(), m, unbiased=unbiased), **tol)
    for dim in (0, 1, -1):
        torch.testing.assert_close(masked_mean(xd, md, dim, backend=backend).double().cpu(),
                                   masked_mean_reference(x.double(), m, dim), **tol,
                                   equal_nan=True)
        torch.testing.assert_close(masked_var(xd, md, dim, backend=backend).double().cpu(),
                                   masked_var_reference(x.double(), m, dim), **tol,
                                   equal_nan=True)
    for shift in (True, False):
        got = masked_whiten(xd, md, shift, backend=backend)
        want = masked_whiten_reference(x.double(), m, shift)
        torch.testing.assert_close(got.double().cpu(), want, **tol)
        assert (got[~md] == 0).all()
    # no mask: all elements
    torch.testing.assert_close(masked_whiten(xd.nan_to_num(), backend=backend).double().cpu(),
                               masked_whiten_reference(x.nan_to_num().double()), **tol)


def test_masked_moments_empty_slices_and_views():
    x = torch.randn(4, 6, dtype=torch.float64)
    m = torch.ones(4, 6, dtype=torch.bool)
    m[1] = False
    m[2, 1:] = False
    mean = masked_mean(x, m, dim=1)
    var = masked_var(x, m, dim=1)
    assert math.isnan(mean[1]) and math.isnan(var[1]) and math.isnan(var[2])
    assert mean[2] == x[2, 0]
    assert masked_var(x, m, dim=1, unbiased=False)[2] == 0
    # non-contiguous views are read in place
    big = torch.randn(8, 12, dtype=torch.float64)
    view = big[::2, 1::2]
    vm = torch.rand(12, 8).t()[::2, ::1][:, :6] > 0.3
    torch.testing.assert_close(masked_whiten(view, vm), masked_whiten_reference(view, vm))
    torch.testing.assert_close(masked_mean(view.t(), vm.t(), 0), masked_mean_reference(view.t(),
                               vm.t(), 0))


# ======================================================================================
# Group advantages
# ======================================================================================
def _group_case(B=24, seed=0, nan=True, dtype=torch.float64):
    """Unsorted ids, groups of different sizes incl. size one, ties, a NaN, an all-NaN group."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([7, 3, 7, 100, 3, 3, 7, -5, 42, 42, 42, 9, 9, 9, 9, 100, 11, 11,
                        7, 3, 13, 42, 9, 13])[:B]
    scores = torch.randint(0, 3, (B,), generator=g).to(torch.float64)  # ties
    scores[::3] += torch.rand(B, generator=g, dtype=torch.float64)[::3]
    scores[11:15] = 0.5  # an all-equal group (id 9 has members 11..14 and 22)
    scores[22] = 0.5
    if nan:
        scores[4] = float("nan")  # id 3: NaN member, skipped
        scores[20] = float("nan")
        scores[23] = float("nan")  # id 13: all NaN -> 0
    return scores.to(dtype), ids


METHOD_EXTRA = {"opo": {"lengths": torch.arange(1, 25, dtype=torch.float64) % 7}}


def _call_group(fn, scores, ids, method, semantics, **kw):
    extra = dict(METHOD_EXTRA.get(method, {}))
    if "lengths" in extra:
        extra["lengths"] = extra["lengths"][: scores.shape[0]].to(scores.device)
    extra.update(kw)
    return fn(scores, group_ids=ids, method=method, semantics=semantics, **extra)


def _raises_size_one(method, semantics):
    _, size_one, _ = adv_mod._SEMANTICS[semantics]
    return (size_one == "error" and method in ("grpo", "rloo", "grpo_passk")) or (
        size_one == "self" and method == "grpo_passk")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("method", GROUP_METHODS)
@pytest.mark.parametrize("semantics", GROUP_SEMANTICS)
def test_group_parity_unsorted_ids(backend, device, method, semantics):
    scores, ids = _group_case()
    sd, idd = scores.to(device), ids.to(device)
    if _raises_size_one(method, semantics):
        with pytest.raises(ValueError, match="at least 2 valid"):
            _call_group(group_advantages, sd, idd, method, semantics, backend=backend)
        return
    got = _call_group(group_advantages, sd, idd, method, semantics, backend=backend)
    want = _call_group(group_advantages_reference, scores, ids, method, semantics)
    assert got.dtype == torch.float64 and got.shape == (24,)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
    nan = torch.isnan(scores)
    assert (got.cpu()[nan] == 0).all()  # NaN scores: advantage 0
    if method in ("grpo", "dr_grpo", "rloo", "grpo_passk", "gpg", "batch_std", "opo"):
        assert (got.cpu()[11:15] == 0).all() and got.cpu()[22] == 0  # all-equal group: exactly 0
    # int32 ids and a [B, T] broadcast
    mask = torch.rand(24, 9) > 0.3
    got_tok = _call_group(group_advantages, sd, idd.to(torch.int32), method, semantics,
                          mask=mask.to(device), backend=backend)
    want_tok = _call_group(group_advantages_reference, scores, ids, method, semantics, mask=mask)
    torch.testing.assert_close(got_tok.cpu(), want_tok, rtol=1e-10, atol=1e-10)


def test_group_size_one_semantics():
    """One group of two and a lonely sample, per semantics (docs/ops/advantage.md table)."""
    s = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 1])
    sd = math.sqrt(2.0)
    expect = {
        ("grpo", "rlfuse"): [-1 / (sd + 1e-6), 1 / (sd + 1e-6), 0.0],
        ("grpo", "trl"): [-1 / (sd + 1e-4), 1 / (sd + 1e-4), 0.0],
        ("grpo", "verl"): [-1 / (sd + 1e-6), 1 / (sd + 1e-6), 5.0 / (1 + 1e-6)],
        ("dr_grpo", "verl"): [-1.0, 1.0, 5.0],
        ("dr_grpo", "openrlhf"): [-1.0, 1.0, 0.0],
        ("rloo", "verl"): [-2.0, 2.0, 5.0],
        ("rloo", "trl"): [-2.0, 2.0, 0.0],
        ("opo", "verl"): [-1.0, 1.0, 5.0],
    }
    for (method, sem), want in expect.items():
        kw = {"lengths": torch.tensor([1.0, 1.0, 1.0])} if method == "opo" else {}
        got = group_advantages(s, group_ids=ids, method=method, semantics=sem, **kw)
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    for method in ("grpo", "rloo", "grpo_passk"):
        with pytest.raises(ValueError, match="sample 2 is alone"):
            group_advantages(s, group_ids=ids, method=method, semantics="openrlhf")
    with pytest.raises(ValueError, match="grpo_passk"):
        group_advantages(s, group_ids=ids, method="grpo_passk", semantics="verl")


def test_group_methods_by_hand():
    s = torch.tensor([1.0, 4.0, 2.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    k = 3
    mu = torch.tensor([7 / 3, 7 / 3, 7 / 3, 1.0, 1.0, 1.0], dtype=torch.float64)
    sd = torch.tensor([math.sqrt(7 / 3)] * 3 + [math.sqrt(3.0)] * 3, dtype=torch.float64)
    g = dict(group_size=k)
    torch.testing.assert_close(group_advantages(s, **g, method="dr_grpo"), s - mu)
    torch.testing.assert_close(group_advantages(s, **g, method="grpo", eps=0.0), (s - mu) / sd)
    torch.testing.assert_close(group_advantages(s, **g, method="grpo", eps=0.0, std_floor=2.0),
                               (s - mu) / sd.clamp(min=2.0))
    torch.testing.assert_close(group_advantages(s, **g, method="rloo"), (s - mu) * 1.5)
    bstd = s.std()
    torch.testing.assert_close(group_advantages(s, **g, method="batch_std", eps=0.0),
                               (s - mu) / bstd)
    # passk: only the group's best gets (max - second) / (std + eps)
    pk = group_advantages(s, **g, method="grpo_passk", eps=0.0)
    torch.testing.assert_close(pk, torch.tensor([0, 2 / sd[0], 0, 0, 0, 3 / sd[3]],
                                                dtype=torch.float64))
    pk = group_advantages(s, **g, method="grpo_passk", norm_by_std=False)
    torch.testing.assert_close(pk, torch.tensor([0, 2.0, 0, 0, 0, 3.0], dtype=torch.float64))
    # ties for the maximum: max - second = 0 for everyone
    t = torch.tensor([2.0, 2.0, 1.0], dtype=torch.float64)
    assert (group_advantages(t, group_size=3, method="grpo_passk") == 0).all()
    # gpg: alpha = B / #nonzero = 6 / 4
    torch.testing.assert_close(group_advantages(s, **g, method="gpg"), 1.5 * (s - mu))
    torch.testing.assert_close(group_advantages(s, **g, method="gpg", f_norm=3.0), 0.5 * (s - mu))
    # opo: length-weighted baseline
    ln = torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 2.0])
    base = torch.tensor([(1 + 8 + 6) / 6] * 3 + [6 / 4] * 3, dtype=torch.float64)
    torch.testing.assert_close(group_advantages(s, **g, method="opo", lengths=ln), s - base)
    # reinforce_pp_baseline: whitened r - mu (over samples; token-weighted with a mask)
    x = s - mu
    torch.testing.assert_close(group_advantages(s, **g, method="reinforce_pp_baseline"),
                               (x - x.mean()) / torch.sqrt(x.var() + 1e-8))
    mask = torch.arange(5)[None] < torch.tensor([1, 2, 3, 1, 1, 2])[:, None]
    w = mask.sum(-1).double()
    mean = (w * x).sum() / w.sum()
    var = (w * (x - mean) ** 2).sum() / (w.sum() - 1)
    want = ((x - mean) / torch.sqrt(var + 1e-8))[:, None] * mask
    torch.testing.assert_close(group_advantages(s, **g, method="reinforce_pp_baseline",
                                                mask=mask), want)
    var_b = (w * (x - mean) ** 2).sum() / w.sum()
    want_b = ((x - mean) / torch.sqrt(var_b))[:, None] * mask
    torch.testing.assert_close(group_advantages(s, **g, method="reinforce_pp_baseline",
                                                mask=mask, semantics="openrlhf"), want_b)


@given(
    B=st.integers(1, 40),
    n_ids=st.integers(1, 12),
    method=st.sampled_from(GROUP_METHODS),
    semantics=st.sampled_from(["rlfuse", "trl", "verl"]),
    nan_frac=st.sampled_from([0.0, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    token=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_group_cpu_random(B, n_ids, method, semantics, nan_frac, dtype, token, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-3, n_ids, (B,), generator=g)
    T = 6
    if token:
        scores = torch.randn(B, T, generator=g, dtype=torch.float64)
    else:
        scores = torch.randint(0, 4, (B,), generator=g).double() + 0.25 * torch.randn(
            B, generator=g, dtype=torch.float64) * (torch.rand(B, generator=g) > 0.5)
    if nan_frac:
        nanrows = torch.rand(B, generator=g) < nan_frac
        scores[nanrows] = float("nan")
    mask = torch.rand(B, T, generator=g) > 0.2
    scores = scores.to(dtype)
    kw = dict(group_ids=ids, method=method, semantics=semantics, mask=mask)
    try:
        want = group_advantages_reference(scores.double(), **kw)
    except ValueError:
        with pytest.raises(ValueError):
            group_advantages(scores, **kw)
        return
    got = group_advantages(scores, **kw)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), want, **tol)


def test_group_size_blocks_equal_ids():
    s = torch.randn(32, dtype=torch.float64)
    for method in GROUP_METHODS:
        kw = {"lengths": torch.rand(32) * 5} if method == "opo" else {}
        a = group_advantages(s, group_size=8, method=method, **kw)
        b = group_advantages(s, group_ids=torch.arange(32) // 8, method=method, **kw)
        c = group_advantages(s, group_ids=(torch.arange(32) // 8)[torch.arange(32)] * 13 - 7,
                             method=method, **kw)
        assert torch.equal(a, b) and torch.equal(a, c)


def test_group_permutation_invariance():
    """Shuffling the samples shuffles the advantages (ties broken by sample order only in
    grpo_passk, which the data here avoids)."""
    s = torch.randn(30, dtype=torch.float64)
    ids = torch.randint(0, 6, (30,))
    perm = torch.randperm(30)
    for method in GROUP_METHODS:
        kw = {"lengths": torch.rand(30) * 5} if method == "opo" else {}
        try:
            a = group_advantages(s, group_ids=ids, method=method, **kw)
        except ValueError:
            continue
        kwp = {"lengths": kw["lengths"][perm]} if kw else {}
        b = group_advantages(s[perm], group_ids=ids[perm], method=method, **kwp)
        torch.testing.assert_close(b, a[perm], rtol=1e-12, atol=1e-12)


def test_group_token_level_rewards_input():
    tok = torch.zeros(16, 10)
    tok[torch.arange(16), torch.randint(0, 10, (16,))] = torch.randn(16)
    mask = torch.ones(16, 10, dtype=torch.int64)
    a = group_advantages(tok, group_size=4, mask=mask)
    b = group_advantages(tok.sum(-1), group_size=4, mask=mask)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="scores must not be infinite"):
        bad = tok.clone()
        bad[3, 2] = float("inf")
        group_advantages(bad, group_size=4)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_group_token_rewards_masked_positions_never_used(backend, device, dtype, layout,
                                                         mask_dtype):
    """[B, T] token rewards with a mask: the row sums run over the kept positions only, so
    NaN / inf / garbage at masked positions changes nothing (docs/ops/advantage.md); the
    float64 reference on poisoned inputs, and bitwise the same result as zeros there."""
    g = torch.Generator().manual_seed(11)
    B, T = (8, 6) if _small(backend) else (24, 40)
    m = _mask("holes", B, T, g)
    m[3] = False  # a sample with no kept position: its score is 0
    tok = torch.randn(B, T, generator=g, dtype=torch.float64)
    tok[5, m[5]] = 0.0
    poison = torch.full((B, T), float("nan"), dtype=torch.float64)
    poison[1::3] = float("inf")
    poison[2::3] = -1e30
    bad = torch.where(m, tok, poison).to(dtype)
    clean = torch.where(m, tok, torch.zeros_like(tok)).to(dtype)
    if layout == "strided":  # [B, T] views with a token stride of 2 (scores and mask)
        bad = torch.stack([bad, bad], -1)[..., 0]
        clean = torch.stack([clean, clean], -1)[..., 0]
        mk = torch.stack([m, m], -1)[..., 0].to(mask_dtype)
    else:
        mk = m.to(mask_dtype)
    for method in ("grpo", "rloo", "reinforce_pp_baseline", "opo"):
        want = group_advantages_reference(bad.double(), group_size=4, method=method, mask=mk)
        want_clean = group_advantages_reference(clean.double(), group_size=4, method=method,
                                                mask=mk)
        torch.testing.assert_close(want, want_clean, rtol=0, atol=0)
        assert torch.isfinite(want).all()
        got = group_advantages(bad.to(device), group_size=4, method=method,
                               mask=mk.to(device), backend=backend)
        got_clean = group_advantages(clean.to(device), group_size=4, method=method,
                                     mask=mk.to(device), backend=backend)
        torch.testing.assert_close(got.double().cpu(), want, **_tol(dtype))
        assert torch.equal(got, got_clean), method
        # the per-sample scores: [B] in, the same advantages
        per_sample = torch.where(m, tok, torch.zeros_like(tok)).sum(-1).to(dtype)
        got_s = group_advantages(per_sample.to(device), group_size=4, method=method,
                                 mask=mk.to(device), backend=backend)
        torch.testing.assert_close(got.double().cpu(), got_s.double().cpu(), **_tol(dtype))
    # inf at a kept position is still an error, named by its position
    worse = bad.clone()
    r, c = 6, int(m[6].nonzero()[0, 0])
    worse[r, c] = float("inf")
    with pytest.raises(ValueError, match=rf"position \({r}, {c}\) holds inf"):
        group_advantages(worse.to(device), group_size=4, mask=mk.to(device), backend=backend)


_EMPTY_ROWS_SCRIPT = r"""
import sys, torch
from rlfuse.ops import group_advantages
backend, device = sys.argv[1], sys.argv[2]
z = torch.zeros(4, 0, device=device)
a = group_advantages(z, group_size=2, backend=backend)
b = group_advantages(z, group_size=2, mask=torch.zeros(4, 0, device=device), backend=backend)
print(tuple(a.shape), a.abs().sum().item(), tuple(b.shape))
"""


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_group_token_rewards_empty_rows(backend, device):
    """[B, 0] token rewards sum to 0 (the CPU kernel used to read them as [B] scores from
    an empty tensor's null pointer: SIGSEGV); in a fresh interpreter, so a crash fails here."""
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "-c", _EMPTY_ROWS_SCRIPT, backend, device], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    assert out.stdout.split() == ["(4,)", "0.0", "(4,", "0)"]


# ======================================================================================
# Token rewards
# ======================================================================================
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_token_rewards(backend, device):
    B, T = (4, 13) if _small(backend) else (10, 90)
    m = _mask("holes", B, T)
    m[1] = False  # no valid token: score dropped
    kl = _poison_masked(torch.randn(B, T, dtype=torch.float64), m).float()
    sc = torch.randn(B)
    got = token_rewards(sc.to(device), m.to(device), kl=kl.to(device), kl_coef=0.05,
                        backend=backend)
    want = token_rewards_reference(sc.double(), m, kl=kl.double(), kl_coef=0.05)
    torch.testing.assert_close(got.double().cpu(), want, **_tol(torch.float32))
    assert (got.cpu()[1] == 0).all()
    # score only, padded by the mask; the last valid position carries it
    got = token_rewards(sc.to(device), m.to(device), backend=backend)
    last = T - 1 - m.flip(-1).to(torch.int64).argmax(-1)
    rows = torch.arange(B)[m.any(-1)]
    assert torch.equal(got.cpu()[rows, last[rows]], sc[rows])
    assert got.cpu().count_nonzero() == len(rows)
    # packed
    cu = torch.tensor([0, 4, 4, 11, 12])
    N = 12
    pm = torch.rand(N) > 0.3
    pk = torch.randn(N)
    ps = torch.randn(4)
    got = token_rewards(ps.to(device), pm.to(device), kl=pk.to(device), kl_coef=0.2,
                        cu_seqlens=cu.to(device), backend=backend)
    want = token_rewards_reference(ps.double(), pm, kl=pk.double(), kl_coef=0.2, cu_seqlens=cu)
    torch.testing.assert_close(got.double().cpu(), want, **_tol(torch.float32))
    got = token_rewards(ps.to(device), cu_seqlens=cu.to(device), backend=backend)
    want = token_rewards_reference(ps.double(), None, cu_seqlens=cu)
    torch.testing.assert_close(got.double().cpu(), want, **_tol(torch.float32))


# ======================================================================================
# Layouts, dtypes, determinism, allocation poisoning
# ======================================================================================
def test_views_int_masks_and_grad_inputs():
    base_r = torch.randn(12, 40, dtype=torch.float64)
    base_v = torch.randn(40, 12, dtype=torch.float64)
    r = base_r[::2, 3:]                       # row stride 80, element stride 1
    v = base_v.t()[::2, 3:]                   # element stride 12
    m = (torch.rand(40, 12) > 0.3).t()[::2, 3:].to(torch.int32)
    lv = torch.randn(12, dtype=torch.float64)[::2]
    a, rt = gae(r, v, m, gamma=0.9, lam=0.9, last_values=lv)
    ra, rrt = gae_reference(r, v, m, gamma=0.9, lam=0.9, last_values=lv)
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(rt, rrt)
    # bf16 / f16 inputs are widened to float32
    a16, _ = gae(r.to(torch.bfloat16), v.to(torch.float16), m, gamma=0.9, lam=0.9)
    ra16, _ = gae_reference(r.to(torch.bfloat16).double(), v.to(torch.float16).double(), m,
                            gamma=0.9, lam=0.9)
    assert a16.dtype == torch.float32
    torch.testing.assert_close(a16.double(), ra16, **_tol(torch.float32))
    # inputs that require grad are served; outputs carry no graph
    rg = r.clone().requires_grad_()
    a, _ = gae(rg, v, m, gamma=0.9, lam=0.9)
    assert not a.requires_grad
    s = torch.randn(8, requires_grad=True)
    out = group_advantages(s, group_size=4)
    assert not out.requires_grad
    out = masked_whiten(s, None)
    assert not out.requires_grad


def test_empty_inputs():
    for B, T in ((0, 5), (3, 0), (0, 0)):
        r = torch.randn(B, T)
        a, rt = gae(r, r, torch.ones(B, T), gamma=0.9, lam=0.9)
        assert a.shape == (B, T) and rt.shape == (B, T)
        assert discounted_returns(r, None, 0.9).shape == (B, T)
    a, _ = gae(torch.randn(0), torch.randn(0), None, gamma=1.0, lam=1.0,
               cu_seqlens=torch.tensor([0]))
    assert a.shape == (0,)
    a, _ = gae(torch.randn(0), torch.randn(0), None, gamma=1.0, lam=1.0,
               cu_seqlens=torch.tensor([0, 0, 0]), last_values=torch.randn(2))
    assert a.shape == (0,)
    out = group_advantages(torch.randn(0), group_size=4)
    assert out.shape == (0,)
    out = group_advantages(torch.randn(0), group_size=4, mask=torch.ones(0, 7))
    assert out.shape == (0, 7)
    assert token_rewards(torch.randn(2), torch.ones(2, 0)).shape == (2, 0)


def _nan_empty(shape, dtype, device=None):
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.is_floating_point():
        t.fill_(float("nan"))
    else:
        t.fill_(-7)
    return t


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_poisoned_outputs_are_fully_written(backend, device, monkeypatch):
    monkeypatch.setattr(adv_mod, "_empty", _nan_empty)
    B, T = (3, 21) if _small(backend) else (9, 77)
    r, v, m, lv = _gae_inputs(B, T, torch.float32, device, "holes")
    for sem in ("skip_masked", "zero_masked"):
        a, rt = gae(r, v, m, gamma=0.9, lam=0.9, last_values=lv, semantics=sem,
                    backend=backend, whiten=True)
        assert not torch.isnan(a).any() and not torch.isnan(rt).any()
    cu = torch.tensor([0, 3, 3, 20]).to(device)
    a, rt = gae(torch.randn(20, device=device), torch.randn(20, device=device), None,
                gamma=0.9, lam=0.9, cu_seqlens=cu, backend=backend)
    assert not torch.isnan(a).any() and not torch.isnan(rt).any()
    assert not torch.isnan(discounted_returns(r, m, 0.9, backend=backend)).any()
    x = torch.randn(5, 13, device=device)
    assert not torch.isnan(masked_whiten(x, x > 0, backend=backend)).any()
    assert not torch.isnan(masked_mean(x, x > 0, 1, backend=backend)).any()
    scores, ids = _group_case(nan=True, dtype=torch.float32)
    for method in GROUP_METHODS:
        kw = {"lengths": torch.rand(24, device=device)} if method == "opo" else {}
        out = group_advantages(scores.to(device), group_ids=ids.to(device), method=method,
                               mask=(torch.rand(24, 11) > 0.3).to(device), backend=backend,
                               **kw)
        assert not torch.isnan(out).any()
    out = token_rewards(torch.randn(B, device=device), m, kl=r.nan_to_num(), kl_coef=0.1,
                        backend=backend)
    assert not torch.isnan(out).any()


def test_thread_count_invariance_bitwise(monkeypatch):
    monkeypatch.setattr(_backend, "THREAD_GRAIN", 64)  # every thread even on small inputs
    r, v, m, lv = _gae_inputs(37, 301, torch.float32, "cpu", "holes")
    x = torch.randn(37, 301)
    scores = torch.randn(37 * 8, 64)
    smask = torch.rand(37 * 8, 64) > 0.2
    ids = torch.randint(0, 30, (296,))
    old = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((
                *gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv, whiten=True),
                masked_whiten(x, x > -0.5),
                masked_var(x, x > 0, 1),
                group_advantages(scores, group_size=8, mask=smask, method="reinforce_pp_baseline"),
                group_advantages(scores, group_ids=ids, method="grpo"),
            ))
    finally:
        torch.set_num_threads(old)
    for res in results[1:]:
        for got, want in zip(res, results[0]):
            assert torch.equal(got, want)


def test_batch_invariance_bitwise():
    """A sequence's GAE, and a group's advantages, do not depend on the rest of the batch."""
    r, v, m, lv = _gae_inputs(40, 133, torch.float32, "cpu", "holes")
    full_a, full_r = gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv)
    for rows in (slice(0, 1), slice(7, 8), slice(3, 11), slice(39, 40)):
        a, rt = gae(r[rows].clone(), v[rows].clone(), m[rows].clone(), gamma=0.99, lam=0.95,
                    last_values=lv[rows].clone())
        assert torch.equal(a, full_a[rows]) and torch.equal(rt, full_r[rows])
    perm = torch.randperm(40)
    a, _ = gae(r[perm], v[perm], m[perm], gamma=0.99, lam=0.95, last_values=lv[perm])
    assert torch.equal(a, full_a[perm])
    s = torch.randn(64)
    full = group_advantages(s, group_size=8)
    part = group_advantages(s[16:24].clone(), group_size=8)
    assert torch.equal(part, full[16:24])


def test_concurrent_python_threads():
    import threading

    r, v, m, lv = _gae_inputs(16, 200, torch.float32, "cpu", "holes")
    want = gae(r, v, m, gamma=0.9, lam=0.9)[0]
    errors = []

    def work():
        try:
            for _ in range(5):
                assert torch.equal(gae(r, v, m, gamma=0.9, lam=0.9)[0], want)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ======================================================================================
# torch.library / torch.compile
# ======================================================================================
def test_opcheck():
    r, v, m, lv = _gae_inputs(3, 9, torch.float32, "cpu", "holes")
    torch.library.opcheck(torch.ops.rlfuse.gae.default,
                          (r.nan_to_num(), v.nan_to_num(), m, lv, None, 0.9, 0.9, False, False,
                           True, "cpu"))
    torch.library.opcheck(torch.ops.rlfuse.group_advantages.default,
                          (torch.randn(8), torch.arange(8) % 3, 0, "grpo", None, None, 1e-6, -1.0,
                           "rlfuse", True, 1.0, "cpu"))
    torch.library.opcheck(torch.ops.rlfuse.masked_whiten.default,
                          (torch.randn(4, 5), None, True, True, 1e-8, "cpu"))
    torch.library.opcheck(torch.ops.rlfuse.masked_mean_var.default,
                          (torch.randn(4, 5), torch.rand(4, 5) > 0.2, 1, True, True, False, "cpu"))
    torch.library.opcheck(torch.ops.rlfuse.token_rewards.default,
                          (torch.randn(3), torch.rand(3, 6) > 0.3, torch.randn(3, 6), None, 6,
                           0.1, "cpu"))


def test_direct_eager_call_and_library_op_agree(monkeypatch):
    """Eager calls skip the torch.library dispatch; the registered ops give the same."""
    r, v, m, lv = _gae_inputs(5, 23, torch.float32, "cpu", "holes")
    r, v = r.nan_to_num(), v.nan_to_num()
    s = torch.randn(10)
    ids = torch.tensor([3, 1, 3, 0, 1, 1, 0, 3, 3, 1])

    def run():
        return [*gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv, whiten=True),
                discounted_returns(r, m, 0.9), masked_whiten(v, m), masked_mean(v, m, 1),
                masked_var(v, m), group_advantages(s, group_ids=ids, method="rloo"),
                group_advantages(s[:5], group_size=5, mask=m),
                token_rewards(s[:5], m, kl=v, kl_coef=0.1)]

    assert adv_mod._EAGER_DIRECT
    direct = run()
    monkeypatch.setattr(adv_mod, "_EAGER_DIRECT", False)
    via_op = run()
    for x, y in zip(direct, via_op):
        assert torch.equal(x, y)


def test_torch_compile_fullgraph():
    r, v, m, _ = _gae_inputs(4, 17, torch.float32, "cpu", "holes")
    r, v = r.nan_to_num(), v.nan_to_num()

    def f(r, v, m, s):
        a, ret = gae(r, v, m, gamma=0.99, lam=0.95, whiten=True)
        g = group_advantages(s, group_size=2, mask=m)
        return a + g, ret, masked_mean(a, m)

    s = torch.randn(4)
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    got = compiled(r, v, m, s)
    want = f(r, v, m, s)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


# ======================================================================================
# Bad input
# ======================================================================================
def _r(*shape):
    return torch.randn(*shape)


BAD_CASES = [
    # (callable, exception, message fragment)
    (lambda: gae(_r(2, 3), _r(2, 4), None, gamma=0.9, lam=0.9), ValueError, "values"),
    (lambda: gae(_r(2, 3), _r(2, 3), torch.ones(3, 2), gamma=0.9, lam=0.9), ValueError, "mask"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=1.5, lam=0.9), ValueError, "gamma"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=-0.1), ValueError, "lam"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=float("nan"), lam=0.5), ValueError, "gamma"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma="0.9", lam=0.5), TypeError, "gamma"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=0.9, semantics="x"), ValueError,
     "semantics"),
    (lambda: gae(_r(2, 3).int(), _r(2, 3), None, gamma=0.9, lam=0.9), TypeError, "rewards"),
    (lambda: gae(_r(2, 3), None, None, gamma=0.9, lam=0.9), TypeError, "values"),
    (lambda: gae(_r(6), _r(6), None, gamma=0.9, lam=0.9), ValueError, "rewards"),
    (lambda: gae(_r(2, 3), _r(2, 3), torch.tensor([[1, 0, 2], [1, 1, 1]]), gamma=0.9, lam=0.9),
     ValueError, "mask must hold only 0 and 1"),
    (lambda: gae(_r(2, 3), _r(2, 3), torch.full((2, 3), 0.5), gamma=0.9, lam=0.9),
     ValueError, "mask must hold only 0 and 1"),
    # int64 masks are read as int32 halves on the vector path: 2**32 has a zero low half
    (lambda: gae(_r(2, 40), _r(2, 40), torch.ones(2, 40, dtype=torch.int64).index_put_(
        (torch.tensor([1]), torch.tensor([21])), torch.tensor(2**32)), gamma=0.9, lam=0.9),
     ValueError, r"mask must hold only 0 and 1.*position \(1, 21\) holds 4294967296"),
    (lambda: gae(_r(2, 40), _r(2, 40), torch.ones(2, 40, dtype=torch.int64).index_put_(
        (torch.tensor([0]), torch.tensor([9])), torch.tensor(-1)), gamma=0.9, lam=0.9),
     ValueError, r"position \(0, 9\) holds -1"),
    (lambda: group_advantages(_r(8), group_size=4, mask=torch.ones(8, 40, dtype=torch.int64)
                              .index_put_((torch.tensor([5]), torch.tensor([33])),
                                          torch.tensor(2**33 + 1))),
     ValueError, r"position \(5, 33\)"),
    (lambda: gae(torch.tensor([[1.0, float("nan")]]), _r(1, 2), None, gamma=0.9, lam=0.9),
     ValueError, "rewards must be finite"),
    (lambda: gae(_r(1, 2), torch.tensor([[float("inf"), 1.0]]), torch.ones(1, 2), gamma=0.9,
                 lam=0.9), ValueError, "values must be finite"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=0.9,
                 last_values=torch.tensor([0.0, float("nan")])), ValueError, "last_values"),
    (lambda: gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=0.9, last_values=_r(3)), ValueError,
     "last_values"),
    (lambda: gae(_r(1, 3), _r(1, 3), torch.tensor([[0, 1, 0]]), gamma=0.9, lam=0.9,
                 whiten=True), ValueError, "at least"),
    (lambda: gae(_r(5), _r(5), None, gamma=0.9, lam=0.9, cu_seqlens=torch.tensor([0, 2, 4])),
     ValueError, "cu_seqlens"),
    (lambda: gae(_r(5), _r(5), None, gamma=0.9, lam=0.9, cu_seqlens=torch.tensor([1, 5])),
     ValueError, "cu_seqlens"),
    (lambda: gae(_r(5), _r(5), None, gamma=0.9, lam=0.9, cu_seqlens=torch.tensor([0, 3, 2, 5])),
     ValueError, "cu_seqlens"),
    (lambda: gae(_r(5), _r(5), None, gamma=0.9, lam=0.9, cu_seqlens=torch.tensor([0.0, 5.0])),
     TypeError, "cu_seqlens"),
    (lambda: discounted_returns(_r(2, 3), None, 2.0), ValueError, "gamma"),
    (lambda: masked_whiten(_r(4), torch.tensor([1, 0, 0, 0])), ValueError, "at least 2"),
    (lambda: masked_whiten(_r(4), torch.tensor([1, 1, 0])), ValueError, "mask"),
    (lambda: masked_whiten(torch.tensor([1.0, float("nan")]), None), ValueError, "x must be finite"),
    (lambda: masked_mean(_r(3), torch.zeros(3)), ValueError, "selects no element"),
    (lambda: masked_var(_r(3), torch.tensor([0, 1, 0])), ValueError, "single element"),
    (lambda: masked_mean(_r(3, 2), None, 2), ValueError, "dim"),
    (lambda: masked_mean(_r(3, 2), None, 1.0), TypeError, "dim"),
    (lambda: group_advantages(_r(8)), ValueError, "exactly one of group_ids and group_size"),
    (lambda: group_advantages(_r(8), group_size=3), ValueError, "group_size"),
    (lambda: group_advantages(_r(8), group_size=0), ValueError, "group_size"),
    (lambda: group_advantages(_r(8), group_ids=torch.zeros(7, dtype=torch.long)), ValueError,
     "group_ids"),
    (lambda: group_advantages(_r(8), group_ids=torch.zeros(8)), TypeError, "group_ids"),
    (lambda: group_advantages(_r(8), group_size=4, method="ppo"), ValueError, "method"),
    (lambda: group_advantages(_r(8), group_size=4, semantics="x"), ValueError, "semantics"),
    (lambda: group_advantages(_r(8), group_size=4, eps=-1.0), ValueError, "eps"),
    (lambda: group_advantages(_r(8), group_size=4, std_floor=float("inf")), ValueError,
     "std_floor"),
    (lambda: group_advantages(_r(8), group_size=4, f_norm=0.0), ValueError, "f_norm"),
    (lambda: group_advantages(_r(8), group_size=4, method="opo"), ValueError, "lengths"),
    (lambda: group_advantages(_r(8), group_size=4, mask=torch.ones(7, 3)), ValueError, "mask"),
    (lambda: group_advantages(_r(8), group_size=4, mask=torch.full((8, 3), 2)), ValueError,
     "mask must hold only 0 and 1"),
    (lambda: group_advantages(torch.tensor([1.0, float("inf")]), group_size=2), ValueError,
     "scores"),
    (lambda: group_advantages(_r(2, 3, 4), group_size=2), ValueError, "scores"),
    (lambda: group_advantages(_r(4), group_size=2, lengths=torch.tensor([1, -1, 2, 2])),
     ValueError, "lengths"),
    (lambda: group_advantages(_r(4), group_size=2, method="reinforce_pp_baseline",
                              mask=torch.tensor([[1, 0], [0, 0], [0, 0], [0, 0]])),
     ValueError, "reinforce_pp_baseline"),
    (lambda: token_rewards(_r(2)), ValueError, "mask"),
    (lambda: token_rewards(_r(2), torch.ones(3, 4)), ValueError, "mask"),
    (lambda: token_rewards(_r(2), torch.ones(2, 4), kl=_r(2, 5)), ValueError, "kl"),
    (lambda: token_rewards(torch.tensor([1.0, float("nan")]), torch.ones(2, 4)), ValueError,
     "scores"),
    (lambda: token_rewards(_r(2), torch.ones(2, 4), kl=torch.full((2, 4), float("nan")),
                           kl_coef=0.1), ValueError, "kl must be finite"),
    (lambda: token_rewards(_r(2), torch.ones(2, 4), kl_coef=float("inf")), ValueError, "kl_coef"),
    (lambda: token_rewards(_r(3), cu_seqlens=torch.tensor([0, 2, 4])), ValueError, "scores"),
]


@pytest.mark.parametrize("case", range(len(BAD_CASES)))
def test_bad_input(case):
    fn, exc, msg = BAD_CASES[case]
    with pytest.raises(exc, match=msg):
        fn()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bad_data_same_message_every_backend(backend, device):
    r = torch.randn(2, 5, device=device)
    m = torch.ones(2, 5, device=device)
    r[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"rewards must be finite.*\(1, 3\)"):
        gae(r, r.nan_to_num(), m, gamma=0.9, lam=0.9, backend=backend)
    m[0, 2] = 3
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*\(0, 2\)"):
        gae(r.nan_to_num(), r.nan_to_num(), m, gamma=0.9, lam=0.9, backend=backend)
    r[1, 3] = float("nan")
    m[0, 2] = 1
    m[1, 3] = 0  # masked NaN is fine
    gae(r, r, m.bool() & ~torch.isnan(r), gamma=0.9, lam=0.9, backend=backend)


def test_unavailable_backend():
    with pytest.raises(ValueError, match="backend"):
        gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=0.9, backend="numpy")
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="cuda"):
            gae(_r(2, 3), _r(2, 3), None, gamma=0.9, lam=0.9, backend="cuda")


# ======================================================================================
# GPU (run on a machine with a CUDA device)
# ======================================================================================
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_shapes(backend):
    dev = "cuda"
    r, v, m, lv = _gae_inputs(64, 1500, torch.float32, dev, "holes")
    for sem in ("skip_masked", "zero_masked"):
        a, rt = gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv, semantics=sem,
                    backend=backend)
        ra, rrt = _ref_gae(r, v, m, lv, gamma=0.99, lam=0.95, semantics=sem)
        torch.testing.assert_close(a.double().cpu(), ra, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rt.double().cpu(), rrt, rtol=1e-4, atol=1e-4)
        again = gae(r, v, m, gamma=0.99, lam=0.95, last_values=lv, semantics=sem,
                    backend=backend)[0]
        assert torch.equal(a, again)  # deterministic
    s = torch.randn(4096, 64, device=dev)
    mask = torch.rand(4096, 64, device=dev) > 0.2
    ids = torch.randint(0, 500, (4096,), device=dev)
    for method in GROUP_METHODS:
        kw = {"lengths": torch.rand(4096, device=dev) * 10} if method == "opo" else {}
        got = group_advantages(s, group_ids=ids, method=method, mask=mask, backend=backend, **kw)
        want = group_advantages(s.cpu(), group_ids=ids.cpu(), method=method, mask=mask.cpu(),
                                backend="cpu", **{k: t.cpu() for k, t in kw.items()})
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(300, 700, device=dev)
    xm = torch.rand(300, 700, device=dev) > 0.4
    torch.testing.assert_close(masked_whiten(x, xm, backend=backend).cpu(),
                               masked_whiten(x.cpu(), xm.cpu(), backend="cpu"),
                               rtol=1e-5, atol=1e-5)
    sc = torch.randn(64, device=dev)
    torch.testing.assert_close(token_rewards(sc, m, kl=r.nan_to_num(), kl_coef=0.1,
                                             backend=backend).cpu(),
                               token_rewards(sc.cpu(), m.cpu(), kl=r.nan_to_num().cpu(),
                                             kl_coef=0.1, backend="cpu"))
