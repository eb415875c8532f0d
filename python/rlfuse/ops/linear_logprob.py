"""Fused lm_head + token log-probabilities + entropy, without materialising the logits.

    linear_token_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0,
                          return_entropy=False, ignore_index=-100, chunk_size=None,
                          fp32_grad_accum=True, backend=None)

returns what ``token_logprobs(torch.addmm(bias, hidden, weight.T), token_ids, ...)``
returns (``hidden`` flattened to [N, H]; ``hidden @ weight.T`` without a bias): the bias
is added inside the GEMM, so each logit is rounded once to the input dtype, not once for
the product and again for the sum.
The logits are computed one chunk of ``C`` rows at a time (``[C, V]``), never all at once:

forward, per chunk of C rows (all leading dims of ``hidden`` flattened to N rows; rows
whose id is ignore_index are skipped, and when there are any, each chunk's rows are
gathered into a [C, H] buffer allocated once per call, never all active rows at once):
    buf[:c] = addmm(bias, hidden[chunk], weight.T)     one BLAS / cuBLAS matmul into a
                                                       buffer allocated once per call
    logp, entropy, lse = row kernel of token_logprobs  (C++ / CUDA / Triton / torch)
    saved for backward: hidden, weight, bias, ids, lse, entropy  (O(N), never O(N x V))

backward (the upstream gradients g_lp, g_ent are only known here), per chunk:
    buf[:c] = addmm(bias, hidden[chunk], weight.T)     recomputed
    dlogits = (g_lp (onehot - p) - g_ent p (log p + H)) / T
                                                       written over buf in place (CPU and
                                                       Triton); a second buffer on CUDA,
                                                       whose kernel takes __restrict__ ptrs
    grad_weight        += dlogits.T @ hidden[chunk]    (float32 accumulator for bf16/fp16
                                                        weights when fp32_grad_accum)
    grad_bias          += dlogits.sum(0)               (float32)
    grad_hidden[chunk]  = dlogits @ weight             (with ignored rows: into the [C, H]
                                                        buffer, then index_copy_ into the
                                                        chunk's rows of grad_hidden)

The two ops (forward, backward) are ``torch.library.custom_op``s with fake and autograd
registrations, so ``torch.compile(fullgraph=True)`` traces callers and ``opcheck`` passes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from rlfuse import _backend, _validate
from rlfuse.ops.logprob import (
    _check_ids_torch,
    _flat_ids,
    _out_dtype,
    _token_logprobs_backward_op,
    _token_logprobs_op,
    token_logprobs_reference,
)

__all__ = ["linear_token_logprobs", "linear_token_logprobs_reference"]

_OP = "linear_token_logprobs"

# Budget for the per-call logits chunk buffer(s).  On the CPU the buffer is small enough
# that peak extra memory stays a small fraction of the materialised path's [N, V]
# logits + gradient; BLAS is already efficient at 64+ rows.  On a GPU bigger chunks keep
# cuBLAS busy.  Both are capped by a fraction of the free memory.
_CPU_BUDGET_BYTES = 32 << 20
_GPU_BUDGET_BYTES = 512 << 20
_ROW_MULTIPLE = 64


# --------------------------------------------------------------------------------------
# Reference (the specification): materialise the logits, then token_logprobs_reference.
# --------------------------------------------------------------------------------------
def linear_token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
):
    """``token_logprobs_reference(torch.addmm(bias, hidden, weight.T), ...)`` (materialises
    [..., V]; ``hidden @ weight.T`` without a bias).

    The logits are formed as the op forms them: the bias added inside the GEMM, one
    rounding to the input dtype.  Differentiable with plain torch autograd; the tests run
    it in float64."""
    H = hidden.size(-1)
    h2 = hidden.reshape(-1, H)
    logits = h2 @ weight.t() if bias is None else torch.addmm(bias, h2, weight.t())
    logits = logits.view(*hidden.shape[:-1], weight.size(0))
    return token_logprobs_reference(
        logits, token_ids, temperature=temperature, return_entropy=return_entropy,
        ignore_index=ignore_index,
    )


# --------------------------------------------------------------------------------------
# Chunk geometry
# --------------------------------------------------------------------------------------
def _free_bytes(device: torch.device) -> Optional[int]:
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        pass
    return None


def auto_chunk_size(N: int, V: int, H: int, elem_size: int, device, n_buffers: int = 1,
                    gather_rows: bool = False) -> int:
    """Rows per chunk when ``chunk_size=None``.

    The chunk buffer(s) ``n_buffers x C x V x elem_size`` stay within a budget (32 MiB on
    the CPU, 512 MiB on a GPU, and at most 1/8 of the free memory), and so does the
    ``C x H x elem_size`` buffer of gathered hidden rows when some rows are ignored
    (``gather_rows``; it only binds when H > n_buffers x V, so for LLM vocabularies the
    chunks are those of the path without ignored rows); C is a multiple of 64
    rows (>= 64, so the matmuls keep BLAS-efficient shapes; H does not move the optimum
    much because each matmul is already K=H deep), at most N, and the N rows are spread
    evenly over the chunks so that the last one is not a sliver.
    """
    device = torch.device(device)
    N, V = max(int(N), 1), max(int(V), 1)
    budget = _GPU_BUDGET_BYTES if device.type == "cuda" else _CPU_BUDGET_BYTES
    free = _free_bytes(device)
    if free:
        budget = min(budget, free // 8)
    rows = budget // (V * elem_size * n_buffers)
    if gather_rows:
        rows = min(rows, budget // (max(int(H), 1) * elem_size))
    rows = max(_ROW_MULTIPLE, rows // _ROW_MULTIPLE * _ROW_MULTIPLE)
    if rows >= N:
        return N
    n_chunks = -(-N // rows)
    even = -(-N // n_chunks)
    return min(N, -(-even // _ROW_MULTIPLE) * _ROW_MULTIPLE)


def _uses_second_buffer(backend: str) -> bool:
    # The CUDA backward kernel declares logits and dlogits __restrict__: no aliasing.
    # The torch reference backward returns a fresh tensor.
    return backend == "cuda"


# --------------------------------------------------------------------------------------
# Row kernels on one chunk of contiguous [c, V] logits
# --------------------------------------------------------------------------------------
def _rows_forward(backend, logits, ids, logp, ent, lse, inv_t, temperature, ignore_index,
                  return_entropy) -> int:
    """Fill logp / ent / lse ([c], out dtype) for the contiguous [c, V] chunk ``logits``.

    Returns the first row (in the chunk) whose id is out of range, or -1 (the C++ kernel
    checks ids in the same pass; other backends' ids are checked before)."""
    c, V = logits.shape
    if backend == "cpu":
        bad = _backend.cpu_module().token_logprobs_fwd(
            logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], 1, c, 0, V, V,
            ids.data_ptr(), _backend.INDEX_CODES[ids.dtype], logp.data_ptr(),
            ent.data_ptr() if return_entropy else 0, lse.data_ptr(), inv_t, ignore_index,
            _backend.threads_for(c * V),
        )
        return int(bad)
    if backend == "cuda":
        with _backend.cuda_launch(logits.device) as stream:
            _backend.cuda_module().token_logprobs_fwd(
                logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], 1, c, 0, V, V,
                ids.data_ptr(), _backend.INDEX_CODES[ids.dtype], logp.data_ptr(),
                ent.data_ptr() if return_entropy else 0, lse.data_ptr(), inv_t, ignore_index,
                stream,
            )
    elif backend == "triton":
        lp_t, ent_t, lse_t = _backend.triton_kernels("logprob").forward(
            logits.unsqueeze(0), ids, inv_t, ignore_index, return_entropy
        )
        logp.copy_(lp_t)
        lse.copy_(lse_t)
        if return_entropy:
            ent.copy_(ent_t)
    else:  # "torch": the reference row math (ids were checked up front)
        lp_t, ent_t, lse_t = _token_logprobs_op(
            logits, ids, temperature, ignore_index, return_entropy, "torch"
        )
        logp.copy_(lp_t)
        lse.copy_(lse_t)
        if return_entropy:
            ent.copy_(ent_t)
    return -1


