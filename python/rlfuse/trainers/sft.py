"""Supervised warm-up: teach a (tiny) causal LM the answer format before RL.

    supervised_warmup(model, tokenizer, examples, *, steps, batch_size, learning_rate, seed)

Each example is a dict with ``prompt`` and ``solution`` (the columns of
:mod:`rlfuse.tasks`); the model is trained on ``prompt + solution + eos`` with the loss on
the solution and eos tokens only (mean negative log-likelihood over those tokens), through
:func:`rlfuse.models.causal_lm_token_logprobs` (no ``[tokens, vocab]`` logits).
"""

from __future__ import annotations

import math
import numbers
import random

import torch

__all__ = ["supervised_warmup", "encode_supervised"]


def encode_supervised(tokenizer, examples, *, max_length=None, max_prompt_length=None,
                      device="cpu"):
    """Right-padded ``(input_ids, attention_mask, completion_mask, position_ids)`` for
    ``prompt + solution + eos``; ``completion_mask`` marks the solution and eos tokens.
    A prompt longer than ``max_prompt_length`` keeps its last tokens; a row longer than
    ``max_length`` is cut at the end."""
    rows, comps = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id; supervised warm-up needs one")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "prompt" not in ex or "solution" not in ex:
            raise ValueError(f"examples[{i}] must be a dict with 'prompt' and 'solution'")
        p = tokenizer(ex["prompt"])["input_ids"]
        if max_prompt_length is not None:
            p = p[-max_prompt_length:]
        s = tokenizer(ex["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = p + s
        c = [0] * len(p) + [1] * len(s)
        if max_length is not None:
            ids, c = ids[:max_length], c[:max_length]
        rows.append(ids)
        comps.append(c)
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), T, dtype=torch.long)
    comp = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, c) in enumerate(zip(rows, comps)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        comp[i, : len(c)] = torch.tensor(c)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), comp.to(device), pos.to(device)


def supervised_loss(model, input_ids, attention_mask, completion_mask, position_ids=None):
    """Mean negative log-likelihood of the completion tokens (fused log-probs)."""
    from rlfuse.models.hf import causal_lm_token_logprobs

    logp = causal_lm_token_logprobs(model, input_ids, attention_mask=attention_mask,
                                    completion_mask=completion_mask, position_ids=position_ids)
    m = completion_mask.to(logp.dtype)
    return -(logp * m).sum() / m.sum().clamp(min=1)


def supervised_warmup(model, tokenizer, examples, *, steps: int, batch_size: int,
                      learning_rate: float, seed: int = 0, weight_decay: float = 0.0,
                      max_grad_norm: float | None = 1.0, log_every: int = 0,
                      callback=None) -> list[float]:
    """Train ``model`` in place for ``steps`` AdamW steps on random mini-batches of
    ``examples`` (drawn with ``seed``); returns the loss of every step.

    The learning rate decays linearly to 10% over the steps.  ``callback(step, loss)`` is
    called after every step when given; ``log_every > 0`` prints the loss.
    """
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    def _number(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if not _number(learning_rate) or not math.isfinite(learning_rate) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a finite positive number, got {learning_rate!r}")
    if max_grad_norm is not None and (not _number(max_grad_norm)
                                      or not math.isfinite(max_grad_norm)
                                      or not max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be None (no clipping) or a finite positive "
                         f"number, got {max_grad_norm!r}")
    if not _number(weight_decay) or not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    examples = list(examples)
    if not examples:
        raise ValueError("examples is empty")
    device = next(model.parameters()).device
    rng = random.Random(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                            lr=learning_rate, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(steps, 1))
    was_training = model.training
    model.train()
    losses = []
    for step in range(steps):
        batch = [examples[rng.randrange(len(examples))] for _ in range(batch_size)]
        ids, attn, comp, pos = encode_supervised(tokenizer, batch, device=device)
        loss = supervised_loss(model, ids, attn, comp, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
        if log_every and (step + 1) % log_every == 0:
            print(f"warm-up step {step + 1}/{steps}  loss {losses[-1]:.4f}", flush=True)
    model.train(was_training)
    return losses
