"""The host-side work of the GPU paths of the small ops, pinned: on a GPU, policy_loss,
value_loss, gae and group_advantages are bound by the aten ops their Python layer dispatches
(each a kernel launch) and by device syncs, not by their kernels (docs/benchmarks.md, "GPU").

The counts are taken on the Triton backend (tests/hostops.py), which shares that layer with
the CUDA backend (only the kernel call differs): under TRITON_INTERPRET=1 on CPU tensors, on a
GPU on CUDA tensors.  Each case has an upper bound a little above today's count, so that a
change adding launches or syncs fails here instead of only on a GPU benchmark.

Also here: the GPU paths check data after the kernel (one flag read per call), so their
error messages are compared with the CPU backend's, and the code that replaced the torch
aggregation coefficients is run for every aggregation mode against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse.ops import (
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    value_loss,
)
from tests.helpers import HAS_CUDA, TRITON_ON_CPU
from tests.hostops import count_host_ops
from tests.ops.test_policy_loss import (
    PL,
    SEM_MODES,
    _case,
    _check_policy,
    _check_value,
    _inputs,
)

pytestmark = [
    pytest.mark.skipif(not (TRITON_ON_CPU or HAS_CUDA),
                       reason="the Triton backend needs TRITON_INTERPRET=1 or a GPU"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    # bad input reaches the interpreted kernels before the checks name it
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DEV = "cuda" if HAS_CUDA else "cpu"
BK = "triton"


# ------------------------------------------------------------------------------ counts
def _tensors(B=4, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    maskf = (torch.arange(T)[None] < lengths[:, None]).float()
    d = dict(lp=lp, old=lp + 0.1 * torch.randn(B, T, generator=g),
             ref=lp + 0.1 * torch.randn(B, T, generator=g), adv=torch.randn(B, T, generator=g),
             ent=torch.rand(B, T, generator=g), values=torch.randn(B, T, generator=g),
             returns=torch.randn(B, T, generator=g), maskf=maskf, maskb=maskf.bool(),
             maski=maskf.to(torch.int64))
    d["old_values"] = d["values"] + 0.2 * torch.randn(B, T, generator=g)
    # group_advantages: 2B samples in groups of 4, one reward per sequence
    d["tok"] = torch.zeros(2 * B, T)
    d["tok"][:, 3] = torch.arange(2 * B) % 3
    d["scores"] = d["tok"].sum(-1)
    d["mask2"] = torch.cat([d["maski"], d["maski"]])
    d["ids"] = torch.arange(2 * B) // 4
    d["n"] = torch.tensor(100.0)
    d = {k: v.to(DEV) for k, v in d.items()}
    d["x"] = d["lp"].clone().requires_grad_()  # the differentiable inputs
    d["v"] = d["values"].clone().requires_grad_()
    return d


def _pl(t, mask, **kw):
    return policy_loss(t["x"], t["old"], t["adv"], t[mask], backend=BK, **kw)[0]


def _vl(t, mask):
    return value_loss(t["v"], t["old_values"], t["returns"], t[mask], cliprange_value=0.2,
                      backend=BK)[0]


def _ga(t, kind):
    if kind == "ids":
        return group_advantages(t["tok"], group_ids=t["ids"], mask=t["mask2"],
                                semantics="verl", backend=BK)
    if kind == "size":
        return group_advantages(t["tok"], group_size=4, mask=t["mask2"], semantics="verl",
                                backend=BK)
    return group_advantages(t["scores"], group_ids=t["ids"], mask=t["mask2"],
                            semantics="verl", backend=BK)


# name: (call, pinned counts of one forward call: compute ops, every aten op, device syncs,
# host-to-device copies, Triton launches).  The same calls before these counts were pinned
# (compute ops / syncs / copies): policy_loss ppo+k3 83 / 2 / 0, gspo 90 / 2 / 0, dapo with a
# count tensor 86 / 3 / 0, value_loss 45 / 1 / 0, gae whiten 66 / 5 / 2, gae 32 / 1 / 1,
# masked_whiten 34 / 4 / 1, group_advantages 28-36 / 5-6 / 1 (docs/benchmarks.md, "GPU").
CASES = {
    "policy ppo+k3 float mask (bench)": (
        lambda t: _pl(t, "maskf", ref_logp=t["ref"], beta=0.04, epsilon_low=0.2,
                      epsilon_high=0.28), (21, 37, 1, 0, 1)),
    "policy ppo+k3 bool mask": (
        lambda t: _pl(t, "maskb", ref_logp=t["ref"], beta=0.04), (18, 36, 1, 0, 1)),
    "policy gspo (bench)": (lambda t: _pl(t, "maskf", variant="gspo"), (28, 44, 1, 0, 1)),
    "policy gspo trl": (lambda t: _pl(t, "maskb", variant="gspo", semantics="trl"),
                        (40, 60, 1, 0, 1)),
    "policy trl grpo + entropy": (
        lambda t: _pl(t, "maskb", semantics="trl", loss_agg_mode="grpo", entropy=t["ent"],
                      entropy_coef=0.01), (26, 47, 1, 0, 1)),
    "policy dapo, num_items_in_batch tensor": (
        lambda t: _pl(t, "maskb", semantics="trl", num_items_in_batch=t["n"]),
        (22, 43, 1, 0, 1)),
    "value float mask (bench)": (lambda t: _vl(t, "maskf"), (20, 31, 1, 0, 1)),
    "value bool mask": (lambda t: _vl(t, "maskb"), (16, 29, 0, 0, 1)),
    "gae whiten int64 mask (bench)": (
        lambda t: gae(t["values"], t["returns"], t["maski"], gamma=1.0, lam=0.95, whiten=True,
                      backend=BK), (12, 25, 1, 1, 3)),
    "gae int64 mask (bench)": (
        lambda t: gae(t["values"], t["returns"], t["maski"], gamma=1.0, lam=0.95, backend=BK),
        (3, 8, 1, 0, 1)),
    "gae bool mask, last_values": (
        lambda t: gae(t["values"], t["returns"], t["maskb"], gamma=0.99, lam=0.95,
                      last_values=t["values"][:, 0], backend=BK), (3, 10, 1, 0, 1)),
    "masked_whiten": (lambda t: masked_whiten(t["values"], t["maskb"], backend=BK),
                      (11, 21, 1, 1, 2)),
    "group_advantages ids, [B, T] (bench)": (lambda t: _ga(t, "ids"), (20, 32, 1, 0, 2)),
    "group_advantages group_size": (lambda t: _ga(t, "size"), (13, 17, 1, 0, 2)),
    "group_advantages [B] scores": (lambda t: _ga(t, "scores"), (17, 29, 1, 0, 2)),
}


def _count(name):
    fn, _ = CASES[name]
    t = _tensors()
    fn(t)  # warm: compile caches, cached kernel parameters
    with count_host_ops() as c:
        fn(t)
    return c


@pytest.mark.parametrize("name", list(CASES))
def test_host_ops_per_call_pinned(name):
    c = _count(name)
    got = c.summary()
    compute, aten, syncs, h2d, launches = CASES[name][1]
    detail = f"{name}: {got}; ops {dict(c.table())}; syncs {c.syncs}"
    # a little room for ops (a torch version may split one differently), none for syncs
    assert got["compute"] <= compute + 2, detail
    assert got["aten"] <= aten + 4, detail
    assert got["syncs"] <= syncs, detail
    assert got["h2d"] <= h2d, detail
    assert got["launches"] == launches, detail


# ------------------------------------------------------------------------------ results
@pytest.mark.parametrize("semantics,mode", SEM_MODES)
def test_gpu_path_every_aggregation(semantics, mode):
    """The aggregation coefficients of the GPU paths (_gpu_coefs: constants, counts, per-row
    lengths, global counts as numbers or tensors, dp_size) against the float64 reference;
    row 0 of the inputs has no token and row 1 one."""
    t = _inputs(B=4, T=9, seed=31, device=DEV)
    ent = semantics != "openrlhf"
    kw = dict(variant="ppo", semantics=semantics, loss_agg_mode=mode, beta=0.02,
              entropy_coef=0.03 if ent else 0.0)
    c = _case(t, ent=ent)
    _check_policy(c, BK, **kw)
    _check_policy(c, BK, dp_size=2, **kw)
    n = float(c["mask_in"].sum())
    if mode in ("token-mean", "dapo"):
        _check_policy(c, BK, global_num_tokens=2 * n, **kw)
        _check_policy(c, BK, num_items_in_batch=torch.tensor(2 * n, device=DEV), **kw)
    if mode.startswith("seq-mean"):
        _check_policy(c, BK, global_batch_size=torch.tensor(5, device=DEV), **kw)
        _check_policy(c, BK, global_batch_size=7, **kw)
    if mode in PL._SEM_MODES[semantics]:
        _check_value(t, BK, cliprange_value=0.2, semantics=semantics, loss_agg_mode=mode)
        if mode in ("token-mean", "dapo", "bnpo"):
            _check_value(t, BK, semantics=semantics, loss_agg_mode=mode,
                         global_num_tokens=torch.tensor(2 * n, device=DEV))
    # no token at all: loss and gradient 0, statistics finite
    lp = t["logp"].clone().requires_grad_()
    loss, st = policy_loss(lp, t["old"], t["adv"], torch.zeros_like(t["mask"]), ref_logp=t["ref"],
                           beta=0.1, loss_agg_mode=mode, semantics=semantics, backend=BK)
    (g,) = torch.autograd.grad(loss, lp)
    assert loss.item() == 0.0 and (g == 0).all() and st["num_tokens"].item() == 0
    assert all(torch.isfinite(v) for v in st.values())


def test_gpu_path_float64_and_gspo_coupling():
    """float64 inputs without KL or entropy (the loss is then a slice of the weighted sums:
    returned as a tensor of its own), and GSPO's sequence-gradient coupling."""
    t = _inputs(B=5, T=11, seed=32, dtype=torch.float64, device=DEV)
    c = _case(t, ref=False, ent=False)
    loss, _, _ = _check_policy(c, BK, rtol=1e-6, atol=1e-7, grtol=1e-5, gatol=1e-7)
    assert loss._base is None and loss.dtype == torch.float64
    c = _case(t, isw=True)
    for sem in ("trl", "openrlhf", "rlfuse"):
        _check_policy(c, BK, variant="gspo", semantics=sem, beta=0.1, rtol=1e-6, atol=1e-7,
                      grtol=1e-5, gatol=1e-7)