def _rows_backward(backend, logits, ids, lse, ent, g_lp, g_ent, out, inv_t, temperature,
                   ignore_index):
    """dlogits of the contiguous [c, V] chunk; written into ``out`` (which may be
    ``logits`` itself for the cpu and triton backends).  Returns the dlogits tensor."""
    c, V = logits.shape
    if backend in ("cpu", "cuda"):
        args = (
            logits.data_ptr(), _backend.DTYPE_CODES[logits.dtype], 1, c, 0, V, V,
            ids.data_ptr(), _backend.INDEX_CODES[ids.dtype], lse.data_ptr(),
            ent.data_ptr() if g_ent is not None else 0,
            g_lp.data_ptr() if g_lp is not None else 0,
            g_ent.data_ptr() if g_ent is not None else 0,
            out.data_ptr(), inv_t, ignore_index,
        )
        if backend == "cpu":
            _backend.cpu_module().token_logprobs_bwd(*args, _backend.threads_for(c * V))
        else:
            with _backend.cuda_launch(logits.device) as stream:
                _backend.cuda_module().token_logprobs_bwd(*args, stream)
        return out
    if backend == "triton":
        # The Triton backward program loads each tile of x before storing the same tile
        # of dx, so dx may be the logits buffer itself: launch the kernel in place.
        tk = _backend.triton_kernels("logprob")
        import triton

        view = logits.unsqueeze(0)
        _, _, block_v, _, num_warps = tk._launch_params(view)
        f32 = lambda t: None if t is None else t.float()  # noqa: E731 (the kernel reads fp32)
        lse, ent, g_lp, g_ent = f32(lse), f32(ent), f32(g_lp), f32(g_ent)
        dummy = lse
        tk._logprob_bwd_kernel[(c, triton.cdiv(V, block_v))](
            view, ids, lse, ent if g_ent is not None else dummy,
            g_lp if g_lp is not None else dummy, g_ent if g_ent is not None else dummy,
            out, c, 0, V, V, float(inv_t), int(ignore_index),
            HAS_GLP=g_lp is not None, HAS_GE=g_ent is not None, BLOCK_V=block_v,
            num_warps=num_warps,
        )
        return out
    return _token_logprobs_backward_op(
        logits, ids, lse, ent, g_lp, g_ent, temperature, ignore_index, "torch"
    )


