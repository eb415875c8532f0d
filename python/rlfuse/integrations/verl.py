"""Route verl's advantage estimators, KL penalty, policy losses, loss aggregation and
log-prob / entropy helpers to rlfuse ops with ``semantics="verl"``.

    import rlfuse.integrations.verl as rl_verl
    rl_verl.patch()        # before verl builds its workers / trainer
    ...
    rl_verl.unpatch()      # every original object back

Patched (verl 0.9.x; each replacement keeps verl's signature and return values):

* ``verl.trainer.ppo.core_algos``: the advantage estimators ``gae``, ``grpo``, ``rloo``,
  ``reinforce_plus_plus``, ``reinforce_plus_plus_baseline``, ``remax``, ``opo``,
  ``grpo_passk``, ``gpg`` (in ``ADV_ESTIMATOR_REGISTRY`` through verl's
  ``register_adv_est`` and as module attributes, which ``compute_advantage`` calls
  directly for GAE and GRPO); ``kl_penalty``; the ``vanilla``, ``gspo`` and ``cispo``
  policy losses (``POLICY_LOSS_REGISTRY`` and module attributes); ``agg_loss``.
* ``verl.utils.torch_functional``: ``logprobs_from_logits``, ``entropy_from_logits``.

Every verl module already imported that bound one of these names (``from ... import
agg_loss``) is rebound too.  Configurations the rlfuse ops do not cover fall back to verl's
own function for that call (listed in docs/integrations.md).
"""

from __future__ import annotations

import functools

import torch

from rlfuse import ops
from rlfuse.integrations._patching import Integration, Patcher
from rlfuse.ops.policy_loss import KL_KINDS

__all__ = ["patch", "unpatch", "patched", "is_patched", "KNOWN_VERSIONS", "TESTED_VERSION"]

KNOWN_VERSIONS = ((0, 9),)
TESTED_VERSION = "0.9.1"
SEMANTICS = "verl"


# verl estimator name -> (core_algos function name, rlfuse replacement factory)
_ESTIMATORS = {
    "gae": "compute_gae_advantage_return",
    "grpo": "compute_grpo_outcome_advantage",
    "rloo": "compute_rloo_outcome_advantage",
    "reinforce_plus_plus": "compute_reinforce_plus_plus_outcome_advantage",
    "reinforce_plus_plus_baseline": "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "remax": "compute_remax_outcome_advantage",
    "opo": "compute_opo_outcome_advantage",
    "grpo_passk": "compute_grpo_passk_outcome_advantage",
    "gpg": "compute_gpg_outcome_advantage",
}
_POLICY_LOSSES = {"vanilla": "compute_policy_loss_vanilla", "gspo": "compute_policy_loss_gspo",
                  "cispo": "compute_policy_loss_cispo"}
_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
              "seq-mean-token-sum-norm")


# ------------------------------------------------------------------------------ helpers
def _group_ids(index, B: int, device) -> torch.Tensor:
    """verl's ``index`` (numpy array of uids, a list, or a tensor) as int64 group ids."""
    if isinstance(index, torch.Tensor) and not index.is_floating_point():
        return index.reshape(-1).to(device=device, dtype=torch.int64)
    ids: dict = {}
    out = [ids.setdefault(u, len(ids)) for u in list(index)[:B]]
    if len(out) != B:
        raise ValueError(f"index must have one uid per sample ({B}), got {len(out)}")
    return torch.tensor(out, dtype=torch.int64, device=device)


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == ref.dtype else x.to(ref.dtype)


def _group(token_level_rewards, response_mask, index, method, **kw):
    scores = token_level_rewards.sum(dim=-1)  # as verl: the row sum of the token rewards
    adv = ops.group_advantages(scores, group_ids=_group_ids(index, scores.shape[0], scores.device),
                               method=method, mask=response_mask, semantics=SEMANTICS, **kw)
    adv = _like(adv, token_level_rewards)
    return adv, adv


def _agg_kwargs(mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                loss_scale_factor=None, **unknown):
    """policy_loss aggregation arguments for verl's agg_loss arguments, or None where verl's
    own agg_loss must run (it raises for dp_size > 1 without global counts)."""
    if unknown or mode not in _AGG_MODES:
        return None
    if dp_size != 1 and ((mode == "token-mean" and batch_num_tokens is None) or
                         (mode.startswith("seq") and global_batch_size is None)):
        return None
    kw = dict(loss_agg_mode=mode, dp_size=int(dp_size))
    if batch_num_tokens is not None:
        kw["global_num_tokens"] = batch_num_tokens
    if global_batch_size is not None:
        kw["global_batch_size"] = global_batch_size
    if loss_scale_factor is not None:
        kw["loss_scale_factor"] = loss_scale_factor
    return kw


