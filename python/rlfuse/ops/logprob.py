"""Token log-probabilities and entropy from logits.

    token_logprobs(logits, token_ids, *, temperature=1.0, return_entropy=False,
                   ignore_index=-100, backend=None)

For every position (all leading dimensions of ``logits``), with z = logits / temperature:

    logp    = z[y] - logsumexp(z)                         (log-probability of token y)
    entropy = -sum_v p_v log p_v,  p = softmax(z)          (if return_entropy)

Positions whose id equals ``ignore_index`` give 0 for both and no gradient.  The result is
float32 (float64 for float64 logits); accumulation is float32 whatever the input dtype.  No
``[..., V]`` log-softmax is ever materialised: each row is read once with an online max /
sum-exp.  The fused backward for both outputs is

    dlogits = (g_lp * (onehot(y) - p) - g_ent * p * (log p + H)) / temperature

computed in float32 and written in the logits' dtype.

Three files hold this op: this module (reference, torch.library op, dispatch),
``csrc/cpu/logprob.cpp`` / ``csrc/cuda/logprob.cu`` and ``kernels/logprob.py`` (Triton).
"""

from __future__ import annotations

from typing import Optional

import torch

from rlfuse import _backend, _validate

__all__ = ["token_logprobs", "token_logprobs_reference"]

_OP = "token_logprobs"