def _chunk_logits(buf, h, weight, bias):
    """buf[:c] = h @ weight.T (+ bias), one matmul into the reused buffer."""
    out = buf[: h.size(0)]
    if bias is not None:
        torch.addmm(bias, h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=out)
    return out


def _row_buffer(idx, C, H, hidden):
    """The [C, H] buffer that receives each chunk's gathered rows when rows are ignored
    (allocated once per call; the backward reuses it for the chunk's grad_hidden)."""
    if idx is None:
        return None
    return torch.empty((min(C, idx.numel()), H), dtype=hidden.dtype, device=hidden.device)


def _chunk_rows(h2, idx, s, e, hbuf):
    """Active rows s:e of ``h2``: a view when no row is ignored, else gathered into
    ``hbuf`` (never all M active rows at once)."""
    if idx is None:
        return h2[s:e]
    out = hbuf[: e - s]
    torch.index_select(h2, 0, idx[s:e], out=out)
    return out


def _add_param_grads(d, hc, grad_w, partial_w, grad_b, b_dtype):
    """grad_w += d.T @ hc (through the weight-dtype ``partial_w`` into a float32
    ``grad_w`` when given), grad_b += d.sum(0); a None gradient is skipped."""
    if grad_w is not None:
        if partial_w is None:
            grad_w.addmm_(d.t(), hc)
        else:
            torch.mm(d.t(), hc, out=partial_w)
            grad_w.add_(partial_w)
    if grad_b is not None:
        grad_b.add_(d.sum(0, dtype=b_dtype))


def _check_ids(ids: torch.Tensor, V: int, ignore_index: int) -> None:
    """One torch reduction over the ids (GPU / torch backends)."""
    try:
        _check_ids_torch(ids, V, ignore_index)
    except ValueError as exc:  # same message, this op's name
        raise ValueError(str(exc).replace("token_logprobs:", f"{_OP}:", 1)) from None


