"""Property tests (hypothesis) for kl_penalty, policy_loss and value_loss on every backend that
runs here: any shape for the KL (size 0 and 1 dimensions included), [B, T] with empty rows
and masks with holes for the losses, every semantics / variant / aggregation combination a
semantics accepts, views, extreme log-ratios; loss, statistics and gradients compared with
the float64 references, invalid combinations required to raise the reference's error."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlfuse.ops import (
    kl_penalty,
    kl_penalty_reference,
    policy_loss,
    policy_loss_reference,
    value_loss,
    value_loss_reference,
)
from tests.reliability._inputs import (
    BACKENDS,
    DEVICE,
    FLOATS,
    LAYOUTS,
    MASK_DTYPES,
    MASK_KINDS,
    budget,
    holes_mask,
    laid_out,
    seeds,
)

PL = importlib.import_module("rlfuse.ops.policy_loss")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _close(got, want, rtol, what):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = float(torch.nan_to_num(want.abs(), posinf=0).max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _rtol(dtype, backend):
    # the Triton kernels compute float64 inputs in float32 (docs/ops.md)
    return 1e-9 if dtype == torch.float64 and backend != "triton" else 5e-5


def _gtol(dtype, backend):
    """Gradients are written in the input dtype (16-bit ones round)."""
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return _rtol(dtype, backend) if _rtol(dtype, backend) < 1e-6 else 1e-4


def _error(fn):
    try:
        return fn(), None
    except ValueError as exc:
        return None, str(exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_properties(backend):
    @budget(backend)
    @given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
           semantics=st.sampled_from(PL.SEMANTICS), kind=st.sampled_from(PL.KL_KINDS),
           clamp=st.sampled_from([None, 0.5, 5.0]), spread=st.sampled_from([0.3, 30.0, 1e4]),
           dtype=st.sampled_from(FLOATS), layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(shape, semantics, kind, clamp, spread, dtype, layout, seed):
        if kind not in PL._SEM_KL[semantics]:
            with pytest.raises(ValueError, match=re.escape(f"kind={kind!r} does not exist in")):
                kl_penalty(torch.zeros(2), torch.zeros(2), kind, semantics=semantics)
            return
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        lp = -torch.rand(shape, generator=gen, dtype=torch.float64) * 3
        ref = lp + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
        lp, ref = lp.to(dtype), ref.to(dtype)
        x = laid_out(lp.to(dev), layout).requires_grad_()
        out = kl_penalty(x, laid_out(ref.to(dev), layout), kind, clamp=clamp,
                         semantics=semantics, backend=backend)
        xr = lp.double().requires_grad_()
        want = kl_penalty_reference(xr, ref.double(), kind, clamp=clamp, semantics=semantics)
        assert out.shape == lp.shape
        # an estimate beyond the computing precision's range (k3 of a log-ratio of 95 is
        # 1.8e41) is inf in the op: compare with the reference rounded to that precision
        computed = torch.float64 if out.dtype == torch.float64 and backend != "triton" \
            else torch.float32
        _close(out, want.to(computed), _rtol(dtype, backend), "kl")
        if out.numel() and bool(torch.isfinite(want).all()):
            g = torch.randn(shape, generator=gen, dtype=torch.float64)
            (d,) = torch.autograd.grad((out * g.to(out)).sum(), x)
            (rd,) = torch.autograd.grad((want * g).sum(), xr)
            assert d.dtype == dtype
            # autograd through the reference's clamp of an overflowing exp gives 0 * inf = NaN
            # where the documented gradient (0 outside the clamp) is finite: compare elsewhere
            # (gradients are written in the input dtype: compare with the reference rounded to
            # it, so a float16 gradient beyond 65504 is inf in both)
            ok = torch.isfinite(rd)
            assert bool(torch.isfinite(d[ok.to(d.device) & torch.isfinite(rd.to(dtype))]).all())
            _close(d[ok], rd.to(dtype)[ok], _gtol(dtype, backend), "dkl")

    check()


def _policy_inputs(B, T, gen, spread, mask_kind):
    lp = -(torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 + 0.05)
    d = dict(logp=lp, old=lp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64),
             ref=lp + spread * torch.randn(B, T, generator=gen, dtype=torch.float64),
             adv=torch.randn(B, T, generator=gen, dtype=torch.float64),
             ent=torch.rand(B, T, generator=gen, dtype=torch.float64) * 3,
             isw=torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.5)
    d["mask"] = holes_mask(B, T, gen, mask_kind)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_loss_properties(backend):
    sem_variants = [(s, v) for s in PL.SEMANTICS for v in PL._SEM_VARIANTS[s]]

    @budget(backend)
    @given(B=st.integers(0, 4), T=st.integers(0, 7), sv=st.sampled_from(sem_variants),
           mode=st.sampled_from((None,) + PL.LOSS_AGG_MODES), with_ref=st.booleans(),
           with_ent=st.booleans(), with_isw=st.booleans(), with_old=st.booleans(),
           adv_shape=st.sampled_from(["bt", "b", "b1"]), mask_kind=st.sampled_from(MASK_KINDS),
           mask_dtype=st.sampled_from(MASK_DTYPES), spread=st.sampled_from([0.05, 1.0, 30.0]),
           dual=st.booleans(), dtype=st.sampled_from(FLOATS), layout=st.sampled_from(LAYOUTS),
           seed=seeds)
    def check(B, T, sv, mode, with_ref, with_ent, with_isw, with_old, adv_shape, mask_kind,
              mask_dtype, spread, dual, dtype, layout, seed):
        semantics, variant = sv
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        t = _policy_inputs(B, T, gen, spread, mask_kind)
        adv = {"bt": t["adv"], "b": t["adv"][:, 0] if T else torch.randn(B, generator=gen,
                                                                       dtype=torch.float64),
               "b1": None}[adv_shape]
        if adv is None:
            adv = (t["adv"][:, :1] if T else torch.randn(B, 1, generator=gen,
                                                          dtype=torch.float64)).contiguous()
        kw = dict(variant=variant, semantics=semantics, loss_agg_mode=mode,
                  beta=0.1 if with_ref else 0.0, entropy_coef=0.01 if with_ent else 0.0,
                  clip_ratio_c=3.0 if dual and variant in ("ppo", "gspo") else None)
        cast = (lambda x: x.to(dtype))
        ref_args = dict(ref_logp=cast(t["ref"]).double() if with_ref else None,
                        entropy=None, is_weights=cast(t["isw"]).double() if with_isw else None)
        lpr = cast(t["logp"]).double().requires_grad_()
        entr = cast(t["ent"]).double().requires_grad_() if with_ent else None
        old = cast(t["old"]) if with_old else None
        want, want_err = _error(lambda: policy_loss_reference(
            lpr, None if old is None else old.double(), cast(adv).double(), t["mask"],
            **{**ref_args, "entropy": entr}, **kw))
        dv = (lambda x: None if x is None else laid_out(x.to(dev), layout))
        lp = dv(cast(t["logp"])).requires_grad_()
        ent = dv(cast(t["ent"])).requires_grad_() if with_ent else None
        got, got_err = _error(lambda: policy_loss(
            lp, dv(old), dv(cast(adv)), dv(t["mask"].to(mask_dtype)),
            ref_logp=dv(cast(t["ref"])) if with_ref else None, entropy=ent,
            is_weights=dv(cast(t["isw"])) if with_isw else None, backend=backend, **kw))
        assert got_err == want_err
        if want_err is not None:
            return
        (loss, stats), (rloss, rstats) = got, want
        rtol = _rtol(dtype, backend)
        # a value beyond the output dtype's range (the mean ratio at log-ratios near 90 is
        # 8e38) is inf in the op: compare with the reference rounded to that dtype
        _close(loss, rloss.to(loss.dtype), rtol, "loss")
        assert set(stats) == set(rstats)
        for k in stats:
            _close(stats[k], rstats[k].to(stats[k].dtype), rtol, k)
        wrt, rwrt = [lp] + ([ent] if with_ent else []), [lpr] + ([entr] if with_ent else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        rgrads = torch.autograd.grad(rloss, rwrt, allow_unused=True)
        # a row holding a log-ratio whose exp overflows the computing precision (|x| >= 88
        # in float32; docs/ops/policy_loss.md) has inf ratios or KL terms there, and a
        # clipped token's zero slope times an infinite ratio is NaN, as in float32 autograd:
        # such rows (a sequence ratio spans the row) are compared elsewhere only
        lim = 700.0 if dtype == torch.float64 and backend != "triton" else 88.0
        lpd, m = cast(t["logp"]).double(), t["mask"].bool()
        big = torch.zeros_like(m)
        if old is not None:
            big |= (lpd - old.double()).abs() >= lim
        if with_ref:
            big |= (cast(t["ref"]).double() - lpd).abs() >= lim
        keep = ~(big & m).any(-1, keepdim=True).expand_as(m)
        for name, g, r, x in zip(("dlogp", "dentropy"), grads, rgrads, wrt):
            g = torch.zeros_like(x) if g is None else g
            r = torch.zeros_like(x, dtype=torch.float64) if r is None else r
            assert g.dtype == dtype
            k = keep.to(g.device)
            # rounded as the op writes it
            _close(g[k], r.to(dtype)[keep], _gtol(dtype, backend), name)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_loss_properties(backend):
    @budget(backend)
    @given(B=st.integers(0, 4), T=st.integers(0, 7), semantics=st.sampled_from(PL.SEMANTICS),
           mode=st.sampled_from((None,) + PL.LOSS_AGG_MODES),
           clip=st.sampled_from([None, 0.0, 0.2, 1e4]), with_old=st.booleans(),
           mask_kind=st.sampled_from(MASK_KINDS), mask_dtype=st.sampled_from(MASK_DTYPES),
           scale=st.sampled_from([1.0, 1e4]), dtype=st.sampled_from(FLOATS),
           layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(B, T, semantics, mode, clip, with_old, mask_kind, mask_dtype, scale, dtype,
              layout, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        v, vo, R = (scale * torch.randn(B, T, generator=gen, dtype=torch.float64)
                    for _ in range(3))
        v, vo, R = v.to(dtype), vo.to(dtype), R.to(dtype)
        m = holes_mask(B, T, gen, mask_kind)
        kw = dict(cliprange_value=clip, loss_agg_mode=mode, semantics=semantics)
        vr = v.double().requires_grad_()
        want, want_err = _error(lambda: value_loss_reference(
            vr, vo.double() if with_old else None, R.double(), m, **kw))
        dv = (lambda x: laid_out(x.to(dev), layout))
        vv = dv(v).requires_grad_()
        got, got_err = _error(lambda: value_loss(
            vv, dv(vo) if with_old else None, dv(R), dv(m.to(mask_dtype)), backend=backend,
            **kw))
        assert got_err == want_err
        if want_err is not None:
            return
        (loss, stats), (rloss, rstats) = got, want
        rtol = _rtol(dtype, backend)
        _close(loss, rloss, rtol, "loss")
        if dtype != torch.float64 or backend == "triton":
            # clip_frac counts tokens whose clipped error is strictly larger: a discrete test
            # that float32 rounding decides when nothing is really clipped (OpenRLHF's
            # old + clamp(v - old) is not exactly v in float32, as in OpenRLHF itself), so it
            # is compared with the reference evaluated in float32, the op's precision
            f32 = (lambda x: x.float())
            rstats["clip_frac"] = value_loss_reference(
                f32(v), f32(vo) if with_old else None, f32(R), m, **kw)[1]["clip_frac"]
        for k in rstats:
            _close(stats[k], rstats[k], rtol, k)
        (g,) = torch.autograd.grad(loss, vv, allow_unused=True)
        (r,) = torch.autograd.grad(rloss, vr, allow_unused=True)
        g = torch.zeros_like(vv) if g is None else g
        r = torch.zeros_like(vr) if r is None else r
        _close(g, r.to(dtype), _gtol(dtype, backend), "dvalues")

    check()
