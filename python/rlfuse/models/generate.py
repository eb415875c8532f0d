"""Sampling completions from a Hugging Face causal LM with a lean decode loop.

    sample(model, input_ids, attention_mask, *, max_new_tokens, eos_token_id, pad_token_id,
           num_samples=1, temperature=1.0, top_p=1.0, top_k=0, generator=None,
           sampler="cdf") -> [B * num_samples, P + n] ids

does what ``model.generate(do_sample=True, num_return_sequences=num_samples,
temperature=..., top_p=..., top_k=..., max_new_tokens=...)`` does for a left-padded batch,
with the same numbers: a prefill that keeps only the last position's logits, then one
forward per new token on the KV cache; logits in float32, divided by the temperature, cut
to the ``top_k`` largest and to the ``top_p`` nucleus the way ``transformers``' warpers do,
then one draw per row.  A row that has produced an eos token gets ``pad_token_id`` from then
on (and stays attended, as in ``generate``); the loop stops when every row is done or after
``max_new_tokens``.  Output rows are the ``num_samples`` samples of prompt 0, then of
prompt 1, ...

Two things make it cheaper than ``generate`` besides the leaner loop:

* the prompt is encoded once, not ``num_samples`` times: the prefill runs on the ``B``
  prompts, and its KV cache and last logits are repeated for the samples (GRPO's
  ``num_generations`` share one prefill);
* ``sampler="cdf"`` draws a token by inverting the CDF of the row's probabilities with one
  uniform number per row (a cumulative sum and a binary search), where
  ``torch.multinomial`` draws an exponential variate per vocabulary entry.  The
  distribution is the same (tested); the random stream is not.  ``sampler="multinomial"``
  uses ``torch.multinomial`` as ``generate`` does: with the same seed and ``num_samples=1``
  the tokens then equal ``generate``'s (tested).

What it leaves out is the machinery ``generate`` runs around every token for features a
trainer's rollout does not use: the logits-processor and stopping-criteria lists, the
model-kwargs update and input preparation, the streamer and output bookkeeping.  Those
cost about as much as a tiny model's forward.  The model's own ``generation_config``
(repetition penalty, bad words, ...) is not applied: the caller's arguments are the whole
sampling configuration, as in the trainers' configs.

:func:`supports` says whether a model can run this loop (a forward that takes
``past_key_values`` and ``use_cache``); the trainers fall back to ``generate`` otherwise.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["sample", "supports", "warp_logits"]


def _forward_params(model) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def supports(model) -> bool:
    """True when ``model``'s forward takes a KV cache (``past_key_values``, ``use_cache``)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return False
    p = _forward_params(model)
    return {"past_key_values", "use_cache", "attention_mask"} <= p


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """``transformers``' temperature, top-k and top-p warpers in that order (in place on a
    float32 ``[B, V]`` tensor the caller owns): removed tokens get ``-inf``."""
    if temperature != 1.0:
        logits.div_(temperature)
    V = logits.size(-1)
    if top_k and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        # ascending sort; drop the tokens whose cumulative probability stays <= 1 - top_p,
        # always keeping the most likely one
        s, idx = torch.sort(logits, dim=-1, descending=False)
        cum = s.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[..., -1] = False
        logits.masked_fill_(drop.scatter(1, idx, drop), float("-inf"))
    return logits


def _draw(probs: torch.Tensor, sampler: str, generator) -> torch.Tensor:
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    cdf = probs.cumsum_(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device,
                   dtype=probs.dtype)
    # right=True: a uniform that lands on a plateau (a removed token) goes to the next
    # token with mass; the clamp guards the last entry against rounding in the sum
    idx = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return idx.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _eos_tensor(eos_token_id, device) -> Optional[torch.Tensor]:
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    return torch.tensor([int(i) for i in ids], device=device)


@torch.no_grad()
def sample(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
           max_new_tokens: int, eos_token_id: Union[int, Sequence[int], None],
           pad_token_id: Optional[int], num_samples: int = 1, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, generator: Optional[torch.Generator] = None,
           sampler: str = "cdf", all_done: Optional[Callable[[bool], bool]] = None
           ) -> torch.Tensor:
    """Each prompt ``num_samples`` times followed by up to ``max_new_tokens`` sampled ids,
    ``[B * num_samples, P + n]`` (``n <= max_new_tokens``: the loop stops early when every
    row has ended).  ``all_done(local_done) -> bool``: with several processes that must run
    the same number of forwards (FSDP), whether every process is done (an all-reduce);
    a process whose rows are done keeps stepping with pad tokens until then."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("sample: input_ids must be a non-empty [B, P] tensor")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"sample: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not (temperature > 0):
        raise ValueError(f"sample: temperature must be > 0, got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample: top_k must be an int >= 0, got {top_k!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"sample: num_samples must be a positive int, got {num_samples!r}")
    if sampler not in ("cdf", "multinomial"):
        raise ValueError(f"sample: sampler must be 'cdf' or 'multinomial', got {sampler!r}")
    B0, P = input_ids.shape
    B = B0 * num_samples
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("sample: attention_mask must have the shape of input_ids")
    eos = _eos_tensor(eos_token_id, dev)
    if eos is not None and pad_token_id is None:
        raise ValueError("sample: pad_token_id is required with eos_token_id")
    params = _forward_params(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    use_pos = "position_ids" in params

    # the whole mask up front: new positions are attended (as generate does, pads included)
    mask = torch.ones(B, P + max_new_tokens, dtype=attention_mask.dtype, device=dev)
    ids = torch.empty(B, P + max_new_tokens, dtype=input_ids.dtype, device=dev)
    rep = (lambda x: x.repeat_interleave(num_samples, 0)) if num_samples > 1 else (lambda x: x)
    mask[:, :P] = rep(attention_mask)
    ids[:, :P] = rep(input_ids)
    kw = dict(attention_mask=attention_mask, use_cache=True, **keep)
    if use_pos:
        pos = attention_mask.long().cumsum(-1) - 1
        pos.masked_fill_(attention_mask == 0, 1)
        kw["position_ids"] = pos
        next_pos = rep(pos[:, -1:] + 1)
    out = model(input_ids=input_ids, **kw)
    last = out.logits[:, -1, :]
    cache = out.past_key_values
    if num_samples > 1:
        last = rep(last)
        cache.batch_repeat_interleave(num_samples)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    n = 0
    for t in range(max_new_tokens):
        logits = last.to(dtype=torch.float32, copy=True)
        warp_logits(logits, temperature, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        nxt = _draw(probs, sampler, generator)
        if eos is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad_token_id))
        ids[:, P + t] = nxt
        n = t + 1
        if n == max_new_tokens:
            break
        if eos is not None:
            unfinished &= ~torch.isin(nxt, eos)
            done = not bool(unfinished.any())
            if all_done is not None:
                done = all_done(done)
            if done:
                break
        kw = dict(attention_mask=mask[:, :P + t + 1], past_key_values=cache, use_cache=True,
                  **keep)
        if use_pos:
            kw["position_ids"] = next_pos
            next_pos = next_pos + 1
        out = model(input_ids=nxt.unsqueeze(1), **kw)
        last, cache = out.logits[:, -1, :], out.past_key_values
    return ids[:, :P + n]