# --------------------------------------------------------------------------------------
# Reference (the specification).  Plain torch, written for clarity; differentiable.
# --------------------------------------------------------------------------------------
def token_logprobs_reference(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """Materialising reference: ``log_softmax`` then ``gather``.

    Computes in float64 for float64 logits, else float32.  Returns ``logp`` or
    ``(logp, entropy)`` like :func:`token_logprobs`.
    """
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(acc) / temperature
    logsm = torch.log_softmax(z, dim=-1)
    ignored = token_ids == ignore_index
    safe_ids = token_ids.masked_fill(ignored, 0).long()
    logp = logsm.gather(-1, safe_ids.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return logp
    p = logsm.exp()
    # p log p := 0 where p == 0 (z = -inf); keep the -inf out of the graph so the
    # gradient stays finite there.
    finite_logsm = torch.where(torch.isneginf(logsm), torch.zeros_like(logsm), logsm)
    entropy = -(p * finite_logsm).sum(-1)
    return logp, entropy.masked_fill(ignored, 0.0)


def _reference_backward(logits, token_ids, lse, entropy, g_lp, g_ent, temperature, ignore_index):
    """The fused backward formula in plain torch (used by backend='torch')."""
    acc = lse.dtype
    z = logits.to(acc) / temperature
    logp_all = z - lse.unsqueeze(-1)
    p = logp_all.exp()
    d = torch.zeros_like(z)
    ignored = token_ids == ignore_index
    if g_lp is not None:
        onehot = torch.zeros_like(z)
        onehot.scatter_(-1, token_ids.masked_fill(ignored, 0).long().unsqueeze(-1), 1.0)
        d = d + g_lp.unsqueeze(-1) * (onehot - p)
    if g_ent is not None:
        plogp = torch.where(p > 0, p * (logp_all + entropy.unsqueeze(-1)), torch.zeros_like(p))
        d = d - g_ent.unsqueeze(-1) * plogp
    d = d.masked_fill(ignored.unsqueeze(-1), 0.0) / temperature
    return d.to(logits.dtype)


# --------------------------------------------------------------------------------------
# Row geometry: describe the leading dimensions as (n_outer, n_inner) rows with two
# strides, so that views such as logits[:, :-1] need no copy.
# --------------------------------------------------------------------------------------
def _row_geometry(logits: torch.Tensor):
    """Return (logits, n_outer, n_inner, stride_outer, stride_inner); copies only if the
    last dimension is strided or the leading dims cannot be described by two strides."""
    if logits.stride(-1) != 1 and logits.size(-1) > 1:
        logits = logits.contiguous()
    dims = [(s, st) for s, st in zip(logits.shape[:-1], logits.stride()[:-1]) if s != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1][0] *= size
            merged[-1][1] = stride
        else:
            merged.append([size, stride])
    if len(merged) > 2:
        logits = logits.contiguous()
        n = logits.numel() // max(logits.size(-1), 1)
        return logits, 1, n, 0, logits.size(-1)
    while len(merged) < 2:
        merged.insert(0, [1, 0])
    (n_outer, s_outer), (n_inner, s_inner) = merged
    return logits, n_outer, n_inner, s_outer, s_inner


def _out_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _flat_ids(token_ids: torch.Tensor) -> torch.Tensor:
    ids = token_ids.reshape(-1)
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    return ids.contiguous()


def _check_ids_torch(ids: torch.Tensor, V: int, ignore_index: int) -> None:
    bad = ((ids < 0) | (ids >= V)) & (ids != ignore_index)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{_OP}: token_ids must lie in [0, {V}) or equal ignore_index={ignore_index}; "
            f"position {first} (flattened) holds {int(ids[first])}"
        )


# --------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("rlfuse::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lead = logits.shape[:-1]
    V = logits.size(-1)
    out_dtype = _out_dtype(logits)
    if backend == "torch":
        _check_ids_torch(_flat_ids(token_ids), V, ignore_index)
        z = logits.to(out_dtype) / temperature
        lse = torch.logsumexp(z, dim=-1)
        res = token_logprobs_reference(
            logits, token_ids, temperature=temperature, return_entropy=return_entropy,
            ignore_index=ignore_index,
        )
        if return_entropy:
            logp, ent = res
        else:
            logp, ent = res, logits.new_empty((0,), dtype=out_dtype)
        lse = lse.masked_fill(token_ids == ignore_index, 0.0)
        return logp.contiguous(), ent.contiguous(), lse.contiguous()

    logits, n_outer, n_inner, s_outer, s_inner = _row_geometry(logits)
    ids = _flat_ids(token_ids)
    N = ids.numel()
    logp = torch.empty(N, dtype=out_dtype, device=logits.device)
    lse = torch.empty(N, dtype=out_dtype, device=logits.device)
    ent = torch.empty(N if return_entropy else 0, dtype=out_dtype, device=logits.device)
    inv_t = 1.0 / temperature
    if N > 0:
        if backend == "cpu":
            bad = _backend.cpu_module().token_logprobs_fwd(
                logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], n_outer, n_inner,
                s_outer, s_inner, V, ids.data_ptr(), _backend.INDEX_CODES[ids.dtype],
                logp.data_ptr(), ent.data_ptr() if return_entropy else 0, lse.data_ptr(),
                inv_t, ignore_index, _backend.threads_for(N * V),
            )
            if bad >= 0:
                raise ValueError(
                    f"{_OP}: token_ids must lie in [0, {V}) or equal ignore_index="
                    f"{ignore_index}; position {bad} (flattened) holds {int(ids[bad])}"
                )
        elif backend == "cuda":
            _check_ids_torch(ids, V, ignore_index)
            with _backend.cuda_launch(logits.device) as stream:
                _backend.cuda_module().token_logprobs_fwd(
                    logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], n_outer, n_inner,
                    s_outer, s_inner, V, ids.data_ptr(), _backend.INDEX_CODES[ids.dtype],
                    logp.data_ptr(), ent.data_ptr() if return_entropy else 0, lse.data_ptr(),
                    inv_t, ignore_index, stream,
                )
        elif backend == "triton":
            _check_ids_torch(ids, V, ignore_index)
            view = logits.as_strided((n_outer, n_inner, V), (s_outer, s_inner, 1))
            with _backend.device_guard(logits.device):
                lp_t, ent_t, lse_t = _backend.triton_kernels("logprob").forward(
                    view, ids, inv_t, ignore_index, return_entropy
                )
            # The Triton kernels compute in float32; float64 logits get float64 outputs.
            logp, lse = lp_t.to(out_dtype), lse_t.to(out_dtype)
            if return_entropy:
                ent = ent_t.to(out_dtype)
        else:  # pragma: no cover - resolve() only returns known names
            raise RuntimeError(f"{_OP}: unknown backend {backend!r}")
    ent_out = ent.view(lead) if return_entropy else ent
    return logp.view(lead), ent_out, lse.view(lead)


@_token_logprobs_op.register_fake
def _(logits, token_ids, temperature, ignore_index, return_entropy, backend):
    lead = logits.shape[:-1]
    dt = _out_dtype(logits)
    ent = logits.new_empty(lead if return_entropy else (0,), dtype=dt)
    return logits.new_empty(lead, dtype=dt), ent, logits.new_empty(lead, dtype=dt)


