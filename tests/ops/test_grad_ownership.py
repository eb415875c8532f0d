"""Gradient ownership of every differentiable op: a backward never hands out a tensor that
its autograd node still holds (or hands out the same tensor twice).

Several ops compute their gradient in the forward and save it (policy_loss, value_loss,
preference_loss, preference_loss_from_hidden); the others build it in the backward.  Either
way the gradient returned to autograd must be the caller's to edit: a hook or a caller that
changes it in place (``g.mul_``, ``x.grad.zero_()``, or through ``.data``, which autograd's
version counters do not see) must not change what a later backward through a retained
graph returns, nor make it fail.  Every gradient is compared with the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from rlfuse.ops import (
    kl_penalty,
    kl_penalty_reference,
    linear_token_logprobs,
    linear_token_logprobs_reference,
    policy_loss,
    policy_loss_reference,
    preference_loss,
    preference_loss_from_hidden,
    preference_loss_reference,
    sequence_logprobs,
    token_logprobs,
    token_logprobs_reference,
    value_loss,
    value_loss_reference,
)
from tests.helpers import HAS_CUDA, TRITON_ON_CPU, grad_tol

# Under the Triton interpreter (numpy) unselected tl.where branches warn (log(0), ...).
pytestmark = pytest.mark.filterwarnings(
    "ignore::RuntimeWarning:triton.runtime.interpreter",
    "ignore::DeprecationWarning:triton.runtime.interpreter",
    "ignore:Conversion of an array with ndim:DeprecationWarning")

BACKENDS = ["cpu", "torch"] + (["triton"] if TRITON_ON_CPU or HAS_CUDA else [])
DEV = {"cpu": "cpu", "torch": "cpu", "triton": "cuda" if HAS_CUDA else "cpu"}

B, T, V, H, P = 4, 9, 13, 6, 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    lp = -(torch.rand(B, T, generator=g, dtype=torch.float64) * 2 + 0.1)
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    return dict(
        lp=lp, old=lp + 0.2 * rn(B, T), ref=lp + 0.2 * rn(B, T), adv=rn(B, T), mask=mask,
        ent=torch.rand(B, T, generator=g, dtype=torch.float64) * 2, ret=rn(B, T),
        logits=rn(B, T, V), ids=torch.randint(0, V, (B, T), generator=g),
        hidden=rn(B, T, H), weight=0.3 * rn(V, H),
        c=-5 * torch.rand(3, generator=g, dtype=torch.float64),
        r=-5 * torch.rand(3, generator=g, dtype=torch.float64),
        rc=-5 * torch.rand(3, generator=g, dtype=torch.float64),
        rr=-5 * torch.rand(3, generator=g, dtype=torch.float64),
        prc=-5 * torch.rand(P, generator=g, dtype=torch.float64) - 10,
        prr=-5 * torch.rand(P, generator=g, dtype=torch.float64) - 10,
    )


def _cases():
    """name -> (input key, fn(x, d, backend) -> scalar loss, reference(x64, d64) -> loss).
    ``d`` holds the constant tensors in the dtype / device of the call."""

    def pl(x, d, be):
        return policy_loss(x, d["old"], d["adv"], d["mask"], ref_logp=d["ref"], beta=0.1,
                           entropy=d["ent"], entropy_coef=0.01, backend=be)[0]

    def pl_ref(x, d):
        return policy_loss_reference(x, d["old"], d["adv"], d["mask"], ref_logp=d["ref"],
                                     beta=0.1, entropy=d["ent"], entropy_coef=0.01)[0]

    def pl_ent(x, d, be):
        return policy_loss(d["lp"], d["old"], d["adv"], d["mask"], entropy=x,
                           entropy_coef=0.01, backend=be)[0]

    def pl_ent_ref(x, d):
        return policy_loss_reference(d["lp"], d["old"], d["adv"], d["mask"], entropy=x,
                                     entropy_coef=0.01)[0]

    def gspo(x, d, be):
        return policy_loss(x, d["old"], d["adv"], d["mask"], variant="gspo", backend=be)[0]

    def gspo_ref(x, d):
        return policy_loss_reference(x, d["old"], d["adv"], d["mask"], variant="gspo")[0]

    def vl(x, d, be):
        return value_loss(x, d["old"], d["ret"], d["mask"], cliprange_value=0.2, backend=be)[0]

    def vl_ref(x, d):
        return value_loss_reference(x, d["old"], d["ret"], d["mask"], cliprange_value=0.2)[0]

    def kl(x, d, be):
        return kl_penalty(x, d["ref"], "k3", backend=be).sum()

    def kl_ref(x, d):
        return kl_penalty_reference(x, d["ref"], "k3").sum()

    def pref(x, d, be):
        return preference_loss(x, d["r"], d["rc"], d["rr"], backend=be)[0]

    def pref_ref(x, d):
        return preference_loss_reference(x, d["r"], d["rc"], d["rr"])[0]

    def tlp(x, d, be):
        lp, ent = token_logprobs(x, d["ids"], return_entropy=True, backend=be)
        return lp.sum() + 0.1 * ent.sum()

    def tlp_ref(x, d):
        lp, ent = token_logprobs_reference(x, d["ids"], return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    def llp(x, d, be):
        lp, ent = linear_token_logprobs(x, d["weight"], d["ids"], return_entropy=True,
                                        backend=be)
        return lp.sum() + 0.1 * ent.sum()

    def llp_ref(x, d):
        lp, ent = linear_token_logprobs_reference(x, d["weight"], d["ids"], return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    def seq(x, d, be):
        return sequence_logprobs(d["ids"], logits=x, mask=d["mask"], backend=be).mean.sum()

    def seq_ref(x, d):
        lp = token_logprobs_reference(x, d["ids"])
        m = d["mask"].to(lp.dtype)
        return ((lp * m).sum(-1) / m.sum(-1)).sum()

    def fh(x, d, be):  # padded layout: rows 0..P-1 chosen, P..2P-1 rejected
        return preference_loss_from_hidden(x[:2 * P], d["weight"], d["ids"][:2 * P],
                                           mask=d["mask"][:2 * P], ref_chosen_logps=d["prc"],
                                           ref_rejected_logps=d["prr"], backend=be)[0]

    def fh_ref(x, d):
        lp = linear_token_logprobs_reference(x[:2 * P], d["weight"], d["ids"][:2 * P])
        s = (lp * d["mask"][:2 * P].to(lp.dtype)).sum(-1)
        return preference_loss_reference(s[:P], s[P:], d["prc"], d["prr"])[0]

    return {
        "policy_loss": ("lp", pl, pl_ref),
        "policy_loss[entropy]": ("ent", pl_ent, pl_ent_ref),
        "policy_loss[gspo]": ("lp", gspo, gspo_ref),
        "value_loss": ("lp", vl, vl_ref),
        "kl_penalty": ("lp", kl, kl_ref),
        "preference_loss": ("c", pref, pref_ref),
        "token_logprobs": ("logits", tlp, tlp_ref),
        "linear_token_logprobs": ("hidden", llp, llp_ref),
        "sequence_logprobs": ("logits", seq, seq_ref),
        "preference_loss_from_hidden": ("hidden", fh, fh_ref),
    }


CASES = _cases()


def _setup(name, backend, dtype=torch.float32):
    key, fn, ref = CASES[name]
    d64 = _data()
    dev = DEV[backend]
    d = {k: (v.to(dtype) if v.is_floating_point() else v).to(dev) for k, v in d64.items()}
    x64 = d64[key].clone().requires_grad_()
    (want,) = torch.autograd.grad(ref(x64, dict(d64, **{key: x64})), x64)
    return key, fn, d, want


def _leaf(d, key):
    return d[key].detach().clone().requires_grad_()


def _check(got, want, dtype=torch.float32):
    torch.testing.assert_close(got.detach().double().cpu(), want, **grad_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_retained_graph_survives_in_place_edits_of_returned_gradients(name, backend):
    """autograd.grad through a retained graph, three times, the caller editing each result
    in place in between (visibly to autograd, then behind its back through .data): every
    pass gives the reference gradient, and no two passes return the same storage."""
    key, fn, d, want = _setup(name, backend)
    x = _leaf(d, key)
    loss = fn(x, dict(d, **{key: x}), backend)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    _check(g1, want)
    g1.mul_(2.0)
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    _check(g2, want)
    g2.data.zero_()
    (g3,) = torch.autograd.grad(loss, x)
    _check(g3, want)
    ptrs = {g1.data_ptr(), g2.data_ptr(), g3.data_ptr()}
    assert len(ptrs) == 3, "a backward returned the same gradient storage twice"
    _check(g1, 2.0 * want)
    assert not bool(g2.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_in_place_gradient_hooks_and_grad_edits_with_retained_graph(name, backend):
    """Hooks that modify the gradient in place (on the leaf, and on a non-leaf input of the
    op), x.grad edited in place between backward passes of a retained graph."""
    key, fn, d, want = _setup(name, backend)
    x = _leaf(d, key)
    x.register_hook(lambda g: g.mul_(3.0))
    loss = fn(x, dict(d, **{key: x}), backend)
    loss.backward(retain_graph=True)
    _check(x.grad, 3.0 * want)
    x.grad.mul_(-1.0)   # e.g. an in-place grad scaling / clipping step
    x.grad.data.zero_()  # zero_grad(set_to_none=False), out of autograd's sight
    loss.backward(retain_graph=True)
    _check(x.grad, 3.0 * want)
    x.grad = None
    loss.backward()      # the last pass frees the graph
    _check(x.grad, 3.0 * want)

    w = _leaf(d, key)
    z = w * 1.0          # a non-leaf input, as logp / logits are in a model
    z.register_hook(lambda g: g.neg_())
    loss = fn(z, dict(d, **{key: z}), backend)
    loss.backward(retain_graph=True)
    loss.backward()
    _check(w.grad, -2.0 * want)


@pytest.mark.parametrize("name", list(CASES))
def test_float64_gradients_stay_owned(name):
    """float64 inputs (the gradient keeps the input dtype, no cast that would copy)."""
    key, fn, d, want = _setup(name, "cpu", torch.float64)
    x = _leaf(d, key)
    loss = fn(x, dict(d, **{key: x}), "cpu")
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1.data.fill_(float("nan"))
    (g2,) = torch.autograd.grad(loss, x)
    _check(g2, want, torch.float64)
    assert g1.data_ptr() != g2.data_ptr()
