"""Triton backend of the advantage family (see python/rlfuse/ops/advantage.py for the
formulas; the reference implementations there are the specification).

GAE is a linear recurrence on the state (A, nv) (advantage, value of the next kept
position).  Walking a sequence backwards, position t applies the affine map

    kept t:      A <- c A + gamma nv + (r_t - v_t),   nv <- v_t       (c = gamma * lam)
    skipped t:   identity

Maps compose associatively: with f = (a, b, cc, d, e) meaning
``A' = a A + b nv + cc,  nv' = d nv + e``, "apply g, then f" is

    (fa ga,  fa gb + fb gd,  fa gc + fb ge + fc,  fd gd,  fd ge + fe)

so each program (one sequence) loads a tile of BLOCK positions in reverse time order, runs
``tl.associative_scan`` over the maps, applies the prefix maps to the state carried from
the later tiles, and carries the state after the tile's earliest position on.  Tiles are
processed in a fixed order and the scan order is fixed, so results are deterministic.

Group statistics: one program per group (its members listed, in index order, by
``order[seg[g]:seg[g + 1]]``), float64 arithmetic, fixed-order block reductions.
Masked moments: one program per row (float64).  Broadcast, whitening and token rewards
are elementwise.  Under ``TRITON_INTERPRET=1`` the tiles are small so that tests cover the
multi-tile paths with tiny shapes.
"""

import functools
import os

import torch
import triton
import triton.language as tl

