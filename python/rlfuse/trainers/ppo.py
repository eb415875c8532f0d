"""PPO with a separate value model and GAE on a Hugging Face causal LM.

One round on each process: ``per_device_train_batch_size * gradient_accumulation_steps``
prompts, one completion each; rewards from the reward functions on the last completion
token and a per-token KL penalty against the reference model
(:func:`rlfuse.ops.kl_penalty` + :func:`rlfuse.ops.token_rewards`, as TRL's PPO and
verl); values from the value model; advantages and returns from :func:`rlfuse.ops.gae`,
advantages whitened (:func:`rlfuse.ops.masked_whiten`); then ``num_ppo_epochs`` optimizer
steps, each over every micro-batch, of

    policy_loss(variant="ppo", epsilon=cliprange, token-mean)
      + vf_coef * value_loss(cliprange_value, token-mean)

with token means normalised by the round's global token count.
"""

from __future__ import annotations

import time

import torch

from rlfuse.trainers.base import (BaseTrainer, _LogprobModule, check_reference_is_separate,
                                  position_ids_from_mask)
from rlfuse.trainers.config import ConfigError, PPOConfig
from rlfuse.trainers.grpo import _check_reward_funcs

__all__ = ["PPOTrainer", "ValueModel"]


class ValueModel(torch.nn.Module):
    """A causal LM's transformer body with a scalar head: ``values [B, T]``, where
    ``values[:, t]`` is the value of the state after token ``t``.

    ``hidden_size``: the width of the body's output (``last_hidden_state``).  The head's
    parameters are stored in ``dtype`` (default: the body's floating dtype), so a bfloat16
    model keeps one parameter dtype (what FSDP2 needs within a root, and what the
    optimizer sees for the rest of the model); the head's matmul always runs in float32
    (hidden states and head parameters upcast), so values, and the value loss computed
    from them, are float32 whatever the model's dtype."""

    def __init__(self, backbone, hidden_size: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.backbone = backbone
        if dtype is None:
            dtype = next((p.dtype for p in backbone.parameters() if p.is_floating_point()),
                         torch.float32)
        self.head = torch.nn.Linear(hidden_size, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, model):
        """A value model whose body is a copy of ``model``'s (head initialised to 0).  The
        head's width is the input width of ``model``'s lm_head (what the body outputs:
        e.g. OPT with ``word_embed_proj_dim != hidden_size`` projects its hidden states
        down before the lm_head), else ``config.hidden_size``."""
        import copy

        base = copy.deepcopy(model.base_model)
        width = None
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        w = getattr(out, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            width = int(w.shape[1])
        if width is None:
            width = model.config.hidden_size
        return cls(base, width)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=False)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        w, b = self.head.weight, self.head.bias
        v = torch.nn.functional.linear(h.to(torch.float32), w.to(torch.float32),
                                       None if b is None else b.to(torch.float32))
        # a copy, not a view (FSDP2 hooks the outputs for backward and warns about views)
        return v.squeeze(-1).clone()


class PPOTrainer(BaseTrainer):
    """``PPOTrainer(model, reward_funcs, args=PPOConfig(...), train_dataset=...,
    tokenizer=None, ref_model=None, value_model=None)``.

    ``value_model``: a :class:`ValueModel` (or any module mapping ``(input_ids,
    attention_mask, position_ids)`` to ``[B, T]`` values); default: a copy of the policy's
    body with a zero-initialised head.  ``ref_model`` is required when ``kl_coef > 0``
    (or a second copy is loaded from ``model``'s path).
    """

    config_class = PPOConfig
    algorithm = "ppo"

    def __init__(self, model, reward_funcs, args: PPOConfig | None = None, train_dataset=None,
                 tokenizer=None, ref_model=None, value_model=None):
        self.reward_funcs = _check_reward_funcs(reward_funcs)
        self._ref_arg = ref_model
        self._value_arg = value_model
        self._model_arg = model
        super().__init__(model, args, train_dataset, tokenizer)

    def _check_more(self):
        a = self.args
        if a.reward_weights is not None and len(a.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights: {len(a.reward_weights)} weights for "
                              f"{len(self.reward_funcs)} reward functions")
        if a.kl_coef > 0 and self._ref_arg is None and not isinstance(self._model_arg, str):
            raise ConfigError("kl_coef > 0 needs a reference model: pass ref_model= (e.g. "
                              "copy_reference(model)) or give model as a path, or set kl_coef=0")
        if a.kl_coef == 0 and self._ref_arg is not None:
            raise ConfigError("ref_model is given but kl_coef == 0 (it would never be used): "
                              "drop ref_model, or set kl_coef > 0")
        if a.kl_coef > 0:
            check_reference_is_separate(self._model_arg, self._ref_arg)
        if self._value_arg is not None and not isinstance(self._value_arg, torch.nn.Module):
            raise ConfigError(f"value_model must be a torch.nn.Module, got "
                              f"{type(self._value_arg).__name__}")

    def _setup_models(self):
        from transformers import AutoModelForCausalLM

        ref = self._ref_arg
        if self.args.kl_coef > 0:
            if ref is None or isinstance(ref, str):
                ref = AutoModelForCausalLM.from_pretrained(ref or self._model_arg)
            self.ref_model = ref.to(self.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            if self.fsdp:
                self._fully_shard(_LogprobModule(self.ref_model), runs=self.ref_model)
        else:
            self.ref_model = None
        vm = self._value_arg if self._value_arg is not None else ValueModel.from_causal_lm(self.model)
        self.value_model = vm.to(self.device).train()
        self.model.train()
        self.policy = self._wrap_distributed(_LogprobModule(self.model), runs=self.model)
        self.value = self._wrap_distributed(self.value_model)
        self._make_optimizer(self._params())

    def _trainable_modules(self):
        return {"model": self.model, "value_model": self.value_model}

    def _resume_fields(self):
        return super()._resume_fields() + ("num_ppo_epochs",)

    def _items_per_round(self):
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def _steps_per_round(self):
        return self.args.num_ppo_epochs

    def completion_values(self, module, r):
        """``[B, C]``: the value of the state before each completion token."""
        attn = r.attention_mask
        module = self._root(module)
        v = module(r.input_ids, attn, position_ids_from_mask(attn))
        self._reshard(module)
        P = r.prompt_ids.size(1)
        return v[:, P - 1:-1]

    def make_rollout(self, rows):
        from rlfuse.ops import gae, kl_penalty, masked_whiten, token_rewards

        a = self.args
        r = self.generate([row["prompt"] for row in rows], 1)
        r.columns = {k: [row[k] for row in rows] for k in rows[0] if k != "prompt"}
        scores, per_func, n_none = self.score(r)
        r.extra["rewards"] = scores
        r.extra["rewards_per_func"] = per_func
        r.extra["n_none"] = torch.full((len(scores),), float(n_none))
        # a sample whose every reward function returned None is left out of the update
        keep = ~torch.isnan(scores)
        r.completion_mask = r.completion_mask * keep.long().to(self.device).unsqueeze(1)
        mask = r.completion_mask
        t0 = time.perf_counter()
        with torch.no_grad():
            old_logp = self.batched_logprobs(self.model, r)
            old_values = torch.cat([
                self.completion_values(self.value_model, r.select(slice(i, i + a.per_device_train_batch_size)))
                for i in range(0, len(r.prompts), a.per_device_train_batch_size)], 0)
            if self.ref_model is not None:
                ref_logp = self.batched_logprobs(self.ref_model, r)
                kl = kl_penalty(old_logp, ref_logp, a.kl_estimator)
            else:
                kl = torch.zeros_like(old_logp)
        self._time("old_logprobs_values", t0)
        t0 = time.perf_counter()
        s = torch.nan_to_num(scores, nan=0.0).to(torch.float32).to(self.device)
        rewards = token_rewards(s, mask, kl=kl, kl_coef=a.kl_coef)
        if a.whiten_rewards and int(mask.sum()) > 1:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        adv, returns = gae(rewards, old_values, mask, gamma=a.gamma, lam=a.lam,
                           semantics="zero_masked")
        if int(mask.sum()) > 1:
            adv = masked_whiten(adv, mask)
        self._time("advantages", t0)
        r.extra.update(old_logp=old_logp, old_values=old_values, advantages=adv,
                       returns=returns, kl=kl)
        return r

    def micro_batch_loss(self, mb, global_tokens: float):
        from rlfuse.ops import policy_loss, value_loss

        a = self.args
        t0 = time.perf_counter()
        logp, ent = self.completion_logprobs(self.policy, mb, return_entropy=True)
        values = self.completion_values(self.value, mb)
        self._time("policy_forward", t0)
        mask = mb.completion_mask
        agg = dict(loss_agg_mode="token-mean", global_num_tokens=max(global_tokens, 1.0),
                   dp_size=self.world_size)
        t0 = time.perf_counter()
        pg, stats = policy_loss(logp, mb.extra["old_logp"], mb.extra["advantages"], mask,
                                variant="ppo", epsilon=a.cliprange, **agg)
        vl, vstats = value_loss(values, mb.extra["old_values"], mb.extra["returns"], mask,
                                cliprange_value=a.cliprange_value, **agg)
        loss = pg + a.vf_coef * vl
        self._time("policy_loss_op", t0)
        m = mask.to(ent.dtype)
        n = m.sum().clamp(min=1)
        stats = dict(stats)
        stats["value_loss"] = vl.detach()
        stats["vf_clipfrac"] = vstats["clip_frac"]
        stats["entropy"] = (ent.detach() * m).sum() / n
        stats["kl"] = (mb.extra["kl"] * m).sum() / n
        return loss, stats

    def _round_metrics(self, r, loss, stats, metrics, t_round):
        rew = r.extra["rewards"]
        valid = ~torch.isnan(rew)
        ntok = float(r.completion_mask.sum())
        elapsed = time.perf_counter() - t_round
        m = dict(metrics)
        m.update({
            "loss": loss,
            "reward": float(rew[valid].mean()) if valid.any() else float("nan"),
            "reward_std": float(rew[valid].std()) if valid.sum() > 1 else 0.0,
            "rewards_none": int(r.extra["n_none"][0]) if len(rew) else 0,
            "clipped_ratio": float(r.extra["truncated"].float().mean()),
            "kl": stats.get("kl", 0.0),
            "entropy": stats.get("entropy", 0.0),
            "pg_loss": stats.get("pg_loss", 0.0),
            "value_loss": stats.get("value_loss", 0.0),
            "clip_ratio": stats.get("clip_frac", 0.0),
            "vf_clipfrac": stats.get("vf_clipfrac", 0.0),
            "approx_kl": stats.get("approx_kl", 0.0),
            "completion_length": ntok / max(1, len(r.prompts)),
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
