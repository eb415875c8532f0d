"""Triton backend: per-row token log-probs (+ optional entropy) of logits.

For every row r of ``logits3d`` (rows flattened as ``r = o * n_inner + i``) with
``z = x * inv_temp`` (fp32 math):

    lse[r]     = logsumexp(z)
    logp[r]    = z[ids[r]] - lse[r]
    entropy[r] = -(softmax(z) * log_softmax(z)).sum() = log(S) - W / S

with ``S = sum exp(z - m)``, ``W = sum exp(z - m) * (z - m)``.  The forward reads
each row once, one BLOCK_V tile at a time: a tile is viewed as [LANES, R] with
R = one 16-byte vector (8 x bf16/fp16, 4 x fp32), every lane (held by a single
thread) keeps its own running max ``m`` and running ``S``/``W``, rescaled when
the max grows (one exp per element plus one per lane and tile), and the lanes
are combined at the end of the row.  The backward is a 2-D grid (rows on grid
dim 0, vocab tiles on dim 1) that writes every element of dlogits.

Numerics / special values
  * all math in fp32 (the input may be fp32/fp16/bf16/fp64);
  * differences ``x - m`` are formed in *input units* before scaling by the
    temperature, and ``logp`` is computed as ``(x_id - M) * inv_temp - log(S)``,
    so rows with |x| ~ 1e4 keep full fp32 accuracy in logp and entropy;
  * ``-inf`` elements contribute nothing (never ``0 * -inf``); a row that is
    entirely ``-inf`` gives lse = -inf and logp = entropy = NaN (as torch);
  * a NaN anywhere in a row propagates to logp, entropy and lse of that row;
  * rows whose id equals ``ignore_index`` give logp = entropy = lse = 0 and a
    zero gradient row;
  * an id outside [0, V) (and != ignore_index) gives logp = NaN (no OOB read).

Temperature is a runtime fp32 scalar (no recompilation per value); inv_temp
must be positive and finite.
"""

import os

import torch
import triton
import triton.language as tl

__all__ = ["forward", "backward"]

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-3.4028234663852886e38)  # -FLT_MAX: finite "minus infinity"

