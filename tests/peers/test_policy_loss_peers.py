"""policy_loss / kl_penalty / value_loss against the frameworks they reproduce.

verl: the installed ``verl.trainer.ppo.core_algos`` functions, called directly.
TRL: the installed ``GRPOTrainer._compute_loss``, called on a stand-in trainer whose model
     returns our tensors, so the numbers are TRL's own loss code.
OpenRLHF (not installed): its formulas written out below from openrlhf/models/loss.py and
     openrlhf/models/utils.py (PolicyLoss, ValueLoss, aggregate_loss, compute_approx_kl).
Every comparison covers the loss, the statistics the framework logs and the gradient.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from rlfuse.ops import kl_penalty, policy_loss, value_loss
from tests.helpers import require_peer

pytestmark = pytest.mark.peer


def _inputs(B=6, T=40, seed=0, spread=0.3, extreme=False):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    old = lp + spread * torch.randn(B, T, generator=g)
    ref = lp + spread * torch.randn(B, T, generator=g)
    if extreme:  # beyond verl's +-20 log-ratio and +-10 KL clamps
        old[0, :4] = lp[0, :4] + torch.tensor([25.0, -25.0, 12.0, -12.0])
        ref[0, :4] = lp[0, :4] + torch.tensor([-30.0, 30.0, 15.0, -15.0])
    adv = torch.randn(B, T, generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.75).float()
    mask[1] = 0.0
    mask[2] = 0.0
    mask[2, 3] = 1.0
    mask[0, :4] = 1.0
    ent = torch.rand(B, T, generator=g) * 2
    isw = torch.rand(B, T, generator=g) + 0.5
    return dict(lp=lp, old=old, ref=ref, adv=adv, mask=mask, ent=ent, isw=isw)


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    return g


def _close(a, b, what, rtol=2e-5, atol=1e-6):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-12)
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}: {m}")


# ====================================================================================== verl
def _verl():
    return require_peer("verl.trainer.ppo.core_algos")


def _actor_config(**kw):
    from verl.workers.config import ActorConfig

    base = dict(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4,
                ppo_micro_batch_size_per_gpu=2)
    base.update(kw)
    return ActorConfig(**base)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+",
                                  "k3+", "abs+", "low_var_kl+"])
def test_verl_kl_penalty(kind):
    ca = _verl()
    t = _inputs(extreme=True)
    x1 = t["lp"].clone().requires_grad_()
    x2 = t["lp"].clone().requires_grad_()
    want = ca.kl_penalty(x1, t["ref"], kind)
    got = kl_penalty(x2, t["ref"], kind, semantics="verl")
    _close(got, want, kind)
    go = torch.randn_like(want)
    _close(_grad((got * go).sum(), x2), _grad((want * go).sum(), x1), f"{kind} grad")


def _verl_agg_kwargs(mode, info):
    kw = {}
    if "batch_num_tokens" in info and mode == "token-mean":
        kw["global_num_tokens"] = info["batch_num_tokens"]
    if "global_batch_size" in info and mode.startswith("seq"):
        kw["global_batch_size"] = info["global_batch_size"]
    if info.get("dp_size", 1) != 1:
        kw["dp_size"] = info["dp_size"]
    if "loss_scale_factor" in info and mode == "seq-mean-token-sum-norm":
        kw["loss_scale_factor"] = info["loss_scale_factor"]
    return kw


INFOS = [{}, dict(dp_size=2, batch_num_tokens=300, global_batch_size=11),
         dict(loss_scale_factor=17)]


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("info", range(len(INFOS)))
@pytest.mark.parametrize("use_isw", [False, True])
def test_verl_vanilla(mode, info, use_isw):
    ca = _verl()
    info = INFOS[info]
    t = _inputs(seed=1, extreme=True)
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                        clip_ratio_c=2.5)
    cfg.global_batch_info.update(info)
    x1 = t["lp"].clone().requires_grad_()
    x2 = t["lp"].clone().requires_grad_()
    isw = t["isw"] if use_isw else None
    want, metrics = ca.compute_policy_loss_vanilla(t["old"], x1, t["adv"], t["mask"], mode,
                                                   config=cfg, rollout_is_weights=isw)
    got, st = policy_loss(x2, t["old"], t["adv"], t["mask"], semantics="verl",
                          epsilon_low=0.15, epsilon_high=0.28, clip_ratio_c=2.5,
                          is_weights=isw, loss_agg_mode=mode, **_verl_agg_kwargs(mode, info))
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    _close(st["clip_frac"], metrics["actor/pg_clipfrac"], "pg_clipfrac")
    _close(st["approx_kl"], metrics["actor/ppo_kl"], "ppo_kl")
    _close(st["dual_clip_frac"], metrics["actor/pg_clipfrac_lower"], "pg_clipfrac_lower")


def test_verl_vanilla_default_dual_clip():
    """verl always applies dual-clip with clip_ratio_c = 3.0; semantics='verl' does too."""
    ca = _verl()
    t = _inputs(seed=2, spread=1.5)
    cfg = _actor_config(clip_ratio=0.2)
    want, m = ca.compute_policy_loss_vanilla(t["old"], t["lp"], t["adv"], t["mask"],
                                             "token-mean", config=cfg)
    got, st = policy_loss(t["lp"], t["old"], t["adv"], t["mask"], semantics="verl")
    _close(got, want, "loss")
    assert m["actor/pg_clipfrac_lower"] > 0
    _close(st["dual_clip_frac"], m["actor/pg_clipfrac_lower"], "pg_clipfrac_lower")


@pytest.mark.parametrize("variant", ["gspo", "cispo", "sapo", "gpg"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_other_policy_losses(variant, mode):
    ca = _verl()
    t = _inputs(seed=3, spread=0.6)
    t["old"][0, 0] = t["lp"][0, 0] - 12.0  # exercises verl's GSPO clamp(log ratio, max=10)
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                        tau_pos=1.0, tau_neg=1.05)
    fn = getattr(ca, f"compute_policy_loss_{variant}")
    x1 = t["lp"].clone().requires_grad_()
    x2 = t["lp"].clone().requires_grad_()
    want, metrics = fn(t["old"], x1, t["adv"], t["mask"], mode, config=cfg,
                       rollout_is_weights=t["isw"])
    kw = dict(loss_agg_mode=mode)
    if variant == "sapo":  # verl's SAPO ignores loss_agg_mode (always seq-mean-token-mean)
        kw = {}
    got, st = policy_loss(x2, t["old"], t["adv"], t["mask"], variant=variant, semantics="verl",
                          epsilon_low=0.2, epsilon_high=0.28, is_weights=t["isw"], **kw)
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    if "actor/ppo_kl" in metrics:
        _close(st["approx_kl"], metrics["actor/ppo_kl"], "ppo_kl")
    if variant in ("gspo", "cispo"):
        _close(st["clip_frac"], metrics["actor/pg_clipfrac"], "pg_clipfrac")


def test_verl_reinforce():
    ca = _verl()
    t = _inputs(seed=4)
    cfg = _actor_config()
    x1 = t["lp"].clone().requires_grad_()
    x2 = t["lp"].clone().requires_grad_()
    want, metrics = ca.compute_policy_loss_reinforce(t["old"], x1, t["adv"], t["mask"],
                                                     "seq-mean-token-sum", config=cfg,
                                                     rollout_is_weights=t["isw"])
    got, st = policy_loss(x2, t["old"], t["adv"], t["mask"], variant="reinforce",
                          semantics="verl", is_weights=t["isw"],
                          loss_agg_mode="seq-mean-token-sum")
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    _close(st["approx_kl"], metrics["actor/ppo_kl"], "ppo_kl")


@pytest.mark.parametrize("kl_type", ["low_var_kl", "k1", "mse", "k3+"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_verl_actor_loss_with_kl_and_entropy(kl_type, mode):
    """verl.workers.utils.losses.ppo_loss: pg_loss - entropy_coeff * agg(entropy)
    + kl_loss_coef * agg(kl_penalty(log_prob, ref, kl_loss_type)), all with loss_agg_mode."""
    ca = _verl()
    t = _inputs(seed=5, extreme=True)
    cfg = _actor_config(clip_ratio=0.2)
    x1 = t["lp"].clone().requires_grad_()
    h1 = t["ent"].clone().requires_grad_()
    pg, _ = ca.compute_policy_loss_vanilla(t["old"], x1, t["adv"], t["mask"], mode, config=cfg)
    ent_loss = ca.agg_loss(loss_mat=h1, loss_mask=t["mask"], loss_agg_mode=mode)
    kld = ca.kl_penalty(logprob=x1, ref_logprob=t["ref"], kl_penalty=kl_type)
    kl_loss = ca.agg_loss(loss_mat=kld, loss_mask=t["mask"], loss_agg_mode=mode)
    want = pg - 0.01 * ent_loss + 0.05 * kl_loss
    x2 = t["lp"].clone().requires_grad_()
    h2 = t["ent"].clone().requires_grad_()
    got, st = policy_loss(x2, t["old"], t["adv"], t["mask"], semantics="verl", ref_logp=t["ref"],
                          beta=0.05, kl_kind=kl_type, entropy=h2, entropy_coef=0.01,
                          loss_agg_mode=mode)
    _close(got, want, "loss")
    g1 = torch.autograd.grad(want, [x1, h1])
    g2 = torch.autograd.grad(got, [x2, h2])
    _close(g2[0], g1[0], "d logp")
    _close(g2[1], g1[1], "d entropy")
    _close(st["kl_loss"], kl_loss, "kl_loss")
    _close(st["entropy_loss"], ent_loss, "entropy_loss")
    _close(st["pg_loss"], pg, "pg_loss")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_verl_value_loss(mode):
    ca = _verl()
    t = _inputs(seed=6)
    v = torch.randn(6, 40)
    old_v = v + 0.5 * torch.randn(6, 40)
    ret = torch.randn(6, 40)
    x1 = v.clone().requires_grad_()
    x2 = v.clone().requires_grad_()
    want, clipfrac = ca.compute_value_loss(x1, ret, old_v, t["mask"], cliprange_value=0.3,
                                           loss_agg_mode=mode)
    got, st = value_loss(x2, old_v, ret, t["mask"], cliprange_value=0.3, loss_agg_mode=mode,
                         semantics="verl")
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    _close(st["clip_frac"], clipfrac, "vf_clipfrac")


# ======================================================================================= TRL
class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_loss(t, lp, ent, *, loss_type, level="token", beta=0.0, bias_kl=False, delta=None,
              eps_low=0.2, eps_high=0.28, entropy_coef=0.0, isw=None, max_len=None,
              tau=(1.0, 1.05)):
    """Run TRL's own GRPOTrainer._compute_loss on a stand-in trainer."""
    mod = require_peer("trl.trainer.grpo_trainer")
    B, T = lp.shape
    f = types.SimpleNamespace()
    f.model = types.SimpleNamespace(training=True)
    f.accelerator = _Accelerator()
    f._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    f.top_entropy_quantile = 1.0
    f.off_policy_mask_threshold = None
    f.importance_sampling_level = level
    f.beta = beta
    f.loss_type = loss_type
    f.epsilon_low, f.epsilon_high = eps_low, eps_high
    f.args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl,
                                   sapo_temperature_pos=tau[0], sapo_temperature_neg=tau[1],
                                   steps_per_generation=1, entropy_target=0.0)
    f.use_vllm = isw is not None
    f.vllm_importance_sampling_correction = isw is not None
    f.current_gradient_accumulation_steps = 1
    f.max_completion_length = max_len or T
    f._entropy_bonus_enabled = entropy_coef != 0.0
    f.use_adaptive_entropy = False
    f.entropy_coef = entropy_coef
    f.aux_loss_enabled = False
    f._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, None)
    f.get_high_entropy_mask = None
    mask = t["mask"].long()
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long),
                  prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                  advantages=t["adv_seq"], old_per_token_logps=t["old"],
                  ref_per_token_logps=t["ref"],
                  num_items_in_batch=torch.tensor(float(mask.sum())))
    if isw is not None:
        inputs["importance_sampling_ratio"] = isw
    loss = mod.GRPOTrainer._compute_loss(f, None, inputs)
    return loss, {k: v[-1] for k, v in f._metrics["train"].items()}


