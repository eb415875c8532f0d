"""rlfuse.ops.sequence_logprobs / reduce_sequences: padded and packed layouts."""

from __future__ import annotations

import pytest
import torch

from rlfuse.ops import (
    linear_token_logprobs_reference,
    reduce_sequences,
    sequence_logprobs,
    token_logprobs_reference,
)


def _padded_batch(B=4, T=11, V=97, H=13, lengths=(11, 3, 7, 0)):
    hidden = torch.randn(B, T, H)
    weight = torch.randn(V, H) * 0.5
    ids = torch.randint(0, V, (B, T))
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    return hidden, weight, ids, mask


def _want(hidden, weight, ids, mask):
    lp = linear_token_logprobs_reference(hidden.double(), weight.double(), ids)
    s = (lp * mask).sum(-1)
    n = mask.sum(-1)
    return s, torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s)), n


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_padded_sums_and_means(path):
    hidden, weight, ids, mask = _padded_batch()
    kw = dict(logits=hidden @ weight.t()) if path == "logits" else dict(hidden=hidden, weight=weight)
    r = sequence_logprobs(ids, mask=mask, **kw)
    s, m, n = _want(hidden, weight, ids, mask)
    torch.testing.assert_close(r.sum.double(), s, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(r.mean.double(), m, rtol=1e-5, atol=1e-5)
    assert torch.equal(r.count, n) and r.count.dtype == torch.int64
    assert r.mean[3] == 0 and r.sum[3] == 0  # empty sequence
    assert r.token_logprobs.shape == ids.shape and r.entropy is None


def test_packed_equals_padded():
    hidden, weight, ids, mask = _padded_batch()
    padded = sequence_logprobs(ids.masked_fill(~mask, -100), hidden=hidden, weight=weight,
                               return_entropy=True)
    lengths = mask.sum(-1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    packed = sequence_logprobs(ids[mask], hidden=hidden[mask], weight=weight, cu_seqlens=cu,
                               return_entropy=True)
    torch.testing.assert_close(packed.sum, padded.sum)
    torch.testing.assert_close(packed.mean, padded.mean)
    assert torch.equal(packed.count, padded.count)
    assert torch.equal(packed.token_logprobs, padded.token_logprobs[mask])
    assert torch.equal(packed.entropy, padded.entropy[mask])
    # [1, N] stream gives the same
    p2 = sequence_logprobs(ids[mask][None], hidden=hidden[mask][None], weight=weight,
                           cu_seqlens=cu.to(torch.int32))
    torch.testing.assert_close(p2.sum, packed.sum)


def test_packed_mask_and_ignore_index():
    V = 50
    logits = torch.randn(10, V)
    ids = torch.randint(0, V, (10,))
    ids[4] = -100
    mask = torch.ones(10, dtype=torch.bool)
    mask[0] = False
    cu = torch.tensor([0, 6, 6, 10])  # an empty middle sequence
    r = sequence_logprobs(ids, logits=logits, mask=mask, cu_seqlens=cu)
    lp = token_logprobs_reference(logits.double(), ids)
    want = torch.stack([lp[1:6].sum() - lp[4], torch.tensor(0.0, dtype=torch.float64),
                        lp[6:10].sum()])
    torch.testing.assert_close(r.sum.double(), want, rtol=1e-6, atol=1e-5)
    assert r.count.tolist() == [4, 0, 4]
    assert r.mean[1] == 0


def test_reduce_ignores_nan_in_masked_positions_and_is_differentiable():
    v = torch.randn(3, 5, requires_grad=True)
    x = v.detach().clone()
    x[0, 4] = float("nan")
    x.requires_grad_()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 4] = False
    s, m, n = reduce_sequences(x, mask=mask)
    assert not torch.isnan(s).any()
    (s.sum() + m.sum()).backward()
    assert x.grad[0, 4] == 0 and torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad[1], torch.full((5,), 1.2))


def test_gradients_flow_to_hidden_and_weight():
    hidden, weight, ids, mask = _padded_batch()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    r = sequence_logprobs(ids, hidden=h, weight=w, mask=mask)
    r.mean.sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    _, m, _ = _want(h64, w64, ids, mask)
    m.sum().backward()
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    hidden, weight, ids, mask = _padded_batch()
    logits = hidden @ weight.t()
    cases = [
        (lambda: sequence_logprobs(ids), ValueError, "logits"),
        (lambda: sequence_logprobs(ids, logits=logits, hidden=hidden, weight=weight),
         ValueError, "logits"),
        (lambda: sequence_logprobs(ids, hidden=hidden), ValueError, "weight"),
        (lambda: sequence_logprobs(ids, logits=logits, mask=mask[:, :3]), ValueError, "mask"),
        (lambda: sequence_logprobs(ids.float(), logits=logits), TypeError, "token_ids"),
        (lambda: sequence_logprobs(ids.view(-1), logits=logits.view(-1, 97),
                                   cu_seqlens=torch.tensor([0, 5, 40])), ValueError, "cu_seqlens"),
        (lambda: sequence_logprobs(ids.view(-1), logits=logits.view(-1, 97),
                                   cu_seqlens=torch.tensor([1, 44])), ValueError, "cu_seqlens"),
        (lambda: sequence_logprobs(ids.view(-1), logits=logits.view(-1, 97),
                                   cu_seqlens=torch.tensor([0, 30, 20, 44])), ValueError, "cu_seqlens"),
        (lambda: sequence_logprobs(ids.view(-1), logits=logits.view(-1, 97),
                                   cu_seqlens=torch.tensor([0.0, 44.0])), TypeError, "cu_seqlens"),
        (lambda: sequence_logprobs(ids, logits=logits, cu_seqlens=torch.tensor([0, 44])),
         ValueError, "token_ids"),
        (lambda: sequence_logprobs(ids.view(-1), logits=logits.view(-1, 97)), ValueError,
         "token_ids"),
        (lambda: reduce_sequences(torch.ones(44), cu_seqlens=None), ValueError, "values"),
        (lambda: reduce_sequences(torch.ones(4, 11), cu_seqlens=torch.tensor([0, 44])),
         ValueError, "values"),
        (lambda: reduce_sequences(torch.ones(3, 4, dtype=torch.long)), TypeError, "values"),
    ]
    for fn, exc, word in cases:
        with pytest.raises(exc, match=word):
            fn()