@torch.library.custom_op("rlfuse::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    acc = lse.dtype
    g_lp = None if grad_logp is None else grad_logp.to(acc).reshape(-1).contiguous()
    g_ent = None if grad_entropy is None else grad_entropy.to(acc).reshape(-1).contiguous()
    if backend == "torch":
        lead = logits.shape[:-1]
        return _reference_backward(
            logits, token_ids, lse, entropy if g_ent is not None else None,
            None if g_lp is None else g_lp.view(lead),
            None if g_ent is None else g_ent.view(lead), temperature, ignore_index,
        )
    shape = logits.shape
    logits, n_outer, n_inner, s_outer, s_inner = _row_geometry(logits)
    V = logits.size(-1)
    ids = _flat_ids(token_ids)
    N = ids.numel()
    lse_f = lse.reshape(-1).contiguous()
    ent_f = entropy.reshape(-1).contiguous() if g_ent is not None else None
    inv_t = 1.0 / temperature
    if backend == "triton":
        view = logits.as_strided((n_outer, n_inner, V), (s_outer, s_inner, 1))
        with _backend.device_guard(logits.device):
            d = _backend.triton_kernels("logprob").backward(
                view, ids, lse_f, ent_f, g_lp, g_ent, inv_t, ignore_index
            )
        return d.view(shape)
    dlogits = torch.empty((N, V), dtype=logits.dtype, device=logits.device)
    if N > 0 and V > 0:
        args = (
            logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], n_outer, n_inner, s_outer,
            s_inner, V, ids.data_ptr(), _backend.INDEX_CODES[ids.dtype], lse_f.data_ptr(),
            ent_f.data_ptr() if ent_f is not None else 0,
            g_lp.data_ptr() if g_lp is not None else 0,
            g_ent.data_ptr() if g_ent is not None else 0,
            dlogits.data_ptr(), inv_t, ignore_index,
        )
        if backend == "cpu":
            _backend.cpu_module().token_logprobs_bwd(*args, _backend.threads_for(N * V))
        else:
            with _backend.cuda_launch(logits.device) as stream:
                _backend.cuda_module().token_logprobs_bwd(*args, stream)
    return dlogits.view(shape)


@_token_logprobs_backward_op.register_fake
def _(logits, token_ids, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, token_ids, temperature, ignore_index, return_entropy, backend = inputs
    _, ent, lse = output
    ctx.save_for_backward(logits, token_ids, lse, ent)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)
    # Unused outputs give None (not zeros), so the backward skips their terms.
    ctx.set_materialize_grads(False)


def _backward(ctx, g_lp, g_ent, _g_lse):
    logits, token_ids, lse, ent = ctx.saved_tensors
    if not ctx.return_entropy:
        g_ent = None
    dlogits = None
    if ctx.needs_input_grad[0] and (g_lp is not None or g_ent is not None):
        dlogits = _token_logprobs_backward_op(
            logits, token_ids, lse, ent, g_lp, g_ent, ctx.temperature, ctx.ignore_index,
            ctx.backend,
        )
    return dlogits, None, None, None, None, None


_token_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def token_logprobs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str | None = None,
):
    """Log-probability of ``token_ids`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[..., V]`` float32, bfloat16, float16 (or float64) scores.  Any leading
            shape; views (e.g. ``logits[:, :-1]``) are read in place without a copy.
        token_ids: integer tensor of shape ``logits.shape[:-1]``; each id in ``[0, V)`` or
            equal to ``ignore_index``.
        temperature: sampling temperature (> 0); logits are divided by it.
        return_entropy: also return the entropy of the same distribution.
        ignore_index: positions holding this id give 0 (log-prob and entropy) and no gradient.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``; default by device, or the
            ``RLFUSE_BACKEND`` environment variable.

    Returns:
        ``logp`` (float32, shape ``logits.shape[:-1]``), or ``(logp, entropy)``.
        float64 logits give float64 results.

    Raises:
        TypeError: ``logits`` not floating, ``token_ids`` not integer, non-tensor arguments.
        ValueError: shape or device mismatch, ``temperature <= 0``, ids out of range,
            empty vocabulary.
    """
    _validate.float_tensor(_OP, "logits", logits)
    _validate.int_tensor(_OP, "token_ids", token_ids)
    if logits.dim() < 1:
        raise ValueError(f"{_OP}: logits must have at least 1 dimension (the vocabulary)")
    if logits.size(-1) == 0:
        raise ValueError(f"{_OP}: logits has an empty vocabulary dimension (size 0)")
    _validate.shape_equals(
        _OP, "token_ids", token_ids, logits.shape[:-1], "logits.shape[:-1]"
    )
    _validate.same_device(_OP, "logits", logits, token_ids=token_ids)
    temperature = _validate.temperature(_OP, temperature)
    ignore_index = _validate.integer(_OP, "ignore_index", ignore_index)
    token_ids = _validate.ids_for_ignore_index(token_ids, ignore_index)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{_OP}: return_entropy must be a bool, got {type(return_entropy).__name__}")
    chosen = _backend.resolve(backend, logits.device, _OP)
    logp, ent, _ = _token_logprobs_op(
        logits, token_ids, temperature, ignore_index, return_entropy, chosen
    )
    return (logp, ent) if return_entropy else logp
