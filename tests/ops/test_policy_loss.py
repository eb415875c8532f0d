"""rlfuse.ops kl_penalty / policy_loss / value_loss: parity with the float64 reference for every
variant, aggregation and semantics, gradients, views, thread-count invariance, torch.library
and torch.compile integration, and bad input."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlfuse import _backend
from rlfuse.ops import (
    kl_penalty,
    kl_penalty_reference,
    policy_loss,
    policy_loss_reference,
    value_loss,
    value_loss_reference,
)
from tests.helpers import HAS_CUDA, TRITON_ON_CPU

PL = importlib.import_module("rlfuse.ops.policy_loss")

# The Triton interpreter itself trips a numpy deprecation on scalar loop bounds.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")

# Backends that run here; Triton runs under the interpreter on CPU tensors (tiny shapes).
BACKENDS = ["cpu", "torch"] + (["triton"] if TRITON_ON_CPU or HAS_CUDA else [])
DEV = {"cpu": "cpu", "torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "cuda": "cuda"}

SEM_VARIANTS = [(s, v) for s in PL.SEMANTICS for v in PL._SEM_VARIANTS[s]]
SEM_MODES = [(s, m) for s in PL.SEMANTICS for m in PL._SEM_MODES[s]]


# ------------------------------------------------------------------------------ inputs
def _inputs(B=6, T=37, dtype=torch.float32, device="cpu", seed=0, spread=0.3):
    """Random rollout tensors; row 0 is fully masked, row 1 has a single token."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 3 + 0.05)
    d = dict(
        logp=lp,
        old=lp + spread * rn(B, T),
        ref=lp + spread * rn(B, T),
        adv=rn(B, T),
        ent=torch.rand(B, T, generator=g, dtype=torch.float64) * 3,
        isw=torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5,
        values=rn(B, T),
        returns=rn(B, T),
    )
    d["old_values"] = d["values"] + 0.3 * rn(B, T)
    mask = torch.rand(B, T, generator=g) < 0.7
    if B > 0:
        mask[0] = False
    if B > 1 and T > 0:
        mask[1] = False
        mask[1, T // 2] = True
    out = {k: v.to(dtype).to(device) for k, v in d.items()}
    out["mask"] = mask.to(device)
    return out


def _f64(x):
    return None if x is None else x.detach().to(torch.float64)


def _ref_policy(t, grad_entropy=True, **kw):
    """float64 reference loss, stats and gradients w.r.t. logp and entropy."""
    lp = t["logp"].detach().double().requires_grad_()
    ent = t.get("ent_in")
    H = None if ent is None else ent.detach().double().requires_grad_(grad_entropy)
    loss, stats = policy_loss_reference(
        lp, _f64(t.get("old_in")), _f64(t["adv_in"]), t["mask_in"],
        ref_logp=_f64(t.get("ref_in")), entropy=H, is_weights=_f64(t.get("isw_in")), **kw)
    wrt = [lp] + ([H] if H is not None and grad_entropy else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, wrt)]
    return loss, stats, grads


def _run_policy(t, backend, **kw):
    lp = t["logp"].detach().clone().requires_grad_()
    ent = t.get("ent_in")
    H = None if ent is None else ent.detach().clone().requires_grad_()
    loss, stats = policy_loss(lp, t.get("old_in"), t["adv_in"], t["mask_in"],
                              ref_logp=t.get("ref_in"), entropy=H,
                              is_weights=t.get("isw_in"), backend=backend, **kw)
    wrt = [lp] + ([H] if H is not None else [])
    grads = torch.autograd.grad(loss, wrt)
    return loss, stats, grads


def _case(t, *, old=True, ref=True, ent=True, isw=False, adv="bt", mask=None):
    c = dict(logp=t["logp"], mask_in=t["mask"] if mask is None else mask)
    c["old_in"] = t["old"] if old else None
    c["ref_in"] = t["ref"] if ref else None
    c["ent_in"] = t["ent"] if ent else None
    c["isw_in"] = t["isw"] if isw else None
    a = t["adv"]
    a0 = a[:, :1] if a.size(1) else torch.zeros(a.size(0), 1, dtype=a.dtype, device=a.device)
    c["adv_in"] = {"bt": a, "b": a0[:, 0].contiguous(), "b1": a0.contiguous()}[adv]
    return c


