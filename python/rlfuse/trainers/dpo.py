"""DPO (and the other DPO-family losses of :func:`rlfuse.ops.preference_loss`) on a
Hugging Face causal LM.

The dataset has ``prompt``, ``chosen`` and ``rejected`` columns (text).  Each pair is
encoded as ``prompt + chosen + eos`` and ``prompt + rejected + eos`` (chosen rows first,
TRL's order); the sequence log-probs are the sums of the completion tokens' log-probs from
:func:`rlfuse.models.causal_lm_token_logprobs` (fused lm_head, no logits).  The reference
model's log-probs are computed once for the whole dataset before training (TRL's
``precompute_ref_log_probs``), so the reference model is not needed afterwards.  Each step
accumulates ``gradient_accumulation_steps`` micro-batches of
``per_device_train_batch_size`` pairs; the loss is the mean over the step's pairs.
"""

from __future__ import annotations

import time

import torch

from rlfuse.trainers.base import BaseTrainer, _LogprobModule, check_reference_is_separate
from rlfuse.trainers.config import ConfigError, DPOConfig
from rlfuse.trainers.sft import encode_supervised

__all__ = ["DPOTrainer"]


class DPOTrainer(BaseTrainer):
    """``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=...,
    tokenizer=None)``.  ``ref_model`` may be a model, a path, or None (a copy is loaded
    from ``model``'s path; not needed when every type of ``loss_type`` is one of the
    reference-free ``sft``, ``simpo``, ``orpo``)."""

    config_class = DPOConfig
    algorithm = "dpo"
    required_columns = ("prompt", "chosen", "rejected")

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None,
                 tokenizer=None):
        self._ref_arg = ref_model
        self._model_arg = model
        super().__init__(model, args, train_dataset, tokenizer)

    def _check_more(self):
        from rlfuse.ops.preference import REFERENCE_FREE_TYPES

        self._needs_ref = any(t not in REFERENCE_FREE_TYPES for t in self.args.loss_types())
        if self._needs_ref and self._ref_arg is None and not isinstance(self._model_arg, str):
            raise ConfigError(f"loss_type={self.args.loss_type!r} needs a reference model: "
                              "pass ref_model= (e.g. copy_reference(model)) or give model as "
                              "a path")
        if self._needs_ref:
            check_reference_is_separate(self._model_arg, self._ref_arg)

    def _setup_models(self):
        self.model.train()
        self.policy = self._wrap_distributed(_LogprobModule(self.model), runs=self.model)
        self._make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.ref_logps = None
        if self._needs_ref:
            ref = self._ref_arg
            if ref is None or isinstance(ref, str):
                from transformers import AutoModelForCausalLM

                ref = AutoModelForCausalLM.from_pretrained(ref or self._model_arg)
            ref = ref.to(self.device).eval()
            if self.fsdp:       # sharded too; it is only needed for this pass
                ref = self._fully_shard(_LogprobModule(ref), runs=ref)
            t0 = time.perf_counter()
            self.ref_logps = self._precompute(ref)
            self._time("ref_logprobs", t0)

    def _items_per_round(self):
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    def encode(self, rows, idx=None):
        """``(input_ids, attention_mask, completion_mask, position_ids)`` of ``[2P, T]``:
        chosen rows, then rejected rows.  Raises ``ValueError`` naming the dataset row
        (``idx``: the rows' dataset indices) when truncation to ``max_length`` left a
        completion without tokens (the pair would train on nothing, or on one side only)."""
        a = self.args
        ex = ([{"prompt": r["prompt"], "solution": r["chosen"]} for r in rows]
              + [{"prompt": r["prompt"], "solution": r["rejected"]} for r in rows])
        out = encode_supervised(self.tokenizer, ex, max_length=a.max_length,
                                max_prompt_length=a.max_prompt_length, device=self.device)
        empty = (out[2].sum(1) == 0).nonzero()
        if len(empty):
            j = int(empty[0])
            P = len(rows)
            row = int(idx[j % P]) if idx is not None else j % P
            side = "chosen" if j < P else "rejected"
            raise ValueError(
                f"train_dataset row {row}: the {side} completion has no tokens left after "
                f"truncation to max_length={a.max_length} (max_prompt_length="
                f"{a.max_prompt_length}): raise max_length, or set max_prompt_length below it")
        return out

    def sequence_logps(self, module, rows, idx=None):
        """(chosen [P], rejected [P], chosen lengths, rejected lengths)."""
        ids, attn, comp, pos = self.encode(rows, idx)
        if not isinstance(module, _LogprobModule) and not isinstance(
                getattr(module, "module", None), _LogprobModule):
            module = _LogprobModule(module)
        logp = module(ids, attn, comp, pos, 1.0, False)
        seq = (logp * comp.to(logp.dtype)).sum(1)
        lens = comp.sum(1)
        P = len(rows)
        return seq[:P], seq[P:], lens[:P], lens[P:]

    @torch.no_grad()
    def _precompute(self, ref):
        """Reference (chosen, rejected) log-probs of every dataset row, ``[N, 2]``."""
        N = len(self.train_dataset)
        mb = self.args.per_device_train_batch_size
        out = torch.empty(N, 2, dtype=torch.float32, device=self.device)
        for i in range(0, N, mb):
            rows = [self.train_dataset[j] for j in range(i, min(N, i + mb))]
            c, r, _, _ = self.sequence_logps(ref, rows, list(range(i, i + len(rows))))
            out[i:i + len(rows), 0] = c
            out[i:i + len(rows), 1] = r
        return out

    def _next_rows(self):
        rows = super()._next_rows()
        # the dataset indices of these rows, for the precomputed reference log-probs
        n = self._items_per_round()
        start = self.state["position"] - n * self.world_size + self.rank * n
        self._row_idx = self._perm[1][start:start + n]
        return rows

    def micro_batch_loss(self, rows, idx):
        from rlfuse.ops import preference_loss

        a = self.args
        t0 = time.perf_counter()
        c, r, lc, lr = self.sequence_logps(self.policy, rows, idx)
        self._time("policy_forward", t0)
        ref = self.ref_logps[idx] if self.ref_logps is not None else None
        t0 = time.perf_counter()
        loss, stats = preference_loss(
            c, r, None if ref is None else ref[:, 0], None if ref is None else ref[:, 1],
            loss_type=a.loss_type, loss_weights=a.loss_weights, beta=a.beta,
            label_smoothing=a.label_smoothing, chosen_lengths=lc, rejected_lengths=lr)
        self._time("policy_loss_op", t0)
        return loss / a.gradient_accumulation_steps, stats

    def accumulate_gradients(self, rows, idx):
        import contextlib

        mb = self.args.per_device_train_batch_size
        starts = list(range(0, len(rows), mb))
        total, acc = 0.0, {}
        for k, i in enumerate(starts):
            with contextlib.ExitStack() as stack:
                self._sync_gradients(stack, k == len(starts) - 1)
                loss, stats = self.micro_batch_loss(rows[i:i + mb],
                                                    torch.as_tensor(idx[i:i + mb]))
                t0 = time.perf_counter()
                loss.backward()
                self._time("backward", t0)
            total += float(loss.detach())
            for key, v in stats.items():
                acc[key] = acc.get(key, 0.0) + float(v.float().mean()) / len(starts)
        return total, acc

    def _train_round(self):
        t0 = time.perf_counter()
        rows = self._next_rows()
        loss, stats = self.accumulate_gradients(rows, self._row_idx)
        metrics = {"step": self.state["global_step"] + 1}
        self._optimizer_step(loss, metrics)
        self.state["global_step"] += 1
        metrics.update({
            "loss": loss,
            "rewards/chosen": stats["chosen_rewards"],
            "rewards/rejected": stats["rejected_rewards"],
            "rewards/margins": stats["margins"],
            "rewards/accuracies": stats["accuracies"],
            "lr": self.scheduler.get_last_lr()[0],
            "step_time": time.perf_counter() - t0,
        })
        return [metrics]
