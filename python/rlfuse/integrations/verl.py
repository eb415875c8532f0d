"""Route verl's advantage estimators, KL penalty, policy losses, loss aggregation and
log-prob / entropy helpers to rlfuse ops with ``semantics="verl"``.

    import rlfuse.integrations.verl as rl_verl
    rl_verl.patch()        # before verl builds its workers / trainer
    ...
    rl_verl.unpatch()      # every original object back

Patched (verl 0.9.x; each replacement keeps verl's signature, return values and their
dtypes):

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
import math
import numbers
import os

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


def _dtype(*xs, floor=None) -> torch.dtype:
    """The dtype torch's type promotion gives verl's arithmetic over the tensors (or dtypes)
    among ``xs`` (None and Python numbers are skipped: a number does not change a floating
    result), promoted with ``floor`` where verl's code forces a step into that dtype
    (``.float()``)."""
    dt = floor
    for x in xs:
        d = x.dtype if isinstance(x, torch.Tensor) else x if isinstance(x, torch.dtype) else None
        if d is not None:
            dt = d if dt is None else torch.promote_types(dt, d)
    return dt


def _wide(x, dt: torch.dtype):
    """``x`` in float64 where verl's result is float64 (the ops accumulate in float32 for
    narrower inputs); unchanged otherwise."""
    if dt == torch.float64 and isinstance(x, torch.Tensor) and x.dtype != dt:
        return x.to(dt)
    return x


def _acc(dt: torch.dtype) -> torch.dtype:
    return torch.float64 if dt == torch.float64 else torch.float32


def _out(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dt else x.to(dt)


def _or_verl(run, fallback, mask):
    """``run()`` (the rlfuse op), or verl's own function where the op refused ``mask``
    because it holds values other than 0 and 1: verl multiplies by the mask and counts its
    sum, so a fractional (or integer > 1) mask weights the tokens.  The ops check mask values
    themselves (in the CPU kernel, or with the flag read the GPU path makes anyway), so a 0/1
    mask costs nothing more here; the mask is read only after a refusal, and any other
    refusal is re-raised."""
    try:
        return run()
    except ValueError:
        if (not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool
                or not bool(((mask != 0) & (mask != 1)).any())):
            raise
    return fallback()


def _count(v):
    """A global count verl divides by, as a number the op takes, or None where verl's own
    code must run (0, negative or non-finite: verl returns inf / NaN or a negated loss).
    A tensor count is read once (the op would read it too)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_complex():
            return None
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return None
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def _floats(*xs) -> bool:
    return all(isinstance(x, torch.Tensor) and x.is_floating_point() for x in xs)


def _nonneg(v) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            and v >= 0)


def _group(fallback, token_level_rewards, response_mask, index, method, **kw):
    dt = _dtype(token_level_rewards, response_mask)  # verl: scores * response_mask
    # as verl: the row sum of the token rewards (in float32 / float64, not rounded to bf16)
    scores = token_level_rewards.sum(dim=-1, dtype=_acc(dt))
    ids = _group_ids(index, scores.shape[0], scores.device)

    def run():
        adv = _out(ops.group_advantages(scores, group_ids=ids, method=method,
                                        mask=response_mask, semantics=SEMANTICS, **kw), dt)
        return adv, adv

    return _or_verl(run, fallback, response_mask)


