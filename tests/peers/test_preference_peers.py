"""preference_loss against the frameworks it reproduces.

TRL: the installed ``DPOTrainer._compute_loss`` (every loss type, lists with weights,
     f-divergences, ``use_weighting``, ``ld_alpha``), called on a stand-in trainer whose model
     returns our per-token log-probs, so the numbers are TRL's own loss code; the installed
     ``CPOTrainer.cpo_loss`` (simpo) and ``ORPOTrainer.odds_ratio_loss`` (orpo) likewise.
OpenRLHF (not installed): ``DPOLoss`` from openrlhf/models/loss.py written out below (IPO on
     summed log-ratios, sigmoid with label smoothing).
Every comparison covers the loss, the logged rewards / margins / accuracy and the gradient.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from rlfuse.ops import preference_loss, preference_loss_from_hidden
from rlfuse.ops.preference import LOSS_TYPES
from tests.helpers import require_peer

pytestmark = pytest.mark.peer

P, T = 6, 12


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _batch(seed=0, dtype=torch.float64):
    """Stacked [2P, T] ids / completion mask (prompt first) and per-token log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * P,), generator=g)
    lens = torch.randint(1, T - 3, (2 * P,), generator=g)
    pos = torch.arange(T)
    cmask = ((pos >= prompt[:, None]) & (pos < (prompt + lens)[:, None])).long()
    shift = cmask[:, 1:]
    tok = -(torch.rand(2 * P, T - 1, generator=g, dtype=dtype) * 1.5 + 0.05) * shift
    ref = tok.detach().sum(1) + torch.randn(2 * P, generator=g, dtype=dtype) * 1.5
    return cmask, tok, ref


def _trl_dpo(tok, cmask, ref, *, loss_type, beta=0.1, eps=0.0, weights=None, fdiv="reverse_kl",
             falpha=0.5, tau=0.05, ld_alpha=None, lssp=None):
    """TRL's own DPOTrainer._compute_loss on a stand-in trainer (precomputed ref log-probs)."""
    mod = require_peer("trl.trainer.dpo_trainer")
    types_ = loss_type if isinstance(loss_type, list) else [loss_type]
    B = tok.size(0)
    out = types.SimpleNamespace(
        log_probs=tok, entropy=torch.zeros_like(tok), mean_logits=torch.zeros_like(tok),
        is_top1=torch.zeros(tok.shape, dtype=torch.bool), log_sum_sq_probs=lssp)
    f = types.SimpleNamespace()
    f.model = types.SimpleNamespace(training=True)
    f.accelerator = _Accelerator()
    f.aux_loss_enabled = False
    f.ld_alpha = ld_alpha
    f.precompute_ref_logps = True
    f.f_divergence_type = fdiv
    f.f_alpha_divergence_coef = falpha
    f.loss_types = types_
    f.loss_weights = weights or [1.0] * len(types_)
    f.beta = beta
    f.label_smoothing = eps
    f.use_weighting = lssp is not None
    f.args = types.SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None)
    f._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    f._total_train_tokens = 0
    f._tp_size = 1
    inputs = dict(input_ids=torch.zeros(B, T, dtype=torch.long), attention_mask=cmask,
                  completion_mask=cmask, ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])
    loss = mod.DPOTrainer._compute_loss(f, lambda **kw: out, inputs, False)
    return loss, {k: v[-1] for k, v in f._metrics["train"].items()}


def _ours(tok, cmask, ref, **kw):
    shift = cmask[:, 1:]
    s = tok.sum(1)
    n = shift.sum(1)
    return preference_loss(s[:P], s[P:], ref[:P], ref[P:], chosen_lengths=n[:P],
                           rejected_lengths=n[P:], **kw)


