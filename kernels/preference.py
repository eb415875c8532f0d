"""Triton backend of the preference family: the per-pair DPO-family loss, its gradients with
respect to the chosen / rejected sequence log-probs, and the statistics, in one program.

The Python side (``rlfuse.ops.preference``) resolves the configuration; this kernel gets
contiguous float64 per-pair inputs (the math runs in float64 for every input dtype, as in
the C++ and CUDA kernels), the loss-type codes and weights, and the scalar parameters as a
float64 tensor.  One program walks the P pairs in blocks of BLOCK:

    pass 1 (only with an "sft" term): sum_i c_i, sum_i L_c,i, sum_i p_i
    pass 2: per pair, every listed type's value and partial derivatives (the formulas of
            csrc/cpu/preference.h, see docs/ops/preference.md), gradients, statistics; the
            loss is a fixed-order tree sum of the per-lane partial sums.

The result does not depend on launch timing; a pair's statistics depend on that pair only.
"""

import math

import torch
import triton
import triton.language as tl

__all__ = ["preference_loss"]


@triton.jit
def _log1p(y):
    # accurate log(1 + y) without a log1p intrinsic (Goldberg's trick)
    u = 1.0 + y
    d = u - 1.0
    return tl.where(d == 0.0, y, tl.log(u) * (y / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _expm1(x):
    u = tl.exp(x)
    d = u - 1.0
    safe = (u != 1.0) & (d != -1.0)
    out = tl.where(safe, d * x / tl.log(tl.where(safe, u, 2.0)), x)
    return tl.where(d == -1.0, -1.0, out)


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _log1mexp(x):
    return tl.where(x < -0.6931471805599453, _log1p(-tl.exp(x)), tl.log(-_expm1(x)))


@triton.jit
def _f_score(u, falpha, FDIV: tl.constexpr):
    if FDIV == 1:  # forward KL: 1 - e^-u
        e = tl.exp(-u)
        s = 1.0 - e
        ds = e
    elif FDIV == 2:  # JS: log 2 + logsigmoid(u)
        s = 0.6931471805599453 - _softplus(-u)
        ds = _sigmoid(-u)
    elif FDIV == 3:  # alpha divergence, exponent clamped at 80
        am1 = falpha - 1.0
        t = am1 * u
        e = tl.exp(tl.minimum(t, 80.0))
        s = (e - 1.0) / am1
        ds = tl.where(t > 80.0, 0.0, e)
    else:
        s = u
        ds = u * 0.0 + 1.0
    return s, ds


@triton.jit
def _pref_kernel(
    c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, pw_ptr, codes_ptr, w_ptr, prm_ptr,
    loss_ptr, gc_ptr, gr_ptr, stats_ptr, P, K,
    HAS_REF: tl.constexpr, HAS_LEN: tl.constexpr, HAS_PW: tl.constexpr, HAS_SFT: tl.constexpr,
    FDIV: tl.constexpr, IPO_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    beta = tl.load(prm_ptr + 0)
    eps = tl.load(prm_ptr + 1)
    gamma = tl.load(prm_ptr + 2)
    tau = tl.load(prm_ptr + 3)
    falpha = tl.load(prm_ptr + 4)
    log1m_eps = tl.load(prm_ptr + 5)
    log_eps = tl.load(prm_ptr + 6)
    w_sft = tl.load(prm_ptr + 7)
    lanes = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=prm_ptr.dtype.element_ty)

    sft_val = tl.sum(zero, axis=0)
    sft_grad = sft_val
    if HAS_SFT:
        acc_c = zero
        acc_l = zero
        acc_w = zero
        for s in range(0, P, BLOCK):
            offs = s + lanes
            inb = offs < P
            acc_c += tl.load(c_ptr + offs, mask=inb, other=0.0)
            if HAS_LEN:
                acc_l += tl.load(lc_ptr + offs, mask=inb, other=0.0)
            else:
                acc_l += tl.where(inb, 1.0, 0.0)
            if HAS_PW:
                acc_w += tl.load(pw_ptr + offs, mask=inb, other=0.0)
            else:
                acc_w += tl.where(inb, 1.0, 0.0)
        denom = tl.maximum(tl.sum(acc_l, axis=0), 1.0)
        sft_val = -tl.sum(acc_c, axis=0) / denom
        sft_grad = -w_sft * (tl.sum(acc_w, axis=0) / P) / denom

    loss_acc = zero
    for s in range(0, P, BLOCK):
        offs = s + lanes
        inb = offs < P
        c = tl.load(c_ptr + offs, mask=inb, other=0.0)
        r = tl.load(r_ptr + offs, mask=inb, other=0.0)
        if HAS_REF:
            uc = c - tl.load(rc_ptr + offs, mask=inb, other=0.0)
            ur = r - tl.load(rr_ptr + offs, mask=inb, other=0.0)
        else:
            uc = c
            ur = r
        if HAS_LEN:
            lc = tl.maximum(tl.load(lc_ptr + offs, mask=inb, other=1.0), 1.0)
            lr = tl.maximum(tl.load(lr_ptr + offs, mask=inb, other=1.0), 1.0)
        else:
            lc = zero + 1.0
            lr = zero + 1.0
        sc, dsc = _f_score(uc, falpha, FDIV)
        sr, dsr = _f_score(ur, falpha, FDIV)
        # pieces shared by the types
        z = beta * (sc - sr)
        a = beta * uc
        b = beta * ur
        sp_nz = _softplus(-z)
        sp_z = _softplus(z)
        sg_nz = _sigmoid(-z)
        sg_z = _sigmoid(z)
        sg_a = _sigmoid(a)
        sg_na = _sigmoid(-a)
        sg_b = _sigmoid(b)
        sg_nb = _sigmoid(-b)
        # length-averaged differences (ipo, sigmoid_norm, simpo, orpo)
        dn = sc / lc - sr / lr
        ac = c / lc
        ar = r / lr
        v_tot = zero
        gc_tot = zero
        gr_tot = zero
        for k in range(0, K):
            code = tl.load(codes_ptr + k)
            wk = tl.load(w_ptr + k)
            # z-based types: value and d/dz
            v = (1.0 - eps) * sp_nz + eps * sp_z  # sigmoid (cDPO)
            dz = -(1.0 - eps) * sg_nz + eps * sg_z
            # hinge: relu(1 - z); `h <= 0` is false for NaN, so a NaN z gives a NaN
            # value and slope (as the sigmoid types do)
            h = 1.0 - z
            hinge_off = h <= 0.0
            v = tl.where(code == 1, tl.where(hinge_off, 0.0, h), v)
            dz = tl.where(code == 1, tl.where(hinge_off, 0.0, tl.where(h != h, h, -1.0)), dz)
            v = tl.where(code == 3, sg_z * (-sp_nz - log1m_eps) + sg_nz * (-sp_z - log_eps), v)
            dz = tl.where(code == 3, sg_z * sg_nz * (z + log_eps - log1m_eps), dz)
            kr = 1.0 / (1.0 - 2.0 * eps)
            v = tl.where(code == 5, ((1.0 - eps) * sp_nz - eps * sp_z) * kr, v)
            dz = tl.where(code == 5, (-(1.0 - eps) * sg_nz - eps * sg_z) * kr, dz)
            m = _sigmoid(z / tau)
            mn = _sigmoid(-z / tau)
            dm = m * mn / tau
            exm = tl.exp(-z - _softplus(-z / tau))  # e^-z m without overflow
            v = tl.where(code == 10, sp_nz * (1.0 - m) + exm, v)
            dz = tl.where(code == 10, -sg_nz * (1.0 - m) - sp_nz * dm - exm + exm * mn / tau, dz)
            dc = dz * beta * dsc
            dr = -dz * beta * dsr
            # ipo / sigmoid_norm (length-averaged scores)
            ipo_avg = IPO_NORM != 0
            d_ipo = tl.where(ipo_avg, dn, sc - sr)
            ic = tl.where(ipo_avg, 1.0 / lc, 1.0)
            ir = tl.where(ipo_avg, 1.0 / lr, 1.0)
            e_ipo = d_ipo - 1.0 / (2.0 * beta)
            v = tl.where(code == 2, e_ipo * e_ipo, v)
            dc = tl.where(code == 2, 2.0 * e_ipo * ic * dsc, dc)
            dr = tl.where(code == 2, -2.0 * e_ipo * ir * dsr, dr)
            dd = -beta * _sigmoid(-beta * dn)
            v = tl.where(code == 11, _softplus(-beta * dn), v)
            dc = tl.where(code == 11, dd * dsc / lc, dc)
            dr = tl.where(code == 11, -dd * dsr / lr, dr)
            # types on the log-ratios u_c, u_r
            v = tl.where(code == 4, _softplus(-a) + 0.5 * _softplus(a) + 0.5 * _softplus(b), v)
            dc = tl.where(code == 4, beta * (-sg_na + 0.5 * sg_a), dc)
            dr = tl.where(code == 4, beta * 0.5 * sg_b, dr)
            v = tl.where(code == 6, _softplus(-a) + _softplus(b), v)
            dc = tl.where(code == 6, -beta * sg_na, dc)
            dr = tl.where(code == 6, beta * sg_b, dr)
            h = 0.5 / beta
            v = tl.where(code == 7, (uc - h) * (uc - h) + (ur + h) * (ur + h), v)
            dc = tl.where(code == 7, 2.0 * (uc - h), dc)
            dr = tl.where(code == 7, 2.0 * (ur + h), dr)
            v = tl.where(code == 8, (1.0 - sg_a) + sg_b, v)
            dc = tl.where(code == 8, -beta * sg_a * sg_na, dc)
            dr = tl.where(code == 8, beta * sg_b * sg_nb, dr)
            mm = beta * (uc - ur)
            sm = _sigmoid(mm)
            gm = beta * sm * _sigmoid(-mm)
            v = tl.where(code == 9, sg_a + (1.0 - sm), v)
            dc = tl.where(code == 9, beta * sg_a * sg_na - gm, dc)
            dr = tl.where(code == 9, gm, dr)
            # reference-free: simpo, orpo; sft is the batch term
            y = beta * (ac - ar) - gamma
            v = tl.where(code == 13, (1.0 - eps) * _softplus(-y) + eps * _softplus(y), v)
            dy = -(1.0 - eps) * _sigmoid(-y) + eps * _sigmoid(y)
            dc = tl.where(code == 13, dy * beta / lc, dc)
            dr = tl.where(code == 13, -dy * beta / lr, dr)
            lo = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            go = -beta * _sigmoid(-lo)
            v = tl.where(code == 14, beta * _softplus(-lo), v)
            dc = tl.where(code == 14, go * (-1.0 / _expm1(ac)) / lc, dc)
            dr = tl.where(code == 14, go * (1.0 / _expm1(ar)) / lr, dr)
            v = tl.where(code == 12, sft_val + zero, v)
            dc = tl.where(code == 12, 0.0, dc)
            dr = tl.where(code == 12, 0.0, dr)
            v_tot += wk * v
            gc_tot += wk * dc
            gr_tot += wk * dr
        if HAS_PW:
            wi = tl.load(pw_ptr + offs, mask=inb, other=0.0)
        else:
            wi = zero + 1.0
        li = wi * v_tot
        loss_acc += tl.where(inb, li, 0.0)
        tl.store(gc_ptr + offs, wi * gc_tot / P + sft_grad, mask=inb)
        tl.store(gr_ptr + offs, wi * gr_tot / P, mask=inb)
        if HAS_REF:
            rew_c = beta * uc
            rew_r = beta * ur
        else:
            rew_c = beta * ac
            rew_r = beta * ar
        tl.store(stats_ptr + offs, rew_c, mask=inb)
        tl.store(stats_ptr + P + offs, rew_r, mask=inb)
        tl.store(stats_ptr + 2 * P + offs, rew_c - rew_r, mask=inb)
        tl.store(stats_ptr + 3 * P + offs, tl.where(rew_c > rew_r, 1.0, 0.0), mask=inb)
        tl.store(stats_ptr + 4 * P + offs, li, mask=inb)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / P)


def preference_loss(c, r, rc, rr, lc, lr, pw, ints, floats, loss, grad_c, grad_r, stats):
    """Fill loss, grad_c, grad_r and stats ([5, P]) for P >= 1 pairs (layout: ops/preference).

    The math runs in float64 whatever the input dtype (P values cost nothing, and float32
    intermediates such as forward-KL scores can overflow); float32 outputs are rounded once.
    """
    acc = torch.float64
    dev = c.device
    outs = (loss, grad_c, grad_r, stats)
    if loss.dtype != acc:
        loss, grad_c, grad_r, stats = (torch.empty(o.shape, dtype=acc, device=dev) for o in outs)
    P = c.numel()
    fcode, ipo_norm, K = int(ints[0]), int(ints[1]), int(ints[2])
    # (padded to one entry: a kernel argument is never an empty tensor)
    codes = torch.tensor(list(ints[3:3 + K]) or [0], dtype=torch.int32, device=dev)
    weights = torch.tensor(list(floats[5:5 + K]) or [0.0], dtype=acc, device=dev)
    beta, eps, gamma, tau, falpha = (float(v) for v in floats[:5])
    w_sft = sum(w for code, w in zip(ints[3:3 + K], floats[5:5 + K]) if code == 12)
    log1m_eps = math.log1p(-eps) if eps < 1 else -math.inf
    log_eps = math.log(eps) if eps > 0 else -math.inf
    prm = torch.tensor([beta, eps, gamma, tau, falpha, log1m_eps, log_eps, w_sft], dtype=acc,
                       device=dev)

    def vec(x):
        return None if x is None else x.to(acc).contiguous()

    cv, rv, rcv, rrv, lcv, lrv, pwv = (vec(x) for x in (c, r, rc, rr, lc, lr, pw))
    block = min(1024, max(16, triton.next_power_of_2(P)))
    _pref_kernel[(1,)](
        cv, rv, rcv if rcv is not None else cv, rrv if rrv is not None else cv,
        lcv if lcv is not None else cv, lrv if lrv is not None else cv,
        pwv if pwv is not None else cv, codes, weights, prm, loss, grad_c, grad_r, stats, P, K,
        HAS_REF=rc is not None, HAS_LEN=lc is not None, HAS_PW=pw is not None,
        HAS_SFT=12 in ints[3:3 + K], FDIV=fcode, IPO_NORM=ipo_norm, BLOCK=block,
    )
    if outs[0] is not loss:
        for o, t in zip(outs, (loss, grad_c, grad_r, stats)):
            o.copy_(t)
