"""Triton backend of the policy_loss family: fused policy loss rows, value loss rows, KL.

The Python side (``rlfuse.ops.policy_loss``) computes the per-row token counts L_i, the GSPO
sequence log-ratio means and the aggregation coefficients c_i / e_i with torch, then calls

    policy_rows(...)   one program per row: d(loss)/d(logp) (times c_i) for every token,
                       d(loss)/d(entropy), and the row's sums for the loss and the statistics
                       (rows[i, k], k in the order of RowVal in csrc/cpu/policy_loss.cpp);
    value_rows(...)    the same for the clipped value loss;
    kl_penalty(...)    the KL estimate, or grad_out * its derivative, elementwise.

Per-token formulas are those of ``csrc/cpu/policy_loss.cpp`` (see ``docs/ops/policy_loss.md``);
every input is read through (row stride, token stride) so views and broadcast [B] advantages
need no copy; all math is float32.  Masked tokens are selected away (``tl.where``), never
multiplied, so NaN or inf there does not leak.  A row's sums are a fixed-order tree over one
BLOCK of lanes, so results do not depend on the other rows.
"""

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["policy_rows", "value_rows", "kl_penalty"]

_BIG = 3.0e38  # stands for +inf in clamp bounds (Triton scalar arguments stay finite)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _fin(v: float) -> float:
    return _BIG if v == math.inf else (-_BIG if v == -math.inf else float(v))


def _block(T: int) -> int:
    cap = 64 if _interpret() else 1024
    return max(16, min(cap, triton.next_power_of_2(max(int(T), 1))))


def _strides(x, B, T):
    """(row stride, token stride) of a [B, T] view (0 for broadcast dimensions)."""
    if x is None:
        return 0, 0
    if x.dim() == 1:
        return 0, x.stride(0)
    return (x.stride(0) if B > 1 else 0), (x.stride(1) if T > 1 else 0)


@triton.jit
def _clamp(x, lo, hi):
    # torch.clamp: NaN stays NaN (tl.minimum/maximum may drop it).
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _k3_terms(q):
    # v = e^q - q - 1 and em1 = e^q - 1, accurate near q = 0 (series for |q| < 1/2).
    p = 2.7557319958e-07
    p = p * q + 2.7557318845e-06
    p = p * q + 2.4801587642e-05
    p = p * q + 1.9841270114e-04
    p = p * q + 1.3888889225e-03
    p = p * q + 8.3333337680e-03
    p = p * q + 4.1666667908e-02
    p = p * q + 1.6666667163e-01
    p = p * q + 5.0000000000e-01
    v_small = q * q * p
    e = tl.exp(q)
    small = (q > -0.5) & (q < 0.5)
    v = tl.where(small, v_small, (e - q) - 1.0)
    em1 = tl.where(small, q + v_small, e - 1.0)
    return v, em1


@triton.jit
def _kl_value_grad(d, lrc, oc, KM: tl.constexpr, KIND: tl.constexpr):
    if KM == 2:
        q = -d
        qc = _clamp(q, -lrc, lrc)
        v, em1 = _k3_terms(qc)
        g = tl.where(qc == q, -em1, 0.0)
    else:
        if KIND == 0:
            v = d
            g = tl.full(d.shape, 1.0, tl.float32)
        elif KIND == 1:
            v = tl.where(d < 0, -d, d)
            g = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        else:
            v = 0.5 * d * d
            g = d
    # oc = _BIG means no clamp: an overflowing estimate stays inf (as the reference), not 3e38
    vc = tl.where(oc >= 3.0e38, v, _clamp(v, -oc, oc))
    g = tl.where(vc == v, g, 0.0)
    return v, vc, g