def _close(got, want, rtol, atol, what, floor=0.0):
    """``atol`` is relative to the larger of ``want``'s magnitude and ``floor`` (the size of
    the terms a reduction sums: a mean of +-1 terms that cancels to 1e-4 still carries the
    float32 rounding of its terms)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = max(want.abs().max().item() if want.numel() else 0.0, floor)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(scale, 1e-30) + 1e-12,
                               msg=lambda m: f"{what}: {m}")


def _check_policy(t, backend, rtol=2e-5, atol=2e-6, grtol=1e-4, gatol=2e-6, **kw):
    loss, stats, grads = _run_policy(t, backend, **kw)
    rloss, rstats, rgrads = _ref_policy(t, **kw)
    # the per-token terms are of the advantages' size: the floor of the reductions' atol
    m = t["mask_in"].cpu().bool()
    adv = t["adv_in"].detach().double().cpu()
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand(m.shape)
    floor = adv[m].abs().mean().item() if bool(m.any()) else 0.0
    _close(loss, rloss, rtol, atol, "loss", floor)
    assert set(stats) == set(rstats)
    for k in stats:
        _close(stats[k], rstats[k], rtol, atol, f"stat {k}", floor)
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        assert g.shape == r.shape
        _close(g, r, grtol, gatol, ["d logp", "d entropy"][i])
    return loss, stats, grads


# ------------------------------------------------------------------------------ KL
KL_KINDS = ["k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "k3+", "abs+", "k2+"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semantics", PL.SEMANTICS)
@pytest.mark.parametrize("kind", KL_KINDS)
def test_kl_parity(backend, semantics, kind):
    if kind not in PL._SEM_KL[semantics]:
        with pytest.raises(ValueError, match="kind"):
            kl_penalty(torch.zeros(2), torch.zeros(2), kind, semantics=semantics)
        return
    dev = DEV[backend]
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(5, 33, generator=g, dtype=torch.float64) * 4
    d = torch.randn(5, 33, generator=g, dtype=torch.float64) * 4
    d[0, :5] = torch.tensor([30.0, -30.0, 1e-4, -1e-4, 0.0])  # clamps and tiny differences
    ref = lp - d
    x = lp.float().to(dev).requires_grad_()
    v = kl_penalty(x, ref.float().to(dev), kind, semantics=semantics, backend=backend)
    assert v.dtype == torch.float32 and v.shape == lp.shape
    go = torch.randn(5, 33, generator=g).to(dev)
    (gx,) = torch.autograd.grad(v, x, go)
    xr = lp.float().double().requires_grad_()
    rv = kl_penalty_reference(xr, ref.float().double(), kind, semantics=semantics)
    (rg,) = torch.autograd.grad(rv, xr, go.double().cpu())
    _close(v, rv, 1e-5, 1e-7, "kl")
    _close(gx, rg, 1e-5, 1e-7, "kl grad")


def test_kl_formulas_written_out():
    """The estimators and clamps, written out independently of the reference."""
    lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0, -0.5, -40.0, 30.0], dtype=torch.float64)
    d = lp - ref
    want = {"k1": d, "abs": d.abs(), "k2": 0.5 * d * d, "k3": torch.exp(-d) + d - 1}
    for kind, w in want.items():
        torch.testing.assert_close(kl_penalty(lp, ref, kind), w)
    # verl: clamp(ref - logp, -20, 20) inside k3, then the value to [-10, 10]
    q = (-d).clamp(-20, 20)
    torch.testing.assert_close(kl_penalty(lp, ref, "k3", semantics="verl"),
                               (q.exp() - q - 1).clamp(-10, 10))
    # OpenRLHF: every kind's value clamped to [-10, 10]
    torch.testing.assert_close(kl_penalty(lp, ref, "k1", semantics="openrlhf"), d.clamp(-10, 10))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2", clamp=1.0), (0.5 * d * d).clamp(-1, 1))
    # straight-through: value of k3, gradient of k2 (d)
    x = lp.clone().requires_grad_()
    v = kl_penalty(x, ref, "k3+")
    torch.testing.assert_close(v, want["k3"])
    (g,) = torch.autograd.grad(v.sum(), x)
    torch.testing.assert_close(g, d)


def test_kl_k3_accurate_near_zero():
    """e^-d + d - 1 cancels for small d; the kernel keeps ~float32 relative accuracy there."""
    d = torch.tensor([1e-6, -1e-5, 3e-4, -2e-3, 0.1, -0.3, 0.45], dtype=torch.float64)
    lp = torch.full_like(d, -1.0)
    ref = lp - d
    exact = torch.expm1(-d) + d  # float64
    v = kl_penalty(lp.float(), ref.float(), "k3").double()
    dd = lp.float().double() - ref.float().double()  # the float32-rounded difference
    exact = torch.expm1(-dd) + dd
    assert ((v - exact).abs() <= 1e-6 * exact.abs() + 1e-30).all(), (v, exact)
    x = lp.float().requires_grad_()
    (g,) = torch.autograd.grad(kl_penalty(x, ref.float(), "k3").sum(), x)
    want = -torch.expm1(-dd)
    assert ((g.double() - want).abs() <= 1e-6 * want.abs()).all()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_kl_shapes_views_dtypes(backend):
    base = torch.randn(3, 8, 10, dtype=torch.float64) - 1
    ref = base + 0.3 * torch.randn_like(base)
    for x, r in [(base, ref), (base[:, ::2, 1:], ref[:, ::2, 1:]), (base[0, 0], ref[0, 0]),
                 (base[0, 0, 0], ref[0, 0, 0]), (base.transpose(0, 2), ref.transpose(0, 2))]:
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            xx = x.to(dt)
            got = kl_penalty(xx, r.to(torch.float32), "k3", backend=backend)
            want = kl_penalty_reference(xx.double(), r.float().double(), "k3")
            assert got.shape == x.shape
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert kl_penalty(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


def test_kl_gradcheck_float64():
    x = (torch.randn(4, 7, dtype=torch.float64) - 1).requires_grad_()
    ref = x.detach() + 0.5 * torch.randn(4, 7, dtype=torch.float64)
    for kind in ("k1", "abs", "k2", "k3"):
        assert torch.autograd.gradcheck(lambda z: kl_penalty(z, ref, kind, backend="cpu"), (x,))


def test_kl_bad_input():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="logp"):
        kl_penalty(x.long(), x)
    with pytest.raises(TypeError, match="ref_logp"):
        kl_penalty(x, x.numpy())
    with pytest.raises(ValueError, match="ref_logp"):
        kl_penalty(x, x[:, :3])
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(x, x, "k4")
    with pytest.raises(TypeError, match="kind"):
        kl_penalty(x, x, 3)
    with pytest.raises(ValueError, match="clamp"):
        kl_penalty(x, x, clamp=-1.0)
    with pytest.raises(ValueError, match="semantics"):
        kl_penalty(x, x, semantics="deepspeed")


# ------------------------------------------------------------------------------ policy loss
@pytest.mark.parametrize("semantics,variant", SEM_VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_parity_every_variant(backend, semantics, variant):
    dev = DEV[backend]
    small = backend == "triton" and TRITON_ON_CPU
    t = _inputs(B=4 if small else 7, T=21 if small else 301, device=dev, seed=2)
    kw = dict(variant=variant, semantics=semantics, beta=0.05,
              entropy_coef=0.01 if semantics != "openrlhf" else 0.0)
    if semantics in ("rlfuse", "verl"):
        kw["kl_kind"] = "k3"
    _check_policy(_case(t, isw=True), backend, **kw)


@pytest.mark.parametrize("semantics,mode", SEM_MODES)
def test_policy_parity_every_aggregation(semantics, mode):
    t = _inputs(B=7, T=65, seed=3)
    variants = {"openrlhf": "ppo"}
    kw = dict(variant=variants.get(semantics, "ppo"), semantics=semantics, loss_agg_mode=mode,
              beta=0.02)
    for backend in ("cpu", "torch"):
        _check_policy(_case(t, ent=semantics != "openrlhf"), backend,
                      entropy_coef=0.0 if semantics == "openrlhf" else 0.03, **kw)


def test_aggregation_formulas_written_out():
    """Each loss_agg_mode against its formula on a per-token loss (gpg: l = -A * logp)."""
    t = _inputs(B=5, T=9, dtype=torch.float64, seed=4)
    lp, A, m = t["logp"], t["adv"], t["mask"]
    mf = m.double()
    ell = torch.where(m, -A * lp, torch.zeros(()))
    L = mf.sum(-1)
    N, G, B, T = mf.sum(), (L > 0).sum(), 5, 9
    per_seq_mean = torch.where(L > 0, ell.sum(-1) / L.clamp(min=1), torch.zeros(()))
    want = {
        "token-mean": ell.sum() / N,
        "token-sum": ell.sum(),
        "seq-mean-token-mean": per_seq_mean.sum() / G,
        "seq-mean-token-sum": ell.sum() / G,
        "seq-mean-token-sum-norm": ell.sum() / G / T,
        "grpo": (ell.sum(-1) / L.clamp(min=1)).mean(),
        "bnpo": ell.sum() / N,
        "dr_grpo": ell.sum() / (B * T),
        "dapo": ell.sum() / N,
        "luspo": ell.sum(-1).mean(),
    }
    for mode, w in want.items():
        loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode=mode)
        torch.testing.assert_close(loss, w, msg=mode)
    # global counts, dp_size, scale factors
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", global_num_tokens=100.0, dp_size=4)
    torch.testing.assert_close(loss, ell.sum() / 100 * 4)
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode="seq-mean-token-mean",
                          global_batch_size=torch.tensor(8))
    torch.testing.assert_close(loss, per_seq_mean.sum() / 8)
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode="seq-mean-token-sum-norm",
                          loss_scale_factor=3.0)
    torch.testing.assert_close(loss, ell.sum() / G / 3)
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode="dr_grpo",
                          max_completion_length=50)
    torch.testing.assert_close(loss, ell.sum() / (B * 50))
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode="dapo",
                          num_items_in_batch=torch.tensor(77.0))
    torch.testing.assert_close(loss, ell.sum() / 77)
    # counts a mode does not use are ignored (as verl's global_batch_info and TRL's
    # num_items_in_batch are)
    for mode in ("seq-mean-token-mean", "grpo", "bnpo", "luspo", "token-sum"):
        a, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode=mode)
        b, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode=mode,
                           num_items_in_batch=1234, loss_scale_factor=7.0)
        assert torch.equal(a, b), mode
    # verl / OpenRLHF seq-mean-token-mean divide by (L + 1e-8)
    loss, _ = policy_loss(lp, None, A, m, variant="gpg", loss_agg_mode="seq-mean-token-mean",
                          semantics="verl")
    torch.testing.assert_close(loss, (ell.sum(-1) / (L + 1e-8)).sum() / G)


def test_variant_formulas_written_out():
    """Per-token policy terms on handcrafted ratios, independent of the reference."""
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    r = torch.tensor([[0.5, 0.9, 1.0, 1.5, 5.0, 0.5]], dtype=torch.float64)
    old = lp - r.log()
    A = torch.tensor([[1.0, -1.0, 2.0, 1.0, -1.0, -2.0]], dtype=torch.float64)
    m = torch.ones(1, 6, dtype=torch.bool)

    def loss_of(**kw):
        kw.setdefault("loss_agg_mode", "token-sum")
        return policy_loss(lp, old, A, m, **kw)[0]

    clip = r.clamp(0.8, 1.2)
    ppo = torch.maximum(-A * r, -A * clip)
    torch.testing.assert_close(loss_of(), ppo.sum())
    dual = torch.where(A < 0, torch.minimum(ppo, -3.0 * A), ppo)
    torch.testing.assert_close(loss_of(clip_ratio_c=3.0), dual.sum())
    torch.testing.assert_close(loss_of(semantics="verl"), dual.sum())  # verl default c = 3
    trl_delta = -torch.minimum(A * r.clamp(max=2.0), A * clip)
    torch.testing.assert_close(loss_of(delta=2.0, semantics="trl", loss_agg_mode="dapo"),
                               trl_delta.sum() / 6)
    torch.testing.assert_close(loss_of(variant="cispo"), (-clip * A * lp).sum())
    trl_cispo = -r.clamp(max=4.0) * A * lp
    torch.testing.assert_close(policy_loss(lp, old, A, m, variant="cispo", semantics="trl",
                                           epsilon_high=4.0)[0], trl_cispo.sum() / 6)
    tau = torch.where(A > 0, torch.tensor(1.0, dtype=torch.float64),
                      torch.tensor(1.05, dtype=torch.float64))
    sapo = -(torch.sigmoid(tau * (r - 1)) * 4 / tau) * A
    torch.testing.assert_close(loss_of(variant="sapo"), sapo.sum())
    torch.testing.assert_close(loss_of(variant="gpg"), (-A * lp).sum())
    s = r.log().mean().exp()
    gspo = torch.maximum(-A * s, -A * s.clamp(0.8, 1.2))
    torch.testing.assert_close(loss_of(variant="gspo"), gspo.sum())
    # asymmetric clip (DAPO clip-higher)
    clip2 = r.clamp(1 - 0.1, 1 + 0.28)
    torch.testing.assert_close(loss_of(epsilon_low=0.1, epsilon_high=0.28),
                               torch.maximum(-A * r, -A * clip2).sum())
    # statistics
    _, st = policy_loss(lp, old, A, m, clip_ratio_c=3.0)
    assert st["clip_frac_low"].item() == pytest.approx(1 / 6)  # r = 0.5, A = -2
    assert st["clip_frac_high"].item() == pytest.approx(1 / 6)  # r = 1.5, A > 0
    assert st["dual_clip_frac"].item() == pytest.approx(1 / 6)  # r = 5, A = -1: 5 > 3
    assert st["ratio_mean"].item() == pytest.approx(r.mean().item())
    assert st["approx_kl"].item() == pytest.approx((old - lp).mean().item())


def test_gspo_gradient_forms():
    """verl (GSPO-token, stop-gradient) vs TRL/OpenRLHF (through the sequence mean) differ
    only when advantages vary inside a sequence."""
    t = _inputs(B=4, T=12, dtype=torch.float64, seed=5)
    c = _case(t, ent=False, ref=False)
    c["adv_in"] = t["adv"][:, 0].contiguous()  # per-sequence advantages
    g = {}
    for sem in ("rlfuse", "trl"):  # both: c_i = 1 / (B L_i)
        kw = dict(loss_agg_mode="grpo") if sem == "trl" else dict(
            loss_agg_mode="seq-mean-token-mean", global_batch_size=4)
        g[sem] = _run_policy(c, "cpu", variant="gspo", semantics=sem, **kw)[2][0]
        _check_policy(c, "cpu", variant="gspo", semantics=sem, **kw)
    rows = c["mask_in"].any(-1)
    torch.testing.assert_close(g["rlfuse"][rows], g["trl"][rows])
    c["adv_in"] = t["adv"]  # per-token advantages: the two gradients differ
    a = _run_policy(c, "cpu", variant="gspo", semantics="rlfuse")[2][0]
    b = _run_policy(c, "cpu", variant="gspo", semantics="trl", loss_agg_mode="dapo")[2][0]
    assert not torch.allclose(a, b)
    _check_policy(c, "cpu", variant="gspo", semantics="trl", loss_agg_mode="dapo")


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_options(backend):
    """Ratio-weighted KL, importance weights, [B] / [B, 1] advantages, on-policy (old=None),
    each KL kind, delta and dual clip, for the GSPO coupling too."""
    dev = DEV[backend]
    small = backend == "triton" and TRITON_ON_CPU
    t = _inputs(B=5, T=19 if small else 130, device=dev, seed=6)
    for variant, sem, kw in [
        ("ppo", "rlfuse", dict(kl_ratio_weighted=True, kl_kind="k2", delta=1.5, clip_ratio_c=2.0)),
        ("gspo", "trl", dict(kl_ratio_weighted=True, loss_agg_mode="grpo")),
        ("gspo", "rlfuse", dict(kl_ratio_weighted=True, kl_kind="abs+")),
        ("ppo", "verl", dict(kl_kind="k1+", kl_clamp=0.5)),
        ("sapo", "trl", dict(tau_pos=2.0, tau_neg=3.0)),
        ("cispo", "rlfuse", dict(epsilon_low=0.5, epsilon_high=0.1, kl_kind="mse")),
        ("reinforce", "verl", dict(kl_kind="low_var_kl", loss_agg_mode="seq-mean-token-sum")),
    ]:
        for adv in ("bt", "b", "b1"):
            for old in (True, False):
                c = _case(t, isw=True, adv=adv, old=old)
                _check_policy(c, backend, variant=variant, semantics=sem, beta=0.2, **kw)


@given(
    B=st.integers(0, 6),
    T=st.integers(0, 70),
    variant=st.sampled_from(list(PL.VARIANTS)),
    mode=st.sampled_from(list(PL.LOSS_AGG_MODES)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    adv=st.sampled_from(["bt", "b", "b1"]),
    mask_dtype=st.sampled_from([torch.bool, torch.uint8, torch.int32, torch.float32]),
    spread=st.sampled_from([0.0, 0.05, 1.0, 8.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_policy_parity_random(B, T, variant, mode, dtype, flags, adv, mask_dtype, spread, seed):
    old, ref, ent, isw = flags
    t = _inputs(B=B, T=T, dtype=dtype, seed=seed, spread=spread)
    c = _case(t, old=old, ref=ref, ent=ent, isw=isw, adv=adv, mask=t["mask"].to(mask_dtype))
    kw = dict(variant=variant, loss_agg_mode=mode, beta=0.1 if ref else 0.0,
              entropy_coef=0.02 if ent else 0.0)
    tol = dict(rtol=1e-10, atol=1e-12, grtol=1e-9, gatol=1e-12) if dtype == torch.float64 else {}
    if dtype == torch.bfloat16:  # inputs are bf16, math float32; gradients rounded to bf16
        tol = dict(grtol=1e-2, gatol=5e-3)
    _check_policy(c, "cpu", **kw, **tol)


def test_masked_positions_never_leak():
    """NaN / inf in every input under mask 0 change nothing (they are selected away)."""
    t = _inputs(B=4, T=40, seed=7)
    c = _case(t, isw=True)
    want = _run_policy(c, "cpu", beta=0.1, entropy_coef=0.1, variant="ppo")
    m = c["mask_in"]
    dirty = dict(c)
    for k in ("logp", "old_in", "ref_in", "ent_in", "isw_in", "adv_in"):
        x = c[k].clone()
        x[~m] = float("nan")
        x[~m & (torch.arange(40) % 2 == 0)] = float("inf")
        dirty[k] = x
    for backend in ("cpu", "torch"):
        got = _run_policy(dirty, backend, beta=0.1, entropy_coef=0.1, variant="ppo")
        if backend == "cpu":
            assert torch.equal(got[0], want[0])
        assert torch.isfinite(got[0])
        for g, w in zip(got[2], want[2]):
            assert torch.equal(g[~m], torch.zeros_like(g[~m]))
            torch.testing.assert_close(g, w)


def test_empty_and_fully_masked():
    for B, T in ((0, 5), (3, 0), (0, 0)):
        lp = torch.randn(B, T, requires_grad=True)
        loss, st = policy_loss(lp, lp.detach(), torch.randn(B, T),
                               torch.ones(B, T, dtype=torch.bool))
        assert loss.item() == 0 and st["num_tokens"].item() == 0
        (g,) = torch.autograd.grad(loss, lp, allow_unused=True)
        assert g is None or g.shape == (B, T)
    t = _inputs(B=3, T=8)
    lp = t["logp"].clone().requires_grad_()
    for mode in PL.LOSS_AGG_MODES:
        loss, st = policy_loss(lp, t["old"], t["adv"], torch.zeros(3, 8), loss_agg_mode=mode,
                               ref_logp=t["ref"], beta=0.1)
        (g,) = torch.autograd.grad(loss, lp)
        assert loss.item() == 0.0 and (g == 0).all() and st["num_tokens"].item() == 0
        assert all(torch.isfinite(v) for v in st.values())


def test_gradient_accumulation_with_global_count():
    """Micro-batches with global_num_tokens (or global_batch_size) sum to the full batch."""
    t = _inputs(B=8, T=50, dtype=torch.float64, seed=8)
    c = _case(t)
    kw = dict(beta=0.1, entropy_coef=0.05)
    full, _, full_g = _run_policy(c, "cpu", **kw)
    n = c["mask_in"].sum().item()
    G = c["mask_in"].any(-1).sum().item()
    for mode, extra in (("token-mean", dict(global_num_tokens=n)),
                        ("seq-mean-token-mean", dict(global_batch_size=G))):
        full, _, full_g = _run_policy(c, "cpu", loss_agg_mode=mode, **kw)
        parts, grads = 0.0, []
        for rows in (slice(0, 3), slice(3, 8)):
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
            loss, _, g = _run_policy(sub, "cpu", loss_agg_mode=mode, **extra, **kw)
            parts = parts + loss
            grads.append(g[0])
        torch.testing.assert_close(parts, full)
        torch.testing.assert_close(torch.cat(grads), full_g[0])


# gradcheck compares with finite differences of the loss value, so it applies where the
# gradient is the true derivative: not to stop-gradient objectives (GSPO-token, CISPO, the
# straight-through "+" estimators), which the reference-gradient tests cover instead.
@pytest.mark.parametrize("variant,sem", [("ppo", "rlfuse"), ("ppo", "trl"), ("sapo", "rlfuse"),
                                         ("gpg", "verl"), ("gspo", "trl"),
                                         ("gspo", "openrlhf")])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(variant, sem, backend):
    t = _inputs(B=3, T=6, dtype=torch.float64, seed=9)
    m, old, A, ref = t["mask"], t["old"], t["adv"], t["ref"]
    mode = {"trl": "grpo", "openrlhf": "seq-mean-token-mean"}.get(sem, "seq-mean-token-mean")
    for _ in range(1):
        kw = dict(variant=variant, semantics=sem, beta=0.3 if sem != "openrlhf" else 0.0,
                  entropy_coef=0.2 if sem != "openrlhf" else 0.0,
                  kl_ratio_weighted=sem == "trl", loss_agg_mode=mode)
        if sem == "openrlhf":
            ref = None

        def f(lp, H):
            return policy_loss(lp, old, A, m, ref_logp=ref, entropy=H, backend=backend, **kw)[0]

        lp = t["logp"].clone().requires_grad_()
        H = t["ent"].clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (lp, H))


def test_thread_count_invariance_bitwise():
    t = _inputs(B=9, T=777, seed=10)
    c = _case(t, isw=True)
    old = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for variant in ("ppo", "gspo"):
                res.append((n, variant, _run_policy(c, "cpu", variant=variant, beta=0.1,
                                                    entropy_coef=0.1, semantics="rlfuse")))
    finally:
        torch.set_num_threads(old)
    first = {v: r for n, v, r in res if n == 1}
    for n, v, (loss, stats, grads) in res:
        loss0, stats0, grads0 = first[v]
        assert torch.equal(loss, loss0)
        assert all(torch.equal(stats[k], stats0[k]) for k in stats)
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, grads0))


def test_row_gradients_do_not_depend_on_other_rows():
    """With a per-row-constant aggregation (token-sum), a row's gradient is bitwise the same
    in any batch: rows are computed independently, in a fixed order."""
    t = _inputs(B=8, T=300, seed=11)
    c = _case(t, isw=True)
    _, _, full = _run_policy(c, "cpu", loss_agg_mode="token-sum", beta=0.1)
    for rows in (slice(2, 3), slice(5, 8)):
        sub = {k: (v[rows].clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
        _, _, part = _run_policy(sub, "cpu", loss_agg_mode="token-sum", beta=0.1)
        assert torch.equal(part[0], full[0][rows])


@pytest.mark.parametrize("isa", ["x86-64-v2", "x86-64-v3", "x86-64-v4"])
def test_every_isa_build(isa):
    c = _backend.cpu_module()
    old = c.active_isa()
    if not c.set_isa(isa):
        pytest.skip(f"this CPU lacks {isa}")
    try:
        t = _inputs(B=5, T=203, seed=12)
        for variant in PL.VARIANTS:
            _check_policy(_case(t, isw=True), "cpu", variant=variant, beta=0.1,
                          entropy_coef=0.1)
        _check_value(t, "cpu", cliprange_value=0.2)
        x = t["logp"]
        for kind in ("k1", "k3", "abs"):
            torch.testing.assert_close(kl_penalty(x, t["ref"], kind).double(),
                                       kl_penalty_reference(x.double(), t["ref"].double(), kind),
                                       rtol=1e-5, atol=1e-6)
    finally:
        c.set_isa(old)


def test_views_dtypes_and_masks():
    """Non-contiguous views (transposed, sliced), low-precision inputs, every mask dtype."""
    t = _inputs(B=6, T=40, dtype=torch.float64, seed=13)
    big = {k: torch.cat([v, v], 1).t().contiguous().t() for k, v in t.items() if k != "mask"}
    views = {k: v[:, ::2] for k, v in big.items()}  # [B, T] with strides (1, 2B)
    c = _case(t, isw=True)
    cv = dict(c, logp=views["logp"].float(), old_in=views["old"].bfloat16(),
              adv_in=views["adv"].half(), ref_in=views["ref"].float(), ent_in=views["ent"].float(),
              isw_in=views["isw"].bfloat16())
    for md in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.bfloat16, torch.float32, torch.float64):
        cv["mask_in"] = c["mask_in"].to(md)
        _check_policy(cv, "cpu", beta=0.1, entropy_coef=0.1, variant="ppo")
    lp16 = dict(cv, logp=t["logp"].bfloat16())
    loss, _, (g, _) = _run_policy(lp16, "cpu", beta=0.1)
    assert g.dtype == torch.bfloat16 and loss.dtype == torch.float32


def test_no_grad_and_need_grad():
    t = _inputs(B=4, T=30, seed=14)
    # (the CPU kernel has a separate instantiation for plain PPO without a gradient)
    for kw in (dict(), dict(ref_logp=t["ref"], beta=0.1, kl_kind="k1"),
               dict(ref_logp=t["ref"], beta=0.1), dict(ref_logp=t["ref"], beta=0.1,
                                                       kl_kind="k3+")):
        with torch.no_grad():
            a, sa = policy_loss(t["logp"], t["old"], t["adv"], t["mask"], **kw)
        lp = t["logp"].clone().requires_grad_()
        b, sb = policy_loss(lp, t["old"], t["adv"], t["mask"], **kw)
        assert torch.equal(a, b.detach()) and not a.requires_grad
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # gradient through entropy only
    H = t["ent"].clone().requires_grad_()
    loss, _ = policy_loss(t["logp"], t["old"], t["adv"], t["mask"], entropy=H, entropy_coef=0.5)
    (gh,) = torch.autograd.grad(loss, H)
    n = t["mask"].sum()
    torch.testing.assert_close(gh, torch.where(t["mask"], -0.5 / n, 0.0))


def test_poisoned_allocations(monkeypatch):
    """Outputs come from torch.empty; NaN-filled fresh allocations expose unwritten elements."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        x = real_empty(*args, **kwargs)
        if x.is_floating_point():
            x.fill_(float("nan"))
        return x

    monkeypatch.setattr(torch, "empty", poisoned)
    t = _inputs(B=5, T=37, seed=15)
    for variant in PL.VARIANTS:
        loss, stats, grads = _run_policy(_case(t, isw=True), "cpu", variant=variant, beta=0.1,
                                         entropy_coef=0.1)
        assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
        assert all(torch.isfinite(g).all() for g in grads)
    v = t["values"].clone().requires_grad_()
    loss, st = value_loss(v, t["old_values"], t["returns"], t["mask"], cliprange_value=0.2)
    (g,) = torch.autograd.grad(loss, v)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    x = t["logp"].clone().requires_grad_()
    k = kl_penalty(x, t["ref"])
    (g,) = torch.autograd.grad(k.sum(), x)
    assert torch.isfinite(k).all() and torch.isfinite(g).all()