TRL_CASES = [
    ("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"),
    ("luspo", "token"), ("grpo", "sequence"), ("dapo", "sequence"), ("luspo", "sequence"),
    ("cispo", "token"), ("sapo", "token"),
]


@pytest.mark.parametrize("loss_type,level", TRL_CASES)
@pytest.mark.parametrize("beta,bias_kl", [(0.0, False), (0.04, False), (0.04, True)])
def test_trl_grpo_loss(loss_type, level, beta, bias_kl):
    t = _inputs(seed=7, spread=0.4)
    t["adv_seq"] = t["adv"][:, 0].contiguous()
    x1 = t["lp"].clone().requires_grad_()
    h1 = t["ent"].clone().requires_grad_()
    want, metrics = _trl_loss(t, x1, h1, loss_type=loss_type, level=level, beta=beta,
                              bias_kl=bias_kl, entropy_coef=0.01, eps_high=4.0 if loss_type ==
                              "cispo" else 0.28)
    variant = {"cispo": "cispo", "sapo": "sapo"}.get(loss_type,
                                                     "gspo" if level == "sequence" else "ppo")
    mode = {"cispo": "dapo", "sapo": "grpo"}.get(loss_type, loss_type)
    x2 = t["lp"].clone().requires_grad_()
    h2 = t["ent"].clone().requires_grad_()
    got, st = policy_loss(x2, t["old"], t["adv_seq"], t["mask"], variant=variant,
                          semantics="trl", epsilon=0.2,
                          epsilon_high=4.0 if loss_type == "cispo" else 0.28,
                          ref_logp=t["ref"] if beta else None, beta=beta,
                          kl_ratio_weighted=bias_kl, entropy=h2, entropy_coef=0.01,
                          loss_agg_mode=mode, num_items_in_batch=t["mask"].sum())
    _close(got, want, "loss")
    g1 = torch.autograd.grad(want, [x1, h1])
    g2 = torch.autograd.grad(got, [x2, h2])
    _close(g2[0], g1[0], "d logp")
    _close(g2[1], g1[1], "d entropy")
    _close(st["entropy_mean"], metrics["entropy"], "entropy")
    if variant == "ppo":
        _close(st["clip_frac_low"], metrics["clip_ratio/low_mean"], "clip low")
        _close(st["clip_frac_high"], metrics["clip_ratio/high_mean"], "clip high")
    if variant == "cispo":
        _close(st["clip_frac_high"], metrics["cispo_clip_ratio"], "cispo clip")
    if beta and not bias_kl and level == "token":
        _close(st["kl_mean"], metrics["kl"], "kl")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_trl_delta_and_vllm_importance_sampling(level):
    t = _inputs(seed=8, spread=1.0)
    t["adv_seq"] = t["adv"][:, 0].contiguous()
    isw = t["isw"] if level == "token" else t["isw"][:, :1].contiguous()
    x1 = t["lp"].clone().requires_grad_()
    want, _ = _trl_loss(t, x1, t["ent"], loss_type="dapo", level=level, delta=1.6, isw=isw,
                        beta=0.04)
    x2 = t["lp"].clone().requires_grad_()
    got, _ = policy_loss(x2, t["old"], t["adv_seq"], t["mask"],
                         variant="gspo" if level == "sequence" else "ppo", semantics="trl",
                         epsilon_high=0.28, delta=1.6, is_weights=isw, ref_logp=t["ref"],
                         beta=0.04, num_items_in_batch=t["mask"].sum())
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")


