"""preference_loss / preference_logps / preference_loss_from_hidden (DPO family).

Every loss type against formulas written out here (TRL 1.16 DPOTrainer, CPOTrainer (simpo),
ORPOTrainer (orpo) loss math) in float64, on every backend that runs here; gradients; the
from-hidden path against materialised logits of a tiny model built from a config; bad input.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlfuse.ops import (
    preference_logps,
    preference_loss,
    preference_loss_from_hidden,
    preference_loss_reference,
)
from rlfuse.ops.preference import LOSS_TYPES, REFERENCE_FREE_TYPES, SORTED_TYPES, STATS
from tests.helpers import backends_and_devices

# (backend, device) pairs that run here; "cuda" appears on a machine with a GPU.
BACKENDS = backends_and_devices(include_torch=True)
# The Triton kernel evaluates every type's formula and selects with tl.where: under the
# interpreter (numpy) the unselected branches warn about log(0), inf - inf, ...
pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning:triton.runtime.interpreter",
    "ignore::DeprecationWarning:triton.runtime.interpreter")
KERNEL_BACKENDS = backends_and_devices(include_torch=False)

BETA = 0.3
EPS = 0.2  # label smoothing where a type uses it


def _inputs(P=9, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    lc = torch.randint(0, 30, (P,), generator=g)
    lr = torch.randint(1, 30, (P,), generator=g)
    lc[0] = 0  # an empty chosen completion (lengths clamp to 1 where divided by)
    # summed log-probs with per-token means in (-2, 0), so orpo's log(1 - e^mean) is finite
    c = -(torch.rand(P, generator=g, dtype=torch.float64) * 1.9 + 0.05) * lc.clamp(min=1)
    r = -(torch.rand(P, generator=g, dtype=torch.float64) * 1.9 + 0.05) * lr.clamp(min=1)
    rc = c + torch.randn(P, generator=g, dtype=torch.float64) * 2
    rr = r + torch.randn(P, generator=g, dtype=torch.float64) * 2
    pw = torch.rand(P, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return dict(c=cast(c), r=cast(r), rc=cast(rc), rr=cast(rr), lc=lc.to(device),
                lr=lr.to(device), pw=cast(pw))


def _eps_for(t):
    return EPS if t in ("sigmoid", "exo_pair", "robust", "simpo") else 0.0


# ---------------------------------------------------------------- formulas, written out here
def _sp(x):  # softplus = -logsigmoid(-x)
    return F.softplus(x)


def _formula(t, c, r, rc, rr, lc, lr, beta, eps, *, ipo_norm=True, gamma=0.5, tau=0.05):
    """Per-pair term of loss type t, written from the papers / TRL 1.16."""
    uc, ur = (c - rc, r - rr) if rc is not None else (c, r)
    Lc, Lr = lc.double().clamp(min=1), lr.double().clamp(min=1)
    z = beta * (uc - ur)
    a, b = beta * uc, beta * ur
    sig = torch.sigmoid
    if t == "sigmoid":
        return (1 - eps) * _sp(-z) + eps * _sp(z)
    if t == "hinge":
        return torch.clamp(1 - z, min=0)
    if t == "ipo":
        d = (uc / Lc - ur / Lr) if ipo_norm else (uc - ur)
        return (d - 1 / (2 * beta)) ** 2
    if t == "exo_pair":
        q = sig(z)
        return q * (torch.log(q) - math.log(1 - eps)) + (1 - q) * (torch.log(1 - q) - math.log(eps))
    if t == "nca_pair":
        return _sp(-a) + 0.5 * _sp(a) + 0.5 * _sp(b)
    if t == "robust":
        return ((1 - eps) * _sp(-z) - eps * _sp(z)) / (1 - 2 * eps)
    if t == "bco_pair":
        return _sp(-a) + _sp(b)
    if t == "sppo_hard":
        return (uc - 1 / (2 * beta)) ** 2 + (ur + 1 / (2 * beta)) ** 2
    if t == "apo_zero":
        return (1 - sig(a)) + sig(b)
    if t == "apo_down":
        return sig(a) + (1 - sig(a - b))
    if t == "discopop":
        m = sig(z / tau)
        return _sp(-z) * (1 - m) + torch.exp(-z) * m
    if t == "sigmoid_norm":
        return _sp(-beta * (uc / Lc - ur / Lr))
    if t == "sft":
        return (-c.sum() / lc.double().sum().clamp(min=1)).expand_as(c)
    if t == "simpo":
        y = beta * (c / Lc - r / Lr) - gamma
        return (1 - eps) * _sp(-y) + eps * _sp(y)
    if t == "orpo":
        ac, ar = c / Lc, r / Lr
        o = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
        return beta * _sp(-o)
    raise AssertionError(t)


def _check(loss, stats, grads, want_loss, want_grads, rc_present, x, beta, dtype, per_pair):
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(loss.double(), want_loss, **tol)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, **tol)
    c, r = x["c"].double(), x["r"].double()
    if rc_present:
        rew_c, rew_r = beta * (c - x["rc"].double()), beta * (r - x["rr"].double())
    else:
        rew_c = beta * c / x["lc"].double().clamp(min=1)
        rew_r = beta * r / x["lr"].double().clamp(min=1)
    torch.testing.assert_close(stats["chosen_rewards"].double(), rew_c, **tol)
    torch.testing.assert_close(stats["rejected_rewards"].double(), rew_r, **tol)
    torch.testing.assert_close(stats["margins"].double(), rew_c - rew_r, **tol)
    torch.testing.assert_close(stats["accuracies"].double(), (rew_c > rew_r).double())
    torch.testing.assert_close(stats["losses"].double(), per_pair, **tol)


def _run(fn, x, dtype, device="cpu", **kw):
    """Call fn on x moved to device; loss, stats and gradients come back on the CPU."""
    def dev(t):
        return None if t is None else t.to(device)

    c = x["c"].detach().to(device).requires_grad_()
    r = x["r"].detach().to(device).requires_grad_()
    if "pair_weights" in kw:
        kw["pair_weights"] = dev(kw["pair_weights"])
    loss, stats = fn(c, r, dev(kw.pop("rc", x["rc"])), dev(kw.pop("rr", x["rr"])),
                     chosen_lengths=dev(x["lc"]), rejected_lengths=dev(x["lr"]), **kw)
    grads = torch.autograd.grad(loss, (c, r), allow_unused=True)
    grads = [torch.zeros_like(c) if g is None else g for g in grads]
    return loss.cpu(), {k: v.cpu() for k, v in stats.items()}, [g.cpu() for g in grads]


def _want(types, weights, x, beta, eps, pw=None, ref=True, **kw):
    c = x["c"].detach().double().requires_grad_()
    r = x["r"].detach().double().requires_grad_()
    rc, rr = (x["rc"].double(), x["rr"].double()) if ref else (None, None)
    per = sum(w * _formula(t, c, r, rc, rr, x["lc"], x["lr"], beta, eps, **kw)
              for t, w in zip(types, weights))
    if pw is not None:
        per = per * pw.double()
    loss = per.mean()
    g = torch.autograd.grad(loss, (c, r), allow_unused=True)
    g = [torch.zeros_like(c) if gi is None else gi for gi in g]
    return loss.detach(), g, per.detach()


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_formula(loss_type, backend, device):
    eps = _eps_for(loss_type)
    for dtype in (torch.float64, torch.float32):
        x = _inputs(dtype=dtype, seed=LOSS_TYPES.index(loss_type))
        loss, stats, grads = _run(preference_loss, x, dtype, loss_type=loss_type, beta=BETA,
                                  label_smoothing=eps, backend=backend, device=device)
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        want, wg, per = _want([loss_type], [1.0], x, BETA, eps)
        _check(loss, stats, grads, want, wg, True, x, BETA, dtype, per)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_reference_free_types_without_reference(backend, device):
    x = _inputs(seed=3)
    types = ["simpo", "sft", "orpo"]
    weights = [1.0, 0.7, 0.4]
    loss, stats, grads = _run(preference_loss, x, torch.float64, rc=None, rr=None,
                              loss_type=types, loss_weights=weights, beta=2.0,
                              label_smoothing=0.1, backend=backend, device=device,
                              simpo_gamma=0.8)
    want, wg, per = _want(types, weights, x, 2.0, 0.1, ref=False, gamma=0.8)
    _check(loss, stats, grads, want, wg, False, x, 2.0, torch.float64, per)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_weighted_type_list_and_pair_weights(backend, device):
    x = _inputs(P=13, seed=5)
    types = ["sigmoid", "sft", "ipo", "bco_pair", "sigmoid"]
    weights = [1.0, 0.5, -0.25, 2.0, 0.3]
    loss, stats, grads = _run(preference_loss, x, torch.float64, loss_type=types,
                              loss_weights=weights, beta=BETA, pair_weights=x["pw"],
                              backend=backend, device=device)
    want, wg, per = _want(types, weights, x, BETA, 0.0, pw=x["pw"])
    _check(loss, stats, grads, want, wg, True, x, BETA, torch.float64, per)
    # the dict form is the same call
    loss2, _, _ = _run(preference_loss, x, torch.float64,
                       loss_type={"sigmoid": 1.3, "sft": 0.5, "ipo": -0.25, "bco_pair": 2.0},
                       beta=BETA, pair_weights=x["pw"], backend=backend, device=device)
    torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_sorted_types_aot(backend, device):
    """aot / aot_unpaired: sigmoid loss of differences of sorted batch log-ratios (ranks)."""
    x = _inputs(P=11, seed=37)
    eps = 0.1
    for types, weights in ((["aot"], [1.0]), (["aot_unpaired"], [1.0]),
                           (["sigmoid", "aot", "aot_unpaired", "sft"], [1.0, 0.4, 0.3, 0.2])):
        loss, stats, grads = _run(preference_loss, x, torch.float64, loss_type=types,
                                  loss_weights=weights, beta=BETA, label_smoothing=eps,
                                  backend=backend, device=device)
        c = x["c"].clone().requires_grad_()
        r = x["r"].clone().requires_grad_()
        want = 0.0
        per = torch.zeros_like(c)
        for t, w in zip(types, weights):
            if t in SORTED_TYPES:
                if t == "aot":
                    d = (c - r).sort().values - (x["rc"] - x["rr"]).sort().values
                else:
                    d = (c - x["rc"]).sort().values - (r - x["rr"]).sort().values
                want = want + w * ((1 - eps) * _sp(-BETA * d) + eps * _sp(BETA * d)).mean()
            else:
                e = eps if t == "sigmoid" else 0.0
                f = w * _formula(t, c, r, x["rc"], x["rr"], x["lc"], x["lr"], BETA, e)
                per = per + f
                want = want + f.mean()
        wg = torch.autograd.grad(want, (c, r))
        torch.testing.assert_close(loss, want.detach(), rtol=1e-10, atol=1e-12)
        for g, w in zip(grads, wg):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
        # the per-pair statistics carry the per-pair types only
        torch.testing.assert_close(stats["losses"], per.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ipo_openrlhf_switch(backend, device):
    x = _inputs(seed=7)
    loss, stats, grads = _run(preference_loss, x, torch.float64, loss_type="ipo", beta=BETA,
                              ipo_length_normalize=False, backend=backend, device=device)
    want, wg, per = _want(["ipo"], [1.0], x, BETA, 0.0, ipo_norm=False)
    _check(loss, stats, grads, want, wg, True, x, BETA, torch.float64, per)
    # the unaveraged form needs no lengths
    d = {k: v.to(device) for k, v in x.items()}
    l2, _ = preference_loss(d["c"], d["r"], d["rc"], d["rr"], loss_type="ipo", beta=BETA,
                            ipo_length_normalize=False, backend=backend)
    torch.testing.assert_close(l2.cpu(), want, rtol=1e-10, atol=1e-12)


def _f_score(u, kind, alpha):
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    t = torch.clamp((alpha - 1) * u, max=80.0)
    return (torch.exp(t) - 1) / (alpha - 1)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_scores(fdiv, backend, device):
    x = _inputs(seed=11)
    x["rc"][1] = x["c"][1] - 300.0  # alpha-divergence exponent past its clamp at 80
    for t in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"):
        eps = _eps_for(t)
        loss, _, grads = _run(preference_loss, x, torch.float64, loss_type=t, beta=BETA,
                              label_smoothing=eps, backend=backend, device=device,
                              f_divergence_type=fdiv,
                              f_alpha_divergence_coef=0.6)
        c = x["c"].clone().requires_grad_()
        r = x["r"].clone().requires_grad_()
        # the formula with s(u) in place of u, through shifted reference log-probs
        sc, sr = _f_score(c - x["rc"], fdiv, 0.6), _f_score(r - x["rr"], fdiv, 0.6)
        if t in ("ipo", "sigmoid_norm"):
            Lc, Lr = x["lc"].double().clamp(min=1), x["lr"].double().clamp(min=1)
            d = sc / Lc - sr / Lr
            per = (d - 1 / (2 * BETA)) ** 2 if t == "ipo" else F.softplus(-BETA * d)
        else:
            per = _formula(t, sc, sr, torch.zeros_like(sc), torch.zeros_like(sr), x["lc"],
                           x["lr"], BETA, eps)
        want = per.mean()
        wg = torch.autograd.grad(want, (c, r))
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(grads, wg):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_inputs_and_extremes(backend, device):
    x = _inputs(P=17, seed=13)
    x["c"][2], x["rc"][2] = -5000.0, 0.0  # |beta delta| in the thousands: no overflow
    x["r"][3], x["rr"][3] = -4000.0, 0.0
    for t in ("sigmoid", "nca_pair", "bco_pair", "apo_down", "robust", "hinge"):
        want, wg, _ = _want([t], [1.0], x, BETA, _eps_for(t))
        assert torch.isfinite(want)
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
            xd = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in x.items()}
            loss, _, grads = _run(preference_loss, xd, dt, loss_type=t, beta=BETA,
                                  label_smoothing=_eps_for(t), backend=backend,
                                  device=device)
            assert loss.dtype == torch.float32
            assert grads[0].dtype == dt
            # compare with the formula on the same (rounded) inputs
            xr = {k: (v.double() if v.is_floating_point() else v) for k, v in xd.items()}
            w2, wg2, _ = _want([t], [1.0], xr, BETA, _eps_for(t))
            torch.testing.assert_close(loss.double(), w2, rtol=tol, atol=tol)
            for g, w in zip(grads, wg2):
                torch.testing.assert_close(g.double(), w.to(dt).double(), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_and_empty_batch(backend, device):
    x = _inputs(P=5, device=device)
    x["c"][1] = float("nan")
    loss, stats = preference_loss(x["c"], x["r"], x["rc"], x["rr"], backend=backend)
    assert torch.isnan(loss)
    assert torch.isnan(stats["losses"][1]) and torch.isfinite(stats["losses"][0])
    e = torch.empty(0, dtype=torch.float64, device=device, requires_grad=True)
    loss, stats = preference_loss(e, e.detach(), e.detach(), e.detach(), backend=backend)
    assert loss.item() == 0.0 and stats["losses"].shape == (0,)
    (g,) = torch.autograd.grad(loss, e, allow_unused=True)
    assert g is None or g.shape == (0,)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("where", ["c", "r", "rc", "rr"])
def test_hinge_nan_propagates(where, backend, device):
    """relu(1 - z) of a NaN margin is NaN, its gradient too; the other pairs are untouched.
    (The kernels' `1 - z > 0 ? 1 - z : 0` turned a NaN pair into loss 0, gradient 0.)"""
    x = _inputs(P=5, device=device)
    x["c"][2] = x["r"][2] + 10.0  # one pair with the hinge off (z > 1)

    def run(inp):
        c = inp["c"].clone().requires_grad_()
        r = inp["r"].clone().requires_grad_()
        loss, stats = preference_loss(c, r, inp["rc"], inp["rr"], loss_type="hinge",
                                      beta=BETA, backend=backend)
        loss.backward()
        return loss, stats["losses"], c.grad, r.grad

    _, clean_losses, clean_gc, clean_gr = run(x)
    assert clean_losses[2] == 0 and clean_gc[2] == 0 and (clean_losses[[0, 1, 3, 4]] > 0).all()
    bad = {k: v.clone() for k, v in x.items()}
    bad[where][1] = float("nan")
    loss, losses, gc, gr = run(bad)
    assert torch.isnan(loss) and torch.isnan(losses[1])
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(losses[keep], clean_losses[keep], rtol=0, atol=0)
    torch.testing.assert_close(gc[keep], clean_gc[keep], rtol=0, atol=0)
    torch.testing.assert_close(gr[keep], clean_gr[keep], rtol=0, atol=0)
    if backend != "torch":  # torch.relu's backward passes the gradient through at NaN
        assert torch.isnan(gc[1]) and torch.isnan(gr[1])


# ------------------------------------------------------------------- kernels specifically
@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS)
def test_kernel_outputs_fully_written_and_batch_invariant(backend, device):
    """Stats of a pair do not depend on the other pairs (bitwise), nor on their order."""
    x = _inputs(P=40, seed=17, dtype=torch.float32, device=device)
    kw = dict(loss_type=["sigmoid", "apo_zero", "ipo"], beta=BETA, backend=backend)
    _, s_all = preference_loss(x["c"], x["r"], x["rc"], x["rr"], chosen_lengths=x["lc"],
                               rejected_lengths=x["lr"], **kw)
    for k in STATS:
        assert not torch.isnan(s_all[k]).any(), k
    perm = torch.randperm(40)[:23].to(device)
    sub = {k: v.index_select(0, perm) for k, v in x.items()}
    _, s_sub = preference_loss(sub["c"], sub["r"], sub["rc"], sub["rr"],
                               chosen_lengths=sub["lc"], rejected_lengths=sub["lr"], **kw)
    for k in STATS:
        assert torch.equal(s_sub[k], s_all[k].index_select(0, perm)), k