def _close(a, b, what, rtol=1e-9, atol=1e-12):
    f64 = torch.float64  # (a Python float through as_tensor would be rounded to float32)
    torch.testing.assert_close(torch.as_tensor(a, dtype=f64), torch.as_tensor(b, dtype=f64),
                               rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare(trl_kw, our_kw, seed=0, lssp=None, pair_weights=None, rtol=1e-9,
             dtype=torch.float64):
    cmask, tok, ref = _batch(seed, dtype)
    shift = cmask[:, 1:]  # the fused head's log-probs are constant 0 at the -100 labels
    t1 = tok.clone().requires_grad_()
    l1, m1 = _trl_dpo(t1 * shift, cmask, ref, lssp=lssp, **trl_kw)
    (g1,) = torch.autograd.grad(l1, t1)
    t2 = tok.clone().requires_grad_()
    l2, st = _ours(t2 * shift, cmask, ref, pair_weights=pair_weights, **our_kw)
    (g2,) = torch.autograd.grad(l2, t2)
    atol = 1e-12 if dtype == torch.float64 else 1e-7
    _close(l2, l1, "loss", rtol=rtol, atol=atol)
    _close(g2, g1, "gradient", rtol=rtol, atol=atol)
    _close(st["chosen_rewards"].mean(), m1["rewards/chosen"], "rewards/chosen")
    _close(st["rejected_rewards"].mean(), m1["rewards/rejected"], "rewards/rejected")
    _close(st["margins"].mean(), m1["rewards/margins"], "rewards/margins")
    # TRL takes the accuracy mean in float32 (.float())
    _close(st["accuracies"].mean(), m1["rewards/accuracies"], "rewards/accuracies", rtol=1e-6)


_DPO_TYPES = [t for t in LOSS_TYPES if t not in ("simpo", "orpo")]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("loss_type", _DPO_TYPES)
def test_trl_dpo_every_loss_type(loss_type, backend):
    eps = 0.15 if loss_type in ("exo_pair", "robust") else 0.0
    _compare(dict(loss_type=loss_type, beta=0.2, eps=eps, tau=0.3),
             dict(loss_type=loss_type, beta=0.2, label_smoothing=eps, discopop_tau=0.3,
                  backend=backend), seed=_DPO_TYPES.index(loss_type),
             # TRL's exo_pair takes the logs of a float32 torch.tensor(label_smoothing)
             rtol=1e-7 if loss_type == "exo_pair" else 1e-9)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_trl_dpo_sorted_types(loss_type):
    lt = ["hinge", loss_type]  # (TRL's sigmoid ignores label_smoothing; ours is cDPO)
    _compare(dict(loss_type=lt, weights=[0.5, 1.0], beta=0.2, eps=0.1),
             dict(loss_type=lt, loss_weights=[0.5, 1.0], beta=0.2, label_smoothing=0.1),
             seed=21)


def test_trl_dpo_weighted_list():
    lt = ["sigmoid", "sft", "bco_pair", "apo_zero"]
    w = [1.0, 0.3, 0.5, 0.2]
    _compare(dict(loss_type=lt, weights=w, beta=0.1), dict(loss_type=lt, loss_weights=w,
                                                           beta=0.1))


@pytest.mark.parametrize("fdiv", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_trl_dpo_f_divergence(fdiv):
    lt = ["sigmoid", "ipo", "hinge", "discopop", "sigmoid_norm"]
    # TRL's alpha_divergence has exponent clamps for float32 / bf16 / fp16 only
    f32 = fdiv == "alpha_divergence"
    _compare(dict(loss_type=lt, beta=0.1, fdiv=fdiv, falpha=0.3, tau=0.2),
             dict(loss_type=lt, beta=0.1, f_divergence_type=fdiv, f_alpha_divergence_coef=0.3,
                  discopop_tau=0.2), rtol=1e-5 if f32 else 1e-9,
             dtype=torch.float32 if f32 else torch.float64)


def test_trl_dpo_use_weighting_as_pair_weights():
    """TRL's WPO weights (use_weighting) computed here and passed as pair_weights."""
    cmask, tok, _ = _batch(3)
    g = torch.Generator().manual_seed(9)
    lssp = -torch.rand(tok.shape, generator=g, dtype=tok.dtype) * 2
    shift = cmask[:, 1:]
    w = torch.exp(((tok - lssp) * shift).sum(1) / shift.sum(1).clamp(min=1))
    pw = w[:P] * w[P:]
    # (TRL weights in place: its sft and hinge terms then fail in TRL itself)
    lt = ["sigmoid", "bco_pair"]
    _compare(dict(loss_type=lt, weights=[1.0, 0.5]),
             dict(loss_type=lt, loss_weights=[1.0, 0.5]), seed=3, lssp=lssp, pair_weights=pw)


def test_trl_dpo_ld_alpha_from_hidden():
    """TRL with ld_alpha on materialised log-probs == preference_loss_from_hidden(ld_alpha)."""
    cmask, _, ref = _batch(5)
    g = torch.Generator().manual_seed(11)
    V, H = 53, 16
    hidden = torch.randn(2 * P, T - 1, H, generator=g, dtype=torch.float64)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / 4).requires_grad_()
    labels = torch.randint(0, V, (2 * P, T - 1), generator=g)
    shift = cmask[:, 1:]
    lp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, labels[..., None]).squeeze(-1)
    tok = lp * shift  # TRL's fused head gives 0 at the -100 labels
    l1, m1 = _trl_dpo(tok, cmask, ref, loss_type=["sigmoid", "ipo"], weights=[1.0, 0.1],
                      ld_alpha=0.3)
    (g1,) = torch.autograd.grad(l1, weight)
    l2, st = preference_loss_from_hidden(hidden, weight, labels, mask=shift, ld_alpha=0.3,
                                         ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:],
                                         loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.1])
    (g2,) = torch.autograd.grad(l2, weight)
    _close(l2, l1, "loss")
    _close(g2, g1, "grad_weight")
    _close(st["margins"].mean(), m1["rewards/margins"], "rewards/margins")