def test_trl_dr_grpo_max_completion_length():
    t = _inputs(seed=9)
    t["adv_seq"] = t["adv"][:, 0].contiguous()
    x1 = t["lp"].clone().requires_grad_()
    want, _ = _trl_loss(t, x1, t["ent"], loss_type="dr_grpo", max_len=64)
    x2 = t["lp"].clone().requires_grad_()
    got, _ = policy_loss(x2, t["old"], t["adv_seq"], t["mask"], semantics="trl",
                         epsilon_high=0.28, loss_agg_mode="dr_grpo", max_completion_length=64)
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")


def test_trl_on_policy_old_logp_none():
    """TRL uses per_token_logps.detach() when old_per_token_logps is absent."""
    t = _inputs(seed=10)
    t["adv_seq"] = t["adv"][:, 0].contiguous()
    x1 = t["lp"].clone().requires_grad_()
    t1 = dict(t, old=None)
    want, _ = _trl_loss(t1, x1, t["ent"], loss_type="grpo")
    x2 = t["lp"].clone().requires_grad_()
    got, st = policy_loss(x2, None, t["adv_seq"], t["mask"], semantics="trl",
                          epsilon_high=0.28, loss_agg_mode="grpo")
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    assert st["ratio_mean"].item() == 1.0


def test_trl_value_loss_formula():
    """TRL's PPO value loss (0.5 * masked mean of max((v - R)^2, (clamp(v, v_old +- c) - R)^2);
    the experimental PPO trainer is not in this TRL install, so the formula is written here."""
    v = torch.randn(4, 9, requires_grad=True)
    old_v = v.detach() + 0.4 * torch.randn(4, 9)
    ret = torch.randn(4, 9)
    mask = (torch.rand(4, 9) < 0.7).float()
    vclip = torch.clamp(v, old_v - 0.2, old_v + 0.2)
    lmax = torch.max((v - ret) ** 2, (vclip - ret) ** 2)
    want = 0.5 * (lmax * mask).sum() / mask.sum()
    got, _ = value_loss(v, old_v, ret, mask, cliprange_value=0.2, semantics="trl")
    _close(got, want, "loss")
    _close(_grad(got, v), _grad(want, v), "grad")


