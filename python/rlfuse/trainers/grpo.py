"""GRPO: group-relative policy optimisation on a Hugging Face causal LM.

One round on each process: draw ``per_device_train_batch_size * gradient_accumulation_steps
/ num_generations`` prompts, sample ``num_generations`` completions for each (``generate``),
score them with the reward functions, compute group advantages
(:func:`rlfuse.ops.group_advantages`), then make ``num_iterations`` optimizer steps over
them, each accumulating ``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` completions.  The loss is
:func:`rlfuse.ops.policy_loss` (TRL semantics) on log-probs from
:func:`rlfuse.models.causal_lm_token_logprobs` (fused lm_head, no logits).
"""

from __future__ import annotations

import copy
import time

import torch

from rlfuse.trainers.base import BaseTrainer, _LogprobModule, check_reference_is_separate
from rlfuse.trainers.config import ConfigError, GRPOConfig

__all__ = ["GRPOTrainer"]

_SCALE_TO_METHOD = {"group": "grpo", "batch": "batch_std", "none": "dr_grpo"}


def _check_reward_funcs(reward_funcs):
    if callable(reward_funcs):
        reward_funcs = [reward_funcs]
    if not isinstance(reward_funcs, (list, tuple)) or not reward_funcs:
        raise ConfigError("reward_funcs must be a callable or a non-empty list of callables")
    for i, f in enumerate(reward_funcs):
        if not callable(f):
            raise ConfigError(f"reward_funcs[{i}] is not callable ({type(f).__name__}); "
                              "reward models are not supported, wrap them in a function")
    return list(reward_funcs)