def test_strided_views_and_stacked_batch():
    """chosen / rejected as halves of one stacked tensor, references as strided views."""
    x = _inputs(P=8, seed=19)
    stacked = torch.cat([x["c"], x["r"]]).requires_grad_()
    ref = torch.stack([x["rc"], x["rr"]], 1)  # [P, 2]: column views have stride 2
    loss, _ = preference_loss(stacked[:8], stacked[8:], ref[:, 0], ref[:, 1], beta=BETA,
                              loss_type="sigmoid", backend="cpu")
    (g,) = torch.autograd.grad(loss, stacked)
    want, wg, _ = _want(["sigmoid"], [1.0], x, BETA, 0.0)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, torch.cat(wg), rtol=1e-12, atol=1e-12)


def test_gradcheck_cpu_kernel():
    x = _inputs(P=6, seed=23)
    for t in ("sigmoid", "discopop", "orpo", "sft", "apo_down"):
        def f(c, r, t=t):
            return preference_loss(c, r, x["rc"], x["rr"], chosen_lengths=x["lc"],
                                   rejected_lengths=x["lr"], loss_type=t, beta=BETA,
                                   backend="cpu")[0]

        c = x["c"].clone().requires_grad_()
        r = x["r"].clone().requires_grad_()
        assert torch.autograd.gradcheck(f, (c, r))