def _active_rows(ids: torch.Tensor, ignore_index: int) -> Optional[torch.Tensor]:
    """Indices of the rows whose id is not ``ignore_index``; None when no row is ignored."""
    ignored = ids == ignore_index
    if not bool(ignored.any()):
        return None
    return (~ignored).nonzero().squeeze(1)


def _device_ctx(t: torch.Tensor):
    return _backend.device_guard(t.device)


def _resolve_chunk(chunk_size: int, N: int, V: int, H: int, dtype, device, backend,
                   gather_rows: bool) -> int:
    if chunk_size > 0:
        return min(chunk_size, max(N, 1))
    esize = torch.empty((), dtype=dtype).element_size()
    return auto_chunk_size(N, V, H, esize, device, 2 if _uses_second_buffer(backend) else 1,
                           gather_rows)


# --------------------------------------------------------------------------------------
# torch.library ops
# --------------------------------------------------------------------------------------
def _linear_forward(hidden, weight, token_ids, bias, temperature, ignore_index,
                    return_entropy, chunk_size, fp32_grad_accum, backend):
    """The body of the forward op, with its arguments (a plain function, so that a
    TorchDispatchMode can see every tensor it allocates: the memory test)."""
    lead = hidden.shape[:-1]
    H = hidden.size(-1)
    V = weight.size(0)
    h2 = hidden.reshape(-1, H)
    ids = _flat_ids(token_ids)
    N = ids.numel()
    out_dtype = _out_dtype(hidden)
    dev = hidden.device
    logp = torch.zeros(N, dtype=out_dtype, device=dev)
    lse = torch.zeros(N, dtype=out_dtype, device=dev)
    ent = torch.zeros(N if return_entropy else 0, dtype=out_dtype, device=dev)
    if N > 0:
        if backend != "cpu":  # the C++ kernel checks ids in its own pass
            _check_ids(ids, V, ignore_index)
        idx = _active_rows(ids, ignore_index)
        if idx is None:
            ids_use, lp_u, ent_u, lse_u = ids, logp, ent, lse
        else:  # ignored rows (prompt, padding) cost no matmul at all
            ids_use = ids.index_select(0, idx)
            n_active = idx.numel()
            lp_u = torch.empty(n_active, dtype=out_dtype, device=dev)
            lse_u = torch.empty(n_active, dtype=out_dtype, device=dev)
            ent_u = torch.empty(n_active if return_entropy else 0, dtype=out_dtype, device=dev)
        M = ids_use.numel()
        if M > 0:
            C = _resolve_chunk(chunk_size, M, V, H, hidden.dtype, dev, backend,
                               idx is not None)
            inv_t = 1.0 / temperature
            with _device_ctx(hidden):
                buf = torch.empty((C, V), dtype=hidden.dtype, device=dev)
                hbuf = _row_buffer(idx, C, H, hidden)
                for s in range(0, M, C):
                    e = min(M, s + C)
                    logits = _chunk_logits(buf, _chunk_rows(h2, idx, s, e, hbuf), weight, bias)
                    bad = _rows_forward(
                        backend, logits, ids_use[s:e], lp_u[s:e],
                        ent_u[s:e] if return_entropy else ent_u, lse_u[s:e], inv_t,
                        temperature, ignore_index, return_entropy,
                    )
                    if bad >= 0:
                        pos = s + bad if idx is None else int(idx[s + bad])
                        raise ValueError(
                            f"{_OP}: token_ids must lie in [0, {V}) or equal ignore_index="
                            f"{ignore_index}; position {pos} (flattened) holds {int(ids[pos])}"
                        )
        if idx is not None:
            logp.index_copy_(0, idx, lp_u)
            lse.index_copy_(0, idx, lse_u)
            if return_entropy:
                ent.index_copy_(0, idx, ent_u)
    ent_out = ent.view(lead) if return_entropy else ent
    return logp.view(lead), ent_out, lse.view(lead)


@torch.library.custom_op("rlfuse::linear_token_logprobs", mutates_args=())
def _linear_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    bias: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
    fp32_grad_accum: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # fp32_grad_accum only matters for the backward; it is an input so that the autograd
    # context receives it (traceably) from the call.
    return _linear_forward(hidden, weight, token_ids, bias, temperature, ignore_index,
                           return_entropy, chunk_size, fp32_grad_accum, backend)