class GRPOTrainer(BaseTrainer):
    """``GRPOTrainer(model, reward_funcs, args=GRPOConfig(...), train_dataset=...,
    tokenizer=None, ref_model=None)``.

    ``model``: a path / name for ``AutoModelForCausalLM.from_pretrained`` or a
    ``PreTrainedModel`` (then ``tokenizer`` is required).  ``reward_funcs``: callables with
    TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``, where the
    columns are the dataset's other columns, one value per completion.  With ``beta > 0``
    the reference model is ``ref_model``, or a second copy loaded from ``model``'s path.
    """

    config_class = GRPOConfig
    algorithm = "grpo"

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None,
                 tokenizer=None, ref_model=None):
        self.reward_funcs = _check_reward_funcs(reward_funcs)
        self._ref_arg = ref_model
        self._model_arg_is_path = isinstance(model, str)
        self._model_arg = model
        super().__init__(model, args, train_dataset, tokenizer)

    def _check_more(self):
        a = self.args
        if a.reward_weights is not None and len(a.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights: {len(a.reward_weights)} weights for "
                              f"{len(self.reward_funcs)} reward functions")
        if a.beta > 0 and self._ref_arg is None and not self._model_arg_is_path:
            raise ConfigError("beta > 0 needs a reference model: pass ref_model= (e.g. "
                              "copy.deepcopy(model)) or give model as a path, or set beta=0")
        if a.beta == 0 and self._ref_arg is not None:
            raise ConfigError("ref_model is given but beta == 0 (it would never be used): "
                              "drop ref_model, or set beta > 0")
        if a.beta > 0:
            check_reference_is_separate(self._model_arg, self._ref_arg)

    def _setup_models(self):
        a = self.args
        self.ref_model = None
        if a.beta > 0:
            ref = self._ref_arg
            if ref is None:
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(self._model_arg)
            elif isinstance(ref, str):
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(ref)
            self.ref_model = ref.to(self.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if self.fsdp:
                self._fully_shard(_LogprobModule(self.ref_model), runs=self.ref_model)
        self.model.train()
        self.policy = self._wrap_distributed(_LogprobModule(self.model), runs=self.model)
        self._make_optimizer([p for p in self.model.parameters() if p.requires_grad])

    def _resume_fields(self):
        return super()._resume_fields() + ("num_generations", "num_iterations")

    def _items_per_round(self):
        a = self.args
        return a.per_device_train_batch_size * a.gradient_accumulation_steps // a.num_generations

    def _steps_per_round(self):
        return self.args.num_iterations

    # -- one round ----------------------------------------------------------------
    def make_rollout(self, rows):
        """Generate, score and compute advantages (and old / reference log-probs)."""
        a = self.args
        G = a.num_generations
        r = self.generate([row["prompt"] for row in rows], G)
        r.columns = {k: [row[k] for row in rows for _ in range(G)]
                     for k in rows[0] if k != "prompt"}
        rewards, per_func, n_none = self.score(r)
        r.extra["rewards"] = rewards
        r.extra["rewards_per_func"] = per_func
        r.extra["n_none"] = torch.full((len(rewards),), float(n_none))
        t0 = time.perf_counter()
        r.extra["advantages"] = self.advantages(rewards)
        self._time("advantages", t0)
        with torch.no_grad():
            if a.num_iterations > 1:
                t0 = time.perf_counter()
                r.extra["old_logp"] = self.batched_logprobs(self.model, r)
                self._time("old_logprobs", t0)
            if self.ref_model is not None:
                t0 = time.perf_counter()
                r.extra["ref_logp"] = self.batched_logprobs(self.ref_model, r)
                self._time("ref_logprobs", t0)
        return r

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """This process's advantages ``[B]`` (on the trainer's device) from its rewards
        ``[B]`` (NaN: no reward).  With ``scale_rewards="batch"`` and several processes the
        std is that of every process's rewards (TRL gathers them first): the rewards are
        gathered (every process holds the same number), the advantages of the whole batch
        computed, and this process's slice kept, so the numbers do not depend on how the
        batch is split over processes."""
        from rlfuse.ops import group_advantages

        a = self.args
        method = _SCALE_TO_METHOD[a.scale_rewards]
        x = rewards.to(torch.float32)
        B = x.numel()
        if method == "batch_std" and self.world_size > 1:
            import torch.distributed as dist

            parts = [torch.empty(B, dtype=torch.float32, device=self.device)
                     for _ in range(self.world_size)]
            dist.all_gather(parts, x.to(self.device))
            x = torch.cat(parts).cpu()
            adv = group_advantages(x, group_size=a.num_generations, method=method,
                                   semantics="trl")
            return adv[self.rank * B:(self.rank + 1) * B].to(self.device)
        return group_advantages(x, group_size=a.num_generations, method=method,
                                semantics="trl").to(self.device)

    def micro_batch_loss(self, r, global_tokens: float):
        """Loss of one micro-batch (already scaled for accumulation) and its stats."""
        from rlfuse.ops import policy_loss

        a = self.args
        GA = a.gradient_accumulation_steps
        t0 = time.perf_counter()
        logp, ent = self.completion_logprobs(self.policy, r, return_entropy=True)
        self._time("policy_forward", t0)
        mask = r.completion_mask
        kw = {}
        if a.loss_type == "dapo":
            # a round whose every completion is masked (mask_truncated_completions) has no
            # tokens: its loss is 0, as PPO's (the guard keeps the divisor positive)
            kw = dict(num_items_in_batch=max(global_tokens, 1.0), dp_size=self.world_size)
        elif a.loss_type == "dr_grpo":
            kw = dict(max_completion_length=a.max_completion_length)
        t0 = time.perf_counter()
        loss, stats = policy_loss(
            logp, r.extra.get("old_logp"), r.extra["advantages"], mask,
            variant="gspo" if a.importance_sampling_level == "sequence" else "ppo",
            epsilon=a.epsilon, epsilon_high=a.epsilon_high, delta=a.delta,
            ref_logp=r.extra.get("ref_logp"), beta=a.beta, kl_kind=a.kl_estimator,
            # TRL applies the correction inside its KL term, which exists only for beta > 0
            kl_ratio_weighted=a.use_bias_correction_kl and a.beta > 0,
            loss_agg_mode=a.loss_type,
            semantics="trl", **kw)
        if a.loss_type != "dapo":
            loss = loss / GA
        if a.entropy_coef > 0:
            m = mask.to(ent.dtype)
            loss = loss - a.entropy_coef * (ent * m).sum() / m.sum().clamp(min=1) / GA
        self._time("policy_loss_op", t0)
        m = mask.to(ent.dtype)
        stats["entropy"] = (ent.detach() * m).sum() / m.sum().clamp(min=1)
        return loss, stats

    def _round_metrics(self, r, loss, stats, metrics, t_round):
        rew = r.extra["rewards"]
        valid = ~torch.isnan(rew)
        G = self.args.num_generations
        grouped = rew.view(-1, G)
        std = torch.tensor([g[~torch.isnan(g)].std().item() if (~torch.isnan(g)).sum() > 1
                            else 0.0 for g in grouped])
        ntok = float(r.completion_mask.sum())
        elapsed = time.perf_counter() - t_round
        m = dict(metrics)
        m.update({
            "loss": loss,
            "reward": float(rew[valid].mean()) if valid.any() else float("nan"),
            "reward_std": float(rew[valid].std()) if valid.sum() > 1 else 0.0,
            "frac_reward_zero_std": float((std == 0).float().mean()),
            "rewards_none": int(r.extra["n_none"][0]) if len(rew) else 0,
            "completion_length": ntok / max(1, len(r.prompts)),
            "clipped_ratio": float(r.extra["truncated"].float().mean()),
            "entropy": stats.get("entropy", 0.0),
            "kl": stats.get("kl_mean", 0.0),
            "clip_ratio": stats.get("clip_frac", 0.0),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": ntok * self.world_size / max(elapsed, 1e-9),
            "step_time": elapsed,
        })
        for j, f in enumerate(self.reward_funcs):
            col = r.extra["rewards_per_func"][:, j]
            ok = ~torch.isnan(col)
            name = getattr(f, "__name__", f"reward_{j}")
            m[f"rewards/{name}"] = float(col[ok].mean()) if ok.any() else float("nan")
        return m


def copy_reference(model):
    """A frozen copy of ``model`` to use as ``ref_model``."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref
