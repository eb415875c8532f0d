"""Per-sequence sums and means of token log-probabilities (DPO, GSPO, sequence-level KL).

    sequence_logprobs(token_ids, *, logits=None, hidden=None, weight=None, bias=None,
                      mask=None, cu_seqlens=None, temperature=1.0, return_entropy=False,
                      ignore_index=-100, chunk_size=None, backend=None) -> SequenceLogprobs
    reduce_sequences(values, *, mask=None, cu_seqlens=None) -> (sum, mean, count)

Two layouts:
    padded  ``[B, T]`` positions with an optional ``mask [B, T]`` (1 = counted); one
            sequence per row.
    packed  a 1-D token stream ``[N]`` (or ``[1, N]``) with ``cu_seqlens [S + 1]`` (int,
            0 = cu[0] <= cu[1] <= ... <= cu[S] = N) marking where each sequence starts; an
            optional ``mask [N]``.
The token log-probs come from :func:`token_logprobs` (``logits=``) or
:func:`linear_token_logprobs` (``hidden=``, ``weight=``).  Positions whose id is
``ignore_index`` are not counted.  No label shift is done here: pass logits / hidden
already aligned with ``token_ids`` (``rlfuse.models.hf`` does the shift for HF models).

    sum[s]   = sum of logp over the counted positions of sequence s
    count[s] = number of counted positions
    mean[s]  = sum[s] / count[s]   (0 for a sequence with no counted position)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from rlfuse import _backend, _validate

__all__ = ["SequenceLogprobs", "reduce_sequences", "sequence_logprobs"]

_OP = "sequence_logprobs"


class SequenceLogprobs(NamedTuple):
    sum: torch.Tensor              # [S] per-sequence sum of token log-probs
    mean: torch.Tensor             # [S] per-sequence mean over counted tokens
    count: torch.Tensor            # [S] int64 number of counted tokens
    token_logprobs: torch.Tensor   # per-token log-probs, layout of token_ids
    entropy: Optional[torch.Tensor] = None  # per-token entropy when return_entropy


def _mask_tensor(op: str, mask, shape, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    _validate.tensor(op, "mask", mask)
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool, integer or floating (0/1), got {mask.dtype}")
    _validate.shape_equals(op, "mask", mask, shape, "the token layout")
    if mask.device != device:
        raise ValueError(f"{op}: mask is on {mask.device} but the tokens are on {device}")
    return mask != 0


def _check_masked_ids(ids: torch.Tensor, m: torch.Tensor, V: int, ignore_index: int,
                      op: str) -> None:
    """Raise as the token op ``op`` would for an out-of-range id at a masked position (the
    op itself only saw ignore_index there).  Skipped where the values are not readable
    (torch.compile tracing, FakeTensorMode, meta / fake tensors)."""
    if _backend.library_op_needed(ids, m):
        return
    bad = (~m) & ((ids < 0) | (ids >= V)) & (ids != ignore_index)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"{op}: token_ids must lie in [0, {V}) or equal ignore_index={ignore_index}; "
            f"position {first} (flattened) holds {int(ids.reshape(-1)[first])}"
        )


def _segments(op: str, cu_seqlens, n: int, device) -> torch.Tensor:
    """Sequence index of every packed position (fixed size n, no data-dependent shape)."""
    _validate.int_tensor(op, "cu_seqlens", cu_seqlens)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{op}: cu_seqlens must be 1-D [S + 1] with S >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}")
    cu = cu_seqlens.long()
    if int(cu[0]) != 0 or int(cu[-1]) != n or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(
            f"{op}: cu_seqlens must start at 0, be non-decreasing and end at the number of "
            f"packed positions ({n}); got {cu_seqlens.tolist() if cu.numel() <= 16 else '...'}"
        )
    pos = torch.arange(n, device=device)
    return torch.searchsorted(cu[1:], pos, right=True)


def reduce_sequences(values: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
                     cu_seqlens: Optional[torch.Tensor] = None, _op: str = "reduce_sequences"):
    """Per-sequence ``(sum, mean, count)`` of per-token ``values``.

    ``values`` is ``[B, T]`` (padded; one sequence per row) or, with ``cu_seqlens``, a
    packed ``[N]`` / ``[1, N]`` stream.  ``mask`` (same shape, nonzero = counted) selects
    the positions; masked-out positions never contribute, even when they hold NaN.
    Differentiable in ``values``.
    """
    _validate.float_tensor(_op, "values", values)
    m = _mask_tensor(_op, mask, values.shape, values.device)
    if cu_seqlens is None:
        if values.dim() != 2:
            raise ValueError(
                f"{_op}: values must be [B, T] for the padded layout (or pass cu_seqlens for a "
                f"packed stream), got shape {tuple(values.shape)}"
            )
        if m is None:
            s = values.sum(-1)
            count = torch.full((values.size(0),), values.size(1), dtype=torch.int64,
                               device=values.device)
        else:
            s = torch.where(m, values, torch.zeros((), dtype=values.dtype,
                                                   device=values.device)).sum(-1)
            count = m.sum(-1, dtype=torch.int64)
    else:
        if values.dim() == 2 and values.size(0) == 1:
            values = values.reshape(-1)
            m = None if m is None else m.reshape(-1)
        if values.dim() != 1:
            raise ValueError(
                f"{_op}: values must be a packed [N] (or [1, N]) stream when cu_seqlens is "
                f"given, got shape {tuple(values.shape)}"
            )
        n = values.numel()
        seg = _segments(_op, cu_seqlens, n, values.device)
        S = cu_seqlens.numel() - 1
        v = values if m is None else torch.where(
            m, values, torch.zeros((), dtype=values.dtype, device=values.device))
        s = torch.zeros(S, dtype=values.dtype, device=values.device).index_add(0, seg, v)
        ones = torch.ones(n, dtype=torch.int64, device=values.device) if m is None else m.long()
        count = torch.zeros(S, dtype=torch.int64, device=values.device).index_add(0, seg, ones)
    mean = s / count.clamp(min=1).to(s.dtype)
    return s, mean, count


def sequence_logprobs(
    token_ids: torch.Tensor,
    *,
    logits: Optional[torch.Tensor] = None,
    hidden: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> SequenceLogprobs:
    """Per-sequence sums and means of token log-probs, padded or packed.

    Args:
        token_ids: ``[B, T]`` (padded) or ``[N]`` / ``[1, N]`` (packed, with ``cu_seqlens``).
        logits: ``[..., V]`` logits aligned with ``token_ids`` (uses :func:`token_logprobs`),
            or
        hidden, weight, bias: final hidden states ``[..., H]`` and the lm_head (uses
            :func:`linear_token_logprobs`, never materialising the logits).
        mask: optional, shape of ``token_ids``; nonzero = counted.  Positions holding
            ``ignore_index`` are never counted.  Masked positions go to the token op as
            ``ignore_index``: they are not computed (no lm_head matmul), give 0 in
            ``token_logprobs`` / ``entropy`` and no gradient, so NaN hidden states or
            logits there (padding) stay out of every result; their ids are still checked.
        cu_seqlens: ``[S + 1]`` sequence boundaries of a packed stream.
        temperature, return_entropy, ignore_index, chunk_size, backend: as in the token ops
            (``chunk_size`` only for the ``hidden`` path).

    Returns:
        :class:`SequenceLogprobs` ``(sum, mean, count, token_logprobs, entropy)``.
    """
    from rlfuse.ops.linear_logprob import linear_token_logprobs
    from rlfuse.ops.logprob import token_logprobs

    _validate.int_tensor(_OP, "token_ids", token_ids)
    if cu_seqlens is None and token_ids.dim() != 2:
        raise ValueError(
            f"{_OP}: token_ids must be [B, T] for the padded layout (or pass cu_seqlens for a "
            f"packed stream), got shape {tuple(token_ids.shape)}"
        )
    if cu_seqlens is not None and not (
        token_ids.dim() == 1 or (token_ids.dim() == 2 and token_ids.size(0) == 1)
    ):
        raise ValueError(
            f"{_OP}: token_ids must be a packed [N] or [1, N] stream when cu_seqlens is given, "
            f"got shape {tuple(token_ids.shape)}"
        )
    if (logits is None) == (hidden is None):
        raise ValueError(f"{_OP}: pass exactly one of logits= or hidden= (with weight=)")
    ignore_index = _validate.integer(_OP, "ignore_index", ignore_index)
    ids = _validate.ids_for_ignore_index(token_ids, ignore_index)
    m = _mask_tensor(_OP, mask, token_ids.shape, token_ids.device)
    # Masked positions go to the token ops as ignore_index: they never enter the forward or
    # the backward (no matmul on the hidden= path, a zero gradient row on the logits= path),
    # so a NaN there (padding) cannot reach the gradients.  Their ids are checked below.
    ids_k = ids if m is None else ids.masked_fill(~m, ignore_index)
    if logits is not None:
        if weight is not None or bias is not None:
            raise ValueError(f"{_OP}: weight= and bias= go with hidden=, not with logits=")
        if chunk_size is not None:
            raise ValueError(f"{_OP}: chunk_size= applies to the hidden= path only")
        out = token_logprobs(
            logits, ids_k, temperature=temperature, return_entropy=return_entropy,
            ignore_index=ignore_index, backend=backend,
        )
    else:
        if weight is None:
            raise ValueError(f"{_OP}: weight= (the lm_head [V, H]) is required with hidden=")
        out = linear_token_logprobs(
            hidden, weight, ids_k, bias=bias, temperature=temperature,
            return_entropy=return_entropy, ignore_index=ignore_index, chunk_size=chunk_size,
            backend=backend,
        )
    if m is not None:  # the ids of masked positions are checked as the token ops check theirs
        _check_masked_ids(ids, m, logits.size(-1) if logits is not None else weight.size(0),
                          ignore_index, "token_logprobs" if logits is not None
                          else "linear_token_logprobs")
    lp, ent = out if return_entropy else (out, None)
    counted = ids_k != ignore_index
    s, mean, count = reduce_sequences(lp, mask=counted, cu_seqlens=cu_seqlens, _op=_OP)
    return SequenceLogprobs(s, mean, count, lp, ent)