def test_eager_function_and_library_op_agree(monkeypatch):
    t = _inputs(B=5, T=50, seed=16)
    c = _case(t, isw=True)
    a = _run_policy(c, "cpu", variant="gspo", semantics="trl", beta=0.1, entropy_coef=0.1)
    monkeypatch.setattr(PL, "_EAGER_AUTOGRAD_FUNCTION", False)
    b = _run_policy(c, "cpu", variant="gspo", semantics="trl", beta=0.1, entropy_coef=0.1)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    x = t["logp"].clone().requires_grad_()
    (g1,) = torch.autograd.grad(kl_penalty(x, t["ref"]).sum(), x)
    v = t["values"].clone().requires_grad_()
    l1, _ = value_loss(v, t["old_values"], t["returns"], t["mask"], cliprange_value=0.2)
    (gv1,) = torch.autograd.grad(l1, v)
    monkeypatch.setattr(PL, "_EAGER_AUTOGRAD_FUNCTION", True)
    (g2,) = torch.autograd.grad(kl_penalty(x, t["ref"]).sum(), x)
    l2, _ = value_loss(v, t["old_values"], t["returns"], t["mask"], cliprange_value=0.2)
    (gv2,) = torch.autograd.grad(l2, v)
    assert torch.equal(g1, g2) and torch.equal(l1, l2) and torch.equal(gv1, gv2)


