"""Hugging Face causal LMs: per-token log-probs of completions without ``model(...).logits``.

    causal_lm_token_logprobs(model, input_ids, *, attention_mask=None, completion_mask=None,
                             position_ids=None, cu_seqlens=None, temperature=1.0,
                             return_entropy=False, chunk_size=None, backend=None,
                             **model_kwargs)

runs the base model (``model.base_model``) to get the last hidden state, takes the output
embedding (``model.get_output_embeddings()``, weight and bias) and computes, through
:func:`rlfuse.ops.linear_token_logprobs`,

    out[..., t] = log p(input_ids[t] | the tokens before t in the same sequence)

for every *scored* position t, and 0 elsewhere.  The result is aligned with ``input_ids``
(the label shift is done here).  A position is scored when

  * it has a predecessor in the same sequence: t > 0, and in the padded layout both t and
    t - 1 are real tokens (``attention_mask``; left or right padding), in the packed
    layout t is not the first token of a sequence (``cu_seqlens`` / ``position_ids``), so
    a sequence's first token is never predicted from the previous sequence's last one;
  * and ``completion_mask[t]`` is nonzero (default: every such position).

Only the hidden states of scored positions go through the lm_head, so prompt and padding
rows cost no matmul.  ``transformers`` is not imported by this module.

A packed stream runs as one row (no attention mask, restarting position ids, from which
``transformers``' masking utilities build the block-diagonal mask) only for the model
types checked to do so (:func:`packed_runs_natively`); other models (OPT, Falcon, BLOOM,
MPT, XGLM, ... build a plain causal mask over the whole stream, so its sequences would
attend to each other) run the stream's sequences as a right-padded batch, and the numbers
equal each sequence run alone.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from rlfuse import _validate

__all__ = ["causal_lm_completion_logprobs", "causal_lm_token_logprobs", "packed_runs_natively",
           "scored_positions"]

_OP = "causal_lm_token_logprobs"


def _packed_starts_from_cu(cu_seqlens: torch.Tensor, n: int) -> torch.Tensor:
    _validate.int_tensor(_OP, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{_OP}: cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"{_OP}: cu_seqlens must start at 0, be non-decreasing and end at the number of "
            f"packed tokens ({n})"
        )
    starts = torch.zeros(n, dtype=torch.bool, device=cu.device)
    starts[cu[:-1][cu[:-1] < n]] = True
    return starts


def scored_positions(input_ids: torch.Tensor, *, attention_mask=None, completion_mask=None,
                     position_ids=None, cu_seqlens=None) -> torch.Tensor:
    """Bool mask (shape of ``input_ids``) of the positions whose token is predicted and
    scored by :func:`causal_lm_token_logprobs`; see the module docstring."""
    scored = _layout(input_ids, attention_mask, completion_mask, position_ids, cu_seqlens)[0]
    return scored.reshape(input_ids.shape)


# Model types whose forward, given a packed stream as one row with restarting position ids
# and no attention mask, keeps the sequences apart (they pass the position ids to
# transformers' masking utilities, which build the block-diagonal mask from them).  Each
# was checked under eager attention and, where the model has it, SDPA (transformers 5.23;
# sliding windows included for Mistral, Qwen2, Gemma 2/3 and GPT-Neo; a few are tested in
# tests/models/test_hf_logprobs.py).  Not here: OPT, Falcon, BLOOM, MPT and XGLM, which
# mask causally over the whole stream, and every type not checked.
_PACKED_MODEL_TYPES = frozenset({
    "apertus", "arcee", "codegen", "exaone4", "gemma", "gemma2", "gemma3_text", "glm", "gpt2",
    "gpt_bigcode", "gpt_neo", "gpt_neox", "gptj", "granite", "helium", "hunyuan_v1_dense",
    "llama", "ministral", "mistral", "mixtral", "olmo", "olmo2", "olmoe", "phi", "phi3",
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "smollm3", "stablelm",
    "starcoder2",
})


def _is_transformers_model(m) -> bool:
    """Whether ``m``'s class is ``transformers``' own (not remote code), looking through
    wrapper classes that torch makes (FSDP2's ``FSDP<Model>``)."""
    for cls in type(m).__mro__:
        if not cls.__module__.startswith("torch."):
            return cls.__module__.startswith("transformers.models.")
    return False


def packed_runs_natively(model) -> bool:
    """True when :func:`causal_lm_token_logprobs` runs a packed stream of ``model`` as one
    row (its sequences kept apart by the position ids): a ``transformers`` model of a type
    checked to do so, under eager or SDPA attention, with a ``transformers`` that detects
    packed position ids.  Otherwise the stream's sequences run as a padded batch."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _PACKED_MODEL_TYPES:
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("eager", "sdpa"):
        return False
    base = getattr(model, "base_model", model)
    if not (_is_transformers_model(model) and _is_transformers_model(base)):
        return False
    masking = sys.modules.get("transformers.masking_utils")
    return masking is not None and hasattr(masking, "find_packed_sequence_indices")


def _packed_as_padded(base, ids2, pos, starts, kwargs):
    """The base model's last hidden state ``[1, N, H]`` for a packed stream, computed on its
    sequences as a right-padded ``[S, L]`` batch (each sequence as if run alone)."""
    dev = ids2.device
    T = ids2.size(1)
    seq = starts.long().cumsum(0) - 1                         # [T] sequence of each token
    first = torch.nonzero(starts).squeeze(1)                  # [S] start of each sequence
    off = torch.arange(T, device=dev) - first[seq]            # [T] offset in its sequence
    S, L = first.numel(), int(off.max()) + 1
    ids = ids2.new_zeros(S, L)
    ids[seq, off] = ids2[0]
    am = torch.zeros(S, L, dtype=torch.long, device=dev)
    am[seq, off] = 1
    pp = torch.zeros(S, L, dtype=pos.dtype, device=dev)
    pp[seq, off] = pos[0]
    out = base(input_ids=ids, attention_mask=am, position_ids=pp, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[seq, off].unsqueeze(0)


def _layout(input_ids, attention_mask, completion_mask, position_ids, cu_seqlens):
    """(scored [B, T] bool, input_ids [B, T], position_ids or None, attention_mask or None,
    sequence starts [T] bool for the packed layout or None)."""
    _validate.int_tensor(_OP, "input_ids", input_ids)
    # Packed: cu_seqlens, or position_ids without attention_mask on one stream ([N] or
    # [1, N]); a [B, T] batch with B > 1 is padded (its position_ids go to the model).
    one_stream = input_ids.dim() == 1 or (input_ids.dim() == 2 and input_ids.size(0) == 1)
    packed = cu_seqlens is not None or (
        position_ids is not None and attention_mask is None and one_stream)
    ids2 = input_ids
    if input_ids.dim() == 1:
        if not packed:
            raise ValueError(
                f"{_OP}: a 1-D input_ids is a packed stream: pass cu_seqlens or position_ids"
            )
        ids2 = input_ids.unsqueeze(0)
    if ids2.dim() != 2 or ids2.numel() == 0:
        raise ValueError(
            f"{_OP}: input_ids must be a non-empty [B, T] (padded) or [1, N] / [N] (packed), "
            f"got shape {tuple(input_ids.shape)}"
        )
    B, T = ids2.shape
    dev = ids2.device
    comp = None
    if completion_mask is not None:
        _validate.tensor(_OP, "completion_mask", completion_mask)
        if completion_mask.numel() != ids2.numel() or completion_mask.shape[-1] != T:
            raise ValueError(
                f"{_OP}: completion_mask must have the shape of input_ids "
                f"{tuple(input_ids.shape)}, got {tuple(completion_mask.shape)}"
            )
        comp = completion_mask.reshape(B, T) != 0
    pos = None
    am = None
    if packed:
        if B != 1:
            raise ValueError(
                f"{_OP}: a packed batch must be one stream [1, N] or [N], got {tuple(input_ids.shape)}"
            )
        if attention_mask is not None:
            raise ValueError(
                f"{_OP}: pass either attention_mask (padded) or cu_seqlens / position_ids "
                "(packed), not both"
            )
        if cu_seqlens is not None:
            starts = _packed_starts_from_cu(cu_seqlens.to(dev), T)
            seq_start = torch.cummax(
                torch.where(starts, torch.arange(T, device=dev), torch.zeros_like(starts, dtype=torch.long)), 0
            ).values
            derived = torch.arange(T, device=dev) - seq_start
            if position_ids is None:
                pos = derived.unsqueeze(0)
            else:
                pos = position_ids.reshape(1, T)
                if not torch.equal(pos[0].long(), derived):
                    raise ValueError(
                        f"{_OP}: position_ids do not restart at the sequence starts given by "
                        "cu_seqlens"
                    )
        else:
            _validate.int_tensor(_OP, "position_ids", position_ids)
            if position_ids.numel() != T:
                raise ValueError(
                    f"{_OP}: position_ids must have the shape of input_ids, got "
                    f"{tuple(position_ids.shape)}"
                )
            pos = position_ids.reshape(1, T)
            p = pos[0].long()
            # A sequence starts wherever the positions do not continue by +1 (as HF does).
            starts = torch.ones(T, dtype=torch.bool, device=dev)
            starts[1:] = p[1:] != p[:-1] + 1
        has_prev = ~starts.unsqueeze(0)
    else:
        starts = None
        if attention_mask is not None:
            _validate.tensor(_OP, "attention_mask", attention_mask)
            _validate.shape_equals(_OP, "attention_mask", attention_mask, (B, T), "input_ids")
            am = attention_mask
            real = attention_mask != 0
        else:
            real = torch.ones(B, T, dtype=torch.bool, device=dev)
        has_prev = torch.zeros(B, T, dtype=torch.bool, device=dev)
        has_prev[:, 1:] = real[:, 1:] & real[:, :-1]
        pos = position_ids
    scored = has_prev if comp is None else has_prev & comp
    return scored, ids2, pos, am, starts


def _configs(cfg) -> list:
    """``cfg`` and, for composite models, its text config."""
    out = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # some configs raise when they have no text part
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def _check_no_logit_transform(model) -> None:
    """Refuse models whose logits are transformed after the lm_head (soft-capping or a
    multiplier): the fused path computes ``hidden @ W.T + b`` only.  Both the top-level
    config and the text config of composite models are checked."""
    for c in _configs(getattr(model, "config", None)):
        for name in ("final_logit_softcapping", "logit_softcapping"):
            if getattr(c, name, None) not in (None, 0, 0.0):
                raise ValueError(
                    f"{_OP}: the model's config sets {name}; soft-capped logits are not supported"
                )
        for name in ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier"):
            if getattr(c, name, None) not in (None, 1, 1.0):
                raise ValueError(
                    f"{_OP}: the model's config sets {name} (logits are rescaled after the "
                    "lm_head); call linear_token_logprobs with the temperature that undoes "
                    "the scaling instead"
                )


def causal_lm_token_logprobs(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    completion_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    **model_kwargs,
):
    """Per-token log-probs (and entropy) of the scored tokens of a HF causal LM.

    Args:
        model: a ``transformers`` causal LM (``...ForCausalLM``) with ``base_model`` and
            ``get_output_embeddings()``.
        input_ids: ``[B, T]`` padded batch, or a packed stream ``[1, N]`` / ``[N]``.
        attention_mask: ``[B, T]`` (padded layout; left or right padding).
        completion_mask: shape of ``input_ids``; nonzero marks the tokens to score (e.g.
            the completion); default: every token that has a predecessor.
        position_ids: packed layout: positions restarting at 0 for each sequence (where
            :func:`packed_runs_natively`, ``transformers`` builds the block-diagonal
            attention from them; otherwise the sequences run as a padded batch); padded
            layout: passed to the model.
        cu_seqlens: packed layout: ``[S + 1]`` sequence boundaries (position ids are
            derived from it when not given).
        temperature, return_entropy, chunk_size, backend: as in
            :func:`rlfuse.ops.linear_token_logprobs`.
        **model_kwargs: passed to the base model.

    Returns:
        float32 ``logp`` of the shape of ``input_ids`` (0 at unscored positions), or
        ``(logp, entropy)``.  Use :func:`scored_positions` for the mask of scored positions.
    """
    from rlfuse.ops.linear_logprob import linear_token_logprobs

    _check_no_logit_transform(model)
    scored, ids2, pos, am, starts = _layout(input_ids, attention_mask, completion_mask,
                                            position_ids, cu_seqlens)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None or not hasattr(head, "weight"):
        raise TypeError(
            f"{_OP}: model must be a Hugging Face causal LM with a base model and an output "
            f"embedding (lm_head), got {type(model).__name__}"
        )
    kwargs = dict(model_kwargs)
    kwargs.setdefault("use_cache", False)
    if starts is not None and not (packed_runs_natively(model) and not kwargs["use_cache"]
                                   and kwargs.get("past_key_values") is None):
        # (transformers looks for packed sequences only when it has no cache)
        hidden = _packed_as_padded(base, ids2, pos, starts, kwargs)
    else:
        out = base(input_ids=ids2, attention_mask=am, position_ids=pos, **kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    weight = head.weight
    bias = getattr(head, "bias", None)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)

    B, T = ids2.shape
    sel = scored[:, 1:]                     # position t >= 1 is predicted from hidden[t - 1]
    h_sel = hidden[:, :-1][sel]             # [M, H]: only the scored rows reach the lm_head
    y_sel = ids2[:, 1:][sel]
    zeros = torch.zeros(B, T - 1, dtype=torch.float32, device=hidden.device)
    if y_sel.numel() == 0:
        # zeros that stay connected to the graph (an empty sum: no NaN from the hidden)
        anchor = hidden[:, :0].sum().float() + weight[:0].sum().float()
        full = torch.zeros(B, T, dtype=torch.float32, device=hidden.device) + anchor
        res = (full, full.clone()) if return_entropy else full
        return _reshape(res, input_ids)
    res = linear_token_logprobs(
        h_sel, weight, y_sel, bias=bias, temperature=temperature,
        return_entropy=return_entropy, chunk_size=chunk_size, backend=backend,
    )
    vals = res if return_entropy else (res,)
    outs = []
    for v in vals:
        shifted = zeros.to(v.dtype).masked_scatter(sel, v)
        outs.append(torch.cat([torch.zeros(B, 1, dtype=v.dtype, device=v.device), shifted], 1))
    return _reshape(tuple(outs) if return_entropy else outs[0], input_ids)


def _reshape(res, input_ids):
    if isinstance(res, tuple):
        return tuple(r.reshape(input_ids.shape) for r in res)
    return res.reshape(input_ids.shape)


def _prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """(first row of each run of identical consecutive prompts [U], run of each row [B])."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], 1)
    _, inv, counts = torch.unique_consecutive(key, dim=0, return_inverse=True,
                                              return_counts=True)
    first = counts.cumsum(0) - counts
    return first, inv


def _can_share(base, prompt_mask) -> bool:
    if base.training and getattr(base, "gradient_checkpointing", False):
        return False            # HF turns the cache off under gradient checkpointing
    try:
        import inspect

        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False
    if not {"past_key_values", "use_cache", "position_ids"} <= set(params):
        return False
    return bool(prompt_mask[:, -1].all())     # left-padded prompts end on a real token


def _shared_cache_ok(cache) -> bool:
    """Only plain per-layer key/value caches are indexed by row here (no sliding windows,
    no quantised or offloaded layers)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer
                                               for layer in cache.layers)


def causal_lm_completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    share_prompts: bool = True,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
):
    """Per-token log-probs ``[B, C]`` (and entropies) of right-padded completions after
    left-padded prompts, with each prompt encoded once per run of identical rows.

    GRPO samples ``num_generations`` completions per prompt, so a batch holds every prompt
    ``G`` times in consecutive rows.  With ``share_prompts`` (default) the base model runs
    on each distinct prompt once, keeping its KV cache; the cache rows are then repeated
    for the prompt's completions (an index, differentiable) and the completions run on it.
    The prompt tokens' share of the forward and backward work drops by a factor ``G``.  The
    result equals
    ``causal_lm_token_logprobs(model, cat(prompt_ids, completion_ids),
    attention_mask=cat(prompt_mask, completion_mask), completion_mask=cat(0, completion_mask),
    position_ids=positions counted over real tokens)[:, P:]`` up to rounding, gradients
    included (tested).  It falls back to that call when no rows repeat, when the model's
    forward takes no cache, under gradient checkpointing, when a prompt row does not end
    on a real token, or when the cache is not a plain ``DynamicCache`` (sliding windows,
    quantised or offloaded layers).

    A completion token is scored when its ``completion_mask`` entry is nonzero and the token
    before it is real (the prompt's last token, or a completion token with a nonzero mask).
    """
    from rlfuse.ops.linear_logprob import linear_token_logprobs

    for name, t in (("prompt_ids", prompt_ids), ("prompt_mask", prompt_mask),
                    ("completion_ids", completion_ids), ("completion_mask", completion_mask)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"causal_lm_completion_logprobs: {name} must be a 2-D tensor")
    B, P = prompt_ids.shape
    C = completion_ids.size(1)
    if prompt_mask.shape != (B, P) or completion_mask.shape != (B, C) or \
            completion_ids.size(0) != B or P == 0 or C == 0:
        raise ValueError(
            "causal_lm_completion_logprobs: prompt_ids/prompt_mask must be [B, P] and "
            "completion_ids/completion_mask [B, C] with P, C > 0, got "
            f"{tuple(prompt_ids.shape)}, {tuple(prompt_mask.shape)}, "
            f"{tuple(completion_ids.shape)}, {tuple(completion_mask.shape)}")
    _check_no_logit_transform(model)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None or not hasattr(head, "weight"):
        raise TypeError(
            "causal_lm_completion_logprobs: model must be a Hugging Face causal LM with a base "
            f"model and an output embedding (lm_head), got {type(model).__name__}")
    attn = torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], 1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    first = inv = None
    if share_prompts and B > 1 and _can_share(base, prompt_mask):
        first, inv = _prompt_groups(prompt_ids, prompt_mask)
        if first.numel() == B:
            first = None
    out1 = None
    if first is not None:
        out1 = base(input_ids=prompt_ids[first], attention_mask=prompt_mask[first],
                    position_ids=pos[first, :P], use_cache=True)
        if not _shared_cache_ok(getattr(out1, "past_key_values", None)):
            out1 = None
    if out1 is None:
        ids = torch.cat([prompt_ids, completion_ids], 1)
        comp = torch.cat([torch.zeros_like(prompt_mask), completion_mask], 1)
        res = causal_lm_token_logprobs(model, ids, attention_mask=attn, completion_mask=comp,
                                       position_ids=pos, temperature=temperature,
                                       return_entropy=return_entropy, chunk_size=chunk_size,
                                       backend=backend)
        return tuple(r[:, P:] for r in res) if return_entropy else res[:, P:]
    cache = out1.past_key_values
    cache.batch_select_indices(inv)
    out2 = base(input_ids=completion_ids, attention_mask=attn, position_ids=pos[:, P:],
                past_key_values=cache, use_cache=True)
    h1 = out1.last_hidden_state[:, -1:]               # [U, 1, H]: predicts completion token 0
    h2 = out2.last_hidden_state[:, :-1]               # [B, C - 1, H]: predicts tokens 1..C-1
    hidden = torch.cat([h1[inv], h2], 1)              # [B, C, H]
    weight, bias = head.weight, getattr(head, "bias", None)
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    cm = completion_mask != 0
    sel = cm & torch.cat([torch.ones_like(cm[:, :1]), cm[:, :-1]], 1)
    y_sel = completion_ids[sel]
    if y_sel.numel() == 0:
        anchor = hidden[:, :0].sum().float() + weight[:0].sum().float()
        full = torch.zeros(B, C, dtype=torch.float32, device=hidden.device) + anchor
        return (full, full.clone()) if return_entropy else full
    res = linear_token_logprobs(hidden[sel], weight, y_sel, bias=bias, temperature=temperature,
                                return_entropy=return_entropy, chunk_size=chunk_size,
                                backend=backend)
    vals = res if return_entropy else (res,)
    outs = [torch.zeros(B, C, dtype=v.dtype, device=v.device).masked_scatter(sel, v)
            for v in vals]
    return tuple(outs) if return_entropy else outs[0]