def _avg(tok, cmask):
    """Per-token mean over the completion (get_batch_logps(average_log_prob=True))."""
    shift = cmask[:, 1:]
    n = shift.sum(1)
    return (tok * shift).sum(1) / n, n


def test_trl_cpo_simpo():
    mod = require_peer("trl.experimental.cpo.cpo_trainer")
    cmask, tok, _ = _batch(7)
    f = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0,
                              label_smoothing=0.1, accelerator=_Accelerator())
    t1 = tok.clone().requires_grad_()
    a, _ = _avg(t1, cmask)
    losses, rc, rr = mod.CPOTrainer.cpo_loss(f, a[:P], a[P:])
    # CPOTrainer: loss = losses.mean() + cpo_alpha * nll (nll = chosen token mean CE)
    shift = cmask[:, 1:]
    nll = -(t1[:P] * shift[:P]).sum() / shift[:P].sum()
    l1 = losses.mean() + 0.5 * nll
    (g1,) = torch.autograd.grad(l1, t1)
    t2 = tok.clone().requires_grad_()
    s, n = (t2 * shift).sum(1), shift.sum(1)
    l2, st = preference_loss(s[:P], s[P:], loss_type=["simpo", "sft"], loss_weights=[1.0, 0.5],
                             beta=2.0, label_smoothing=0.1, simpo_gamma=0.7,
                             chosen_lengths=n[:P], rejected_lengths=n[P:])
    (g2,) = torch.autograd.grad(l2, t2)
    _close(l2, l1, "loss")
    _close(g2, g1, "gradient")
    _close(st["chosen_rewards"], rc, "rewards/chosen")
    _close(st["rejected_rewards"], rr, "rewards/rejected")


def test_trl_orpo():
    mod = require_peer("trl.experimental.orpo.orpo_trainer")
    cmask, tok, _ = _batch(8)
    f = types.SimpleNamespace(beta=0.25, accelerator=_Accelerator())
    t1 = tok.clone().requires_grad_()
    a, _ = _avg(t1, cmask)
    losses, rc, rr, _, _ = mod.ORPOTrainer.odds_ratio_loss(f, a[:P], a[P:])
    shift = cmask[:, 1:]
    nll = -(t1[:P] * shift[:P]).sum() / shift[:P].sum()
    l1 = nll - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    (g1,) = torch.autograd.grad(l1, t1)
    t2 = tok.clone().requires_grad_()
    s, n = (t2 * shift).sum(1), shift.sum(1)
    l2, st = preference_loss(s[:P], s[P:], loss_type=["sft", "orpo"], beta=0.25,
                             chosen_lengths=n[:P], rejected_lengths=n[P:])
    (g2,) = torch.autograd.grad(l2, t2)
    # ORPOTrainer.odds_ratio_loss computes in float32 (.float())
    _close(l2, l1, "loss", rtol=1e-6, atol=1e-7)
    _close(g2, g1, "gradient", rtol=1e-6, atol=1e-7)
    _close(st["chosen_rewards"], rc, "rewards/chosen", rtol=1e-6, atol=1e-7)


# ================================================================== OpenRLHF, written out
def _openrlhf_dpo(c, r, rc, rr, beta, label_smoothing, ipo):
    """openrlhf/models/loss.py DPOLoss.forward."""
    logits = (c - r) - (rc - rr)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses.mean(), beta * (c - rc).detach(), beta * (r - rr).detach()


@pytest.mark.parametrize("ipo", [False, True])
def test_openrlhf_dpo_loss(ipo):
    cmask, tok, ref = _batch(4)
    s = tok.sum(1)
    c1 = s.detach().clone().requires_grad_()
    l1, rc, rr = _openrlhf_dpo(c1[:P], c1[P:], ref[:P], ref[P:], 0.1, 0.2 * (not ipo), ipo)
    (g1,) = torch.autograd.grad(l1, c1)
    c2 = s.detach().clone().requires_grad_()
    kw = dict(loss_type="ipo", ipo_length_normalize=False) if ipo else dict(
        loss_type="sigmoid", label_smoothing=0.2)
    l2, st = preference_loss(c2[:P], c2[P:], ref[:P], ref[P:], beta=0.1, **kw)
    (g2,) = torch.autograd.grad(l2, c2)
    _close(l2, l1, "loss")
    _close(g2, g1, "gradient")
    _close(st["chosen_rewards"], rc, "rewards/chosen")
    _close(st["rejected_rewards"], rr, "rewards/rejected")
