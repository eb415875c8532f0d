"""Route TRL's log-prob, entropy and GRPO loss computations to rlfuse ops.

    import rlfuse.integrations.trl as rl_trl
    rl_trl.patch()                       # before building the trainer
    trainer = GRPOTrainer(...); trainer.train()
    rl_trl.unpatch()                     # every original object back
    with rl_trl.patched(): ...           # the same, for a block

Patched (TRL 1.x, tested with 1.16; each replacement keeps TRL's signature):

* ``trl.trainer.utils.selective_log_softmax``, ``entropy_from_logits`` and
  ``selective_log_softmax_and_entropy`` -> :func:`rlfuse.ops.token_logprobs` (one pass over
  the logits, float32 results), in ``trl.trainer.utils`` and in every imported ``trl``
  module that bound the names (the experimental trainers do ``from ... import
  selective_log_softmax``).
* The fused LM head that TRL installs on the policy and reference models
  (``add_fused_lm_head``, used by ``GRPOTrainer._get_per_token_logps_and_entropies``, RLOO
  and KTO): its projection ``_ChunkedLogProbFunction`` -> :func:`rlfuse.ops.linear_token_logprobs`
  (hidden states -> log-probs and entropies, no ``[N, V]`` logits), and only the scored
  positions reach it on the CPU too.  The model's own forward (and so DDP / FSDP / PEFT
  wrappers) is unchanged.
* ``GRPOTrainer._compute_loss`` -> :func:`rlfuse.ops.policy_loss` with ``semantics="trl"``
  (every ``loss_type`` except ``vespo``, token and sequence importance sampling, ``beta`` with
  and without ``use_bias_correction_kl``, ``delta``, vLLM importance-sampling ratios, the
  off-policy sequence mask, the high-entropy token mask, the static entropy bonus, gradient
  accumulation scaling, MoE aux loss) with TRL's metrics.  Other configurations run TRL's own
  ``_compute_loss`` (listed in docs/integrations.md).
"""

from __future__ import annotations

import functools

import torch

from rlfuse import ops
from rlfuse.integrations._patching import Integration, Patcher

__all__ = ["patch", "unpatch", "patched", "is_patched", "KNOWN_VERSIONS", "TESTED_VERSION"]

KNOWN_VERSIONS = ((1,),)
TESTED_VERSION = "1.16.0"
_IGNORE = -100
_DEVICES = ("cpu", "cuda")


def _ok(t: torch.Tensor) -> bool:
    return t.device.type in _DEVICES and t.dtype in (torch.float32, torch.float64,
                                                     torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------ logits -> logp
def _make_logit_fns(utils) -> dict:
    o_sls = utils.selective_log_softmax
    o_ent = utils.entropy_from_logits
    o_both = utils.selective_log_softmax_and_entropy

    def _ids(index, row_mask):
        return index if row_mask is None else index.masked_fill(row_mask == 0, _IGNORE)

    def _covered(logits, index, temperature, row_mask):
        return (_ok(logits) and logits.dim() >= 1 and temperature > 0
                and index.shape == logits.shape[:-1]
                and (row_mask is None or row_mask.shape == index.shape))

    def selective_log_softmax(logits, index, temperature=1.0, row_mask=None):
        if not _covered(logits, index, temperature, row_mask):  # top-K gathers, bad args
            return o_sls(logits, index, temperature, row_mask)
        return ops.token_logprobs(logits, _ids(index, row_mask), temperature=temperature,
                                  ignore_index=_IGNORE)

    def entropy_from_logits(logits, chunk_size=128):
        if not _ok(logits) or logits.dim() < 1:
            return o_ent(logits, chunk_size)
        zeros = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        return ops.token_logprobs(logits, zeros, return_entropy=True)[1]

    def selective_log_softmax_and_entropy(logits, index, entropy_requires_grad=True,
                                          temperature=1.0, row_mask=None):
        if not _covered(logits, index, temperature, row_mask):
            return o_both(logits, index, entropy_requires_grad, temperature, row_mask)
        lp, ent = ops.token_logprobs(logits, _ids(index, row_mask), temperature=temperature,
                                     ignore_index=_IGNORE, return_entropy=True)
        return lp, ent if entropy_requires_grad else ent.detach()

    made = {"selective_log_softmax": (selective_log_softmax, o_sls),
            "entropy_from_logits": (entropy_from_logits, o_ent),
            "selective_log_softmax_and_entropy": (selective_log_softmax_and_entropy, o_both)}
    for fn, original in made.values():
        functools.update_wrapper(fn, original)
        fn.__rlfuse__ = True
    return made


# ----------------------------------------------------------------- fused LM head (hidden)
def _make_lm_head(original):
    """A stand-in for TRL's ``ChunkedLogProbFunction`` whose ``apply`` runs
    ``linear_token_logprobs``; configurations it does not cover go to the original."""

    class RlfuseChunkedLogProb:
        __rlfuse__ = True
        wrapped = original

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size,
                  final_logit_softcapping=None, logit_scale=1.0, outputs=None):
            outputs = tuple(outputs) if outputs is not None else (
                "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
            want_entropy = "entropy" in outputs
            covered = (final_logit_softcapping is None and logit_scale > 0
                       and set(outputs) <= {"log_probs", "entropy"}
                       and _ok(hidden) and hidden.dim() == 2 and hidden.shape[0] > 0)
            if not covered:
                return original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                      final_logit_softcapping, logit_scale, outputs)
            dev = hidden.device.type
            dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
                     else hidden.dtype)
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            with torch.autocast(dev, enabled=False):
                res = ops.linear_token_logprobs(h, w, targets, bias=b,
                                                temperature=temperature / logit_scale,
                                                return_entropy=want_entropy)
            lp, ent = res if want_entropy else (res, None)
            return lp, ent, None, None, None

    return RlfuseChunkedLogProb


def _make_use_triton(original):
    def _use_triton(device):
        # True selects TRL's "compact" path in the fused LM head: only the positions with a
        # label are projected.  TRL keeps every position off-GPU to avoid recompilation on
        # XLA-like devices; on the CPU the compact path is just cheaper.
        return device.type in _DEVICES or original(device)

    _use_triton.__rlfuse__ = True
    return _use_triton


# ------------------------------------------------------------------------- GRPO loss
_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo")
_MODEL_INPUTS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                 "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                 "mm_token_type_ids", "image_position_ids")


def _loss_covered(self) -> bool:
    level = self.importance_sampling_level
    return (self.loss_type in _LOSS_TYPES and level in ("token", "sequence")
            and not (level == "sequence" and self.loss_type in ("cispo", "sapo"))
            and not getattr(self, "use_adaptive_entropy", False)
            and not (getattr(self, "top_entropy_quantile", 1.0) < 1.0
                     and getattr(self, "_entropy_bonus_enabled", False)))


def _make_compute_loss(original, utils):
    nanmin, nanmax = utils.nanmin, utils.nanmax

    def _compute_loss(self, model, inputs):
        if not _loss_covered(self):
            return original(self, model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _MODEL_INPUTS})
        train = self.model.training
        mode = "train" if train else "eval"
        accum = self.current_gradient_accumulation_steps if train else 1.0
        adv = inputs["advantages"]
        adv2 = adv.unsqueeze(1) if adv.dim() == 1 else adv
        old = inputs.get("old_per_token_logps")
        loss_type, level = self.loss_type, self.importance_sampling_level
        bonus = getattr(self, "_entropy_bonus_enabled", False)

        # Per-token weights of the policy term (TRL multiplies per_token_loss by each).
        weights = []
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps",
                                  logps.detach() if old is None else old)
            weights.append(self.get_off_policy_mask(
                advantages=adv2, per_token_logps=logps, sampling_per_token_logps=sampling,
                mask=mask, off_policy_threshold=self.off_policy_mask_threshold))
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropies, mask,
                                                      1 - self.top_entropy_quantile))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])
        isw = None
        for w in weights:
            w = w.to(torch.float32)
            isw = w if isw is None else isw * w

        variant = {"cispo": "cispo", "sapo": "sapo"}.get(
            loss_type, "gspo" if level == "sequence" else "ppo")
        kw = dict(variant=variant, semantics="trl", epsilon_low=self.epsilon_low,
                  epsilon_high=self.epsilon_high, is_weights=isw,
                  loss_agg_mode={"cispo": "dapo", "sapo": "grpo"}.get(loss_type, loss_type))
        if variant in ("ppo", "gspo"):
            kw["delta"] = self.args.delta
        if variant == "sapo":
            kw.update(tau_pos=self.args.sapo_temperature_pos,
                      tau_neg=self.args.sapo_temperature_neg)
        if loss_type == "dr_grpo":
            kw["max_completion_length"] = self.max_completion_length
        token_normalised = kw["loss_agg_mode"] == "dapo"
        if token_normalised:  # num_items_in_batch spans the generation batch
            norm = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                norm = norm * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            kw["num_items_in_batch"] = norm
        if self.beta != 0.0:
            kw.update(ref_logp=inputs["ref_per_token_logps"], beta=self.beta, kl_kind="k3",
                      kl_ratio_weighted=bool(self.args.use_bias_correction_kl))
        coef = 0.0
        if bonus:
            # TRL: the bonus is a token mean divided by the accumulation steps, whatever the
            # loss_type; the other loss types divide the whole loss by them below.
            coef = self.entropy_coef / accum if token_normalised else self.entropy_coef
            kw.update(entropy=entropies, entropy_coef=coef)
        loss, st = ops.policy_loss(logps, old, adv, mask, **kw)
        if bonus:
            policy = loss.detach() + coef * st["entropy_loss"]
        if not token_normalised:
            loss = loss / accum
        if bonus:
            self._metrics[mode]["policy_loss"].append(
                self.accelerator.gather(policy).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item())
        _log_metrics(self, mode, st, logps, old, adv2, mask, entropies, inputs, nanmin, nanmax)
        return loss

    _compute_loss.__rlfuse__ = True
    functools.update_wrapper(_compute_loss, original)
    return _compute_loss