def test_opcheck():
    t = _inputs(B=3, T=9, seed=17)
    lp = t["logp"].clone().requires_grad_()
    H = t["ent"].clone().requires_grad_()
    for variant, sem in (("ppo", "verl"), ("gspo", "trl"), ("sapo", "rlfuse")):
        cfg, counts = PL._policy_prepare(
            "policy_loss", lp, t["old"], t["adv"], t["mask"], t["ref"], H, None,
            dict(variant=variant, epsilon=0.2, epsilon_low=None, epsilon_high=None,
                 clip_ratio_c=None, delta=None, tau_pos=1.0, tau_neg=1.05, beta=0.1,
                 kl_kind="k3", kl_clamp=None, kl_ratio_weighted=False, entropy_coef=0.1,
                 loss_agg_mode=None, global_num_tokens=None, num_items_in_batch=None,
                 global_batch_size=None, loss_scale_factor=None, max_completion_length=None,
                 dp_size=1, semantics=sem), True)
        ints, floats = cfg.to_lists()
        for backend in ("cpu", "torch"):
            torch.library.opcheck(
                torch.ops.rlfuse.policy_loss.default,
                (lp, t["old"], t["adv"], t["mask"], t["ref"], H, None, None, ints, floats,
                 backend))
    v = t["values"].clone().requires_grad_()
    cfg, _ = PL._value_prepare("value_loss", v, t["old_values"], t["returns"], t["mask"], 0.2,
                               None, None, None, None, None, None, 1, "rlfuse", True)
    ints, floats = cfg.to_lists()
    torch.library.opcheck(torch.ops.rlfuse.value_loss.default,
                          (v, t["old_values"], t["returns"], t["mask"], None, ints, floats, "cpu"))
    x = t["logp"].clone().requires_grad_()
    torch.library.opcheck(torch.ops.rlfuse.kl_penalty.default,
                          (x, t["ref"], [3, 0], [math.inf, math.inf], "cpu"))
    torch.library.opcheck(torch.ops.rlfuse.kl_penalty_backward.default,
                          (x.detach(), t["ref"], torch.randn(3, 9), [3, 1], [20.0, 10.0], "cpu"))