def test_torch_compile_fullgraph_and_opcheck():
    from rlfuse.ops.preference import _preference_op

    x = _inputs(P=10, seed=29, dtype=torch.float32)

    def f(c, r, rc, rr, lc, lr):
        loss, stats = preference_loss(c, r, rc, rr, chosen_lengths=lc, rejected_lengths=lr,
                                      loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
                                      beta=BETA)
        return loss * 2, stats["margins"]

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    c = x["c"].clone().requires_grad_()
    out, m = cf(c, x["r"], x["rc"], x["rr"], x["lc"], x["lr"])
    (g,) = torch.autograd.grad(out, c)
    c2 = x["c"].clone().requires_grad_()
    out2, m2 = f(c2, x["r"], x["rc"], x["rr"], x["lc"], x["lr"])
    (g2,) = torch.autograd.grad(out2, c2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(g, g2)
    torch.testing.assert_close(m, m2)
    args = (x["c"].clone().requires_grad_(), x["r"].clone().requires_grad_(), x["rc"], x["rr"],
            x["lc"], x["lr"], x["pw"], [0, 1, 2, 0, 12], [BETA, 0.0, 0.5, 0.05, 0.5, 1.0, 0.5],
            "cpu")
    torch.library.opcheck(_preference_op, args)


def test_eager_function_and_library_op_agree(monkeypatch):
    import rlfuse.ops.preference as pref

    x = _inputs(P=12, seed=31, dtype=torch.float32)
    outs = []
    for flag in (True, False):
        monkeypatch.setattr(pref, "_EAGER_AUTOGRAD_FUNCTION", flag)
        loss, stats, grads = _run(preference_loss, x, torch.float32, loss_type="robust",
                                  label_smoothing=0.1, beta=BETA, backend="cpu")
        outs.append((loss, stats["losses"], *grads))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------ bad input
def test_reference_needed():
    x = _inputs()
    for t in [t for t in LOSS_TYPES + SORTED_TYPES if t not in REFERENCE_FREE_TYPES]:
        with pytest.raises(ValueError, match="ref_chosen_logps"):
            preference_loss(x["c"], x["r"], loss_type=t, chosen_lengths=x["lc"],
                            rejected_lengths=x["lr"], label_smoothing=_eps_for(t))
    with pytest.raises(ValueError, match="both ref_chosen_logps and ref_rejected_logps"):
        preference_loss(x["c"], x["r"], x["rc"], None)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(loss_type="dpo"), ValueError, "unknown loss_type 'dpo'"),
    (dict(loss_type="aot", pair_weights=torch.ones(9, dtype=torch.float64)), ValueError,
     "ranks of the sorted batch"),
    (dict(loss_type=[]), ValueError, "empty"),
    (dict(loss_type=3), TypeError, "loss_type must be"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights has 1"),
    (dict(loss_weights=[float("nan")]), ValueError, "loss_weights must be finite"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta="x"), TypeError, "beta"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, r"\[0, 0.5\)"),
    (dict(loss_type="exo_pair"), ValueError, r"\(0, 1\)"),
    (dict(bogus=1), TypeError, "bogus"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), ValueError, "works with"),
    (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, exc, match):
    x = _inputs()
    with pytest.raises(exc, match=match):
        preference_loss(x["c"], x["r"], x["rc"], x["rr"], **kwargs)


