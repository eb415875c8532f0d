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
  uniform number per row (a cumulative sum and a binary search, both in float64: a float32
  running sum rounds each cumulative probability to its spacing, ~6e-8 near 1, which at a
  vocabulary of 152k moves the distribution by a total variation of ~1e-3 and gives some
  tokens no chance at all), where ``torch.multinomial`` draws an exponential variate per
  vocabulary entry.  The distribution is the same (tested); the random stream is not.
  ``sampler="multinomial"`` uses ``torch.multinomial`` as ``generate`` does: with the same
  seed and ``num_samples=1`` the tokens then equal ``generate``'s (tested).

Per decode step it also spares the model two costs that do not change the numbers: a plain
``DynamicCache`` gets layers that append into buffers preallocated for the whole sequence
(a view of the filled part is what attention reads) instead of concatenating the cache at
every token, and models of the checked types whose layers all use full attention (under
SDPA or eager attention) get the 4D padding mask ready-made, in the format
``transformers`` would build for them; other models (ALiBi ones such as BLOOM, sliding
windows, composite models, unchecked types) get the 2D mask and build their own.

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


def _draw(probs: torch.Tensor, sampler: str, generator, u: Optional[torch.Tensor] = None,
          buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row of ``probs`` ([B, V], need not sum to 1).  ``"cdf"``: the first
    token whose cumulative probability exceeds ``u * total``, the running sum and the
    scaled draw in float64 (float32 where the device has no float64: MPS); ``u``: the
    uniforms ([B, 1] or [B]; drawn from ``generator`` when None); ``buf``: a [B, V]
    buffer of that dtype to hold the sums (reused across a rollout's steps: a fresh one
    per step costs more than the sum)."""
    if sampler == "multinomial":
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
    # A float32 running sum cannot hold a cumulative probability more finely than its
    # spacing (6e-8 near 1): at V = 152k the rounding moves the distribution by a total
    # variation of ~1e-3 and leaves some tokens no interval at all.  In float64 the sum's
    # error is below 1e-11 (V * 2^-53).
    dt = _cdf_dtype(probs.device)
    if buf is None or buf.shape != probs.shape or buf.dtype != dt or buf.device != probs.device:
        buf = torch.empty(probs.shape, dtype=dt, device=probs.device)
    # (copy, then sum in place: cumsum(dtype=, out=) is several times slower on the CPU)
    cdf = buf.copy_(probs).cumsum_(-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        # (torch.multinomial raises on these too)
        raise RuntimeError("sample: the model produced non-finite logits (NaN or inf "
                           "probabilities); no token can be drawn")
    if u is None:
        u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=dt)
    else:
        u = u.reshape(probs.shape[0], 1).to(device=probs.device, dtype=dt, copy=True)
    # right=True: a uniform that lands on a plateau (a removed token) goes to the next
    # token with mass; the clamp guards the last entry against rounding in the sum
    idx = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)
    return idx.squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _cdf_dtype(device) -> torch.dtype:
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _growing_cache(cache, capacity: int) -> bool:
    """Swap every layer of a plain ``DynamicCache`` for one that appends into a buffer of
    ``capacity`` positions (no concatenation per token; attention reads a view of exactly
    the filled positions).  False, and nothing changed, for other caches."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    if type(cache) is not DynamicCache or not cache.layers or \
            any(type(layer) is not DynamicLayer or not layer.is_initialized
                for layer in cache.layers):
        return False
    cache.layers = [_BufferLayer(layer.keys, layer.values, capacity) for layer in cache.layers]
    return True