# --------------------------------------------------------------------------- estimators
def _make_estimators(orig: dict) -> dict:
    def gae(token_level_rewards, values, response_mask, gamma, lam):
        adv, ret = ops.gae(token_level_rewards, values, response_mask, gamma=float(gamma),
                           lam=float(lam), semantics=SEMANTICS, whiten=True)
        return _like(adv, token_level_rewards), _like(ret, token_level_rewards)

    def grpo(token_level_rewards, response_mask, index, epsilon=1e-6,
             norm_adv_by_std_in_grpo=True, config=None):
        return _group(token_level_rewards, response_mask, index,
                      "grpo" if norm_adv_by_std_in_grpo else "dr_grpo", eps=epsilon)

    def grpo_passk(token_level_rewards, response_mask, index, epsilon=1e-6,
                   norm_adv_by_std_in_grpo=True, config=None, **kwargs):
        if config is None:  # verl asserts
            return orig["grpo_passk"](token_level_rewards, response_mask, index, epsilon,
                                      norm_adv_by_std_in_grpo, config, **kwargs)
        norm = config.get("norm_adv_by_std_in_grpo", True)
        return _group(token_level_rewards, response_mask, index, "grpo_passk", eps=epsilon,
                      norm_by_std=bool(norm))

    def reinforce_plus_plus_baseline(token_level_rewards, response_mask, index, epsilon=1e-6,
                                     config=None, **kwargs):
        return _group(token_level_rewards, response_mask, index, "reinforce_pp_baseline")

    def rloo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
        return _group(token_level_rewards, response_mask, index, "rloo")

    def opo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
        return _group(token_level_rewards, response_mask, index, "opo")

    def gpg(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
            config=None, **kwargs):
        return _group(token_level_rewards, response_mask, index, "gpg", f_norm=float(f_norm))

    def reinforce_plus_plus(token_level_rewards, response_mask, config=None, **kwargs):
        if config is None:  # verl asserts
            return orig["reinforce_plus_plus"](token_level_rewards, response_mask, config,
                                               **kwargs)
        ret = ops.discounted_returns(token_level_rewards, response_mask, float(config.gamma),
                                     semantics=SEMANTICS)
        adv = ops.masked_whiten(ret, response_mask)
        return _like(adv, token_level_rewards), _like(ret, token_level_rewards)

    def remax(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
        ret = ops.discounted_returns(token_level_rewards, response_mask, 1.0,
                                     semantics=SEMANTICS)
        m = response_mask.to(ret.dtype)
        adv = ret - reward_baselines.to(ret.dtype).unsqueeze(-1) * m
        return _like(adv, token_level_rewards), _like(ret, token_level_rewards)

    made = dict(gae=gae, grpo=grpo, grpo_passk=grpo_passk, rloo=rloo, opo=opo, gpg=gpg,
                reinforce_plus_plus=reinforce_plus_plus, remax=remax,
                reinforce_plus_plus_baseline=reinforce_plus_plus_baseline)
    for name, fn in made.items():
        functools.update_wrapper(fn, orig[name])
        fn.__rlfuse__ = True
    return made


# ------------------------------------------------------------------- losses and helpers
def _make_losses(ca, tf) -> dict:
    o_kl, o_agg = ca.kl_penalty, ca.agg_loss
    o_lp, o_ent = tf.logprobs_from_logits, tf.entropy_from_logits
    o_pl = {k: getattr(ca, v) for k, v in _POLICY_LOSSES.items()}
    actor_config = ca.ActorConfig

    def kl_penalty(logprob, ref_logprob, kl_penalty):
        if kl_penalty not in KL_KINDS:  # "full" and unknown kinds: verl raises
            return o_kl(logprob, ref_logprob, kl_penalty)
        out = ops.kl_penalty(logprob, ref_logprob, kl_penalty, semantics=SEMANTICS)
        return _like(out, logprob)

    def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
                 global_batch_size=None, loss_scale_factor=None):
        kw = _agg_kwargs(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                         loss_scale_factor)
        if kw is None or loss_mat.dim() != 2 or loss_mask.shape != loss_mat.shape:
            return o_agg(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens,
                         global_batch_size, loss_scale_factor)
        # The fused policy loss with pg_t = -A * logp, A = -1 (verl's REINFORCE term), is
        # exactly sum_i c_i sum_t m_it loss_mat_it with verl's aggregation coefficients.
        minus_one = loss_mat.new_full((loss_mat.shape[0],), -1.0, dtype=torch.float32)
        loss, _ = ops.policy_loss(loss_mat, None, minus_one, loss_mask, variant="reinforce",
                                  semantics=SEMANTICS, **kw)
        return _like(loss, loss_mat)

    def _policy(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights):
        fallback = functools.partial(o_pl[name], old_log_prob, log_prob, advantages,
                                     response_mask, loss_agg_mode, config, rollout_is_weights)
        if not isinstance(config, actor_config) or log_prob.dim() != 2:
            return fallback()  # verl asserts on a missing / wrong config
        kw = _agg_kwargs(loss_agg_mode, **dict(config.global_batch_info))
        clip = config.clip_ratio
        low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
        high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
        if kw is None or low is None or high is None:
            return fallback()
        extra = {}
        if name == "vanilla":
            c = config.get("clip_ratio_c", 3.0)
            if not c > 1.0:
                return fallback()  # verl asserts
            extra["clip_ratio_c"] = c
        variant = {"vanilla": "ppo", "gspo": "gspo", "cispo": "cispo"}[name]
        loss, st = ops.policy_loss(log_prob, old_log_prob, advantages, response_mask,
                                   variant=variant, epsilon_low=low, epsilon_high=high,
                                   is_weights=rollout_is_weights, semantics=SEMANTICS, **extra,
                                   **kw)
        lower = st["dual_clip_frac"] if name == "vanilla" else torch.zeros_like(st["clip_frac"])
        clipfrac, ppo_kl, clipfrac_lower = torch.stack(
            [st["clip_frac"], st["approx_kl"], lower]).tolist()
        metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
                   "actor/pg_clipfrac_lower": clipfrac_lower}
        # verl's loss has the dtype torch's type promotion gives its floating inputs
        dt = log_prob.dtype
        for t in (old_log_prob, advantages, response_mask, rollout_is_weights):
            if t is not None and t.is_floating_point():
                dt = torch.promote_types(dt, t.dtype)
        return loss.to(dt), metrics

    def vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                config=None, rollout_is_weights=None):
        return _policy("vanilla", old_log_prob, log_prob, advantages, response_mask,
                       loss_agg_mode, config, rollout_is_weights)

    def gspo(old_log_prob, log_prob, advantages, response_mask,
             loss_agg_mode="seq-mean-token-mean", config=None, rollout_is_weights=None):
        return _policy("gspo", old_log_prob, log_prob, advantages, response_mask,
                       loss_agg_mode, config, rollout_is_weights)

    def cispo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
              config=None, rollout_is_weights=None):
        return _policy("cispo", old_log_prob, log_prob, advantages, response_mask,
                       loss_agg_mode, config, rollout_is_weights)

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        return ops.token_logprobs(logits, labels)

    def entropy_from_logits(logits):
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        return ops.token_logprobs(logits, zeros, return_entropy=True)[1]

    made = dict(kl_penalty=(kl_penalty, o_kl), agg_loss=(agg_loss, o_agg),
                vanilla=(vanilla, o_pl["vanilla"]), gspo=(gspo, o_pl["gspo"]),
                cispo=(cispo, o_pl["cispo"]),
                logprobs_from_logits=(logprobs_from_logits, o_lp),
                entropy_from_logits=(entropy_from_logits, o_ent))
    for fn, original in made.values():
        functools.update_wrapper(fn, original)
        fn.__rlfuse__ = True
    return {k: v[0] for k, v in made.items()}