@pytest.mark.parametrize("semantics", ["rlfuse", "verl", "openrlhf"])
def test_gpu_group_size_path_every_method(semantics):
    """group_advantages with group_size (no sort) and with ids, every method, as the CPU
    kernel: NaN scores, ties, masks and lengths included."""
    from rlfuse.ops.advantage import GROUP_METHODS
    g = torch.Generator().manual_seed(33)
    scores = torch.randint(0, 3, (12,), generator=g).double()
    scores[::4] += 0.25
    scores[5] = float("nan")
    mask = (torch.rand(12, 5, generator=g) < 0.8).to(torch.int32)
    mask[:, 0] = 1
    lengths = mask.sum(-1).double()
    for method in GROUP_METHODS:
        kw = dict(method=method, semantics=semantics, mask=mask.to(DEV))
        if method == "opo":
            kw["lengths"] = lengths.to(DEV)
        for grouping in (dict(group_size=3), dict(group_ids=torch.arange(12) % 4)):
            gk = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v)
                  for k, v in grouping.items()}
            try:
                want = group_advantages(scores, backend="cpu",
                                        **{**kw, "mask": mask, **grouping,
                                           **({"lengths": lengths} if method == "opo" else {})})
            except ValueError as exc:
                with pytest.raises(ValueError) as got:
                    group_advantages(scores.to(DEV), backend=BK, **kw, **gk)
                assert str(got.value) == str(exc)
                continue
            got = group_advantages(scores.to(DEV), backend=BK, **kw, **gk)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"{method} {grouping}: {m}")