# ================================================================================== OpenRLHF
def _orl_masked_mean(x, m, dim=None):
    return (x * m).sum(dim=dim) / m.sum(dim=dim)


def _orl_aggregate(loss, m, token_level):
    if token_level:
        return _orl_masked_mean(loss, m)
    L = m.sum(-1)
    seq = (loss * m).sum(-1) / (L + 1e-8)
    seq_mask = (L > 0).float()
    return _orl_masked_mean(seq, seq_mask)


def _orl_policy_loss(lp, old, A, m, eps_low, eps_high, dual_clip, gspo, token_level):
    raw = lp - old
    if gspo:
        ratio = ((raw * m).sum(-1) / m.sum(-1).clamp(min=1)).exp().unsqueeze(-1) * m
    else:
        ratio = raw.clamp(-20.0, 20.0).exp()
    s1 = ratio * A
    s2 = ratio.clamp(1 - eps_low, 1 + eps_high) * A
    if dual_clip is None:
        loss = -torch.min(s1, s2)
    else:
        c1 = torch.min(s1, s2)
        c2 = torch.max(c1, dual_clip * A)
        loss = -torch.where(A < 0, c2, c1)
    loss = _orl_aggregate(loss, m, token_level)
    clip_ratio = _orl_masked_mean(torch.lt(s2, s1).float(), m)
    ppo_kl = _orl_masked_mean(-raw.detach(), m)
    return loss, clip_ratio, ppo_kl