def _agg_kwargs(mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                loss_scale_factor=None, **unknown):
    """policy_loss aggregation arguments for verl's agg_loss arguments, or None where verl's
    own agg_loss must run: it raises for dp_size > 1 without the global count, and returns
    inf / NaN or a negated loss for a count or loss_scale_factor <= 0.  Only the arguments
    verl reads in ``mode`` are checked and passed (verl ignores the others)."""
    if unknown or mode not in _AGG_MODES:
        return None
    if isinstance(dp_size, bool) or not isinstance(dp_size, numbers.Integral) or dp_size < 1:
        return None
    kw = dict(loss_agg_mode=mode, dp_size=int(dp_size))
    name, v = (("global_num_tokens", batch_num_tokens) if mode == "token-mean" else
               ("global_batch_size", global_batch_size) if mode != "token-sum" else (None, None))
    if v is not None:
        kw[name] = _count(v)
        if kw[name] is None:
            return None
    elif name is not None and dp_size != 1:
        return None  # verl raises
    if mode == "seq-mean-token-sum-norm" and loss_scale_factor is not None:
        if isinstance(loss_scale_factor, torch.Tensor):
            return None
        kw["loss_scale_factor"] = _count(loss_scale_factor)
        if kw["loss_scale_factor"] is None:
            return None
    return kw


def _agg_dtype(mode, loss_mat, loss_mask, batch_num_tokens=None, global_batch_size=None,
               **_):
    """The dtype of verl's agg_loss result: loss_mat * loss_mask, over a tensor count where
    one is given; the seq-mean modes go through float32 (``seq_mask.float()``), and
    seq-mean-token-mean divides by the row sums of the mask plus 1e-8 (the default dtype
    for a bool / integer mask)."""
    if mode == "token-mean":
        return _dtype(loss_mat, loss_mask, batch_num_tokens)
    if mode == "token-sum":
        return _dtype(loss_mat, loss_mask)
    floor = torch.float32
    if mode == "seq-mean-token-mean" and not loss_mask.is_floating_point():
        floor = torch.promote_types(floor, torch.get_default_dtype())
    return _dtype(loss_mat, loss_mask, global_batch_size, floor=floor)