def test_bad_tensors():
    x = _inputs()
    c, r, rc, rr = x["c"], x["r"], x["rc"], x["rr"]
    with pytest.raises(TypeError, match="chosen_logps"):
        preference_loss([1.0], r, rc, rr)
    with pytest.raises(TypeError, match="rejected_logps"):
        preference_loss(c, r.long(), rc, rr)
    with pytest.raises(ValueError, match="1-D"):
        preference_loss(c.view(3, 3), r, rc, rr)
    with pytest.raises(ValueError, match="rejected_logps must have shape"):
        preference_loss(c, r[:4], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps must have shape"):
        preference_loss(c, r, rc, rr[:2])
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        preference_loss(c, r, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="both chosen_lengths"):
        preference_loss(c, r, rc, rr, chosen_lengths=x["lc"])
    with pytest.raises(TypeError, match="chosen_lengths"):
        preference_loss(c, r, rc, rr, chosen_lengths=x["lc"].bool(), rejected_lengths=x["lr"])
    with pytest.raises(ValueError, match="pair_weights must have shape"):
        preference_loss(c, r, rc, rr, pair_weights=x["pw"][:3])


# ================================================================== from hidden states
V, H = 97, 24


def _tiny_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).double()


def _pairs(P=3, T=11, seed=0):
    """Stacked [2P, T] completions (label-shifted ids) with a completion mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2 * P, T + 1), generator=g)
    lens = torch.randint(2, T + 1, (2 * P,), generator=g)
    lens[0] = T
    prompt = torch.randint(1, 4, (2 * P,), generator=g)
    pos = torch.arange(T)
    mask = (pos >= prompt.unsqueeze(1) - 1) & (pos < (prompt + lens).clamp(max=T).unsqueeze(1))
    return ids[:, :-1], ids[:, 1:], mask


def _materialised(hidden, weight, labels, mask, token_w=None):
    logits = hidden @ weight.t()
    lp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    w = mask.double() if token_w is None else mask.double() * token_w
    return (lp * w).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_from_hidden_matches_materialised_logits(layout):
    model = _tiny_model()
    inp, labels, mask = _pairs()
    P = inp.size(0) // 2
    hidden = model.model(input_ids=inp).last_hidden_state.detach().requires_grad_()
    weight = model.lm_head.weight
    g = torch.Generator().manual_seed(1)
    ref_c = torch.randn(P, generator=g, dtype=torch.float64) - 15
    ref_r = torch.randn(P, generator=g, dtype=torch.float64) - 15
    kw = dict(loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.3, 0.2], beta=BETA)
    # materialised path, the reference loss on top
    s, n = _materialised(hidden, weight, labels, mask)
    want, wstats = preference_loss_reference(s[:P], s[P:], ref_c, ref_r, chosen_lengths=n[:P],
                                             rejected_lengths=n[P:], **kw)
    want_g = torch.autograd.grad(want, (hidden, weight))
    if layout == "padded":
        loss, stats = preference_loss_from_hidden(hidden, weight, labels, mask=mask,
                                                  ref_chosen_logps=ref_c,
                                                  ref_rejected_logps=ref_r, chunk_size=5, **kw)
        got_g = torch.autograd.grad(loss, (hidden, weight))
    else:
        m = mask.reshape(-1)
        keep = m.nonzero().squeeze(1)  # pack the counted positions only
        cu = torch.zeros(2 * P + 1, dtype=torch.int32)
        cu[1:] = mask.sum(-1).cumsum(0)
        h_flat = hidden.reshape(-1, H)
        loss, stats = preference_loss_from_hidden(h_flat[keep], weight,
                                                  labels.reshape(-1)[keep], cu_seqlens=cu,
                                                  ref_chosen_logps=ref_c,
                                                  ref_rejected_logps=ref_r, chunk_size=7, **kw)
        got_g = torch.autograd.grad(loss, (hidden, weight))
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats["chosen_logps"], s[:P].detach(), rtol=1e-10, atol=1e-10)
    assert torch.equal(stats["rejected_lengths"], n[P:])
    for k in STATS:
        torch.testing.assert_close(stats[k], wstats[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_token_weights_and_ld_alpha(layout):
    """token_weights multiply inside the sums; ld_alpha weights the tail as TRL does."""
    torch.manual_seed(2)
    P, T = 3, 9
    inp, labels, mask = _pairs(P, T, seed=4)
    hidden = torch.randn(2 * P, T, H, dtype=torch.float64)
    weight = torch.randn(V, H, dtype=torch.float64) / H ** 0.5
    tw = torch.rand(2 * P, T, dtype=torch.float64)
    alpha = 0.4
    # TRL's LD-DPO masks (dpo_trainer.py): shared = first min(Lc, Lr) completion tokens
    comp_pos = mask.long().cumsum(1)
    lens = mask.sum(1)
    shared = torch.minimum(lens[:P], lens[P:]).repeat(2)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared.unsqueeze(1))
    tail_mask = comp_pos > shared.unsqueeze(1)
    ld = shared_mask.double() + alpha * tail_mask.double()
    s, n = _materialised(hidden, weight, labels, mask, token_w=tw * ld)
    if layout == "padded":
        got = preference_logps(hidden, weight, labels, mask=mask, token_weights=tw,
                               ld_alpha=alpha)
    else:
        cu = torch.zeros(2 * P + 1, dtype=torch.int64)
        cu[1:] = torch.full((2 * P,), T).cumsum(0)
        got = preference_logps(hidden.reshape(-1, H), weight, labels.reshape(-1),
                               mask=mask.reshape(-1), cu_seqlens=cu,
                               token_weights=tw.reshape(-1), ld_alpha=alpha)
    torch.testing.assert_close(got.chosen, s[:P], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.rejected, s[P:], rtol=1e-10, atol=1e-10)
    assert torch.equal(got.chosen_lengths, n[:P]) and torch.equal(got.rejected_lengths, n[P:])


def test_from_hidden_bad_input():
    hidden = torch.randn(4, 5, H)
    weight = torch.randn(V, H)
    ids = torch.randint(0, V, (4, 5))
    with pytest.raises(ValueError, match="even number"):
        preference_loss_from_hidden(hidden[:3], weight, ids[:3], ref_chosen_logps=torch.zeros(1),
                                    ref_rejected_logps=torch.zeros(1))
    with pytest.raises(ValueError, match="ref_chosen_logps"):  # before any log-prob work
        preference_loss_from_hidden(hidden, weight, ids)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(2,\)"):
        preference_loss_from_hidden(hidden, weight, ids, ref_chosen_logps=torch.zeros(3),
                                    ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="token_weights must have shape"):
        preference_logps(hidden, weight, ids, token_weights=torch.ones(4, 4))
    with pytest.raises(ValueError, match="packed"):
        preference_logps(hidden, weight, ids, cu_seqlens=torch.tensor([0, 10, 20]))
    with pytest.raises(ValueError, match="token_ids must lie"):
        preference_logps(hidden, weight, ids + V)


def test_from_hidden_torch_compile_fullgraph():
    torch.manual_seed(3)
    P, T = 2, 6
    _, labels, mask = _pairs(P, T, seed=6)
    hidden = torch.randn(2 * P, T, H, dtype=torch.float32)
    weight = torch.randn(V, H, dtype=torch.float32) / H ** 0.5
    ref = torch.randn(2 * P) - 10

    def f(h, w):
        loss, stats = preference_loss_from_hidden(h, w, labels, mask=mask, beta=BETA,
                                                  ref_chosen_logps=ref[:P],
                                                  ref_rejected_logps=ref[P:],
                                                  loss_type=["sigmoid", "ipo"])
        return loss, stats["chosen_logps"]

    outs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss, cl = fn(h, w)
        outs.append((loss, cl, *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ============================================= fused from-hidden path (3 matmuls per chunk)
import rlfuse.ops.preference as _pref  # noqa: E402


def _fused_case(layout, P=3, T=7, dtype=torch.float64, seed=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5).to(dtype)
    bias = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    ids = torch.randint(0, V, (2 * P, T), generator=g)
    mask = torch.rand(2 * P, T, generator=g) > 0.3  # holes anywhere
    mask[:, 0] = True
    ids[1, 2] = -100
    tw = torch.rand(2 * P, T, generator=g, dtype=torch.float64) + 0.5
    kw = dict(mask=mask, token_weights=tw)
    if layout == "packed":  # ragged sequences: drop a different tail of each row
        lens = torch.randint(2, T + 1, (2 * P,), generator=g)
        keep = (torch.arange(T) < lens.unsqueeze(1)).reshape(-1).nonzero().squeeze(1)
        cu = torch.zeros(2 * P + 1, dtype=torch.int64)
        cu[1:] = lens.cumsum(0)
        hidden, ids = hidden.reshape(-1, H)[keep], ids.reshape(-1)[keep]
        kw = dict(mask=mask.reshape(-1)[keep], token_weights=tw.reshape(-1)[keep],
                  cu_seqlens=cu)
    ref = torch.randn(2 * P, generator=g, dtype=torch.float64) - 12
    pw = torch.rand(P, generator=g, dtype=torch.float64) + 0.5
    return hidden, weight, bias, ids, kw, ref[:P], ref[P:], pw


def _from_hidden(fused, hidden, weight, bias, ids, kw, upstream=1.0, **loss_kw):
    old = _pref._FUSED_FROM_HIDDEN
    _pref._FUSED_FROM_HIDDEN = fused
    try:
        h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
        loss, stats = preference_loss_from_hidden(h, w, ids, bias=b, **kw, **loss_kw)
        (upstream * loss).backward()
    finally:
        _pref._FUSED_FROM_HIDDEN = old
    return loss.detach(), stats, (h.grad, w.grad, b.grad)


def _assert_same(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    assert set(a[1]) == set(b[1])
    for k in b[1]:
        torch.testing.assert_close(a[1][k], b[1][k], **tol)
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, **tol)


def _count_fused(monkeypatch):
    calls = []
    orig = _pref._fused_forward
    monkeypatch.setattr(_pref, "_fused_forward", lambda *a: calls.append(1) or orig(*a))
    return calls


FUSED_TYPES = [t for t in LOSS_TYPES] + [{"sigmoid": 1.0, "ipo": 0.3, "sft": 0.2, "orpo": 0.5}]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_from_hidden_equals_two_pass(layout, monkeypatch):
    """Every per-pair type (and a weighted list with sft, whose batch coupling is added
    separately) gives the two-pass path's loss, stats and gradients, with pair chunks of one
    pair and of all pairs; the upstream gradient 2.5 scales them."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case(layout)
    if layout == "packed":
        L = kw["cu_seqlens"].diff()
        pair_rows = int((L[:3] + L[3:]).max())
    else:
        pair_rows = 2 * ids.size(1)
    calls = _count_fused(monkeypatch)
    # every type on the padded layout; the packed one with a few (its own row bookkeeping)
    types = FUSED_TYPES if layout == "padded" else ["sigmoid", "bco_pair", FUSED_TYPES[-1]]
    for lt in types:
        eps = 0.2 if lt in ("exo_pair", "robust") else 0.1
        lkw = dict(loss_type=lt, beta=BETA, label_smoothing=eps, ref_chosen_logps=rc,
                   ref_rejected_logps=rr, pair_weights=pw, ld_alpha=0.6, **kw)
        want = _from_hidden(False, hidden, weight, bias, ids, {}, upstream=2.5, **lkw)
        chunks = (pair_rows, None) if layout == "packed" or lt == "sigmoid" else (pair_rows,)
        for chunk in chunks:  # one or two pairs per chunk; all in one
            n = len(calls)
            got = _from_hidden(True, hidden, weight, bias, ids, {}, upstream=2.5,
                               chunk_size=chunk, **lkw)
            assert len(calls) == n + 1
            _assert_same(got, want, rtol=1e-10, atol=1e-12)