# --------------------------------------------------------------------------------- API
def _apply(p: Patcher) -> None:
    import verl.trainer.ppo.core_algos as ca
    import verl.utils.torch_functional as tf

    originals = {name: getattr(ca, fn) for name, fn in _ESTIMATORS.items()}
    estimators = _make_estimators(originals)
    for name in _ESTIMATORS:
        new = estimators[name]
        p.setitem(ca.ADV_ESTIMATOR_REGISTRY, name, new)
        p.rebind("verl", originals[name], new)
    losses = _make_losses(ca, tf)
    for name, fn_name in _POLICY_LOSSES.items():
        old = getattr(ca, fn_name)
        p.setitem(ca.POLICY_LOSS_REGISTRY, name, losses[name])
        p.rebind("verl", old, losses[name])
    for name in ("kl_penalty", "agg_loss"):
        p.rebind("verl", getattr(ca, name), losses[name])
    for name in ("logprobs_from_logits", "entropy_from_logits"):
        p.rebind("verl", getattr(tf, name), losses[name])


_INTEGRATION = Integration("verl", KNOWN_VERSIONS, TESTED_VERSION, _apply)


# patch(): route the functions to rlfuse (idempotent; UnsupportedVersionError for an unknown
# version); unpatch(): every original object back; patched(): a context manager doing both;
# is_patched().
patch, unpatch = _INTEGRATION.patch, _INTEGRATION.unpatch
patched, is_patched = _INTEGRATION.patched, _INTEGRATION.is_patched