# ------------------------------------------------------------------------------ errors
def _nan_at(x, idx, value=float("nan")):
    x = x.clone()
    x[idx] = value
    return x


def _error_cases(dev):
    """name -> call(backend) of bad (or nearly bad) data, with tensors on ``dev``."""
    g = torch.Generator().manual_seed(34)
    r = torch.randn(3, 6, generator=g, dtype=torch.float64).to(dev)
    v = torch.randn(3, 6, generator=g, dtype=torch.float64).to(dev)
    m = torch.ones(3, 6, dtype=torch.int64, device=dev)
    m[2, 4:] = 0
    one_valid = torch.zeros(3, 6, dtype=torch.bool, device=dev)
    one_valid[1, 1] = True
    lv = torch.randn(3, generator=g, dtype=torch.float64).to(dev)
    t = _inputs(B=3, T=8, seed=35, device=dev)
    lp, old, A, pm = t["logp"], t["old"], t["adv"], t["mask"]
    s = torch.tensor([1.0, 2.0, 3.0, 5.0], device=dev)
    tok = torch.zeros(4, 3, device=dev)
    tok[:, 1] = s
    ones = torch.ones(4, 3, device=dev)

    def cnt(x):
        return torch.tensor(x, device=dev)

    return {
        "gae mask value": lambda b: gae(r, v, _nan_at(m, (1, 2), 2), gamma=0.9, lam=0.9,
                                        backend=b),
        "gae whiten mask value": lambda b: gae(r, v, _nan_at(m.float(), (0, 3), 0.5),
                                               gamma=0.9, lam=0.9, whiten=True, backend=b),
        "gae whiten reward": lambda b: gae(_nan_at(r, (2, 1)), v, m, gamma=0.9, lam=0.9,
                                           whiten=True, backend=b),
        "gae whiten value inf": lambda b: gae(r, _nan_at(v, (1, 5), float("inf")), m,
                                              gamma=0.9, lam=0.9, whiten=True, backend=b),
        "gae masked value NaN is fine, last_values NaN": lambda b: gae(
            r, _nan_at(v, (2, 5)), m, gamma=0.9, lam=0.9, last_values=_nan_at(lv, 1),
            backend=b),
        "gae whiten last_values inf, empty row": lambda b: gae(
            r, v, _nan_at(m, 2, 0), gamma=0.9, lam=0.9, whiten=True,
            last_values=_nan_at(lv, 2, float("inf")), backend=b),
        "gae whiten one valid token": lambda b: gae(r, v, one_valid, gamma=0.9, lam=0.9,
                                                    whiten=True, backend=b),
        "masked_whiten x NaN": lambda b: masked_whiten(_nan_at(r, (0, 0)), m, backend=b),
        "masked_whiten mask value": lambda b: masked_whiten(r, _nan_at(m, (2, 2), -1),
                                                            backend=b),
        "masked_mean no element": lambda b: masked_mean(r, torch.zeros_like(m), backend=b),
        "masked_var one element": lambda b: masked_var(r, one_valid, backend=b),
        "masked_mean dim mask value": lambda b: masked_mean(r, _nan_at(m, (0, 1), 3), 1,
                                                            backend=b),
        "group inf score": lambda b: group_advantages(_nan_at(s, 2, float("inf")),
                                                      group_size=2, backend=b),
        "group inf token": lambda b: group_advantages(_nan_at(tok, (3, 1), -float("inf")),
                                                      group_size=2, mask=ones, backend=b),
        "group inf token masked out is fine, mask value": lambda b: group_advantages(
            _nan_at(tok, (3, 2), float("inf")), group_size=2,
            mask=_nan_at(_nan_at(ones, (3, 2), 0), (1, 0), 2), backend=b),
        "group lonely (ids)": lambda b: group_advantages(
            _nan_at(s, 1), group_ids=cnt([5, 5, 1, 1]), semantics="openrlhf", backend=b),
        "group lonely (size)": lambda b: group_advantages(
            _nan_at(s, 3), group_size=2, method="rloo", semantics="openrlhf", backend=b),
        "group rf++ whitening": lambda b: group_advantages(
            s, group_size=2, method="reinforce_pp_baseline",
            mask=cnt([[1, 0], [0, 0], [0, 0], [0, 0]]), backend=b),
        "policy float mask value": lambda b: policy_loss(lp, old, A, _nan_at(pm.float(), (2, 5),
                                                                             0.5), backend=b),
        "policy advantage inf": lambda b: policy_loss(
            lp, old, _nan_at(A, (2, 3), float("inf")), _nan_at(pm, (2, 3), True), backend=b),
        "policy count tensor 0": lambda b: policy_loss(
            lp, old, A, pm, num_items_in_batch=cnt(0.0), backend=b),
        "policy count tensor NaN, mask value": lambda b: policy_loss(
            lp, old, A, _nan_at(pm.float(), (0, 0), 3.0), loss_agg_mode="seq-mean-token-mean",
            global_batch_size=cnt(float("nan")), backend=b),
        "value mask value": lambda b: value_loss(t["values"], t["old_values"], t["returns"],
                                                 _nan_at(pm.to(torch.int8), (1, 1), -1),
                                                 backend=b),
        "value count tensor": lambda b: value_loss(
            t["values"], None, t["returns"], pm, global_num_tokens=cnt(-3.0), backend=b),
    }


@pytest.mark.parametrize("name", list(_error_cases("cpu")))
def test_gpu_data_errors_match_the_cpu_backend(name):
    """The GPU paths check data after their kernels (one read per call); the errors they
    raise are the CPU backend's, word for word (and where it raises none, neither do they)."""

    def outcome(backend, dev):
        try:
            _error_cases(dev)[name](backend)
        except ValueError as exc:
            return str(exc)
        return "no error"

    assert outcome(BK, DEV) == outcome("cpu", "cpu")