def test_fused_from_hidden_matches_materialised_float64():
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("padded", P=4, T=6)
    P = 4
    lt = {"sigmoid": 1.0, "ipo": 0.3, "sft": 0.2}
    got = _from_hidden(True, hidden, weight, bias, ids, kw, ref_chosen_logps=rc,
                       ref_rejected_logps=rr, loss_type=lt, beta=BETA, pair_weights=pw,
                       chunk_size=12)  # one pair per chunk
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    lp = torch.log_softmax(h @ w.t() + b, -1).gather(-1, ids.clamp(min=0).unsqueeze(-1))[..., 0]
    counted = kw["mask"] & (ids != -100)
    s = (lp * kw["token_weights"] * counted).sum(-1)
    n = counted.sum(-1)
    want, wstats = preference_loss_reference(s[:P], s[P:], rc, rr, chosen_lengths=n[:P],
                                             rejected_lengths=n[P:], loss_type=lt, beta=BETA,
                                             pair_weights=pw)
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-10, atol=1e-12)
    for k in STATS:
        torch.testing.assert_close(got[1][k], wstats[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1]["chosen_logps"], s[:P].detach(), rtol=1e-10, atol=1e-12)
    assert torch.equal(got[1]["rejected_lengths"], n[P:])
    for x, y in zip(got[2], (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_from_hidden_low_precision(dtype):
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("padded", dtype=dtype)
    lkw = dict(ref_chosen_logps=rc.float(), ref_rejected_logps=rr.float(), beta=BETA, **kw)
    want = _from_hidden(False, hidden, weight, bias, ids, {}, **lkw)
    got = _from_hidden(True, hidden, weight, bias, ids, {}, chunk_size=14, **lkw)
    tol = dict(rtol=2e-2, atol=2e-3) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    _assert_same(got, want, **tol)
    assert got[2][1].dtype == dtype and got[2][0].dtype == dtype


def test_fused_from_hidden_taken_only_when_exact(monkeypatch):
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("padded")
    calls = _count_fused(monkeypatch)
    ref = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, beta=BETA, **kw)
    _from_hidden(True, hidden, weight, bias, ids, {}, **ref)
    assert len(calls) == 1
    # sorted types, a reference requiring grad, no gradient needed, a pair larger than the
    # chunk: the two-pass path
    _from_hidden(True, hidden, weight, bias, ids, {}, loss_type=["sigmoid", "aot"], **ref)
    rg = dict(ref, ref_chosen_logps=rc.clone().requires_grad_())
    _from_hidden(True, hidden, weight, bias, ids, {}, **rg)
    tw = dict(ref, token_weights=kw["token_weights"].clone().requires_grad_())
    _from_hidden(True, hidden, weight, bias, ids, {}, **tw)
    _from_hidden(True, hidden, weight, bias, ids, {}, chunk_size=2, **ref)  # pair > 2 rows
    with torch.no_grad():
        preference_loss_from_hidden(hidden, weight, ids, bias=bias, **ref)
    preference_loss_from_hidden(hidden, weight, ids, bias=bias, **ref)  # nothing needs grad
    assert len(calls) == 1

    def f(h, w):
        return preference_loss_from_hidden(h, w, ids, **ref)[0]

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(h, w).backward()
    assert len(calls) == 1


def test_fused_from_hidden_shared_weight_accumulates():
    """A weight used elsewhere in the graph (tied embedding) sums both gradients; only
    hidden requiring grad gives no weight gradient."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("padded")
    lkw = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, beta=BETA, **kw)
    grads = []
    for fused in (True, False):
        _pref._FUSED_FROM_HIDDEN = fused
        try:
            w = weight.clone().requires_grad_()
            h = hidden.detach().requires_grad_()
            loss, _ = preference_loss_from_hidden(h, w, ids, **lkw)
            (3.0 * loss + (w ** 2).sum()).backward()
            grads.append((h.grad, w.grad))
            h2 = hidden.detach().requires_grad_()
            loss2, _ = preference_loss_from_hidden(h2, weight, ids, **lkw)
            loss2.backward()
            grads.append((h2.grad,))
        finally:
            _pref._FUSED_FROM_HIDDEN = True
    for a, b in zip(grads[:2], grads[2:]):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


def test_fused_from_hidden_bad_input():
    """The errors of the two-pass path, with gradients required."""
    hidden = torch.randn(4, 5, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    ids = torch.randint(0, V, (4, 5))
    ref = dict(ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))
    with pytest.raises(ValueError, match="token_ids must lie"):
        preference_loss_from_hidden(hidden, weight, ids + V, **ref)
    bad = ids.clone()
    bad[3, 4] = -7
    with pytest.raises(ValueError, match="position 19"):
        preference_loss_from_hidden(hidden, weight, bad, **ref)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must have shape \(2,\)"):
        preference_loss_from_hidden(hidden, weight, ids, ref_chosen_logps=torch.zeros(3),
                                    ref_rejected_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="token_weights must have shape"):
        preference_loss_from_hidden(hidden, weight, ids, token_weights=torch.ones(4, 4), **ref)
    with pytest.raises(TypeError, match="weight must have the dtype"):
        preference_loss_from_hidden(hidden, weight.double(), ids, **ref)
    with pytest.raises(ValueError, match="pair_weights must have shape"):
        preference_loss_from_hidden(hidden, weight, ids, pair_weights=torch.ones(3), **ref)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        preference_loss_from_hidden(hidden, weight, ids, chunk_size=0, **ref)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_from_hidden_dropped_rows(layout, monkeypatch):
    """Rows outside the sums (masked, ignore_index) skip the matmuls: the same results as
    computing them, zero hidden gradient there; a masked row's NaN hidden state stays out."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case(layout)
    lkw = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, beta=BETA, ld_alpha=0.5,
               loss_type=["sigmoid", "sft"], **kw)
    got = _from_hidden(True, hidden, weight, bias, ids, {}, **lkw)
    monkeypatch.setattr(_pref, "_FUSED_DROP_UNCOUNTED", False)
    want = _from_hidden(True, hidden, weight, bias, ids, {}, **lkw)
    _assert_same(got, want, rtol=1e-12, atol=1e-14)
    counted = kw["mask"] & (ids != -100)
    assert (got[2][0][~counted] == 0).all() and (got[2][0][counted] != 0).all()
    monkeypatch.setattr(_pref, "_FUSED_DROP_UNCOUNTED", True)
    poisoned = hidden.clone()
    poisoned[~counted] = float("nan")
    nan_run = _from_hidden(True, poisoned, weight, bias, ids, {}, **lkw)
    _assert_same(nan_run, got, rtol=0, atol=0)


