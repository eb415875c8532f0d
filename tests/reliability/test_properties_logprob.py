"""Property tests (hypothesis) for the log-probability ops on every backend that runs here:
random shapes with size-0 and size-1 dimensions, every float dtype, offset / strided /
transposed views, +-1e4 logits, -inf, subnormals and ignored positions, each compared with
the float64 reference (or required to raise the documented exception)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from rlfuse.ops import (
    linear_token_logprobs,
    linear_token_logprobs_reference,
    reduce_sequences,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_reference,
)
from tests.reliability._inputs import BACKENDS, DEVICE, FLOATS, LAYOUTS, budget, laid_out, seeds

pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning"),
    # the Triton interpreter evaluates in numpy, which warns on inf intermediates
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

LEAD = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def _close(got, want, scale=1.0, rtol=3e-5, what=""):
    torch.testing.assert_close(got.detach().double().cpu(), want.detach().double().cpu(),
                               rtol=rtol, atol=3e-5 * max(1.0, scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _logits(lead, V, dtype, gen, scale, neg_inf, subnormal):
    z = torch.randn(*lead, V, generator=gen, dtype=torch.float64) * scale
    if neg_inf and z.numel():
        z = z.masked_fill(torch.rand(z.shape, generator=gen) < 0.3, float("-inf"))
    if subnormal and z.numel():
        z = z.masked_fill(torch.rand(z.shape, generator=gen) < 0.3, 1e-41)
    return z.to(dtype)


def _ids(lead, V, gen, ignore_frac, id_dtype):
    ids = torch.randint(0, V, lead, generator=gen)
    if ids.numel():
        ids = ids.masked_fill(torch.rand(lead, generator=gen) < ignore_frac, -100)
    return ids.to(id_dtype)


def _run_token(backend, lead, V, dtype, layout, scale, neg_inf, subnormal, ignore_frac,
               id_dtype, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    dev = DEVICE[backend]
    z = _logits(lead, V, dtype, gen, scale, neg_inf, subnormal)
    ids = _ids(lead, V, gen, ignore_frac, id_dtype)
    x = laid_out(z.to(dev), layout).requires_grad_()
    lp, ent = token_logprobs(x, ids.to(dev), temperature=temperature, return_entropy=True,
                             backend=backend)
    assert lp.shape == lead and ent.shape == lead
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    zr = z.double().requires_grad_()
    rlp, rent = token_logprobs_reference(zr, ids, temperature=temperature,
                                         return_entropy=True)
    fin = z.detach()[torch.isfinite(z)]
    mag = float(fin.double().abs().max()) / temperature if fin.numel() else 1.0
    _close(lp, rlp, mag, what="logp")
    _close(ent, rent, mag, what="entropy")
    if neg_inf or not lp.numel():
        return  # gradients at -inf logits are covered by tests/ops; keep to finite rows here
    g1 = torch.randn(lead, generator=gen, dtype=torch.float64)
    g2 = torch.randn(lead, generator=gen, dtype=torch.float64)
    (d,) = torch.autograd.grad((lp * g1.to(lp)).sum() + (ent * g2.to(ent)).sum(), x)
    (rd,) = torch.autograd.grad((rlp * g1).sum() + (rent * g2).sum(), zr)
    assert d.dtype == dtype and d.shape == z.shape
    grtol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)
    _close(d, rd, mag, rtol=grtol, what="dlogits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logprobs_properties(backend):
    @budget(backend)
    @given(lead=LEAD, V=st.integers(1, 70), dtype=st.sampled_from(FLOATS),
           layout=st.sampled_from(LAYOUTS), scale=st.sampled_from([1.0, 30.0, 1e4]),
           neg_inf=st.booleans(), subnormal=st.booleans(), ignore_frac=st.sampled_from([0, .3]),
           id_dtype=st.sampled_from([torch.int64, torch.int32]),
           temperature=st.sampled_from([1.0, 0.7, 3.0]), seed=seeds)
    def check(**kw):
        if kw["dtype"] in (torch.float16, torch.bfloat16) and kw["scale"] == 1e4:
            kw["dtype"] = torch.float32  # 1e4 logits round to multiples of 8..64 in 16 bits
        _run_token(backend, **kw)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_token_logprobs_properties(backend):
    @budget(backend)
    @given(lead=LEAD, H=st.integers(1, 12), V=st.integers(1, 40), bias=st.booleans(),
           dtype=st.sampled_from([torch.float32, torch.float64]),
           layout=st.sampled_from(LAYOUTS), chunk=st.one_of(st.none(), st.integers(1, 9)),
           ignore_frac=st.sampled_from([0, .3]), temperature=st.sampled_from([1.0, 0.5]),
           seed=seeds)
    def check(lead, H, V, bias, dtype, layout, chunk, ignore_frac, temperature, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        h = torch.randn(*lead, H, generator=gen, dtype=torch.float64).to(dtype)
        w = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
        b = (torch.randn(V, generator=gen, dtype=torch.float64) if bias else None)
        b = None if b is None else b.to(dtype)
        ids = _ids(lead, V, gen, ignore_frac, torch.int64)
        hv = laid_out(h.to(dev), layout).requires_grad_()
        wv = w.to(dev).requires_grad_()
        kw = dict(bias=None if b is None else b.to(dev), temperature=temperature,
                  return_entropy=True, chunk_size=chunk, backend=backend)
        lp, ent = linear_token_logprobs(hv, wv, ids.to(dev), **kw)
        hr, wr = h.double().requires_grad_(), w.double().requires_grad_()
        rlp, rent = linear_token_logprobs_reference(
            hr, wr, ids, bias=None if b is None else b.double(), temperature=temperature,
            return_entropy=True)
        _close(lp, rlp, what="logp")
        _close(ent, rent, what="entropy")
        g1 = torch.randn(lead, generator=gen, dtype=torch.float64)
        dh, dw = torch.autograd.grad((lp * g1.to(lp)).sum() + ent.sum(), (hv, wv))
        rdh, rdw = torch.autograd.grad((rlp * g1).sum() + rent.sum(), (hr, wr))
        _close(dh, rdh, rtol=1e-4, what="dhidden")
        _close(dw, rdw, rtol=1e-4, what="dweight")

    check()


def _segment_reference(lp, counted, cu):
    """float64 per-sequence sums / counts by explicit loops (the definition)."""
    lp, counted = lp.double().reshape(-1), counted.reshape(-1)
    S = cu.numel() - 1
    s = torch.zeros(S, dtype=torch.float64)
    n = torch.zeros(S, dtype=torch.int64)
    for i in range(S):
        for p in range(int(cu[i]), int(cu[i + 1])):
            if counted[p]:
                s[i] += lp[p]
                n[i] += 1
    return s, s / n.clamp(min=1), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_properties(backend):
    @budget(backend)
    @given(lens=st.lists(st.integers(0, 6), min_size=1, max_size=5), V=st.integers(1, 30),
           packed=st.booleans(), use_mask=st.booleans(), layout=st.sampled_from(LAYOUTS),
           ignore_frac=st.sampled_from([0, .3]), seed=seeds)
    def check(lens, V, packed, use_mask, layout, ignore_frac, seed):
        gen = torch.Generator().manual_seed(seed)
        dev = DEVICE[backend]
        B, T = len(lens), max(lens)
        if packed:
            N = sum(lens)
            cu = torch.tensor([0] + lens).cumsum(0)
            lead = (N,)
        else:
            cu = torch.arange(B + 1) * T
            lead = (B, T)
        z = torch.randn(*lead, V, generator=gen, dtype=torch.float64)
        ids = _ids(lead, V, gen, ignore_frac, torch.int64)
        mask = torch.rand(lead, generator=gen) < 0.7 if use_mask else None
        out = sequence_logprobs(
            ids.to(dev), logits=laid_out(z.float().to(dev), layout),
            mask=None if mask is None else mask.to(dev),
            cu_seqlens=cu.to(dev) if packed else None, backend=backend)
        lp = token_logprobs_reference(z, ids)
        counted = ids != -100
        if mask is not None:
            counted &= mask
        s, mean, n = _segment_reference(lp, counted, cu)
        _close(out.sum, s, what="sum")
        _close(out.mean, mean, what="mean")
        assert torch.equal(out.count.cpu(), n)
        # reduce_sequences alone: masked-out positions never contribute, even NaN ones
        v = lp.masked_fill(~counted, float("nan"))
        rs, rm, rn = reduce_sequences(v, mask=counted, cu_seqlens=cu if packed else None)
        _close(rs, s, what="reduce sum")
        assert torch.equal(rn, n)

    check()