@_linear_op.register_fake
def _(hidden, weight, token_ids, bias, temperature, ignore_index, return_entropy, chunk_size,
      fp32_grad_accum, backend):
    lead = hidden.shape[:-1]
    dt = _out_dtype(hidden)
    ent = hidden.new_empty(lead if return_entropy else (0,), dtype=dt)
    return hidden.new_empty(lead, dtype=dt), ent, hidden.new_empty(lead, dtype=dt)


def _linear_backward(hidden, weight, token_ids, bias, lse, entropy, grad_logp, grad_entropy,
                     temperature, ignore_index, chunk_size, fp32_grad_accum, need_hidden,
                     need_weight, need_bias, backend):
    """The body of the backward op, with its arguments (see :func:`_linear_forward`)."""
    H = hidden.size(-1)
    V = weight.size(0)
    dev = hidden.device
    h2 = hidden.reshape(-1, H)
    ids = _flat_ids(token_ids)
    N = ids.numel()
    acc = lse.dtype
    g_lp = None if grad_logp is None else grad_logp.to(acc).reshape(-1).contiguous()
    g_ent = None if grad_entropy is None else grad_entropy.to(acc).reshape(-1).contiguous()
    lse_f = lse.reshape(-1).contiguous()
    ent_f = entropy.reshape(-1).contiguous() if g_ent is not None else lse_f

    def empty():  # a distinct tensor per unused output (outputs may not alias)
        return hidden.new_empty((0,))

    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_hidden else empty()
    gh2 = grad_h.view(-1, H) if need_hidden else None
    low_precision_w = weight.dtype in (torch.bfloat16, torch.float16)
    w_acc_dtype = torch.float32 if (fp32_grad_accum and low_precision_w) else weight.dtype
    grad_w = torch.zeros((V, H), dtype=w_acc_dtype, device=dev) if need_weight else empty()
    partial_w = None
    if need_weight and w_acc_dtype != weight.dtype:
        # bf16 x bf16 -> fp32 matmuls are not available on every device, so each chunk's
        # product (accumulated in fp32 inside the GEMM) is rounded once and summed in fp32.
        partial_w = torch.empty((V, H), dtype=weight.dtype, device=dev)
    b_dtype = torch.float64 if (bias is not None and bias.dtype == torch.float64) else torch.float32
    grad_b = torch.zeros(V, dtype=b_dtype, device=dev) if need_bias else empty()

    work = N > 0 and (g_lp is not None or g_ent is not None)
    idx = _active_rows(ids, ignore_index) if work else None
    if need_hidden and (not work or idx is not None):
        grad_h.zero_()  # ignored rows (and everything when there is no upstream gradient)
    if work:
        if idx is None:
            ids_use, lse_u, ent_u, glp_u, gent_u = ids, lse_f, ent_f, g_lp, g_ent
        else:  # only the active rows are recomputed (their O(N) vectors gathered here,
            # their hidden rows one chunk at a time)
            ids_use, lse_u = ids.index_select(0, idx), lse_f.index_select(0, idx)
            ent_u = ent_f.index_select(0, idx) if g_ent is not None else lse_u
            glp_u = g_lp.index_select(0, idx) if g_lp is not None else None
            gent_u = g_ent.index_select(0, idx) if g_ent is not None else None
        M = ids_use.numel()
        if M > 0:
            C = _resolve_chunk(chunk_size, M, V, H, hidden.dtype, dev, backend,
                               idx is not None)
            inv_t = 1.0 / temperature
            with _device_ctx(hidden):
                buf = torch.empty((C, V), dtype=hidden.dtype, device=dev)
                dbuf = torch.empty_like(buf) if _uses_second_buffer(backend) else buf
                hbuf = _row_buffer(idx, C, H, hidden)
                for s in range(0, M, C):
                    e = min(M, s + C)
                    hc = _chunk_rows(h2, idx, s, e, hbuf)
                    logits = _chunk_logits(buf, hc, weight, bias)
                    d = _rows_backward(
                        backend, logits, ids_use[s:e], lse_u[s:e],
                        ent_u[s:e] if gent_u is not None else None,
                        None if glp_u is None else glp_u[s:e],
                        None if gent_u is None else gent_u[s:e],
                        dbuf[: e - s], inv_t, temperature, ignore_index,
                    )
                    if idx is None:
                        if need_hidden:
                            torch.mm(d, weight, out=gh2[s:e])
                        _add_param_grads(d, hc, grad_w if need_weight else None, partial_w,
                                         grad_b if need_bias else None, b_dtype)
                    else:
                        # the parameter gradients read the gathered rows first, then the
                        # same [C, H] buffer takes the chunk's grad_hidden, scattered
                        # into its rows of grad_h
                        _add_param_grads(d, hc, grad_w if need_weight else None, partial_w,
                                         grad_b if need_bias else None, b_dtype)
                        if need_hidden:
                            torch.mm(d, weight, out=hc)
                            gh2.index_copy_(0, idx[s:e], hc)
    if need_weight and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if need_bias and bias is not None and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


