"""Property tests (hypothesis) for the preference ops on every backend that runs here: any
number of pairs (0 included), every loss type alone or combined with weights, with and
without reference log-probs, lengths and pair weights, every float dtype, views, large
log-probs; loss, statistics and gradients compared with the float64 reference, invalid
combinations required to raise the reference's error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlfuse.ops import (
    linear_token_logprobs_reference,
    preference_logps,
    preference_loss,
    preference_loss_reference,
)
from rlfuse.ops.preference import F_DIVERGENCES, LOSS_TYPES
from tests.reliability._inputs import BACKENDS, DEVICE, FLOATS, LAYOUTS, budget, laid_out, seeds
from tests.reliability.test_properties_logprob import _segment_reference

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _close(got, want, rtol, what):
    # the reference rounded to the op's output dtype: a float64 value beyond float32's range
    # (forward_kl's exp(-u) of u = -1000) is inf in float32, correctly
    got, want = got.detach().double().cpu(), want.detach().to(got.dtype).double().cpu()
    scale = float(torch.nan_to_num(want.abs(), posinf=0).max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1.0),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _error(fn):
    try:
        return fn(), None
    except ValueError as exc:
        return None, str(exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_loss_properties(backend):
    @budget(backend)
    @given(P=st.integers(0, 6), types=st.lists(st.sampled_from(LOSS_TYPES), min_size=1,
                                               max_size=3, unique=True),
           weighted=st.booleans(), with_ref=st.booleans(), with_len=st.booleans(),
           with_pw=st.booleans(), beta=st.sampled_from([0.05, 0.1, 2.0]),
           smoothing=st.sampled_from([0.0, 0.1, 0.3]), fdiv=st.sampled_from(F_DIVERGENCES),
           spread=st.sampled_from([1.0, 30.0, 1e3]), dtype=st.sampled_from(FLOATS),
           layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(P, types, weighted, with_ref, with_len, with_pw, beta, smoothing, fdiv, spread,
              dtype, layout, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        if fdiv in ("forward_kl", "alpha_divergence") and dtype != torch.float64:
            # their scores hold exp(-u) (exp(-alpha u)): past |u| ~ 88 float32 overflows and
            # s_c - s_r is inf - inf = NaN, as in TRL (docs/reliability.md, known limits)
            spread = min(spread, 30.0)

        def lp():
            return (-torch.rand(P, generator=gen, dtype=torch.float64) * spread).to(dtype)

        c, r, rc, rr = lp(), lp(), lp(), lp()
        lc = torch.randint(0, 9, (P,), generator=gen)
        lr = torch.randint(0, 9, (P,), generator=gen)
        pw = (torch.rand(P, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
        kw = dict(loss_type=types, beta=beta, label_smoothing=smoothing,
                  loss_weights=[0.5 + i for i in range(len(types))] if weighted else None,
                  f_divergence_type=fdiv)
        opt = lambda x, on: x if on else None  # noqa: E731
        cr, rr_ = c.double().requires_grad_(), r.double().requires_grad_()
        want, want_err = _error(lambda: preference_loss_reference(
            cr, rr_, opt(rc.double(), with_ref), opt(rr.double(), with_ref),
            chosen_lengths=opt(lc, with_len), rejected_lengths=opt(lr, with_len),
            pair_weights=opt(pw.double(), with_pw), **kw))
        dv = (lambda x: laid_out(x.to(dev), layout))
        cg, rg = dv(c).requires_grad_(), dv(r).requires_grad_()
        got, got_err = _error(lambda: preference_loss(
            cg, rg, opt(dv(rc), with_ref), opt(dv(rr), with_ref),
            chosen_lengths=opt(dv(lc), with_len), rejected_lengths=opt(dv(lr), with_len),
            pair_weights=opt(dv(pw), with_pw), backend=backend, **kw))
        assert got_err == want_err
        if want_err is not None:
            return
        (loss, stats), (rloss, rstats) = got, want
        rtol = 1e-9 if dtype == torch.float64 and backend != "triton" else 5e-5
        _close(loss, rloss, rtol, "loss")
        for k in rstats:
            if k == "accuracies":  # a strict comparison of rewards: decided by rounding at ties
                continue
            _close(stats[k], rstats[k], rtol, k)
        if P == 0:
            return
        g = torch.autograd.grad(loss, (cg, rg), allow_unused=True)
        rg_ = torch.autograd.grad(rloss, (cr, rr_), allow_unused=True)
        gtol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else (
            1e-4 if rtol > 1e-6 else rtol)
        for name, a, b, x in zip(("dchosen", "drejected"), g, rg_, (cg, rg)):
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros(x.shape, dtype=torch.float64) if b is None else b
            _close(a, b.to(dtype), gtol, name)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_logps_properties(backend):
    @budget(backend)
    @given(P=st.integers(1, 3), T=st.integers(0, 5), packed=st.booleans(), H=st.integers(1, 6),
           V=st.integers(1, 12), use_mask=st.booleans(), use_tw=st.booleans(),
           ld_alpha=st.sampled_from([None, 0.5]), layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(P, T, packed, H, V, use_mask, use_tw, ld_alpha, layout, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        S = 2 * P
        if packed:
            lens = torch.randint(0, T + 1, (S,), generator=gen)
            cu = torch.zeros(S + 1, dtype=torch.int64)
            cu[1:] = lens.cumsum(0)
            lead = (int(cu[-1]),)
        else:
            cu = torch.arange(S + 1) * T
            lead = (S, T)
        h = torch.randn(*lead, H, generator=gen, dtype=torch.float64)
        w = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5
        ids = torch.randint(0, V, lead, generator=gen)
        if ids.numel():
            ids = ids.masked_fill(torch.rand(lead, generator=gen) < 0.2, -100)
        mask = torch.rand(lead, generator=gen) < 0.7 if use_mask else None
        tw = torch.rand(lead, generator=gen, dtype=torch.float64) if use_tw else None
        kw = dict(mask=None if mask is None else laid_out(mask.to(dev), layout),
                  cu_seqlens=cu.to(dev) if packed else None,
                  token_weights=None if tw is None else laid_out(tw.float().to(dev), layout),
                  ld_alpha=ld_alpha, backend=backend)
        out = preference_logps(laid_out(h.float().to(dev), layout), w.float().to(dev),
                               ids.to(dev), **kw)
        lp = linear_token_logprobs_reference(h.float().double(), w.float().double(), ids)
        counted = ids != -100
        if mask is not None:
            counted &= mask
        weights = torch.ones(lead, dtype=torch.float64) if tw is None else tw.float().double()
        if ld_alpha is not None:  # tokens past min(L_chosen, L_rejected) of the pair
            flat_c, flat_w = counted.reshape(-1), weights.reshape(-1).clone()
            L = torch.tensor([int(flat_c[cu[i]:cu[i + 1]].sum()) for i in range(S)])
            for i in range(S):
                shared, k = int(min(L[i % P], L[P + i % P])), 0
                for p in range(int(cu[i]), int(cu[i + 1])):
                    if flat_c[p]:
                        k += 1
                        if k > shared:
                            flat_w[p] *= ld_alpha
            weights = flat_w.view(lead)
        s, _, n = _segment_reference(lp * weights, counted, cu)
        _close(torch.cat([out.chosen, out.rejected]), s, 3e-5, "sums")
        assert torch.equal(torch.cat([out.chosen_lengths, out.rejected_lengths]).cpu(), n)

    check()