def test_fused_from_hidden_torch_backend():
    """The torch backend's chunk gradients come from autograd on the reference."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("packed")
    lkw = dict(ref_chosen_logps=rc, ref_rejected_logps=rr, beta=BETA, pair_weights=pw,
               loss_type={"sigmoid": 1.0, "sft": 0.3}, backend="torch", **kw)
    want = _from_hidden(False, hidden, weight, bias, ids, {}, upstream=0.5, **lkw)
    got = _from_hidden(True, hidden, weight, bias, ids, {}, upstream=0.5, chunk_size=20, **lkw)
    _assert_same(got, want, rtol=1e-10, atol=1e-12)


def _materialised_f64(hidden, weight, bias, ids, kw, **lkw):
    """Plain torch float64: logits, log_softmax, the weighted counted sums per sequence and
    preference_loss_reference; (loss, (grad_hidden, grad_weight, grad_bias), sums)."""
    h, w, b = (t.detach().clone().requires_grad_() for t in (hidden, weight, bias))
    lp = torch.log_softmax(h @ w.t() + b, -1).gather(-1, ids.clamp(min=0).unsqueeze(-1))[..., 0]
    counted = kw["mask"] & (ids != -100)
    v = torch.where(counted, lp * kw["token_weights"], torch.zeros_like(lp))
    if "cu_seqlens" in kw:
        cu = kw["cu_seqlens"]
        sums = torch.stack([v[cu[i]:cu[i + 1]].sum() for i in range(cu.numel() - 1)])
        n = torch.stack([counted[cu[i]:cu[i + 1]].sum() for i in range(cu.numel() - 1)])
    else:
        sums, n = v.sum(-1), counted.sum(-1)
    P = sums.numel() // 2
    loss, _ = preference_loss_reference(sums[:P], sums[P:], chosen_lengths=n[:P],
                                        rejected_lengths=n[P:], **lkw)
    loss.backward()
    return loss.detach(), (h.grad, w.grad, b.grad), sums.detach()


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_masked_hidden_never_reaches_gradients_either_path(layout, poison):
    """NaN / inf / huge hidden states at masked positions (padding): the two-pass path
    (preference_logps + preference_loss) and the fused path give the loss and gradients of
    the float64 materialised reference on clean inputs, finite, and bitwise the same results
    as with zeros there; preference_logps alone too (docs/ops/preference.md)."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case(layout)
    mask = kw["mask"]
    clean = torch.where(mask.unsqueeze(-1), hidden, torch.zeros_like(hidden))
    bad = torch.where(mask.unsqueeze(-1), hidden, torch.full_like(hidden, poison))
    lkw = dict(loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.3, 0.2], beta=BETA,
               ref_chosen_logps=rc, ref_rejected_logps=rr, pair_weights=pw)
    want_loss, want_grads, want_sums = _materialised_f64(clean, weight, bias, ids, kw, **lkw)
    for fused in (False, True):
        got = _from_hidden(fused, bad, weight, bias, ids, kw, **lkw)
        for x in (got[0], *got[2]):
            assert torch.isfinite(x).all()
        assert (got[2][0][~mask] == 0).all()  # no hidden gradient at masked positions
        torch.testing.assert_close(got[0], want_loss, rtol=1e-10, atol=1e-12)
        for x, y in zip(got[2], want_grads):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        _assert_same(got, _from_hidden(fused, clean, weight, bias, ids, kw, **lkw),
                     rtol=0, atol=0)
    seq = preference_logps(bad, weight, ids, bias=bias, **kw)
    seq_clean = preference_logps(clean, weight, ids, bias=bias, **kw)
    for a, b in zip(seq, seq_clean):
        assert torch.equal(a, b)
    assert torch.isfinite(seq.token_logprobs).all() and (seq.token_logprobs[~mask] == 0).all()
    P = rc.numel()
    torch.testing.assert_close(seq.chosen, want_sums[:P], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(seq.rejected, want_sums[P:], rtol=1e-10, atol=1e-12)


def test_masked_ids_still_checked_two_pass():
    """preference_logps skips masked rows but still checks their ids (as the fused path)."""
    hidden, weight, bias, ids, kw, rc, rr, pw = _fused_case("padded")
    mask = kw["mask"]
    r, c = (~mask).nonzero()[0].tolist()
    ids = ids.clone()
    ids[r, c] = V + 1
    with pytest.raises(ValueError, match=rf"position {r * ids.size(1) + c} \(flattened\) "
                                         rf"holds {V + 1}"):
        preference_logps(hidden, weight, ids, bias=bias, **kw)
    with pytest.raises(ValueError, match=rf"holds {V + 1}"):
        _from_hidden(True, hidden, weight, bias, ids, kw, ref_chosen_logps=rc,
                     ref_rejected_logps=rr)