# --------------------------------------------------------------------------- estimators
def _make_estimators(orig: dict) -> dict:
    # Each returns verl's dtypes: torch's promotion over the tensors verl's code combines
    # (checked against verl in tests/integrations/test_verl_patch.py); a response_mask other
    # than 0/1 runs verl's own estimator.
    def gae(token_level_rewards, values, response_mask, gamma, lam):
        dt = _dtype(token_level_rewards, values, response_mask)

        def run():
            adv, ret = ops.gae(_wide(token_level_rewards, dt), _wide(values, dt), response_mask,
                               gamma=float(gamma), lam=float(lam), semantics=SEMANTICS,
                               whiten=True)
            return _out(adv, dt), _out(ret, dt)

        return _or_verl(run, functools.partial(orig["gae"], token_level_rewards, values,
                                               response_mask, gamma, lam), response_mask)

    def grpo(token_level_rewards, response_mask, index, epsilon=1e-6,
             norm_adv_by_std_in_grpo=True, config=None):
        fallback = functools.partial(orig["grpo"], token_level_rewards, response_mask, index,
                                     epsilon, norm_adv_by_std_in_grpo, config)
        return _group(fallback, token_level_rewards, response_mask, index,
                      "grpo" if norm_adv_by_std_in_grpo else "dr_grpo", eps=epsilon)

    def grpo_passk(token_level_rewards, response_mask, index, epsilon=1e-6,
                   norm_adv_by_std_in_grpo=True, config=None, **kwargs):
        fallback = functools.partial(orig["grpo_passk"], token_level_rewards, response_mask,
                                     index, epsilon, norm_adv_by_std_in_grpo, config, **kwargs)
        if config is None:  # verl asserts
            return fallback()
        norm = config.get("norm_adv_by_std_in_grpo", True)
        return _group(fallback, token_level_rewards, response_mask, index, "grpo_passk",
                      eps=epsilon, norm_by_std=bool(norm))

    def reinforce_plus_plus_baseline(token_level_rewards, response_mask, index, epsilon=1e-6,
                                     config=None, **kwargs):
        fallback = functools.partial(orig["reinforce_plus_plus_baseline"], token_level_rewards,
                                     response_mask, index, epsilon, config, **kwargs)
        return _group(fallback, token_level_rewards, response_mask, index,
                      "reinforce_pp_baseline")

    def rloo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
        fallback = functools.partial(orig["rloo"], token_level_rewards, response_mask, index,
                                     epsilon, config, **kwargs)
        return _group(fallback, token_level_rewards, response_mask, index, "rloo")

    def opo(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
        fallback = functools.partial(orig["opo"], token_level_rewards, response_mask, index,
                                     epsilon, config, **kwargs)
        return _group(fallback, token_level_rewards, response_mask, index, "opo")

    def gpg(token_level_rewards, response_mask, index, epsilon=1e-6, f_norm=1.0, alpha=1.0,
            config=None, **kwargs):
        fallback = functools.partial(orig["gpg"], token_level_rewards, response_mask, index,
                                     epsilon, f_norm, alpha, config, **kwargs)
        return _group(fallback, token_level_rewards, response_mask, index, "gpg",
                      f_norm=float(f_norm))

    def reinforce_plus_plus(token_level_rewards, response_mask, config=None, **kwargs):
        fallback = functools.partial(orig["reinforce_plus_plus"], token_level_rewards,
                                     response_mask, config, **kwargs)
        if config is None:  # verl asserts
            return fallback()
        # verl: the returns stay in the rewards' dtype; the advantages are * response_mask
        dt_ret = token_level_rewards.dtype
        dt_adv = _dtype(token_level_rewards, response_mask)

        def run():
            ret = ops.discounted_returns(_wide(token_level_rewards, dt_adv), response_mask,
                                         float(config.gamma), semantics=SEMANTICS)
            adv = ops.masked_whiten(ret, response_mask)
            return _out(adv, dt_adv), _out(ret, dt_ret)

        return _or_verl(run, fallback, response_mask)

    def remax(token_level_rewards, reward_baselines, response_mask, config=None, **kwargs):
        # verl: returns = rewards * mask (reverse cumsum); advantages = returns - b * mask
        dt_ret = _dtype(token_level_rewards, response_mask)
        dt_adv = _dtype(token_level_rewards, reward_baselines, response_mask)

        def run():
            ret = ops.discounted_returns(_wide(token_level_rewards, dt_adv), response_mask, 1.0,
                                         semantics=SEMANTICS)
            m = response_mask.to(ret.dtype)
            adv = ret - reward_baselines.to(ret.dtype).unsqueeze(-1) * m
            return _out(adv, dt_adv), _out(ret, dt_ret)

        return _or_verl(run, functools.partial(orig["remax"], token_level_rewards,
                                               reward_baselines, response_mask, config,
                                               **kwargs), response_mask)

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
        # verl's own code: "full" and unknown kinds (it raises); a ref_logprob it broadcasts
        # (e.g. [B, 1] against [B, T]); a ref_logprob that takes a gradient (the op treats it
        # as a constant).
        if (kl_penalty not in KL_KINDS or not _floats(logprob, ref_logprob)
                or ref_logprob.shape != logprob.shape
                or (ref_logprob.requires_grad and torch.is_grad_enabled())):
            return o_kl(logprob, ref_logprob, kl_penalty)
        dt = _dtype(logprob, ref_logprob)
        out = ops.kl_penalty(_wide(logprob, dt), _wide(ref_logprob, dt), kl_penalty,
                             semantics=SEMANTICS)
        return _out(out, dt)

    def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None,
                 global_batch_size=None, loss_scale_factor=None):
        fallback = functools.partial(o_agg, loss_mat, loss_mask, loss_agg_mode, dp_size,
                                     batch_num_tokens, global_batch_size, loss_scale_factor)
        if (not _floats(loss_mat) or not isinstance(loss_mask, torch.Tensor)
                or loss_mat.dim() != 2 or loss_mask.shape != loss_mat.shape):
            return fallback()
        kw = _agg_kwargs(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
                         loss_scale_factor)
        if kw is None:
            return fallback()
        dt = _agg_dtype(loss_agg_mode, loss_mat, loss_mask, batch_num_tokens, global_batch_size)
        # The fused policy loss with pg_t = -A * logp, A = -1 (verl's REINFORCE term), is
        # exactly sum_i c_i sum_t m_it loss_mat_it with verl's aggregation coefficients.
        minus_one = loss_mat.new_full((loss_mat.shape[0],), -1.0, dtype=torch.float32)

        def run():
            loss, _ = ops.policy_loss(_wide(loss_mat, dt), None, minus_one, loss_mask,
                                      variant="reinforce", semantics=SEMANTICS, **kw)
            return _out(loss, dt)

        return _or_verl(run, fallback, loss_mask)

    def _policy(name, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                rollout_is_weights):
        fallback = functools.partial(o_pl[name], old_log_prob, log_prob, advantages,
                                     response_mask, loss_agg_mode, config, rollout_is_weights)
        # verl's own code: a missing / wrong config (it asserts), tensors it broadcasts,
        # options the op does not take, a response_mask other than 0/1 (_or_verl: verl
        # weights the tokens by it).
        isw = () if rollout_is_weights is None else (rollout_is_weights,)
        if (not isinstance(config, actor_config) or not _floats(log_prob, old_log_prob,
                                                                 advantages, *isw)
                or log_prob.dim() != 2 or not isinstance(response_mask, torch.Tensor)
                or any(t.shape != log_prob.shape
                       for t in (old_log_prob, advantages, response_mask, *isw))):
            return fallback()
        info = dict(config.global_batch_info)
        kw = _agg_kwargs(loss_agg_mode, **info)
        clip = config.clip_ratio
        low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
        high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
        if kw is None or not (_nonneg(low) and _nonneg(high)):
            return fallback()
        extra = {}
        if name == "vanilla":
            c = config.get("clip_ratio_c", 3.0)
            if not (isinstance(c, numbers.Real) and c > 1.0):
                return fallback()  # verl asserts
            extra["clip_ratio_c"] = c
        # verl: the per-token loss in the promotion of its inputs, then agg_loss
        dt = _agg_dtype(loss_agg_mode, _dtype(log_prob, old_log_prob, advantages, *isw),
                        response_mask, **info)
        variant = {"vanilla": "ppo", "gspo": "gspo", "cispo": "cispo"}[name]

        def run():
            loss, st = ops.policy_loss(_wide(log_prob, dt), _wide(old_log_prob, dt),
                                       _wide(advantages, dt), response_mask, variant=variant,
                                       epsilon_low=low, epsilon_high=high,
                                       is_weights=_wide(rollout_is_weights, dt),
                                       semantics=SEMANTICS, **extra, **kw)
            lower = (st["dual_clip_frac"] if name == "vanilla"
                     else torch.zeros_like(st["clip_frac"]))
            clipfrac, ppo_kl, clipfrac_lower = torch.stack(
                [st["clip_frac"], st["approx_kl"], lower]).tolist()
            metrics = {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": ppo_kl,
                       "actor/pg_clipfrac_lower": clipfrac_lower}
            return _out(loss, dt), metrics

        return _or_verl(run, fallback, response_mask)

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

    # Computed in float32 (float64 for float64 logits); returned in the dtype verl's own
    # function gives: its flash-attn cross-entropy path (taken whenever flash-attn is
    # installed, unless VERL_DISABLE_FLASH_ATTN_CE=1) returns float32 log-probs, its torch
    # path and entropy_from_logits the logits' dtype.
    def logprobs_from_logits(logits, labels, inplace_backward=True):
        flash = (getattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False)
                 and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1")
        return _out(ops.token_logprobs(logits, labels), torch.float32 if flash else logits.dtype)

    def entropy_from_logits(logits):
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        return _out(ops.token_logprobs(logits, zeros, return_entropy=True)[1], logits.dtype)

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