_ELEM_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}
_SUPPORTED_DTYPES = tuple(_ELEM_SIZE)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tile sizes.  On a GPU a tile is 16 KiB of logits (8192 x bf16/fp16,
# 4096 x fp32, 2048 x fp64) handled by 8 warps: 64 bytes (four 16-byte vector
# loads) per thread and tile, plus the prefetched next tile in the forward,
# which keeps enough bytes in flight for HBM (bf16: ~80 registers/thread, 3
# CTAs/SM; fp32: ~48 registers).  Rows whose start is not provably 16-byte
# aligned (a row stride not divisible by 16) cannot use vector loads; their
# per-element addresses cost registers, so they get 8 KiB tiles.  Under the
# interpreter the tiles are small (<= 1024 elements), so small test shapes
# still exercise the multi-tile + tail code path.
_TILE_BYTES_GPU = 16384
_TILE_BYTES_GPU_UNALIGNED = 8192
_MAX_BLOCK_V_INTERP = 1024
_MIN_BLOCK_V = 16


def _launch_params(logits3d: torch.Tensor):
    """(stride_o, stride_i, BLOCK_V, R, num_warps) for a [n_outer, n_inner, V]
    view.  Strides of size-1 dims are passed as 0 (never used, and 0 keeps
    Triton's divisibility-by-16 specialization, hence vector loads)."""
    n_outer, n_inner, V = logits3d.shape
    stride_o = logits3d.stride(0) if n_outer > 1 else 0
    stride_i = logits3d.stride(1) if n_inner > 1 else 0
    esize = _ELEM_SIZE[logits3d.dtype]
    if _interpret():
        cap = _MAX_BLOCK_V_INTERP
    else:
        aligned = stride_o % 16 == 0 and stride_i % 16 == 0 and logits3d.data_ptr() % 16 == 0
        cap = (_TILE_BYTES_GPU if aligned else _TILE_BYTES_GPU_UNALIGNED) // esize
    block_v = max(_MIN_BLOCK_V, min(triton.next_power_of_2(max(int(V), 1)), cap))
    # forward: elements per lane = one 16-byte vector (8 x bf16/fp16, 4 x fp32,
    # 2 x fp64), so that each lane's elements sit in one thread.
    r = max(1, min(16 // esize, block_v))
    # 64 bytes per thread and tile; 1..8 warps.
    num_warps = max(1, min(8, block_v * esize // (64 * 32)))
    return stride_o, stride_i, block_v, r, num_warps


# ----------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------


@triton.jit
def _scaled(x, inv_temp):
    """x * inv_temp rounded to fp32 on its own.  A plain product would be fused
    into a following add or subtract (enable_fp_fusion, on by default); an explicit
    fma with a zero addend is the rounded product and is never fused further."""
    return tl.fma(x, inv_temp, 0.0)


@triton.jit
def _online_update(x, m, S, W, c, WITH_ENTROPY: tl.constexpr):
    """Fold a [LANES, R] fp32 tile into the per-lane running (m, S, W).

    Each lane owns R contiguous elements of the tile (one 16-byte vector, held
    by one thread, so the max/sum over R never leave the thread).  Per lane:
      m: running max in input units; starts at -FLT_MAX (finite, so that
         -inf - m never is -inf - (-inf)).
      S = sum exp2((x - m) * c)
      W = sum exp2((x - m) * c) * (x - m)       (input units)
    with c = inv_temp * log2(e).  When the max grows the old S, W are rescaled
    by alpha = exp(m_old - m_new) (and W shifted by (m_old - m_new) * S).
    -inf elements contribute exactly 0; NaN elements make S (and W) NaN.
    """
    m_new = tl.maximum(m, tl.max(x, axis=1))
    dm = tl.maximum(m - m_new, _NEG_BIG)  # <= 0, finite
    alpha = tl.exp2(dm * c)
    d = x - m_new[:, None]  # <= 0; -inf for -inf elements; NaN for NaN
    e = tl.exp2(d * c)
    if WITH_ENTROPY:
        # e * d with d == -inf -> e * (-FLT_MAX) = 0; NaN stays NaN (e NaN).
        # (alpha * dm) * S instead of alpha * (dm * S): dm * S may overflow.
        ed = tl.sum(e * tl.maximum(d, _NEG_BIG), axis=1)
        W = alpha * W + (alpha * dm) * S + ed
    S = alpha * S + tl.sum(e, axis=1)
    return m_new, S, W


@triton.jit
def _logprob_fwd_kernel(
    x_ptr,
    ids_ptr,
    logp_ptr,
    ent_ptr,
    lse_ptr,
    n_inner,
    stride_o,
    stride_i,
    V,
    inv_temp,
    c,  # inv_temp * log2(e)
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    R: tl.constexpr,  # elements per lane and tile (one 16-byte vector)
):
    LANES: tl.constexpr = BLOCK_V // R
    r = tl.program_id(0).to(tl.int64)
    o = r // n_inner
    i = r - o * n_inner
    row_ptr = x_ptr + o * stride_o + i * stride_i
    tok = tl.load(ids_ptr + r)

    if tok == ignore_index:
        tl.store(logp_ptr + r, 0.0)
        tl.store(lse_ptr + r, 0.0)
        if WITH_ENTROPY:
            tl.store(ent_ptr + r, 0.0)
    else:
        # the target logit (issued first so its latency overlaps the row)
        valid = (tok >= 0) & (tok < V)
        x_id = tl.load(row_ptr + tl.where(valid, tok, 0)).to(tl.float32)

        offs = tl.arange(0, LANES)[:, None] * R + tl.arange(0, R)[None, :]
        m = tl.full([LANES], _NEG_BIG, tl.float32)
        S = tl.zeros([LANES], dtype=tl.float32)
        W = tl.zeros([LANES], dtype=tl.float32)

        n_full = V // BLOCK_V
        if n_full > 0:
            # Full tiles without masks; the next tile is loaded before the
            # current one is processed (register prefetch) so that the load
            # latency overlaps the math.
            x = tl.load(row_ptr + offs)
            for k in range(1, n_full):
                x_next = tl.load(row_ptr + k * BLOCK_V + offs)
                m, S, W = _online_update(x.to(tl.float32), m, S, W, c, WITH_ENTROPY)
                x = x_next
            m, S, W = _online_update(x.to(tl.float32), m, S, W, c, WITH_ENTROPY)
        tail = n_full * BLOCK_V
        if tail < V:
            cols = tail + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf"))
            m, S, W = _online_update(x.to(tl.float32), m, S, W, c, WITH_ENTROPY)

        # ---- combine the lanes -------------------------------------------
        # (a lane's m is NaN only if the GPU max propagated a NaN; its S is
        # NaN then too, which is what carries the NaN to the outputs)
        M = tl.max(m, axis=0)
        dm = tl.maximum(m - M, _NEG_BIG)  # <= 0, finite
        sc = tl.exp2(dm * c)
        S_tot = tl.sum(S * sc, axis=0)  # NaN if any lane is NaN
        log_s = tl.log(S_tot)
        # M * inv_temp rounded on its own, then log S added: the backward forms
        # log p = x * inv_temp - lse from the same rounded product (_scaled), so that
        # log p is exactly 0 at the maximum of a row whose S rounds to 1.
        lse = _scaled(M, inv_temp) + log_s

        logp = tl.fma(x_id - M, inv_temp, -log_s)
        logp = tl.where(valid, logp, float("nan"))

        tl.store(logp_ptr + r, logp)
        tl.store(lse_ptr + r, lse)
        if WITH_ENTROPY:
            W_tot = tl.sum(sc * W + (sc * dm) * S, axis=0)
            ent = log_s - (W_tot * inv_temp) / S_tot
            tl.store(ent_ptr + r, ent)


def _check_inv_temp(inv_temp) -> float:
    inv_temp = float(inv_temp)
    if not (0.0 < inv_temp < float("inf")):
        raise ValueError(f"inv_temp must be positive and finite, got {inv_temp}")
    return inv_temp


def _check_inputs(logits3d: torch.Tensor, ids: torch.Tensor):
    if logits3d.dim() != 3:
        raise ValueError(f"logits3d must be 3-D [n_outer, n_inner, V], got {tuple(logits3d.shape)}")
    if logits3d.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"unsupported logits dtype {logits3d.dtype}")
    if logits3d.stride(2) != 1:
        logits3d = logits3d.contiguous()
    n_outer, n_inner, V = logits3d.shape
    N = n_outer * n_inner
    if ids.dtype not in (torch.int32, torch.int64):
        ids = ids.to(torch.int64)
    ids = ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    if ids.numel() != N:
        raise ValueError(f"ids has {ids.numel()} elements, expected {N}")
    return logits3d, ids, n_outer, n_inner, V, N


def forward(logits3d, ids, inv_temp: float, ignore_index: int, with_entropy: bool):
    """Token log-probs, entropy and logsumexp of every row of ``logits3d``.

    logits3d: [n_outer, n_inner, V] (stride(2) == 1, any other strides),
        float32/float16/bfloat16/float64.
    ids: int32/int64 [n_outer * n_inner].
    Returns (logp [N], entropy [N] or None, lse [N]), contiguous float32.
    """
    logits3d, ids, n_outer, n_inner, V, N = _check_inputs(logits3d, ids)
    inv_temp = _check_inv_temp(inv_temp)
    dev = logits3d.device
    logp = torch.empty(N, dtype=torch.float32, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    ent = torch.empty(N, dtype=torch.float32, device=dev) if with_entropy else None
    if N == 0:
        return logp, ent, lse
    if V == 0:  # degenerate: empty softmax (lse = -inf, logp/entropy = NaN)
        ign = ids == int(ignore_index)
        lse.fill_(float("-inf")).masked_fill_(ign, 0.0)
        logp.fill_(float("nan")).masked_fill_(ign, 0.0)
        if ent is not None:
            ent.fill_(float("nan")).masked_fill_(ign, 0.0)
        return logp, ent, lse

    stride_o, stride_i, block_v, r, num_warps = _launch_params(logits3d)
    _logprob_fwd_kernel[(N,)](
        logits3d,
        ids,
        logp,
        ent if with_entropy else logp,  # dummy pointer when unused
        lse,
        n_inner,
        stride_o,
        stride_i,
        V,
        inv_temp,
        inv_temp * _LOG2E,
        int(ignore_index),
        WITH_ENTROPY=bool(with_entropy),
        BLOCK_V=block_v,
        R=r,
        num_warps=num_warps,
    )
    return logp, ent, lse


# ----------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------


@triton.jit
def _logprob_bwd_kernel(
    x_ptr,
    ids_ptr,
    lse_ptr,
    ent_ptr,
    glp_ptr,
    ge_ptr,
    dx_ptr,
    n_inner,
    stride_o,
    stride_i,
    V,
    inv_temp,
    ignore_index,
    HAS_GLP: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    out_ptrs = dx_ptr + r * V + cols
    tok = tl.load(ids_ptr + r)

    if tok == ignore_index:
        tl.store(out_ptrs, tl.zeros([BLOCK_V], dtype=dx_ptr.dtype.element_ty), mask=mask)
    else:
        o = r // n_inner
        i = r - o * n_inner
        x = tl.load(x_ptr + o * stride_o + i * stride_i + cols, mask=mask, other=0.0)
        lse = tl.load(lse_ptr + r)
        # log p = z - lse with z = x * inv_temp rounded first, as the forward
        # rounded M * inv_temp into lse.  A fused x * inv_temp - lse would subtract
        # lse from the exact product: up to half an ulp of lse off at the maximum,
        # an error of ~0.1 in the gradient there at T = 1e-3.
        t = _scaled(x.to(tl.float32), inv_temp) - lse
        p = tl.exp(t)
        d = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GLP:
            g_lp = tl.load(glp_ptr + r)
            onehot = tl.where(cols == tok, 1.0, 0.0)
            d = g_lp * (onehot - p)
        if HAS_GE:
            g_e = tl.load(ge_ptr + r)
            H = tl.load(ent_ptr + r)
            # p * (t + H) := 0 where p == 0 (z = -inf); NaN propagates.
            ph = tl.where(p == 0.0, 0.0, p * (t + H))
            d = d - g_e * ph
        d = d * inv_temp
        tl.store(out_ptrs, d.to(dx_ptr.dtype.element_ty), mask=mask)


def backward(
    logits3d,
    ids,
    lse,
    entropy_or_None,
    g_logp_or_None,
    g_entropy_or_None,
    inv_temp: float,
    ignore_index: int,
):
    """Gradient of (g_logp . logp + g_entropy . entropy) w.r.t. the logits.

    Returns dlogits, contiguous [N, V] in the logits dtype:
        d_v = (g_lp * ([v == id] - p_v) - g_e * p_v * (log p_v + H)) * inv_temp
    with zero rows for ignored tokens.
    """
    logits3d, ids, n_outer, n_inner, V, N = _check_inputs(logits3d, ids)
    inv_temp = _check_inv_temp(inv_temp)
    dx = torch.empty((N, V), dtype=logits3d.dtype, device=logits3d.device)
    if N == 0 or V == 0:
        return dx

    has_glp = g_logp_or_None is not None
    has_ge = g_entropy_or_None is not None
    if has_ge and entropy_or_None is None:
        raise ValueError("g_entropy given but entropy is None")

    def _f32(t):
        t = t.reshape(-1)
        if t.dtype != torch.float32:
            t = t.float()
        return t.contiguous()

    lse = _f32(lse)
    glp = _f32(g_logp_or_None) if has_glp else lse
    ge = _f32(g_entropy_or_None) if has_ge else lse
    ent = _f32(entropy_or_None) if has_ge else lse

    stride_o, stride_i, block_v, _, num_warps = _launch_params(logits3d)
    grid = (N, triton.cdiv(V, block_v))
    _logprob_bwd_kernel[grid](
        logits3d,
        ids,
        lse,
        ent,
        glp,
        ge,
        dx,
        n_inner,
        stride_o,
        stride_i,
        V,
        inv_temp,
        int(ignore_index),
        HAS_GLP=has_glp,
        HAS_GE=has_ge,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return dx