def test_torch_compile_fullgraph():
    t = _inputs(B=4, T=33, seed=18)

    def f(lp, H, old, A, m, ref, v, ov, ret):
        loss, st = policy_loss(lp, old, A, m, ref_logp=ref, beta=0.04, entropy=H,
                               entropy_coef=0.01, num_items_in_batch=torch.tensor(50.0),
                               semantics="trl")
        vl, _ = value_loss(v, ov, ret, m, cliprange_value=0.2)
        k = kl_penalty(lp, ref, "k3+", semantics="verl").mean()
        return loss + 0.5 * vl + k, st["clip_frac_high"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = [t["logp"].clone().requires_grad_(), t["ent"].clone().requires_grad_(), t["old"],
            t["adv"], t["mask"], t["ref"], t["values"].clone().requires_grad_(),
            t["old_values"], t["returns"]]
    out, cf = compiled(*args)
    grads = torch.autograd.grad(out, [args[0], args[1], args[6]])
    out_e, cf_e = f(*args)
    grads_e = torch.autograd.grad(out_e, [args[0], args[1], args[6]])
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(cf, cf_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ value loss
def _check_value(t, backend, **kw):
    dev = DEV[backend]
    v = t["values"].detach().to(dev).clone().requires_grad_()
    loss, st = value_loss(v, t["old_values"].to(dev), t["returns"].to(dev), t["mask"].to(dev),
                          backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, v)
    vr = t["values"].detach().double().requires_grad_()
    rloss, rst = value_loss_reference(vr, t["old_values"].double(), t["returns"].double(),
                                      t["mask"], **kw)
    (rg,) = torch.autograd.grad(rloss, vr)
    _close(loss, rloss, 2e-5, 2e-6, "value loss")
    _close(g, rg, 1e-4, 2e-6, "value grad")
    if t["values"].dtype != torch.float64:
        # clip_frac counts tokens whose clipped error is strictly larger: a discrete test that
        # the inputs' rounding decides where nothing is really clipped (OpenRLHF's
        # old + clamp(v - old) is not exactly v in float32), so it is compared with the
        # reference evaluated in the inputs' precision (as test_properties_policy does)
        rst["clip_frac"] = value_loss_reference(
            t["values"].detach(), t["old_values"], t["returns"], t["mask"], **kw)[1]["clip_frac"]
    for k in st:
        _close(st[k], rst[k], 2e-5, 2e-6, k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("semantics,mode", SEM_MODES)
def test_value_parity(backend, semantics, mode):
    small = backend == "triton" and TRITON_ON_CPU
    if small and mode not in ("token-mean", "grpo", "seq-mean-token-mean"):
        pytest.skip("interpreter: a few modes suffice")
    t = _inputs(B=5, T=23 if small else 211, seed=19)
    for clip in (None, 0.2):
        _check_value(t, backend, cliprange_value=clip, semantics=semantics, loss_agg_mode=mode)


def test_value_formulas_written_out():
    v = torch.tensor([[1.0, 2.0, 0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.5, 2.5, 0.1, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 0.0, 1.0, -3.0]], dtype=torch.float64)
    m = torch.ones(1, 4)
    loss, st = value_loss(v, old, ret, m, cliprange_value=0.2)
    vc = torch.maximum(torch.minimum(v, old + 0.2), old - 0.2)
    want = 0.5 * torch.maximum((v - ret) ** 2, (vc - ret) ** 2).mean()
    torch.testing.assert_close(loss, want)
    assert st["clip_frac"].item() == pytest.approx(
        ((vc - ret) ** 2 > (v - ret) ** 2).double().mean().item())
    loss, _ = value_loss(v, None, ret, m)
    torch.testing.assert_close(loss, 0.5 * ((v - ret) ** 2).mean())
    x = v.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: value_loss(z, old, ret, m, cliprange_value=0.7, backend="cpu")[0], (x,))


def test_value_bad_input():
    v = torch.randn(2, 3)
    with pytest.raises(ValueError, match="old_values"):
        value_loss(v, None, v, torch.ones(2, 3), cliprange_value=0.2)
    with pytest.raises(ValueError, match="returns"):
        value_loss(v, v, v[:, :2], torch.ones(2, 3))
    with pytest.raises(ValueError, match="mask"):
        value_loss(v, v, v, torch.full((2, 3), 2.0))
    with pytest.raises(ValueError, match="cliprange_value"):
        value_loss(v, v, v, torch.ones(2, 3), cliprange_value=-1.0)
    with pytest.raises(TypeError, match="values"):
        value_loss(v.long(), v, v, torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_agg_mode"):
        value_loss(v, v, v, torch.ones(2, 3), loss_agg_mode="dapo", semantics="verl")


# ------------------------------------------------------------------------------ bad input
def test_policy_bad_input():
    t = _inputs(B=3, T=4)
    lp, old, A, m, ref = t["logp"], t["old"], t["adv"], t["mask"], t["ref"]

    def call(**kw):
        args = dict(logp=lp, old_logp=old, advantages=A, mask=m)
        args.update(kw)
        return policy_loss(args.pop("logp"), args.pop("old_logp"), args.pop("advantages"),
                           args.pop("mask"), **args)

    cases = [
        (TypeError, "logp", dict(logp=lp.long())),
        (ValueError, "logp", dict(logp=lp[0])),
        (ValueError, "old_logp", dict(old_logp=old[:, :2])),
        (TypeError, "old_logp", dict(old_logp=old.int())),
        (ValueError, "advantages", dict(advantages=A[:2])),
        (ValueError, "advantages", dict(advantages=A.unsqueeze(0))),
        (TypeError, "advantages", dict(advantages=A.long())),
        (ValueError, "mask", dict(mask=m[:, :3])),
        (TypeError, "mask", dict(mask=m.to(torch.complex64))),
        (ValueError, "ref_logp", dict(ref_logp=ref[:2], beta=0.1)),
        (ValueError, "entropy", dict(entropy=ref[:, :1])),
        (ValueError, "is_weights", dict(is_weights=ref[:, :2])),
        (ValueError, "variant", dict(variant="trpo")),
        (TypeError, "variant", dict(variant=1)),
        (ValueError, "semantics", dict(semantics="nemo")),
        (ValueError, "variant", dict(variant="gpg", semantics="trl")),
        (ValueError, "variant", dict(variant="sapo", semantics="openrlhf")),
        (ValueError, "loss_agg_mode", dict(loss_agg_mode="mean")),
        (ValueError, "loss_agg_mode", dict(loss_agg_mode="grpo", semantics="verl")),
        (ValueError, "loss_agg_mode", dict(loss_agg_mode="token-mean", semantics="trl")),
        (ValueError, "loss_agg_mode", dict(variant="sapo", semantics="verl",
                                          loss_agg_mode="token-mean")),
        (ValueError, "beta", dict(beta=0.1)),
        (ValueError, "beta", dict(beta=-0.1, ref_logp=ref)),
        (ValueError, "entropy_coef", dict(entropy_coef=0.1)),
        (ValueError, "epsilon", dict(epsilon=-0.1)),
        (ValueError, "epsilon_high", dict(epsilon_high=float("nan"))),
        (TypeError, "epsilon_low", dict(epsilon_low="0.2")),
        (ValueError, "clip_ratio_c", dict(clip_ratio_c=1.0)),
        (ValueError, "clip_ratio_c", dict(clip_ratio_c=3.0, variant="cispo")),
        (ValueError, "delta", dict(delta=0.0)),
        (ValueError, "tau_pos", dict(tau_pos=0.0, variant="sapo")),
        (ValueError, "kl_kind", dict(kl_kind="k9", ref_logp=ref)),
        (ValueError, "kl_kind", dict(kl_kind="abs", ref_logp=ref, semantics="trl")),
        (ValueError, "kl_ratio_weighted", dict(kl_ratio_weighted=True)),
        (ValueError, "kl_ratio_weighted", dict(kl_ratio_weighted=True, ref_logp=ref,
                                              semantics="verl")),
        (ValueError, "kl_clamp", dict(kl_clamp=0.0, ref_logp=ref)),
        (ValueError, "global_num_tokens", dict(global_num_tokens=0)),
        (ValueError, "global_num_tokens", dict(global_num_tokens=torch.ones(2))),
        (ValueError, "num_items_in_batch", dict(global_num_tokens=4, num_items_in_batch=5)),
        (ValueError, "max_completion_length", dict(loss_agg_mode="dr_grpo",
                                                  max_completion_length=0)),
        (ValueError, "dp_size", dict(dp_size=0)),
        (ValueError, "global_batch_size", dict(global_batch_size=-2)),
        (ValueError, "loss_scale_factor", dict(loss_scale_factor=0.0)),
        (TypeError, "dp_size", dict(dp_size=1.5)),
    ]
    for exc, name, kw in cases:
        with pytest.raises(exc, match=name):
            call(**kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_advantage_values_checked(backend):
    dev = DEV[backend]
    t = _inputs(B=3, T=8, device=dev)
    lp, old, A, m = t["logp"], t["old"], t["adv"], t["mask"]
    bad = m.float().clone()
    bad[2, 5] = 0.5
    with pytest.raises(ValueError, match=r"mask.*row 2, token 5"):
        policy_loss(lp, old, A, bad, backend=backend)
    bad = m.to(torch.int32).clone()
    bad[1, 2] = 2
    with pytest.raises(ValueError, match=r"mask.*row 1, token 2"):
        policy_loss(lp, old, A, bad, backend=backend)
    A2 = A.clone()
    mm = m.clone()
    mm[2, 3] = True
    A2[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"advantages.*row 2, token 3.*nan"):
        policy_loss(lp, old, A2, mm, backend=backend)
    A2[2, 3] = float("-inf")
    with pytest.raises(ValueError, match=r"advantages.*row 2, token 3"):
        policy_loss(lp, old, A2, mm, backend=backend)
    # per-sequence advantages: the first masked token of a NaN row is reported
    Ab = A[:, 0].clone()
    Ab[2] = float("nan")
    with pytest.raises(ValueError, match=r"advantages.*row 2"):
        policy_loss(lp, old, Ab, mm, backend=backend)
    # NaN under mask 0 is fine
    A3 = A.clone()
    A3[~m] = float("nan")
    assert torch.isfinite(policy_loss(lp, old, A3, m, backend=backend)[0])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_mismatched_devices():
    t = _inputs(B=2, T=4)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(t["logp"].cuda(), t["old"].cuda(), t["adv"], t["mask"].cuda())


def test_unavailable_backend():
    t = _inputs(B=2, T=4)
    with pytest.raises(RuntimeError, match="cuda"):
        policy_loss(t["logp"], t["old"], t["adv"], t["mask"], backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        policy_loss(t["logp"], t["old"], t["adv"], t["mask"], backend="fpga")


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("semantics,variant", SEM_VARIANTS)
def test_gpu_policy_parity(backend, semantics, variant):
    if backend == "cuda" and not _backend.available("cuda", "cuda"):
        pytest.skip("rlfuse._cuda not built")
    t = _inputs(B=16, T=1500, device="cuda", seed=20)
    kw = dict(variant=variant, semantics=semantics, beta=0.05,
              entropy_coef=0.01 if semantics != "openrlhf" else 0.0)
    _check_policy(_case(t, isw=True), backend, **kw)
    _check_policy(_case(t, adv="b", old=False), backend, **kw)
    for dt in (torch.bfloat16, torch.float64):
        td = _inputs(B=4, T=300, device="cuda", seed=21, dtype=dt)
        tol = dict(grtol=1e-2, gatol=5e-3) if dt == torch.bfloat16 else {}
        _check_policy(_case(td), backend, **kw, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_value_kl_and_errors(backend):
    if backend == "cuda" and not _backend.available("cuda", "cuda"):
        pytest.skip("rlfuse._cuda not built")
    t = _inputs(B=8, T=999, seed=22)
    for sem in ("rlfuse", "openrlhf", "verl"):
        _check_value(t, backend, cliprange_value=0.2, semantics=sem)
    x = t["logp"].cuda().requires_grad_()
    for kind in ("k1", "abs", "k2", "k3", "k3+"):
        v = kl_penalty(x, t["ref"].cuda(), kind, semantics="verl", backend=backend)
        (g,) = torch.autograd.grad(v.sum(), x)
        xr = t["logp"].double().requires_grad_()
        rv = kl_penalty_reference(xr, t["ref"].double(), kind, semantics="verl")
        (rg,) = torch.autograd.grad(rv.sum(), xr)
        _close(v, rv, 1e-5, 1e-7, kind)
        _close(g, rg, 1e-5, 1e-7, kind)
    bad = t["mask"].cuda().float()
    bad[3, 7] = 0.5
    with pytest.raises(ValueError, match="mask"):
        policy_loss(t["logp"].cuda(), t["old"].cuda(), t["adv"].cuda(), bad, backend=backend)


@pytest.mark.gpu
def test_gpu_row_invariance():
    if not _backend.available("cuda", "cuda"):
        pytest.skip("rlfuse._cuda not built")
    t = _inputs(B=32, T=4096, device="cuda", seed=23)
    c = _case(t, isw=True)
    _, _, full = _run_policy(c, "cuda", loss_agg_mode="token-sum", beta=0.1)
    sub = {k: (v[5:9].clone() if isinstance(v, torch.Tensor) else v) for k, v in c.items()}
    _, _, part = _run_policy(sub, "cuda", loss_agg_mode="token-sum", beta=0.1)
    assert torch.equal(part[0], full[0][5:9])


def _captured_glp(monkeypatch):
    """Records where the d loss/d logp buffers that the eager forward saves (glp of
    PL._policy_run) live: addresses only, a reference would change what autograd does."""
    seen = []
    run = PL._policy_run

    def spy(*args):
        out = run(*args)
        seen.append(out[2].data_ptr())
        return out

    monkeypatch.setattr(PL, "_policy_run", spy)
    return seen


def _owned_by_caller(g, saved):
    """g shares no storage with the saved buffers at the addresses ``saved`` (each still
    alive: its graph retained, or held by the test)."""
    return all(g.data_ptr() != p for p in saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_retained_graph_gradient_is_never_the_saved_buffer(backend, dtype, monkeypatch):
    """With retain_graph the backward returns a fresh gradient: the caller (or a hook) may
    edit it in place, visibly to autograd or through .data, and every later pass through
    the graph still gives the float64 reference gradient; no two passes share storage."""
    saved = _captured_glp(monkeypatch)
    t = _inputs(B=4, T=37, seed=31, dtype=dtype, device=DEV[backend])
    kw = dict(ref_logp=t["ref"], beta=0.1, loss_agg_mode="seq-mean-token-mean")
    x = t["logp"].clone().requires_grad_()
    x64 = t["logp"].detach().double().cpu().requires_grad_()
    want = torch.autograd.grad(policy_loss_reference(
        x64, _f64(t["old"]).cpu(), _f64(t["adv"]).cpu(), t["mask"].cpu(),
        ref_logp=_f64(t["ref"]).cpu(), beta=0.1, loss_agg_mode="seq-mean-token-mean")[0],
        x64)[0]
    exact = dtype == torch.float64 and backend != "triton"  # Triton computes in float32
    tol = dict(rtol=1e-9, atol=1e-12) if exact else dict(rtol=1e-4, atol=1e-6)

    def check(g, scale=1.0):
        torch.testing.assert_close(g.detach().double().cpu(), scale * want, **tol)

    loss, _ = policy_loss(x, t["old"], t["adv"], t["mask"], backend=backend, **kw)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.mul_(5)                       # visible to version counters: used to raise
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    g2.data.fill_(float("nan"))      # invisible to them: used to corrupt the next pass
    (g3,) = torch.autograd.grad(loss, x, retain_graph=True)
    check(g3)
    check(g1, 5.0)
    assert len({g1.data_ptr(), g2.data_ptr(), g3.data_ptr()}) == 3
    assert all(_owned_by_caller(g, saved) for g in (g1, g2, g3))
    loss.backward(retain_graph=True)
    x.grad.mul_(-2)                  # in-place grad scaling between retained passes
    x.grad.zero_()
    loss.backward(retain_graph=True)
    check(x.grad)
    (2.5 * loss).backward()          # upstream gradient != 1, last pass
    check(x.grad, 3.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_hooks_on_the_gradient_with_retained_graph(backend):
    """Hooks that modify the gradient in place (on logp as a leaf and as a non-leaf, and on
    the entropy) run on every pass of a retained graph with the same, reference, result."""
    t = _inputs(B=5, T=23, seed=37, device=DEV[backend])
    kw = dict(ref_logp=t["ref"], beta=0.1, entropy_coef=0.05)
    x64 = t["logp"].detach().double().cpu().requires_grad_()
    e64 = t["ent"].detach().double().cpu().requires_grad_()
    want = torch.autograd.grad(policy_loss_reference(
        x64, _f64(t["old"]).cpu(), _f64(t["adv"]).cpu(), t["mask"].cpu(), entropy=e64,
        ref_logp=_f64(t["ref"]).cpu(), beta=0.1, entropy_coef=0.05)[0], (x64, e64))
    tol = dict(rtol=1e-4, atol=1e-6)
    w = t["logp"].clone().requires_grad_()
    z = w * 1.0
    z.register_hook(lambda g: g.mul_(3.0))
    w.register_hook(lambda g: g.add_(1.0))
    ent = t["ent"].clone().requires_grad_()
    ent.register_hook(lambda g: g.neg_())
    loss, _ = policy_loss(z, t["old"], t["adv"], t["mask"], entropy=ent, backend=backend, **kw)
    for _ in range(2):
        loss.backward(retain_graph=True)
        torch.testing.assert_close(w.grad.double().cpu(), 3 * want[0] + 1, **tol)
        torch.testing.assert_close(ent.grad.double().cpu(), -want[1], **tol)
        w.grad = ent.grad = None


def test_backward_hands_over_its_buffer_only_when_the_graph_is_freed(monkeypatch):
    """loss.backward() / autograd.grad(loss) without retain_graph return the forward's
    gradient buffer itself (no multiply, no allocation: the graph and its saved tensors are
    freed before anyone sees it); a retained graph, an upstream gradient other than 1, a
    dtype cast or saved-tensor hooks get a fresh tensor."""
    saved = _captured_glp(monkeypatch)
    t = _inputs(B=4, T=37, seed=31)
    args = (t["old"], t["adv"], t["mask"])
    kw = dict(ref_logp=t["ref"], beta=0.1)
    x = t["logp"].clone().requires_grad_()
    loss, _ = policy_loss(x, *args, **kw)
    (g,) = torch.autograd.grad(loss, x)
    assert g.data_ptr() == saved[-1]
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, x)
    g.mul_(2)  # the caller's own tensor now
    loss, _ = policy_loss(x, *args, **kw)
    loss.backward()
    assert x.grad.data_ptr() == saved[-1]  # AccumulateGrad adopts it: nobody else holds it
    torch.testing.assert_close(2 * x.grad, g)
    x.grad = None
    loss, _ = policy_loss(x, *args, **kw)
    (1.0 * loss).backward(retain_graph=True)   # retained: fresh
    assert _owned_by_caller(x.grad, saved[-1:])
    x.grad = None
    loss, _ = policy_loss(x, *args, **kw)
    (2.0 * loss).backward()                     # scaled: fresh
    assert _owned_by_caller(x.grad, saved[-1:])
    xb = t["logp"].to(torch.bfloat16).requires_grad_()
    loss, _ = policy_loss(xb, *args, **kw)
    (gb,) = torch.autograd.grad(loss, xb)
    assert gb.dtype == torch.bfloat16 and _owned_by_caller(gb, saved[-1:])
    # a saved-tensor hook that keeps what it packs: glp stays shared with the hook
    kept = []

    def pack(v):
        kept.append(v)
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        loss, _ = policy_loss(x, *args, **kw)
    (g,) = torch.autograd.grad(loss, x)
    assert any(k.data_ptr() == saved[-1] for k in kept)
    assert _owned_by_caller(g, saved[-1:])
    g.zero_()
    assert all(bool(k.abs().sum() > 0) for k in kept if k.data_ptr() == saved[-1])


def test_keep_graph_query_of_this_torch():
    """The hand-over rests on torch's report of whether the running backward frees the
    graph; a torch that drops or changes it must fail here, not hand out shared buffers."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(PL._keep_graph())
            return g

    assert PL._keep_graph is not None and PL._saved_tensor_hooks is not None
    assert PL._keep_graph() is True  # outside a backward pass: assume retained
    v = torch.ones(3, requires_grad=True)
    Probe.apply(v).sum().backward()
    Probe.apply(v).sum().backward(retain_graph=True)
    torch.autograd.grad(Probe.apply(v).sum(), v, create_graph=True)
    torch.autograd.grad(Probe.apply(v).sum(), v)
    assert seen == [False, True, True, False]
    assert PL._saved_tensors_plain()
    with torch.autograd.graph.save_on_cpu():
        assert not PL._saved_tensors_plain()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sapo_gradient_where_the_gate_saturates(backend):
    """SAPO's slope sigmoid(z) (1 - sigmoid(z)) is formed without the cancellation of
    1 - sigmoid(z): at z = tau (r - 1) ~ 10-19 float32 rounds sigmoid(z) to 1 (or to
    1 - a few ulps), yet the slope is ~e^-z; every backend matches float64 there."""
    dev = DEV[backend]
    d = torch.tensor([[0.5, 1.5, 2.0, 2.5, 3.0, -3.0, 0.0, -0.5]], dtype=torch.float64)
    old = torch.full_like(d, -2.0)
    lp64 = old + d                                   # r = e^d up to ~20
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones_like(d, dtype=torch.bool)
    kw = dict(variant="sapo", tau_pos=1.0, tau_neg=1.05, loss_agg_mode="token-mean")
    x = lp64.float().to(dev).requires_grad_()
    loss, _ = policy_loss(x, old.float().to(dev), adv.float().to(dev), mask.to(dev),
                          backend=backend, **kw)
    (g,) = torch.autograd.grad(loss, x)
    xr = lp64.float().double().requires_grad_()
    rloss, _ = policy_loss_reference(xr, old.float().double(), adv, mask, **kw)
    (rg,) = torch.autograd.grad(rloss, xr)
    assert bool((rg[0, 1:5].abs() > 0).all())
    torch.testing.assert_close(g.double().cpu(), rg, rtol=1e-4, atol=0)