@triton.jit
def _policy_rows_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, isw_ptr,
    s_lp_b, s_lp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_m_b, s_m_t, s_ref_b, s_ref_t,
    s_ent_b, s_ent_t, s_isw_b, s_isw_t,
    cpg_ptr, xs_ptr, glp_ptr, rows_ptr,
    T, lrc, seq_lr_max, clo, chi, dual_c, delta, tau_pos, tau_neg, beta, kl_lrc, kl_oc,
    VARIANT: tl.constexpr, KM: tl.constexpr, KIND: tl.constexpr, KL_ST: tl.constexpr,
    KL_RW: tl.constexpr, SEQ_GRAD: tl.constexpr, STATX: tl.constexpr, DUAL: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_ISW: tl.constexpr, HAS_ENT: tl.constexpr, WRITE_G: tl.constexpr, BLOCK: tl.constexpr,
    NR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.load(cpg_ptr + b)
    s_row = 1.0
    ds_tok = 0.0
    if VARIANT == 1:  # GSPO: s = exp(min(mean log-ratio, seq_lr_max))
        xs = tl.load(xs_ptr + b)
        ind = xs <= seq_lr_max
        s_row = tl.exp(tl.where(xs > seq_lr_max, seq_lr_max, xs))
        if not SEQ_GRAD:  # GSPO-token (verl): s_it = sg(s_i) pi / sg(pi); else host coupling
            ds_tok = tl.where(ind, s_row, 0.0)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    a_pg = zero
    a_k = zero
    a_h = zero
    a_clip = zero
    a_lo = zero
    a_hi = zero
    a_dual = zero
    a_nx = zero
    a_r = zero
    a_kv = zero
    a_cp = zero
    a_bad = zero
    for t0 in range(0, T, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        inb = offs < T
        m = tl.load(mask_ptr + b * s_m_b + offs * s_m_t, mask=inb, other=0).to(tl.float32)
        on = m != 0.0
        lp = tl.load(lp_ptr + b * s_lp_b + offs * s_lp_t, mask=inb, other=0.0).to(tl.float32)
        if HAS_OLD:
            old = tl.load(old_ptr + b * s_old_b + offs * s_old_t, mask=inb,
                          other=0.0).to(tl.float32)
        else:
            old = lp
        a = tl.load(adv_ptr + b * s_adv_b + offs * s_adv_t, mask=inb, other=0.0).to(tl.float32)
        if HAS_ISW:
            w = tl.load(isw_ptr + b * s_isw_b + offs * s_isw_t, mask=inb,
                        other=1.0).to(tl.float32)
        else:
            w = zero + 1.0
        xr = lp - old
        if VARIANT == 1:
            r = zero + s_row
            drdl = zero + ds_tok
            xstat = xr
        else:
            x = _clamp(xr, -lrc, lrc)
            r = tl.exp(x)
            drdl = tl.where(x == xr, r, 0.0)
            if STATX:
                xstat = x
            else:
                xstat = xr
        neg = a < 0.0
        pos = a > 0.0
        dPdl = zero
        dPdr = zero
        if VARIANT == 0 or VARIANT == 1:  # PPO / GSPO
            c1 = tl.where(r > delta, delta, r)
            c2 = _clamp(r, clo, chi)
            u1 = a * c1
            u2 = a * c2
            clipped = u2 < u1
            lc = -tl.where(clipped, u2, u1)
            dlc = -tl.where(clipped, tl.where(c2 == r, a, 0.0), tl.where(c1 == r, a, 0.0))
            a_clip += tl.where(on & clipped, 1.0, 0.0)
            if DUAL:  # dual-clip for A < 0: min(lc, -c A)
                cap = -dual_c * a
                dual_on = neg & (lc > cap)
                P = tl.where(dual_on, cap, lc)
                dPdr = tl.where(dual_on, 0.0, dlc)
                a_dual += tl.where(on & dual_on, 1.0, 0.0)
            else:
                P = lc
                dPdr = dlc
        elif VARIANT == 2:  # CISPO
            cr = _clamp(r, clo, chi)
            P = -cr * a * lp
            dPdl = -cr * a
            a_clip += tl.where(on & (cr != r), 1.0, 0.0)
        elif VARIANT == 3:  # SAPO
            tau = tl.where(pos, tau_pos, tau_neg)
            e = tl.exp(-(tau * (r - 1.0)))
            sig = 1.0 / (1.0 + e)
            P = -(4.0 / tau) * sig * a
            # 1 - sig = e sig where sig >= 1/2 (no cancellation; e <= 1 there)
            dPdr = -4.0 * sig * tl.where(sig < 0.5, 1.0 - sig, e * sig) * a
        else:  # GPG / REINFORCE
            P = -a * lp
            dPdl = -a
        a_lo += tl.where(on & (r < clo) & neg, 1.0, 0.0)
        a_hi += tl.where(on & (r > chi) & pos, 1.0, 0.0)
        dl = w * (dPdl + dPdr * drdl)
        cpl = w * dPdr
        if KM != 0:
            ref = tl.load(ref_ptr + b * s_ref_b + offs * s_ref_t, mask=inb,
                          other=0.0).to(tl.float32)
            d = lp - ref
            v, vc, g = _kl_value_grad(d, kl_lrc, kl_oc, KM, KIND)
            if KL_ST:
                g = d
            if KL_RW:
                K = r * vc
                dl += beta * (r * g + vc * drdl)
                cpl += beta * vc
            else:
                K = vc
                dl += beta * g
            a_k += tl.where(on, K, 0.0)
            a_kv += tl.where(on, vc, 0.0)
        a_pg += tl.where(on, P * w, 0.0)
        if HAS_ENT:
            h = tl.load(ent_ptr + b * s_ent_b + offs * s_ent_t, mask=inb,
                        other=0.0).to(tl.float32)
            a_h += tl.where(on, h, 0.0)
        a_nx += tl.where(on, -xstat, 0.0)
        a_r += tl.where(on, r, 0.0)
        a_cp += tl.where(on, cpl, 0.0)
        a_bad += tl.where(on & ((a - a) != 0.0), 1.0, 0.0)
        if WRITE_G:
            tl.store(glp_ptr + b * T + offs, tl.where(on, cb * dl, 0.0), mask=inb)
    out = rows_ptr + b * NR
    tl.store(out + 0, tl.sum(a_pg, axis=0))
    tl.store(out + 1, tl.sum(a_k, axis=0))
    tl.store(out + 2, tl.sum(a_h, axis=0))
    tl.store(out + 3, tl.sum(a_clip, axis=0))
    tl.store(out + 4, tl.sum(a_lo, axis=0))
    tl.store(out + 5, tl.sum(a_hi, axis=0))
    tl.store(out + 6, tl.sum(a_dual, axis=0))
    tl.store(out + 7, tl.sum(a_nx, axis=0))
    tl.store(out + 8, tl.sum(a_r, axis=0))
    tl.store(out + 9, tl.sum(a_kv, axis=0))
    tl.store(out + 10, tl.sum(a_cp, axis=0))
    tl.store(out + 11, tl.sum(a_bad, axis=0))


def policy_rows(logp, old, adv, mask, ref, ent, isw, cpg, xs, glp, rows, cfg):
    """Launch the row kernel (one program per row).  ``glp`` gets c_i * d(l_t)/d(logp_t);
    ``rows`` is [B, 12] float32: the ten row sums of RowVal, then the GSPO coupling sum and
    the count of non-finite advantages."""
    B, T = logp.shape
    dummy = logp
    s = {k: _strides(v, B, T) for k, v in dict(lp=logp, old=old, adv=adv, m=mask, ref=ref,
                                                ent=ent, isw=isw).items()}
    write_g = glp.numel() > 0
    dual = math.isfinite(cfg.dual_c)
    _policy_rows_kernel[(B,)](
        logp, old if old is not None else dummy, adv, mask, ref if ref is not None else dummy,
        ent if ent is not None else dummy, isw if isw is not None else dummy,
        *s["lp"], *s["old"], *s["adv"], *s["m"], *s["ref"], *s["ent"], *s["isw"],
        cpg, xs if xs is not None else cpg, glp if write_g else rows, rows,
        T, _fin(cfg.lr_clamp), _fin(cfg.seq_lr_max), _fin(cfg.clip_lo), _fin(cfg.clip_hi),
        cfg.dual_c if dual else 0.0, _fin(cfg.delta), cfg.tau_pos, cfg.tau_neg, cfg.beta,
        _fin(cfg.kl_lr_clamp), _fin(cfg.kl_out_clamp),
        VARIANT=4 if cfg.variant == 5 else int(cfg.variant), KM=int(cfg.kl_mode),
        KIND=int(cfg.kl_kind), KL_ST=bool(cfg.kl_st), KL_RW=bool(cfg.kl_rw),
        SEQ_GRAD=bool(cfg.seq_grad), STATX=bool(cfg.stat_x_clamped), DUAL=dual,
        HAS_OLD=old is not None, HAS_ISW=isw is not None, HAS_ENT=ent is not None,
        WRITE_G=write_g, BLOCK=_block(T), NR=rows.size(1),
    )


@triton.jit
def _value_rows_kernel(
    v_ptr, o_ptr, r_ptr, m_ptr, s_v_b, s_v_t, s_o_b, s_o_t, s_r_b, s_r_t, s_m_b, s_m_t,
    c_ptr, g_ptr, rows_ptr, T, clip,
    FORM: tl.constexpr, HAS_OLD: tl.constexpr, WRITE_G: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.load(c_ptr + b)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    a_l = zero
    a_c = zero
    a_v = zero
    for t0 in range(0, T, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        inb = offs < T
        m = tl.load(m_ptr + b * s_m_b + offs * s_m_t, mask=inb, other=0).to(tl.float32)
        on = m != 0.0
        v = tl.load(v_ptr + b * s_v_b + offs * s_v_t, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(r_ptr + b * s_r_b + offs * s_r_t, mask=inb, other=0.0).to(tl.float32)
        if HAS_OLD:
            o = tl.load(o_ptr + b * s_o_b + offs * s_o_t, mask=inb, other=0.0).to(tl.float32)
        else:
            o = v
        if FORM == 0:
            vc = _clamp(v, o - clip, o + clip)
            ind = tl.where(vc == v, 1.0, 0.0)
        else:
            dv = v - o
            dc = _clamp(dv, -clip, clip)
            vc = o + dc
            ind = tl.where(dc == dv, 1.0, 0.0)
        e1 = v - y
        e2 = vc - y
        l1 = e1 * e1
        l2 = e2 * e2
        g1 = 2.0 * e1
        g2 = 2.0 * e2 * ind
        second = l2 > l1
        lm = tl.where(second, l2, l1)
        gg = tl.where(second, g2, tl.where(l1 > l2, g1, 0.5 * (g1 + g2)))
        a_l += tl.where(on, lm, 0.0)
        a_c += tl.where(on & second, 1.0, 0.0)
        a_v += tl.where(on, v, 0.0)
        if WRITE_G:
            tl.store(g_ptr + b * T + offs, tl.where(on, cb * 0.5 * gg, 0.0), mask=inb)
    out = rows_ptr + b * 3
    tl.store(out + 0, tl.sum(a_l, axis=0))
    tl.store(out + 1, tl.sum(a_c, axis=0))
    tl.store(out + 2, tl.sum(a_v, axis=0))


def value_rows(values, old, returns, mask, coef, grad, rows, form, clip):
    B, T = values.shape
    write_g = grad.numel() > 0
    _value_rows_kernel[(B,)](
        values, old if old is not None else values, returns, mask,
        *_strides(values, B, T), *_strides(old, B, T), *_strides(returns, B, T),
        *_strides(mask, B, T), coef, grad if write_g else rows, rows, T, _fin(clip),
        FORM=int(form), HAS_OLD=old is not None, WRITE_G=write_g, BLOCK=_block(T),
    )


@triton.jit
def _kl_kernel(
    lp_ptr, ref_ptr, go_ptr, out_ptr, s_lp_r, s_lp_c, s_ref_r, s_ref_c, s_go_r, s_go_c, C,
    lrc, oc, KM: tl.constexpr, KIND: tl.constexpr, ST: tl.constexpr, BACKWARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < C
    lp = tl.load(lp_ptr + r * s_lp_r + offs * s_lp_c, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + r * s_ref_r + offs * s_ref_c, mask=inb, other=0.0).to(tl.float32)
    d = lp - ref
    v, vc, g = _kl_value_grad(d, lrc, oc, KM, KIND)
    if BACKWARD:
        go = tl.load(go_ptr + r * s_go_r + offs * s_go_c, mask=inb, other=0.0).to(tl.float32)
        if ST:
            g = d
        tl.store(out_ptr + r * C + offs, go * g, mask=inb)
    else:
        tl.store(out_ptr + r * C + offs, vc, mask=inb)


def kl_penalty(lp2, ref2, go2, out, kind, straight, kl_lr, kl_out, backward):
    """KL estimate (forward) or grad_out * d(estimate)/d(logp) (backward) over [R, C] views;
    ``out`` is contiguous [R, C] (float32, or float64 which is written from float32 math)."""
    R, C = lp2.shape
    BLOCK = _block(C)
    res = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32,
                                                              device=out.device)
    go = go2 if go2 is not None else lp2
    _kl_kernel[(R, triton.cdiv(C, BLOCK))](
        lp2, ref2, go, res, *_strides(lp2, R, C), *_strides(ref2, R, C), *_strides(go, R, C), C,
        _fin(kl_lr), _fin(kl_out), KM=2 if kind == 3 else 1, KIND=int(kind), ST=bool(straight),
        BACKWARD=bool(backward), BLOCK=BLOCK,
    )
    if res is not out:
        out.copy_(res)