def _poisoned(x, mask, value=float("nan")):
    """x with ``value`` at the masked positions (rows of the last dim of x)."""
    return torch.where(mask.unsqueeze(-1), x, torch.full_like(x, value))


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_masked_positions_never_reach_results_or_gradients(path, layout, poison):
    """NaN / inf / huge hidden states (or logits) at masked positions (padding) stay out of the
    sums, the means and every gradient, weight.grad included (docs: masked positions never
    contribute): float64 reference on clean inputs, and bitwise the same results as zeros
    at the masked positions."""
    g = torch.Generator().manual_seed(4)
    B, T, V, H = 4, 9, 37, 12
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[0, -3:] = False
    mask[2] = False  # nothing counted
    ids[1, 4] = -100  # an ignore_index position inside the mask
    kw, want_kw = {}, {}
    if layout == "packed":
        cu = torch.tensor([0, 7, 7, 20, B * T])
        kw, want_kw = dict(cu_seqlens=cu), dict(cu_seqlens=cu)
        hidden, ids, mask = hidden.reshape(-1, H), ids.reshape(-1), mask.reshape(-1)
    counted = mask & (ids != -100)

    def run(h_in, dtype, value):
        h = h_in.to(dtype).detach().requires_grad_()
        w = weight.to(dtype).detach().requires_grad_()
        if path == "hidden":
            r = sequence_logprobs(ids, hidden=h, weight=w, mask=mask, return_entropy=True,
                                  chunk_size=5, **kw)
            (r.sum.sum() + r.mean.sum()).backward()
            return r, (h.grad, w.grad)
        lg = (h @ w.t()).detach()
        lg = _poisoned(lg, mask, value)  # the logits path: poisoned logits rows
        lg.requires_grad_()
        r = sequence_logprobs(ids, logits=lg, mask=mask, return_entropy=True, **kw)
        (r.sum.sum() + r.mean.sum()).backward()
        return r, (lg.grad,)

    clean = _poisoned(hidden, mask, 0.0)
    bad = _poisoned(hidden, mask, poison)
    # float64 reference: masked rows never enter (plain torch on the clean inputs)
    h64 = clean.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    lp = linear_token_logprobs_reference(h64, w64, ids.clamp(min=0))
    s, m, n = reduce_sequences(lp, mask=counted, **want_kw)
    (s.sum() + m.sum()).backward()
    for dtype, tol in ((torch.float64, dict(rtol=1e-10, atol=1e-10)),
                       (torch.float32, dict(rtol=1e-4, atol=1e-4))):
        got, grads = run(bad, dtype, poison)
        same, same_grads = run(clean, dtype, 0.0)
        torch.testing.assert_close(got.sum.double(), s.detach(), **tol)
        torch.testing.assert_close(got.mean.double(), m.detach(), **tol)
        assert torch.equal(got.count, n)
        for x in (got.sum, got.mean, got.token_logprobs, got.entropy, *grads):
            assert torch.isfinite(x).all()
        # masked positions: 0 log-prob and entropy, no gradient
        assert (got.token_logprobs[~mask] == 0).all() and (got.entropy[~mask] == 0).all()
        assert (grads[0][~mask] == 0).all()
        if path == "hidden":
            torch.testing.assert_close(grads[0].double(), h64.grad, **tol)
            torch.testing.assert_close(grads[1].double(), w64.grad, **tol)
        for x, y in zip((got.sum, got.mean, got.token_logprobs, got.entropy, *grads),
                        (same.sum, same.mean, same.token_logprobs, same.entropy, *same_grads)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_masked_positions_ids_still_checked(path):
    """A masked position holding an id outside [0, V) (not ignore_index) raises as before,
    naming the position, though the position is not computed."""
    hidden, weight, ids, mask = _padded_batch()
    ids = ids.clone()
    ids[1, 5] = 97 + 3  # masked (row 1 has 3 counted tokens)
    assert not mask[1, 5]
    kw = dict(logits=hidden @ weight.t()) if path == "logits" else dict(hidden=hidden,
                                                                        weight=weight)
    with pytest.raises(ValueError, match=r"token_ids must lie in \[0, 97\).*position 16 "
                                         r"\(flattened\) holds 100"):
        sequence_logprobs(ids, mask=mask, **kw)