@torch.library.custom_op("rlfuse::linear_token_logprobs_backward", mutates_args=())
def _linear_backward_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    bias: Optional[torch.Tensor],
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    fp32_grad_accum: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient not asked for is an empty tensor."""
    return _linear_backward(hidden, weight, token_ids, bias, lse, entropy, grad_logp,
                            grad_entropy, temperature, ignore_index, chunk_size,
                            fp32_grad_accum, need_hidden, need_weight, need_bias, backend)


@_linear_backward_op.register_fake
def _(hidden, weight, token_ids, bias, lse, entropy, grad_logp, grad_entropy, temperature,
      ignore_index, chunk_size, fp32_grad_accum, need_hidden, need_weight, need_bias, backend):
    gh = hidden.new_empty(hidden.shape) if need_hidden else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if need_weight else hidden.new_empty((0,))
    if need_bias:
        gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(
            (weight.size(0),), dtype=torch.float32)
    else:
        gb = hidden.new_empty((0,))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    (hidden, weight, token_ids, bias, temperature, ignore_index, return_entropy, chunk_size,
     fp32_grad_accum, backend) = inputs
    _, ent, lse = output
    ctx.save_for_backward(hidden, weight, token_ids, bias, lse, ent)
    # Unused outputs give None (not zeros), so the backward skips their terms.
    ctx.set_materialize_grads(False)
    ctx.temperature = temperature
    ctx.ignore_index = ignore_index
    ctx.return_entropy = return_entropy
    ctx.chunk_size = chunk_size
    ctx.backend = backend
    ctx.fp32_grad_accum = fp32_grad_accum
    ctx.mark_non_differentiable(lse)


def _backward(ctx, g_lp, g_ent, _g_lse):
    hidden, weight, token_ids, bias, lse, ent = ctx.saved_tensors
    if not ctx.return_entropy:
        g_ent = None
    need_h = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1]
    need_b = ctx.needs_input_grad[3] and bias is not None
    if (g_lp is None and g_ent is None) or not (need_h or need_w or need_b):
        return (None,) * 10
    gh, gw, gb = _linear_backward_op(
        hidden, weight, token_ids, bias, lse, ent, g_lp, g_ent, ctx.temperature,
        ctx.ignore_index, ctx.chunk_size, ctx.fp32_grad_accum, need_h, need_w, need_b,
        ctx.backend,
    )
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None,
            None, None, None, None, None, None)


_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _chunk_arg(chunk_size) -> int:
    """chunk_size as an int (0 for None); raises below 1."""
    if chunk_size is None:
        return 0
    chunk = _validate.integer(_OP, "chunk_size", chunk_size)
    if chunk < 1:
        raise ValueError(f"{_OP}: chunk_size must be >= 1 (or None), got {chunk}")
    return chunk


def _check_args(hidden, weight, token_ids, bias, temperature, ignore_index):
    """The argument checks of :func:`linear_token_logprobs` (also run by the fused
    preference path); returns (temperature, ignore_index, token_ids)."""
    _validate.float_tensor(_OP, "hidden", hidden)
    _validate.tensor(_OP, "weight", weight)
    _validate.int_tensor(_OP, "token_ids", token_ids)
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"{_OP}: weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}"
        )
    if hidden.dim() < 1:
        raise ValueError(f"{_OP}: hidden must have at least 1 dimension (the hidden size H)")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    H = hidden.size(-1)
    V = weight.size(0)
    if weight.size(1) != H:
        raise ValueError(
            f"{_OP}: weight must have shape [V, H] with H = hidden.size(-1) = {H}, got "
            f"{tuple(weight.shape)}"
        )
    if H == 0:
        raise ValueError(f"{_OP}: hidden has an empty hidden dimension (H = 0)")
    if V == 0:
        raise ValueError(f"{_OP}: weight has an empty vocabulary dimension (V = 0)")
    _validate.shape_equals(_OP, "token_ids", token_ids, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        _validate.tensor(_OP, "bias", bias)
        if bias.dtype != hidden.dtype:
            raise TypeError(
                f"{_OP}: bias must have the dtype of hidden ({hidden.dtype}), got {bias.dtype}"
            )
        _validate.shape_equals(_OP, "bias", bias, (V,), "[V] = [weight.size(0)]")
    _validate.same_device(_OP, "hidden", hidden, weight=weight, token_ids=token_ids, bias=bias)
    temperature = _validate.temperature(_OP, temperature)
    ignore_index = _validate.integer(_OP, "ignore_index", ignore_index)
    token_ids = _validate.ids_for_ignore_index(token_ids, ignore_index)
    return temperature, ignore_index, token_ids


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    fp32_grad_accum: bool = True,
    backend: Optional[str] = None,
):
    """Log-probability of ``token_ids`` under ``softmax((hidden @ weight.T + bias) / T)``
    without materialising the ``[..., V]`` logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (or float64) final hidden states;
            any leading shape (``[B, T, H]`` padded, ``[N, H]`` packed).
        weight: ``[V, H]`` lm_head (output embedding) weight, same dtype and device as
            ``hidden``; may be tied to the input embedding (gradients add up in autograd).
        token_ids: integer tensor of shape ``hidden.shape[:-1]``; each id in ``[0, V)`` or
            equal to ``ignore_index``.
        bias: optional ``[V]`` lm_head bias (same dtype).
        temperature: > 0; the logits are divided by it.
        return_entropy: also return the entropy of each position's distribution.
        ignore_index: positions holding this id give 0 and no gradient.
        chunk_size: rows of logits held at once (``None``: :func:`auto_chunk_size`).
        fp32_grad_accum: accumulate ``grad_weight`` (and ``grad_bias``) of a bf16/fp16
            weight in a float32 buffer across chunks (one ``[V, H]`` float32 buffer for
            the backward); ``False`` accumulates in the weight's dtype.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (row kernel used on
            each chunk); default by device, or ``RLFUSE_BACKEND``.

    Returns:
        ``logp`` (float32, float64 for float64 inputs; shape ``hidden.shape[:-1]``), or
        ``(logp, entropy)``.

    Raises:
        TypeError: non-floating ``hidden``, dtype mismatch of ``weight`` / ``bias``,
            non-integer ``token_ids``, wrongly typed scalars.
        ValueError: shape / device mismatches, empty input, ``temperature <= 0``,
            ``chunk_size < 1``, ids out of range (naming the first bad position).
    """
    temperature, ignore_index, token_ids = _check_args(hidden, weight, token_ids, bias,
                                                       temperature, ignore_index)
    if not isinstance(return_entropy, bool):
        raise TypeError(f"{_OP}: return_entropy must be a bool, got {type(return_entropy).__name__}")
    if not isinstance(fp32_grad_accum, bool):
        raise TypeError(
            f"{_OP}: fp32_grad_accum must be a bool, got {type(fp32_grad_accum).__name__}"
        )
    chunk = _chunk_arg(chunk_size)
    chosen = _backend.resolve(backend, hidden.device, _OP)
    logp, ent, _ = _linear_op(
        hidden, weight, token_ids, bias, temperature, ignore_index, return_entropy, chunk,
        fp32_grad_accum, chosen,
    )
    return (logp, ent) if return_entropy else logp