__all__ = ["gae", "row_stats", "whiten_apply", "group_stats", "broadcast_rows", "token_rewards"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=64)
def _params(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only device tensor of kernel parameters, made once per distinct value (a copy
    of host data to a GPU waits for the stream: made per call, it would be a device sync).
    For parameters that stay the same from call to call (gamma and lambda, eps, kl_coef)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _block(n: int, cap_gpu: int = 1024, cap_interp: int = 16) -> int:
    cap = cap_interp if _interpret() else cap_gpu
    return max(16 if not _interpret() else 4, min(triton.next_power_of_2(max(int(n), 1)), cap))


# ----------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------
@triton.jit
def _compose(ga, gb, gc, gd, ge, fa, fb, fc, fd, fe):
    """Apply g, then f (g holds the later time positions)."""
    return (
        fa * ga,
        fa * gb + fb * gd,
        fa * gc + fb * ge + fc,
        fd * gd,
        fd * ge + fe,
    )


@triton.jit
def _gae_kernel(
    r_ptr, v_ptr, m_ptr, lv_ptr, cu_ptr, adv_ptr, ret_ptr,
    T, r_s0, r_s1, v_s0, v_s1, m_s0, m_s1, lv_s,
    p_ptr,
    HAS_V: tl.constexpr, HAS_M: tl.constexpr, HAS_LV: tl.constexpr, PACKED: tl.constexpr,
    ZERO: tl.constexpr, HAS_RET: tl.constexpr, BLOCK: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    if PACKED:
        lo = tl.load(cu_ptr + s)
        L = tl.load(cu_ptr + s + 1) - lo
        r_base = r_ptr + lo * r_s1
        v_base = v_ptr + lo * v_s1
        m_base = m_ptr + lo * m_s1
        o_off = lo
    else:
        L = T
        r_base = r_ptr + s * r_s0
        v_base = v_ptr + s * v_s0
        m_base = m_ptr + s * m_s0
        o_off = s * T
    acc_ty = adv_ptr.dtype.element_ty
    gamma = tl.load(p_ptr)  # float arguments would be float32: read them in the acc dtype
    c = tl.load(p_ptr + 1)
    i = tl.arange(0, BLOCK)
    A = tl.zeros([], dtype=acc_ty)
    if HAS_LV:
        nv = tl.load(lv_ptr + s * lv_s).to(acc_ty)
    else:
        nv = tl.zeros([], dtype=acc_ty)
    last = tl.full([], -1, tl.int64)
    if ZERO:
        if HAS_M:
            for start in range(0, L, BLOCK):
                t = start + i
                inb = t < L
                mv = tl.load(m_base + t * m_s1, mask=inb, other=0)
                last = tl.maximum(last, tl.max(tl.where(inb & (mv != 0), t, -1), axis=0))
        else:
            last = L - 1
    n_tiles = tl.cdiv(L, BLOCK)
    for k in range(0, n_tiles):
        t = L - 1 - k * BLOCK - i  # i = 0 is the latest position of the tile
        inb = t >= 0
        if HAS_M:
            mv = tl.load(m_base + t * m_s1, mask=inb, other=0)
            on = inb & (mv != 0)
        else:
            on = inb
        r = tl.load(r_base + t * r_s1, mask=on, other=0.0).to(acc_ty)
        r = tl.where(on, r, 0.0)
        if HAS_V:
            v = tl.load(v_base + t * v_s1, mask=on, other=0.0).to(acc_ty)
            v = tl.where(on, v, 0.0)
        else:
            v = tl.zeros([BLOCK], dtype=acc_ty)
        if ZERO:
            keep = inb & (on | (t <= last))
        else:
            keep = on
        one = tl.full([BLOCK], 1.0, acc_ty)
        zero = tl.zeros([BLOCK], dtype=acc_ty)
        fa = tl.where(keep, c, one)
        fb = tl.where(keep, gamma, zero)
        fc = tl.where(keep, r - v, zero)
        fd = tl.where(keep, zero, one)
        fe = tl.where(keep, v, zero)
        pa, pb, pc, pd, pe = tl.associative_scan((fa, fb, fc, fd, fe), 0, _compose)
        A_t = pa * A + pb * nv + pc
        nv_t = pd * nv + pe
        tl.store(adv_ptr + o_off + t, tl.where(on, A_t, 0.0), mask=inb)
        if HAS_RET:
            tl.store(ret_ptr + o_off + t, tl.where(on, A_t + v, 0.0), mask=inb)
        is_last = i == BLOCK - 1
        A = tl.sum(tl.where(is_last, A_t, 0.0), axis=0)
        nv = tl.sum(tl.where(is_last, nv_t, 0.0), axis=0)


def gae(r, v, mask, lv, cu, S, T, gamma, lam, zero, adv, ret):
    """GAE into ``adv`` (and ``ret`` when given), both contiguous in the layout of ``r``.

    r, v: [S, T] (padded) or [N] (packed with cu, int64 [S + 1]); any strides; v may be
    None (values 0).  mask: same shape, any dtype (nonzero = valid), or None.  lv: [S] or
    None.  The caller has validated every input.
    """
    def st(x):
        if x is None:
            return 0, 0
        return (0, x.stride(0)) if x.dim() == 1 else (x.stride(0), x.stride(1))

    (r0, r1), (v0, v1), (m0, m1) = st(r), st(v), st(mask)
    if S == 0 or r.numel() == 0:
        return
    lengths_max = T if cu is None else int((cu[1:] - cu[:-1]).max())
    block = _block(lengths_max, cap_gpu=512)
    dummy = adv
    _gae_kernel[(S,)](
        r, v if v is not None else dummy, mask if mask is not None else dummy,
        lv if lv is not None else dummy, cu if cu is not None else dummy, adv,
        ret if ret is not None else dummy,
        T, r0, r1, v0, v1, m0, m1, lv.stride(0) if lv is not None else 0,
        _params((float(gamma), float(gamma * lam)), adv.dtype, adv.device),
        HAS_V=v is not None, HAS_M=mask is not None, HAS_LV=lv is not None,
        PACKED=cu is not None, ZERO=bool(zero), HAS_RET=ret is not None, BLOCK=block,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------
# Masked moments and whitening
# ----------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(x_ptr, m_ptr, cnt_ptr, mean_ptr, m2_ptr, C, x_s0, x_s1, m_s0, m_s1,
                      HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK)
    n = tl.zeros([], dtype=tl.float64)
    total = tl.zeros([], dtype=tl.float64)
    for start in range(0, C, BLOCK):
        c = start + j
        inb = c < C
        if HAS_M:
            on = inb & (tl.load(m_ptr + row * m_s0 + c * m_s1, mask=inb, other=0) != 0)
        else:
            on = inb
        x = tl.load(x_ptr + row * x_s0 + c * x_s1, mask=on, other=0.0).to(tl.float64)
        n += tl.sum(tl.where(on, 1.0, 0.0).to(tl.float64), axis=0)
        total += tl.sum(tl.where(on, x, 0.0), axis=0)
    mean = tl.where(n > 0, total / tl.maximum(n, 1.0), 0.0)
    m2 = tl.zeros([], dtype=tl.float64)
    for start in range(0, C, BLOCK):
        c = start + j
        inb = c < C
        if HAS_M:
            on = inb & (tl.load(m_ptr + row * m_s0 + c * m_s1, mask=inb, other=0) != 0)
        else:
            on = inb
        x = tl.load(x_ptr + row * x_s0 + c * x_s1, mask=on, other=0.0).to(tl.float64)
        d = tl.where(on, x - mean, 0.0)
        m2 += tl.sum(d * d, axis=0)
    tl.store(cnt_ptr + row, n.to(tl.int64))
    tl.store(mean_ptr + row, mean)
    tl.store(m2_ptr + row, m2)


def row_stats(x2, m2):
    """Per-row (count int64, mean float64, centred sum of squares float64) of [R, C]."""
    R, C = x2.shape
    dev = x2.device
    cnt = torch.empty(R, dtype=torch.int64, device=dev)
    mean = torch.empty(R, dtype=torch.float64, device=dev)
    sq = torch.empty(R, dtype=torch.float64, device=dev)
    if R == 0:
        return cnt, mean, sq
    _row_stats_kernel[(R,)](
        x2, m2 if m2 is not None else x2, cnt, mean, sq, C, x2.stride(0), x2.stride(1),
        m2.stride(0) if m2 is not None else 0, m2.stride(1) if m2 is not None else 0,
        HAS_M=m2 is not None, BLOCK=_block(C), num_warps=4,
    )
    return cnt, mean, sq


@triton.jit
def _whiten_kernel(x_ptr, m_ptr, o_ptr, C, x_s0, x_s1, m_s0, m_s1, p_ptr,
                   HAS_M: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mean = tl.load(p_ptr)  # float64 parameters
    scale = tl.load(p_ptr + 1)
    add_back = tl.load(p_ptr + 2)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = c < C
    if HAS_M:
        on = inb & (tl.load(m_ptr + row * m_s0 + c * m_s1, mask=inb, other=0) != 0)
    else:
        on = inb
    x = tl.load(x_ptr + row * x_s0 + c * x_s1, mask=on, other=0.0).to(tl.float64)
    w = (x - mean) * scale + add_back
    tl.store(o_ptr + row * C + c, tl.where(on, w, 0.0).to(o_ptr.dtype.element_ty), mask=inb)


def whiten_apply(x2, m2, mean, scale, add_back, out2):
    """out2 = mask ? (x - mean) * scale + add_back : 0 (out2 contiguous [R, C])."""
    R, C = x2.shape
    block = _block(C)
    _whiten_kernel[(R, triton.cdiv(C, block))](
        x2, m2 if m2 is not None else x2, out2, C, x2.stride(0), x2.stride(1),
        m2.stride(0) if m2 is not None else 0, m2.stride(1) if m2 is not None else 0,
        torch.tensor([mean, scale, add_back], dtype=torch.float64, device=x2.device),
        HAS_M=m2 is not None, BLOCK=block,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------
# Group statistics
# ----------------------------------------------------------------------------------------
@triton.jit
def _group_kernel(s_ptr, order_ptr, seg_ptr, len_ptr, x_ptr, p_ptr,
                  METHOD: tl.constexpr, SIZE_ONE: tl.constexpr, NORM_BY_STD: tl.constexpr,
                  HAS_LEN: tl.constexpr, HAS_FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    eps = tl.load(p_ptr)  # float64 parameters
    std_floor = tl.load(p_ptr + 1)
    f_norm = tl.load(p_ptr + 2)
    batch_std = tl.load(p_ptr + 3)
    alpha = tl.load(p_ptr + 4)
    lo = tl.load(seg_ptr + g)
    n_m = tl.load(seg_ptr + g + 1) - lo
    i = tl.arange(0, BLOCK)
    inm = i < n_m
    idx = tl.load(order_ptr + lo + i, mask=inm, other=0)
    s = tl.load(s_ptr + idx, mask=inm, other=0.0)
    valid = inm & (s == s)
    n = tl.sum(valid.to(tl.float64), axis=0)
    big = BLOCK + 1
    first = tl.min(tl.where(valid, i, big), axis=0)
    K = tl.sum(tl.where(i == first, s, 0.0), axis=0)
    d = tl.where(valid, s - K, 0.0)
    md = tl.sum(d, axis=0) / tl.maximum(n, 1.0)
    cdev = tl.where(valid, d - md, 0.0)
    sd = tl.sqrt(tl.sum(cdev * cdev, axis=0) / tl.maximum(n - 1.0, 1.0))
    if HAS_FLOOR:
        sd_f = tl.maximum(sd, std_floor)
        bs_f = tl.maximum(batch_std, std_floor)
        one_f = tl.maximum(std_floor, 1.0)
    else:
        sd_f = sd
        bs_f = batch_std
        one_f = 1.0
    # groups with two or more valid scores
    if METHOD == 0:  # grpo
        multi = cdev / (sd_f + eps)
    elif METHOD == 2:  # batch_std
        multi = cdev / (bs_f + eps)
    elif METHOD == 3:  # rloo
        multi = cdev * (n / tl.maximum(n - 1.0, 1.0))
    elif METHOD == 5:  # opo
        if HAS_LEN:
            ln = tl.load(len_ptr + idx, mask=inm, other=0.0)
        else:
            ln = tl.full([BLOCK], 1.0, tl.float64)
        w = tl.sum(tl.where(valid, ln, 0.0), axis=0)
        ws = tl.sum(tl.where(valid, ln * d, 0.0), axis=0)
        base = tl.where(w > 0, ws / tl.where(w > 0, w, 1.0), md)
        multi = d - base
    elif METHOD == 6:  # grpo_passk
        mx = tl.max(tl.where(valid, s, float("-inf")), axis=0)
        best = tl.min(tl.where(valid & (s == mx), i, big), axis=0)
        second = tl.max(tl.where(valid & (i != best), s, float("-inf")), axis=0)
        # groups with < 2 valid scores never use this; keep it finite for them
        mx_s = tl.where(n >= 1, mx, 0.0)
        adv = mx_s - tl.where(n >= 2, second, mx_s)
        if NORM_BY_STD:
            adv = adv / (sd_f + eps)
        multi = tl.where(i == best, adv, 0.0)
    elif METHOD == 7:  # gpg
        multi = (alpha / f_norm) * cdev
    else:  # dr_grpo, reinforce_pp_baseline
        multi = cdev
    # groups with a single valid score
    if SIZE_ONE == 1:  # verl: baseline 0, std 1
        if METHOD == 0:
            single = s / (one_f + eps)
        elif METHOD == 2:
            single = s / (bs_f + eps)
        elif METHOD == 7:
            single = alpha * s / f_norm
        else:
            single = s
    else:
        single = tl.zeros([BLOCK], dtype=tl.float64)
    res = tl.where(n >= 2, multi, tl.where(n == 1, single, 0.0))
    res = tl.where(valid, res, 0.0)
    tl.store(x_ptr + idx, res, mask=inm)


def group_stats(s, order, seg, lens, x, max_count, *, method, size_one, eps, std_floor,
                norm_by_std, f_norm, batch_std, alpha):
    """Per-sample pre-whitening advantages (float64) of every group into ``x``."""
    G = seg.numel() - 1
    if G == 0:
        return
    block = max(2, triton.next_power_of_2(max(int(max_count), 1)))
    _group_kernel[(G,)](
        s, order, seg, lens if lens is not None else s, x,
        _params((float(eps), max(float(std_floor), 0.0), float(f_norm), float(batch_std),
                 float(alpha)), torch.float64, s.device),
        METHOD=int(method), SIZE_ONE=int(size_one), NORM_BY_STD=bool(norm_by_std),
        HAS_LEN=lens is not None, HAS_FLOOR=std_floor >= 0, BLOCK=block,
        num_warps=4 if block >= 128 else 1,
    )


# ----------------------------------------------------------------------------------------
# Broadcast and token rewards
# ----------------------------------------------------------------------------------------
@triton.jit
def _broadcast_kernel(a_ptr, m_ptr, o_ptr, T, m_s0, m_s1, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = t < T
    mv = tl.load(m_ptr + b * m_s0 + t * m_s1, mask=inb, other=0)
    a = tl.load(a_ptr + b)
    tl.store(o_ptr + b * T + t, tl.where(mv != 0, a, 0.0).to(o_ptr.dtype.element_ty), mask=inb)


def broadcast_rows(adv, mask, out):
    """out[b, t] = adv[b] where mask[b, t] != 0, else 0 (out contiguous [B, T])."""
    B, T = mask.shape
    if B == 0 or T == 0:
        return
    block = _block(T)
    _broadcast_kernel[(B, triton.cdiv(T, block))](
        adv, mask, out, T, mask.stride(0), mask.stride(1), BLOCK=block, num_warps=4,
    )


@triton.jit
def _token_rewards_kernel(sc_ptr, m_ptr, kl_ptr, cu_ptr, o_ptr, T, sc_s, m_s0, m_s1, k_s0,
                          k_s1, p_ptr, HAS_M: tl.constexpr, HAS_KL: tl.constexpr,
                          PACKED: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    if PACKED:
        lo = tl.load(cu_ptr + s)
        L = tl.load(cu_ptr + s + 1) - lo
        m_base = m_ptr + lo * m_s1
        k_base = kl_ptr + lo * k_s1
        o_off = lo
    else:
        L = T
        m_base = m_ptr + s * m_s0
        k_base = kl_ptr + s * k_s0
        o_off = s * T
    acc_ty = o_ptr.dtype.element_ty
    kl_coef = tl.load(p_ptr)
    score = tl.load(sc_ptr + s * sc_s).to(acc_ty)
    j = tl.arange(0, BLOCK)
    last = tl.full([], -1, tl.int64)
    if HAS_M:
        for start in range(0, L, BLOCK):
            t = start + j
            inb = t < L
            mv = tl.load(m_base + t * m_s1, mask=inb, other=0)
            last = tl.maximum(last, tl.max(tl.where(inb & (mv != 0), t, -1), axis=0))
    else:
        last = L - 1
    for start in range(0, L, BLOCK):
        t = start + j
        inb = t < L
        if HAS_M:
            on = inb & (tl.load(m_base + t * m_s1, mask=inb, other=0) != 0)
        else:
            on = inb
        if HAS_KL:
            k = tl.load(k_base + t * k_s1, mask=on, other=0.0).to(acc_ty)
            pen = tl.where(on, kl_coef * k, 0.0)
        else:
            pen = tl.zeros([BLOCK], dtype=acc_ty)
        val = tl.where(t == last, score - pen, tl.where(on, 0.0 - pen, 0.0))
        tl.store(o_ptr + o_off + t, val.to(acc_ty), mask=inb)


def token_rewards(scores, mask, kl, cu, S, T, kl_coef, out):
    """Score on the last valid token minus kl_coef * kl on the valid ones (into ``out``)."""
    if S == 0 or out.numel() == 0:
        return

    def st(x):
        if x is None:
            return 0, 0
        return (0, x.stride(0)) if x.dim() == 1 else (x.stride(0), x.stride(1))

    (m0, m1), (k0, k1) = st(mask), st(kl)
    lengths_max = T if cu is None else int((cu[1:] - cu[:-1]).max())
    _token_rewards_kernel[(S,)](
        scores, mask if mask is not None else out, kl if kl is not None else out,
        cu if cu is not None else out, out, T, scores.stride(0), m0, m1, k0, k1,
        _params((float(kl_coef),), out.dtype, out.device), HAS_M=mask is not None,
        HAS_KL=kl is not None, PACKED=cu is not None,
        BLOCK=_block(lengths_max), num_warps=4,
    )