def _buffer_layer_class():
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are views of the first ``length``
        positions of preallocated buffers (grown by doubling if ever exceeded)."""

        def __init__(self, keys, values, capacity):
            super().__init__()
            B, H, L, D = keys.shape
            cap = max(capacity, L)
            self.kbuf = keys.new_empty(B, H, cap, D)
            self.vbuf = values.new_empty(B, H, cap, values.shape[-1])
            self.kbuf[:, :, :L] = keys
            self.vbuf[:, :, :L] = values
            self.length = L
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.keys, self.values = self.kbuf[:, :, :L], self.vbuf[:, :, :L]

        def update(self, key_states, value_states, *args, **kwargs):
            L, n = self.length, key_states.shape[-2]
            if L + n > self.kbuf.shape[2]:
                cap = max(2 * self.kbuf.shape[2], L + n)
                for name in ("kbuf", "vbuf"):
                    old = getattr(self, name)
                    new = old.new_empty(*old.shape[:2], cap, old.shape[-1])
                    new[:, :, :L] = old[:, :, :L]
                    setattr(self, name, new)
            self.kbuf[:, :, L:L + n] = key_states
            self.vbuf[:, :, L:L + n] = value_states
            self.length = L + n
            self.keys, self.values = self.kbuf[:, :, :L + n], self.vbuf[:, :, :L + n]
            return self.keys, self.values

    return BufferLayer


_BUFFER_LAYER = None


def _BufferLayer(keys, values, capacity):
    global _BUFFER_LAYER
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _buffer_layer_class()
    return _BUFFER_LAYER(keys, values, capacity)


# Model types whose decoder builds its attention mask from the 2D padding mask only through
# transformers' masking utilities (``create_causal_mask``), which take a ready 4D mask as it
# is, and uses the 2D mask for nothing else.  Each was checked to give ``generate``'s tokens
# with the ready mask (transformers 5.23; eager and, where the model has it, SDPA; a few are
# tested in tests/models/test_generate.py).  Not here, so they get the
# 2D mask: BLOOM, MPT and Falcon with ``alibi=True`` (ALiBi biases built from the 2D mask),
# composite models such as Gemma3ForConditionalGeneration, and every type not checked.
_MASK4D_MODEL_TYPES = frozenset({
    "apertus", "arcee", "codegen", "exaone4", "falcon", "gemma", "gemma2", "gemma3_text",
    "glm", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite", "helium",
    "hunyuan_v1_dense", "llama", "ministral", "mistral", "mixtral", "olmo", "olmo2", "olmoe",
    "opt", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "smollm3",
    "stablelm", "starcoder2",
})


def _decode_mask_kind(model) -> Optional[str]:
    """How to hand the decode steps a ready 4D padding mask: ``"bool"`` for SDPA,
    ``"additive"`` for eager attention (the formats ``transformers`` builds for them), or
    None: the 2D mask, from which the model builds its own.  A ready mask is given only
    to ``transformers``' own models of a type in ``_MASK4D_MODEL_TYPES`` with full
    attention in every layer (no ALiBi, no sliding windows, chunked or hybrid attention,
    in the model's config or its text config)."""
    cfg = getattr(model, "config", None)
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return None
    from rlfuse.models.hf import _configs, _is_transformers_model

    if getattr(cfg, "model_type", None) not in _MASK4D_MODEL_TYPES or \
            not _is_transformers_model(model):
        return None
    for c in _configs(cfg):
        if getattr(c, "alibi", False):
            return None
        layer_types = getattr(c, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            return None
        if getattr(c, "sliding_window", None) and getattr(c, "use_sliding_window", True):
            return None
        for name in ("attention_chunk_size", "sliding_window_pattern", "attention_type"):
            if getattr(c, name, None) not in (None, "global"):
                return None
    return "bool" if impl == "sdpa" else "additive"


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
           sampler: str = "cdf", all_done: Optional[Callable[[bool], bool]] = None,
           lean: Optional[bool] = None) -> torch.Tensor:
    """Each prompt ``num_samples`` times followed by up to ``max_new_tokens`` sampled ids,
    ``[B * num_samples, P + n]`` (``n <= max_new_tokens``: the loop stops early when every
    row has ended).  ``all_done(local_done) -> bool``: with several processes that must run
    the same number of forwards (FSDP), whether every process is done (an all-reduce);
    a process whose rows are done keeps stepping with pad tokens until then.  ``lean``:
    run the decode steps with :class:`rlfuse.models.decode.LeanDecoder` (None: when it
    supports the model; True: raise if it does not; False: the model's forward)."""
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
    if lean not in (None, True, False):
        raise ValueError(f"sample: lean must be None, True or False, got {lean!r}")
    if sampler not in ("cdf", "multinomial"):
        raise ValueError(f"sample: sampler must be 'cdf' or 'multinomial', got {sampler!r}")
    B0, P = input_ids.shape
    B = B0 * num_samples
    dev = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError("sample: attention_mask must have the shape of input_ids")
    empty = (attention_mask == 0).all(1)
    if bool(empty.any()):
        raise ValueError(f"sample: attention_mask row {int(empty.nonzero()[0])} has no real "
                         "token (an empty prompt; the tokenizer adds no BOS)")
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
    cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise ValueError(f"sample: {type(model).__name__} returned no KV cache with "
                         "use_cache=True; sample with model.generate instead")
    dec = None
    if lean is not False and max_new_tokens > 1:
        # the lean decoder takes the prefill's cache (repeating it for the samples itself)
        from rlfuse.models.decode import _why_not, lean_decoder

        if use_pos and all_done is None:
            dec = lean_decoder(model, B, P + max_new_tokens)
        if lean and dec is None:
            why = ("needs position ids" if not use_pos else "runs on one process only"
                   if all_done is not None else
                   _why_not(model, P + max_new_tokens) or "needs rlfuse._C")
            raise ValueError(f"sample: lean=True but the lean decoder cannot run "
                             f"{type(model).__name__} ({why})")
    if num_samples > 1:
        last = rep(last)
    if dec is not None and not dec.cache_fits(cache, num_samples):
        if lean:
            raise ValueError(f"sample: lean=True but {type(model).__name__}'s prefill "
                             "cache is not one the lean decoder takes")
        dec = None
    if dec is not None:
        dec.load_cache(cache, num_samples)
        cache = out = None   # the prefill's cache is no longer needed
        dec.mask[:, :mask.shape[1]] = mask
        dec.pos.copy_(next_pos[:, 0])
    else:
        if num_samples > 1:
            cache.batch_repeat_interleave(num_samples)
        _growing_cache(cache, P + max_new_tokens)
    # a ready [B, 1, 1, L] padding mask for the one-token steps (a view per step), in the
    # format the attention kernel gets from transformers, which then builds none itself
    kind = _decode_mask_kind(model) if dec is None else None
    step_mask = None
    if kind is not None:
        step_mask = mask.bool()[:, None, None, :]
        if kind == "additive":
            dt = getattr(model, "dtype", torch.float32)
            step_mask = torch.zeros(step_mask.shape, dtype=dt, device=dev).masked_fill_(
                ~step_mask, torch.finfo(dt).min)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    cdf_buf = None          # the CDF sampler's float64 sums, one buffer for every step
    n = 0
    for t in range(max_new_tokens):
        # (the lean decoder's logits are a fresh float32 tensor: no copy needed)
        logits = last if dec is not None and t > 0 else last.to(dtype=torch.float32, copy=True)
        warp_logits(logits, temperature, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if sampler == "cdf" and cdf_buf is None:
            cdf_buf = torch.empty(probs.shape, dtype=_cdf_dtype(dev), device=dev)
        nxt = _draw(probs, sampler, generator, buf=cdf_buf)
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
        if dec is not None:
            last = dec.step(nxt, P + t)
            dec.pos += 1
            continue
        am = mask[:, :P + t + 1] if step_mask is None else step_mask[..., :P + t + 1]
        kw = dict(attention_mask=am, past_key_values=cache, use_cache=True, **keep)
        if use_pos:
            kw["position_ids"] = next_pos
            next_pos = next_pos + 1
        out = model(input_ids=nxt.unsqueeze(1), **kw)
        last, cache = out.logits[:, -1, :], out.past_key_values
    return ids[:, :P + n]
