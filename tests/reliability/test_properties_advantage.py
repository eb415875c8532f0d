"""Property tests (hypothesis) for the advantage family on every backend that runs here: padded
and packed layouts with empty sequences, masks with holes in several dtypes, garbage (NaN,
inf) at masked positions, views, magnitudes from subnormal to 1e4; compared with the float64
references, or required to raise the documented ValueError."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

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
from tests.reliability._inputs import (
    BACKENDS,
    DEVICE,
    FLOATS,
    LAYOUTS,
    MAGNITUDES,
    MASK_DTYPES,
    MASK_KINDS,
    budget,
    holes_mask,
    laid_out,
    seeds,
    values,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _close(got, want, scale=1.0, what=""):
    tol = 1e-9 if got.dtype == torch.float64 else 3e-5
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol,
                               atol=tol * max(1.0, scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _poison(x, m):
    """NaN / inf at masked positions: they must never reach an output."""
    g = torch.where(torch.arange(x.numel()).reshape(x.shape) % 2 == 0,
                    torch.tensor(float("nan"), dtype=x.dtype),
                    torch.tensor(float("inf"), dtype=x.dtype))
    return torch.where(m, x, g)


def _seq_case(B, T, packed, mask_kind, gen):
    """(mask [B, T] or [N], cu_seqlens or None, per-sequence lengths)."""
    m = holes_mask(B, T, gen, mask_kind)
    if not packed:
        return m, None
    lens = torch.randint(0, T + 1, (B,), generator=gen)
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = lens.cumsum(0)
    flat = torch.cat([m[b, : int(lens[b])] for b in range(B)]) if B else torch.zeros(0, dtype=torch.bool)
    return flat, cu


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_and_returns_properties(backend):
    @budget(backend)
    @given(B=st.integers(0, 5), T=st.integers(0, 12), packed=st.booleans(),
           mask_kind=st.sampled_from(MASK_KINDS + ("none",)),
           mask_dtype=st.sampled_from(MASK_DTYPES), dtype=st.sampled_from(FLOATS),
           mag=st.sampled_from(MAGNITUDES), layout=st.sampled_from(LAYOUTS),
           gamma=st.sampled_from([0.0, 0.5, 0.99, 1.0]), lam=st.sampled_from([0.0, 0.95, 1.0]),
           semantics=st.sampled_from(["skip_masked", "zero_masked"]), bootstrap=st.booleans(),
           seed=seeds)
    def check(B, T, packed, mask_kind, mask_dtype, dtype, mag, layout, gamma, lam, semantics,
              bootstrap, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        m, cu = _seq_case(B, T, packed, "full" if mask_kind == "none" else mask_kind, gen)
        r = values(m.shape, gen, mag).to(dtype)
        v = values(m.shape, gen, mag).to(dtype)
        S = B
        lv = values((S,), gen, mag).to(dtype) if bootstrap else None
        mask = None if mask_kind == "none" else m
        if mask is not None:
            r, v = _poison(r, m), _poison(v, m)
        kw = dict(gamma=gamma, lam=lam, semantics=semantics, cu_seqlens=cu)
        dv = (lambda x: None if x is None else laid_out(x.to(dev), layout))
        a, ret = gae(dv(r), dv(v), None if mask is None else dv(mask.to(mask_dtype)),
                     last_values=None if lv is None else lv.to(dev),
                     cu_seqlens=None if cu is None else cu.to(dev),
                     gamma=gamma, lam=lam, semantics=semantics, backend=backend)
        ra, rret = gae_reference(r.double(), v.double(), mask,
                                 last_values=None if lv is None else lv.double(), **kw)
        assert a.dtype == _acc(dtype) and a.shape == r.shape
        scale = float(torch.nan_to_num(ra.abs(), posinf=0).max()) if ra.numel() else 1.0
        _close(a, ra, scale, "advantages")
        _close(ret, rret, scale, "returns")
        g = discounted_returns(dv(r), None if mask is None else dv(mask.to(mask_dtype)), gamma,
                               cu_seqlens=None if cu is None else cu.to(dev),
                               semantics=semantics, backend=backend)
        rg = discounted_returns_reference(r.double(), mask, gamma, cu_seqlens=cu,
                                          semantics=semantics)
        _close(g, rg, float(rg.abs().max()) if rg.numel() else 1.0, "discounted returns")

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_moments_properties(backend):
    @budget(backend)
    @given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
           use_mask=st.booleans(), mask_dtype=st.sampled_from(MASK_DTYPES),
           dtype=st.sampled_from(FLOATS), mag=st.sampled_from(MAGNITUDES),
           layout=st.sampled_from(LAYOUTS), dim=st.one_of(st.none(), st.integers(-3, 2)),
           unbiased=st.booleans(), shift_mean=st.booleans(), seed=seeds)
    def check(shape, use_mask, mask_dtype, dtype, mag, layout, dim, unbiased, shift_mean, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        x = values(shape, gen, mag).to(dtype)
        m = (torch.rand(shape, generator=gen) < 0.6) if use_mask else None
        if m is not None:
            x = _poison(x, m)
        nd = max(len(shape), 1)
        if dim is not None and not -nd <= dim < nd:
            dim = None
        xv = laid_out(x.to(dev), layout)
        mv = None if m is None else laid_out(m.to(mask_dtype).to(dev), layout)
        n = x.numel() if m is None else int(m.sum())
        xd = x.double()
        scale = float(xd[m if m is not None else torch.ones_like(xd, dtype=torch.bool)]
                      .abs().max()) if n else 1.0
        # mean
        if dim is None and n == 0:
            with pytest.raises(ValueError, match="masked_mean: the mask selects no element"):
                masked_mean(xv, mv, backend=backend)
        else:
            got = masked_mean(xv, mv, dim, backend=backend)
            _close(got, masked_mean_reference(xd, m, dim), scale, "mean")
        # variance
        if dim is None and (n == 0 or (unbiased and n == 1)):
            with pytest.raises(ValueError, match="masked_var: the mask selects"):
                masked_var(xv, mv, unbiased=unbiased, backend=backend)
        else:
            got = masked_var(xv, mv, dim, unbiased=unbiased, backend=backend)
            _close(got, masked_var_reference(xd, m, dim, unbiased=unbiased), scale**2, "var")
        # whitening
        if n < (2 if unbiased else 1):
            with pytest.raises(ValueError, match="masked_whiten: the mask selects .* whitening "
                                                 "needs at least"):
                masked_whiten(xv, mv, shift_mean, unbiased=unbiased, backend=backend)
        else:
            got = masked_whiten(xv, mv, shift_mean, unbiased=unbiased, backend=backend)
            want = masked_whiten_reference(xd, m, shift_mean, unbiased=unbiased)
            _close(got, want, float(want.abs().max()) if want.numel() else 1.0, "whiten")

    check()


def _call_or_error(fn):
    try:
        return fn(), None
    except ValueError as exc:
        return None, str(exc)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_advantages_properties(backend):
    @budget(backend)
    @given(n_groups=st.integers(1, 4), gsize=st.integers(1, 4), by_ids=st.booleans(),
           method=st.sampled_from(GROUP_METHODS), semantics=st.sampled_from(GROUP_SEMANTICS),
           nan_frac=st.sampled_from([0.0, 0.3]), mag=st.sampled_from(MAGNITUDES),
           dtype=st.sampled_from(FLOATS), tokens=st.sampled_from(["none", "mask", "lengths"]),
           layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(n_groups, gsize, by_ids, method, semantics, nan_frac, mag, dtype, tokens, layout,
              seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        B = n_groups * gsize
        s = values((B,), gen, mag)
        s = s.masked_fill(torch.rand(B, generator=gen) < nan_frac, float("nan")).to(dtype)
        ids = torch.randperm(B, generator=gen) % n_groups if by_ids else None
        kw = dict(method=method, semantics=semantics)
        kw["group_ids" if by_ids else "group_size"] = ids if by_ids else gsize
        mask = lengths = None
        if tokens == "mask" or method == "opo":
            mask = holes_mask(B, 5, gen, "right")
        if tokens == "lengths":
            lengths = torch.randint(0, 6, (B,), generator=gen)
        want, want_err = _call_or_error(lambda: group_advantages_reference(
            s.double(), mask=mask, lengths=lengths, **kw))
        dkw = dict(kw)
        if by_ids:
            dkw["group_ids"] = ids.to(dev)
        got, got_err = _call_or_error(lambda: group_advantages(
            laid_out(s.to(dev), layout), mask=None if mask is None else mask.to(dev),
            lengths=None if lengths is None else lengths.to(dev), backend=backend, **dkw))
        if want_err is not None or got_err is not None:
            # the same documented error (the sample named may differ between orders)
            assert got_err is not None and want_err is not None, (got_err, want_err)
            assert got_err.split(" (sample")[0] == want_err.split(" (sample")[0]
            return
        fin = s.double()[~torch.isnan(s.double())]
        _close(got, want, float(fin.abs().max()) if fin.numel() else 1.0, method)
        assert torch.equal(got.cpu()[torch.isnan(s).cpu()], torch.zeros_like(
            got.cpu()[torch.isnan(s).cpu()])) or mask is not None

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_rewards_properties(backend):
    @budget(backend)
    @given(B=st.integers(0, 5), T=st.integers(0, 9), packed=st.booleans(),
           mask_kind=st.sampled_from(MASK_KINDS), mask_dtype=st.sampled_from(MASK_DTYPES),
           with_kl=st.booleans(), kl_coef=st.sampled_from([0.0, 0.1, -2.0]),
           dtype=st.sampled_from(FLOATS), mag=st.sampled_from(MAGNITUDES),
           layout=st.sampled_from(LAYOUTS), seed=seeds)
    def check(B, T, packed, mask_kind, mask_dtype, with_kl, kl_coef, dtype, mag, layout, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        m, cu = _seq_case(B, T, packed, mask_kind, gen)
        scores = values((B,), gen, mag).to(dtype)
        kl = _poison(values(m.shape, gen, mag).to(dtype), m) if with_kl else None
        got = token_rewards(laid_out(scores.to(dev), layout),
                            laid_out(m.to(mask_dtype).to(dev), layout),
                            kl=None if kl is None else laid_out(kl.to(dev), layout),
                            kl_coef=kl_coef, cu_seqlens=None if cu is None else cu.to(dev),
                            backend=backend)
        want = token_rewards_reference(scores.double(), m,
                                       kl=None if kl is None else kl.double(),
                                       kl_coef=kl_coef, cu_seqlens=cu,
                                       T=None if packed else T)
        assert got.shape == m.shape
        _close(got, want, float(want.abs().max()) if want.numel() else 1.0, "token rewards")

    check()