@pytest.mark.parametrize("gspo", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("token_level", [True, False])
def test_openrlhf_policy_loss_formula(gspo, dual_clip, token_level):
    if gspo and token_level:
        token_level = False  # OpenRLHF forces sequence-level aggregation for GSPO
    t = _inputs(seed=11, spread=0.8, extreme=not gspo)
    m = t["mask"].clone()
    m[1, 0] = 1.0  # OpenRLHF's sample-level masked mean is NaN for empty rows; avoid them
    m[2, :] = 1.0
    x1 = t["lp"].clone().requires_grad_()
    want, clip_ratio, ppo_kl = _orl_policy_loss(x1, t["old"], t["adv"], m, 0.2, 0.28,
                                                dual_clip, gspo, token_level)
    x2 = t["lp"].clone().requires_grad_()
    got, st = policy_loss(x2, t["old"], t["adv"], m, variant="gspo" if gspo else "ppo",
                          semantics="openrlhf", epsilon_low=0.2, epsilon_high=0.28,
                          clip_ratio_c=dual_clip,
                          loss_agg_mode="token-mean" if token_level else "seq-mean-token-mean")
    _close(got, want, "loss")
    _close(_grad(got, x2), _grad(want, x1), "grad")
    _close(st["clip_frac"], clip_ratio, "clip_ratio")
    _close(st["approx_kl"], ppo_kl, "ppo_kl")


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_openrlhf_kl_formula(kind):
    t = _inputs(seed=12, extreme=True)
    x1 = t["lp"].clone().requires_grad_()
    lr = x1 - t["ref"]
    want = {"k1": lr, "k2": lr ** 2 / 2.0, "k3": (-lr).exp() - 1 - (-lr)}[kind]
    want = want.clamp(min=-10, max=10)
    x2 = t["lp"].clone().requires_grad_()
    got = kl_penalty(x2, t["ref"], kind, semantics="openrlhf")
    _close(got, want, kind)
    _close(_grad(got.sum(), x2), _grad(want.sum(), x1), f"{kind} grad")


@pytest.mark.parametrize("clip", [None, 0.2])
def test_openrlhf_value_loss_formula(clip):
    t = _inputs(seed=13)
    m = t["mask"].clone()
    v = torch.randn(6, 40, requires_grad=True)
    old_v = v.detach() + 0.4 * torch.randn(6, 40)
    ret = torch.randn(6, 40)
    if clip is not None:
        vclip = old_v + (v - old_v).clamp(-clip, clip)
        loss = torch.max((vclip - ret) ** 2, (v - ret) ** 2)
    else:
        loss = (v - ret) ** 2
    want = 0.5 * _orl_aggregate(loss, m, True)
    got, _ = value_loss(v, old_v, ret, m, cliprange_value=clip, semantics="openrlhf")
    _close(got, want, "loss")
    _close(_grad(got, v), _grad(want, v), "grad")