def _log_metrics(self, mode, st, logps, old, adv2, mask, entropies, inputs, nanmin, nanmax):
    """TRL's logged metrics, from the fused pass's statistics where they are the same
    quantity, else from a no-grad recomputation of the clip indicators."""
    metrics = self._metrics[mode]
    maskf = mask.to(torch.float32)

    def global_mean(local_sum, local_count):
        totals = self.accelerator.reduce(torch.stack([local_sum.float(), local_count.float()]),
                                         reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    n_tok = st["num_tokens"]
    with torch.no_grad():
        lp = logps.detach()
        if self.beta != 0.0:
            if self.args.use_bias_correction_kl:  # TRL logs the ratio-weighted KL
                ref = inputs["ref_per_token_logps"]
                kl = torch.exp(ref - lp) - (ref - lp) - 1
                kl = kl * torch.exp(_log_ratio(self, lp, old, maskf))
                metrics["kl"].append(global_mean((kl * maskf).sum(), maskf.sum()))
            else:
                metrics["kl"].append(global_mean(st["kl_mean"] * n_tok, n_tok))
        metrics["entropy"].append(global_mean((entropies.detach() * maskf).sum(), maskf.sum()))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(global_mean(st["clip_frac_high"] * n_tok, n_tok))
        elif self.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
            coef_1 = torch.exp(_log_ratio(self, lp, old, maskf))
            if getattr(self.args, "delta", None) is not None:  # TRL clamps before it logs
                coef_1 = coef_1.clamp(max=self.args.delta)
            low = ((coef_1 < 1 - self.epsilon_low) & (adv2 < 0)).float()
            high = ((coef_1 > 1 + self.epsilon_high) & (adv2 > 0)).float()

            def gmean(x):
                if x.shape[1] == 1:
                    return global_mean(x.sum(), torch.tensor(float(x.shape[0])))
                return global_mean((x * maskf).sum(), maskf.sum())

            def seq_mean(x):
                return x.squeeze(1) if x.shape[1] == 1 else (x * maskf).sum(-1) / maskf.sum(-1)

            metrics["clip_ratio/low_mean"].append(gmean(low))
            metrics["clip_ratio/high_mean"].append(gmean(high))
            metrics["clip_ratio/region_mean"].append(gmean(torch.maximum(low, high)))
            metrics["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(seq_mean(low))).item())
            metrics["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(seq_mean(high))).item())


def _log_ratio(self, lp, old, maskf):
    if old is None:
        return torch.zeros_like(lp)
    log_ratio = lp - old
    if self.importance_sampling_level == "sequence":
        return ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    return log_ratio


# --------------------------------------------------------------------------------- API
def _apply(p: Patcher) -> None:
    import trl.trainer.grpo_trainer as grpo
    import trl.trainer.utils as utils

    for new, old in _make_logit_fns(utils).values():
        p.rebind("trl", old, new)
    p.setattr(utils, "_ChunkedLogProbFunction", _make_lm_head(utils._ChunkedLogProbFunction))
    p.setattr(utils, "_use_triton", _make_use_triton(utils._use_triton))
    p.setattr(grpo.GRPOTrainer, "_compute_loss",
              _make_compute_loss(vars(grpo.GRPOTrainer)["_compute_loss"], utils))


_INTEGRATION = Integration("trl", KNOWN_VERSIONS, TESTED_VERSION, _apply)


# patch(): route the functions to rlfuse (idempotent; UnsupportedVersionError for an unknown
# version); unpatch(): every original object back; patched(): a context manager doing both;
# is_patched().
patch, unpatch = _INTEGRATION.patch, _INTEGRATION.unpatch
patched, is_patched = _INTEGRATION.patched, _INTEGRATION.is_patched
