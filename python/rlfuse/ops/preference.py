"""DPO-family preference losses over (chosen, rejected) pairs, and their fused form from
hidden states.

    preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None,
                    ref_rejected_logps=None, *, loss_type="sigmoid", beta=0.1,
                    label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
                    loss_weights=None, pair_weights=None, backend=None, **type_args)
        -> (loss, stats)
    preference_logps(hidden, weight, token_ids, *, mask=None, cu_seqlens=None,
                     token_weights=None, ld_alpha=None, ...) -> PreferenceLogps
    preference_loss_from_hidden(hidden, weight, token_ids, *, ref_chosen_logps=None,
                                ref_rejected_logps=None, loss_type="sigmoid", ...)
        -> (loss, stats)

With c, r the policy's summed log-probs of the chosen / rejected completion of pair i, c0, r0
the reference model's, u_c = c - c0, u_r = r - r0, s = the f-divergence score of u
(s = u for the default reverse KL), L_c, L_r the completion lengths (clamped to >= 1),
z = beta (s_c - s_r) and e = label_smoothing, the per-pair terms are (TRL 1.16
DPOTrainer, CPOTrainer (simpo), ORPOTrainer (orpo); softplus(x) = -logsigmoid(-x)):

    sigmoid       (1 - e) softplus(-z) + e softplus(z)             (cDPO smoothing; e = 0 is TRL)
    hinge         relu(1 - z)
    ipo           (s_c / L_c - s_r / L_r - 1 / (2 beta))^2         (ipo_length_normalize=False:
                                                                    (s_c - s_r - 1/(2 beta))^2,
                                                                    OpenRLHF)
    exo_pair      q (log q - log(1 - e)) + (1 - q)(log(1 - q) - log e),  q = sigmoid(z)
    nca_pair      softplus(-a) + softplus(a) / 2 + softplus(b) / 2,   a = beta u_c, b = beta u_r
    robust        ((1 - e) softplus(-z) - e softplus(z)) / (1 - 2e)
    bco_pair      softplus(-a) + softplus(b)
    sppo_hard     (u_c - 1/(2 beta))^2 + (u_r + 1/(2 beta))^2
    apo_zero      1 - sigmoid(a) + sigmoid(b)
    apo_down      sigmoid(a) + 1 - sigmoid(a - b)
    discopop      softplus(-z) (1 - m) + exp(-z) m,   m = sigmoid(z / discopop_tau)
    sigmoid_norm  softplus(-beta (s_c / L_c - s_r / L_r))
    sft           -sum_i c_i / sum_i L_c,i   (a batch token mean, the same for every pair)
    simpo         (1 - e) softplus(-y) + e softplus(y),  y = beta (c / L_c - r / L_r) - simpo_gamma
    orpo          beta softplus(-o),  o = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)),
                  a = c / L (the odds-ratio term; TRL's ORPO loss is ["sft", "orpo"])
    aot           the sigmoid term (with e) of d_k = sort(c - r)_k - sort(c0 - r0)_k, a mean
                  over the ranks k of the sorted batch; aot_unpaired: sort(u_c) - sort(u_r)

    loss = sum_k w_k mean_i(p_i term_k(i))   (w = loss_weights, p = pair_weights, default 1)

Gradients flow to the policy log-probs c, r only (the reference log-probs, lengths and
weights are constants).  Full formulas and where the frameworks differ:
``docs/ops/preference.md``.  Kernels: ``csrc/cpu/preference.{h,cpp}``,
``csrc/cuda/preference.cu``, ``kernels/preference.py``; one call computes the loss, both
gradients and the statistics, and the backward is one multiply.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch

from rlfuse import _backend, _validate

__all__ = [
    "LOSS_TYPES",
    "SORTED_TYPES",
    "REFERENCE_FREE_TYPES",
    "F_DIVERGENCES",
    "PreferenceLogps",
    "preference_loss",
    "preference_loss_reference",
    "preference_logps",
    "preference_loss_from_hidden",
]

_OP = "preference_loss"

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo",
              "orpo")
_CODES = {name: i for i, name in enumerate(LOSS_TYPES)}  # csrc/cpu/preference.h: LossType
# TRL's types that sort log-ratios across the batch: computed with torch around the kernel.
SORTED_TYPES = ("aot", "aot_unpaired")
REFERENCE_FREE_TYPES = ("sft", "simpo", "orpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# Types that TRL allows with a non-default f_divergence_type (the others use u_c, u_r).
_FDIV_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_TYPE_ARGS = {"ipo_length_normalize": True, "simpo_gamma": 0.5, "discopop_tau": 0.05,
              "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
_MAX_TYPES = 32  # csrc/cuda/preference.cu: kMaxTypes
STATS = ("chosen_rewards", "rejected_rewards", "margins", "accuracies", "losses")
_N_STATS = len(STATS)

# Argument layout of csrc/cpu/preference.h (enum PrefI / PrefF).
_V3 = 3  # a per-pair input is (pointer, dtype code, stride)
_PI = dict(P=0, threads=1, c=2, r=5, rc=8, rr=11, lc=14, lr=17, pw=20, loss=23, grad_c=24,
           grad_r=25, stats=26, fdiv=27, ipo_norm=28, n_types=29)
_PI_N = 30
_LEN_CODES = {torch.int32: 12, torch.int64: 13, **_backend.DTYPE_CODES}
_LEN_DTYPES = tuple(_LEN_CODES) + (torch.int16, torch.int8, torch.uint8)

_EAGER_AUTOGRAD_FUNCTION = True  # as in policy_loss: eager calls skip the custom-op dispatch


def _use_library_op(*tensors) -> bool:
    """The registered op (not the eager autograd.Function): under torch.compile, a dispatch
    mode such as FakeTensorMode, or for meta / fake / subclass inputs (_backend)."""
    return not _EAGER_AUTOGRAD_FUNCTION or _backend.library_op_needed(*tensors)


# ======================================================================================
# Configuration
# ======================================================================================
def _real(op, name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


def _types_and_weights(op, loss_type, loss_weights):
    if isinstance(loss_type, str):
        types = (loss_type,)
    elif isinstance(loss_type, dict):
        if loss_weights is not None:
            raise ValueError(f"{op}: pass loss weights either in the loss_type dict or as "
                             "loss_weights, not both")
        types, loss_weights = tuple(loss_type), tuple(loss_type.values())
    elif isinstance(loss_type, (list, tuple)):
        types = tuple(loss_type)
    else:
        raise TypeError(f"{op}: loss_type must be a str, a list of str or a dict "
                        f"{{type: weight}}, got {type(loss_type).__name__}")
    if not types:
        raise ValueError(f"{op}: loss_type is an empty list")
    if len(types) > _MAX_TYPES:
        raise ValueError(f"{op}: at most {_MAX_TYPES} loss types per call, got {len(types)}")
    for t in types:
        if not isinstance(t, str):
            raise TypeError(f"{op}: every loss_type must be a str, got {type(t).__name__}")
        if t not in _CODES and t not in SORTED_TYPES:
            raise ValueError(f"{op}: unknown loss_type {t!r}; choose from "
                             f"{LOSS_TYPES + SORTED_TYPES}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
            raise TypeError(f"{op}: loss_weights must be a list of numbers, got "
                            f"{type(loss_weights).__name__}")
        weights = tuple(_real(op, "loss_weights", w) for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"{op}: loss_weights has {len(weights)} entries but loss_type has "
                             f"{len(types)}")
    return types, weights


def _resolve_impl(op, types, weights, beta, label_smoothing, has_ref, has_len, has_pw,
                  type_args, arg_types=()):
    """(ints, floats) of the kernel configuration and the sorted (aot) terms
    ((name, weight), ...); raises on inconsistent arguments.
    ``arg_types`` (the types of the type_args values) only keys the cache: 0 == False, so
    without it ipo_length_normalize=0 would skip its bool check after a call with False."""
    beta = _validate.positive_float(op, "beta", beta)
    eps = _real(op, "label_smoothing", label_smoothing)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 1], got {eps}")
    ta = dict(_TYPE_ARGS)
    for k, v in type_args:
        if k not in ta:
            raise TypeError(f"{op}: unexpected keyword argument {k!r}; type arguments are "
                            f"{tuple(_TYPE_ARGS)}")
        ta[k] = v
    if not isinstance(ta["ipo_length_normalize"], bool):
        raise TypeError(f"{op}: ipo_length_normalize must be a bool")
    gamma = _real(op, "simpo_gamma", ta["simpo_gamma"])
    tau = _validate.positive_float(op, "discopop_tau", ta["discopop_tau"])
    fdiv = ta["f_divergence_type"]
    if fdiv not in F_DIVERGENCES:
        raise ValueError(f"{op}: f_divergence_type must be one of {F_DIVERGENCES}, got {fdiv!r}")
    falpha = _real(op, "f_alpha_divergence_coef", ta["f_alpha_divergence_coef"])
    fcode = F_DIVERGENCES.index(fdiv)
    if fdiv == "alpha_divergence" and abs(falpha - 1.0) < 1e-6:
        fcode = 0  # the limit alpha -> 1 is the reverse KL (as TRL)
    if fcode != 0:
        bad = [t for t in types if t not in _FDIV_TYPES]
        if bad:
            raise ValueError(f"{op}: f_divergence_type={fdiv!r} works with {_FDIV_TYPES} only "
                             f"(as in TRL), got {bad}")
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"{op}: loss_type 'robust' needs label_smoothing in [0, 0.5), got {eps}")
    if "exo_pair" in types and not 0.0 < eps < 1.0:
        raise ValueError(f"{op}: loss_type 'exo_pair' needs label_smoothing in (0, 1) (log of it "
                         f"is taken), got {eps}")
    need_ref = [t for t in types if t not in REFERENCE_FREE_TYPES]
    if need_ref and not has_ref:
        raise ValueError(f"{op}: loss_type {need_ref} needs ref_chosen_logps and "
                         "ref_rejected_logps (the reference model's sequence log-probs); they are "
                         "None")
    need_len = [t for t in types if t in ("sigmoid_norm", "sft", "simpo", "orpo")
                or (t == "ipo" and ta["ipo_length_normalize"])]
    if need_len and not has_len:
        raise ValueError(f"{op}: loss_type {need_len} needs chosen_lengths and rejected_lengths "
                         "(completion token counts); they are None")
    sorted_terms = tuple((t, w) for t, w in zip(types, weights) if t in SORTED_TYPES)
    if sorted_terms and has_pw:
        raise ValueError(f"{op}: pair_weights cannot weight {[t for t, _ in sorted_terms]}: their "
                         "terms belong to ranks of the sorted batch, not to pairs (TRL refuses "
                         "use_weighting with them too)")
    kernel = [(t, w) for t, w in zip(types, weights) if t in _CODES]
    ints = [fcode, int(ta["ipo_length_normalize"]), len(kernel)] + [_CODES[t] for t, _ in kernel]
    floats = [beta, eps, gamma, tau, falpha] + [w for _, w in kernel]
    return tuple(ints), tuple(floats), sorted_terms


_resolve_cached = functools.lru_cache(maxsize=256)(_resolve_impl)


def _config(op, loss_type, loss_weights, beta, label_smoothing, has_ref, has_len, type_args,
            has_pw=False):
    types, weights = _types_and_weights(op, loss_type, loss_weights)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"{op}: beta must be a real number, got {type(beta).__name__}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(f"{op}: label_smoothing must be a real number, got "
                        f"{type(label_smoothing).__name__}")
    try:
        items = tuple(sorted(type_args.items()))
        hash(items)
    except TypeError:
        raise TypeError(f"{op}: type arguments must be numbers, bools or strings") from None
    resolve = _resolve_impl if torch.compiler.is_compiling() else _resolve_cached
    return resolve(op, types, weights, float(beta), float(label_smoothing), has_ref, has_len,
                   has_pw, items, tuple(type(v) for _, v in items))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ======================================================================================
# Reference (the specification), written as TRL writes it
# ======================================================================================
def _f_score(u, fcode, falpha):
    import torch.nn.functional as F

    if fcode == 1:
        return 1 - torch.exp(-u)
    if fcode == 2:
        return math.log(2) + F.logsigmoid(u)
    if fcode == 3:
        coef = 1.0 / (falpha - 1.0)
        t = torch.clamp((falpha - 1.0) * u, max=80.0)
        return (torch.exp(t) - 1.0) * coef
    return u


def _log1mexp(x):
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def _reference_core(c, r, rc, rr, lc, lr, pw, ints, floats):
    """loss (differentiable w.r.t. c and r) and the [5, P] statistics, in c's acc dtype
    (float32, float64 for float64 c).  The math runs in float64 for every input dtype, as in
    the kernels: P values cost nothing, and float32 intermediates (forward-KL scores, e^-z)
    can overflow where the result does not."""
    import torch.nn.functional as F

    out = _acc_dtype(c)
    acc = torch.float64
    fcode, ipo_norm, K = ints[0], ints[1], ints[2]
    types = [LOSS_TYPES[k] for k in ints[3:3 + K]]
    beta, eps, gamma, tau, falpha = floats[:5]
    weights = floats[5:5 + K]
    c, r = c.to(acc), r.to(acc)
    has_ref = rc is not None
    uc = c - rc.detach().to(acc) if has_ref else c
    ur = r - rr.detach().to(acc) if has_ref else r
    Lc = lc.to(acc).clamp(min=1.0) if lc is not None else torch.ones_like(c)
    Lr = lr.to(acc).clamp(min=1.0) if lr is not None else torch.ones_like(r)
    w_pair = pw.detach().to(acc) if pw is not None else torch.ones_like(c)
    sc, sr = _f_score(uc, fcode, falpha), _f_score(ur, fcode, falpha)
    delta = sc - sr
    P = c.numel()
    per_pair = torch.zeros_like(c)
    for t, wt in zip(types, weights):
        if t == "sigmoid":
            ell = -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
        elif t == "hinge":
            ell = torch.relu(1 - beta * delta)
        elif t == "ipo":
            d = sc / Lc - sr / Lr if ipo_norm else delta
            ell = (d - 1 / (2 * beta)) ** 2
        elif t == "exo_pair":
            z = beta * delta
            ell = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                   + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
        elif t == "nca_pair":
            a, b = beta * uc, beta * ur
            ell = -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
        elif t == "robust":
            z = beta * delta
            ell = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif t == "bco_pair":
            ell = -F.logsigmoid(beta * uc) - F.logsigmoid(-beta * ur)
        elif t == "sppo_hard":
            ell = (uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2
        elif t == "apo_zero":
            ell = 1 - torch.sigmoid(beta * uc) + torch.sigmoid(beta * ur)
        elif t == "apo_down":
            ell = torch.sigmoid(beta * uc) + 1 - torch.sigmoid(beta * (uc - ur))
        elif t == "discopop":
            z = beta * delta
            m = torch.sigmoid(z / tau)
            # TRL's exp(-z) * m, written exp(-z - softplus(-z / tau)) so that it stays
            # finite where exp(-z) overflows and m underflows
            ell = -F.logsigmoid(z) * (1 - m) + torch.exp(-z - F.softplus(-z / tau))
        elif t == "sigmoid_norm":
            ell = -F.logsigmoid(beta * (sc / Lc - sr / Lr))
        elif t == "sft":
            n_tokens = lc.to(acc).sum() if lc is not None else c.new_tensor(float(P))
            ell = (-c.sum() / n_tokens.clamp(min=1.0)).expand(P)
        elif t == "simpo":
            y = beta * (c / Lc - r / Lr) - gamma
            ell = -F.logsigmoid(y) * (1 - eps) - F.logsigmoid(-y) * eps
        else:  # orpo
            ac, ar = c / Lc, r / Lr
            lo = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
            ell = -beta * F.logsigmoid(lo)
        per_pair = per_pair + wt * ell
    per_pair = w_pair * per_pair
    loss = per_pair.mean() if P > 0 else per_pair.sum()
    with torch.no_grad():
        if has_ref:
            rew_c, rew_r = beta * uc, beta * ur
        else:
            rew_c, rew_r = beta * (c / Lc), beta * (r / Lr)
        stats = torch.stack([rew_c, rew_r, rew_c - rew_r, (rew_c > rew_r).to(acc),
                             per_pair.detach()])
    return loss.to(out), stats.to(out)


def preference_loss_reference(chosen_logps, rejected_logps, ref_chosen_logps=None,
                              ref_rejected_logps=None, *, loss_type="sigmoid", beta=0.1,
                              label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
                              loss_weights=None, pair_weights=None, **type_args):
    """Plain-torch :func:`preference_loss` (the specification); differentiable w.r.t. the
    policy log-probs.  Computes in float64 for float64 ``chosen_logps``, else float32."""
    _check_tensors(_OP, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_lengths, rejected_lengths, pair_weights)
    ints, floats, sorted_terms = _config(
        _OP, loss_type, loss_weights, beta, label_smoothing, ref_chosen_logps is not None,
        chosen_lengths is not None, type_args, pair_weights is not None)
    loss, stats = _reference_core(chosen_logps, rejected_logps, ref_chosen_logps,
                                  ref_rejected_logps, chosen_lengths, rejected_lengths,
                                  pair_weights, ints, floats)
    loss = loss + _sorted_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                               ref_rejected_logps, sorted_terms, floats[0], floats[1])
    return loss, {k: stats[i] for i, k in enumerate(STATS)}


def _sorted_loss(c, r, rc, rr, terms, beta, eps):
    """TRL's aot / aot_unpaired: the smoothed sigmoid loss of delta_k, the difference of the
    k-th smallest values of two batch-wide log-ratio vectors (ranks, not pairs):

        aot           delta = sort(c - r) - sort(c0 - r0)
        aot_unpaired  delta = sort(c - c0) - sort(r - r0)

    Plain torch (sort + elementwise; autograd through the sort), added to the kernel loss."""
    if not terms:
        return 0.0
    import torch.nn.functional as F

    out, acc = _acc_dtype(c), torch.float64  # float64 math, as _reference_core
    c, r = c.to(acc), r.to(acc)
    rc, rr = rc.detach().to(acc), rr.detach().to(acc)
    total = torch.zeros((), dtype=acc, device=c.device)
    if c.numel() == 0:
        return total.to(out)
    for name, w in terms:
        if name == "aot":
            delta = torch.sort(c - r).values - torch.sort(rc - rr).values
        else:
            delta = torch.sort(c - rc).values - torch.sort(r - rr).values
        z = beta * delta
        per_rank = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        total = total + w * per_rank.mean()
    return total.to(out)


# ======================================================================================
# Kernels
# ======================================================================================
def _desc(ia: list, at: int, x: Optional[torch.Tensor], codes=_backend.DTYPE_CODES) -> None:
    if x is None:
        return  # ia is zero-initialised: pointer 0 = absent
    ia[at:at + _V3] = (x.data_ptr(), codes[x.dtype], x.stride(0) if x.dim() else 0)


def _len_for_kernel(x):
    if x is None or x.dtype in _LEN_CODES:
        return x
    return x.to(torch.int32)


def _kernel_args(c, r, rc, rr, lc, lr, pw, ints, floats, loss, grad_c, grad_r, stats):
    ia = [0] * _PI_N
    ia[_PI["P"]], ia[_PI["threads"]] = c.numel(), 1
    _desc(ia, _PI["c"], c)
    _desc(ia, _PI["r"], r)
    _desc(ia, _PI["rc"], rc)
    _desc(ia, _PI["rr"], rr)
    _desc(ia, _PI["lc"], lc, _LEN_CODES)
    _desc(ia, _PI["lr"], lr, _LEN_CODES)
    _desc(ia, _PI["pw"], pw)
    ia[_PI["loss"]], ia[_PI["grad_c"]] = loss.data_ptr(), grad_c.data_ptr()
    ia[_PI["grad_r"]], ia[_PI["stats"]] = grad_r.data_ptr(), stats.data_ptr()
    ia[_PI["fdiv"]], ia[_PI["ipo_norm"]] = ints[0], ints[1]
    ia[_PI["n_types"]] = ints[2]
    return ia + list(ints[3:]), list(floats)


def _pref_run(c, r, rc, rr, lc, lr, pw, ints, floats, backend):
    """(loss, stats [5, P], grad_c [P], grad_r [P]) in the accumulation dtype (kernel
    backends; "torch" runs the differentiable reference instead, see preference_loss)."""
    acc = _acc_dtype(c)
    P = c.numel()
    dev = c.device
    lc, lr = _len_for_kernel(lc), _len_for_kernel(lr)
    loss = torch.zeros((), dtype=acc, device=dev)
    stats = torch.empty((_N_STATS, P), dtype=acc, device=dev)
    grad_c = torch.empty(P, dtype=acc, device=dev)
    grad_r = torch.empty(P, dtype=acc, device=dev)
    if P == 0:
        return loss, stats, grad_c, grad_r
    if backend == "triton":
        with _backend.device_guard(dev):
            _backend.triton_kernels("preference").preference_loss(
                c, r, rc, rr, lc, lr, pw, ints, floats, loss, grad_c, grad_r, stats)
        return loss, stats, grad_c, grad_r
    ia, fa = _kernel_args(c, r, rc, rr, lc, lr, pw, ints, floats, loss, grad_c, grad_r, stats)
    if backend == "cpu":
        _backend.cpu_module().preference_loss_fwd(ia, fa)
    else:
        with _backend.cuda_launch(dev) as stream:
            _backend.cuda_module().preference_loss(ia, fa, stream)
    return loss, stats, grad_c, grad_r


@torch.library.custom_op("rlfuse::preference_loss", mutates_args=())
def _preference_op(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    chosen_lengths: Optional[torch.Tensor],
    rejected_lengths: Optional[torch.Tensor],
    pair_weights: Optional[torch.Tensor],
    iparams: list[int],
    fparams: list[float],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _pref_run(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     chosen_lengths, rejected_lengths, pair_weights, iparams, fparams, backend)


@_preference_op.register_fake
def _(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
      rejected_lengths, pair_weights, iparams, fparams, backend):
    acc = _acc_dtype(chosen_logps)
    P = chosen_logps.shape[0]
    new = chosen_logps.new_empty
    return (new((), dtype=acc), new((_N_STATS, P), dtype=acc), new((P,), dtype=acc),
            new((P,), dtype=acc))


def _setup_context(ctx, inputs, output):
    _, stats, grad_c, grad_r = output
    ctx.save_for_backward(grad_c, grad_r)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)
    ctx.mark_non_differentiable(stats, grad_c, grad_r)


def _backward(ctx, g_loss, *_unused):
    grad_c, grad_r = ctx.saved_tensors
    dc = dr = None
    if g_loss is not None:
        g = g_loss.to(grad_c.dtype)
        if ctx.needs_input_grad[0]:
            dc = (g * grad_c).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dr = (g * grad_r).to(ctx.dtypes[1])
    return dc, dr, None, None, None, None, None, None, None, None


_preference_op.register_autograd(_backward, setup_context=_setup_context)


class _PreferenceFunction(torch.autograd.Function):
    """Eager twin of rlfuse::preference_loss (same implementation and backward)."""

    @staticmethod
    def forward(ctx, c, r, rc, rr, lc, lr, pw, ints, floats, backend):
        loss, stats, grad_c, grad_r = _pref_run(c, r, rc, rr, lc, lr, pw, ints, floats, backend)
        ctx.save_for_backward(grad_c, grad_r)
        ctx.dtypes = (c.dtype, r.dtype)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        return _backward(ctx, g_loss)


# ======================================================================================
# Public API
# ======================================================================================
def _check_tensors(op, c, r, rc, rr, lc, lr, pw):
    _validate.float_tensor(op, "chosen_logps", c)
    if c.dim() != 1:
        raise ValueError(f"{op}: chosen_logps must be 1-D [P] (one summed log-prob per pair), "
                         f"got shape {tuple(c.shape)}")
    P = c.shape[0]
    _validate.float_tensor(op, "rejected_logps", r)
    _validate.shape_equals(op, "rejected_logps", r, (P,), "chosen_logps.shape")
    if (rc is None) != (rr is None):
        raise ValueError(f"{op}: pass both ref_chosen_logps and ref_rejected_logps, or neither")
    if (lc is None) != (lr is None):
        raise ValueError(f"{op}: pass both chosen_lengths and rejected_lengths, or neither")
    for name, x in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr),
                    ("pair_weights", pw)):
        if x is not None:
            _validate.float_tensor(op, name, x)
            _validate.shape_equals(op, name, x, (P,), "chosen_logps.shape")
    for name, x in (("chosen_lengths", lc), ("rejected_lengths", lr)):
        if x is not None:
            _validate.tensor(op, name, x)
            if x.dtype not in _LEN_DTYPES:
                raise TypeError(f"{op}: {name} must be an integer or floating tensor of token "
                                f"counts, got {x.dtype}")
            _validate.shape_equals(op, name, x, (P,), "chosen_logps.shape")
    _validate.same_device(op, "chosen_logps", c, rejected_logps=r, ref_chosen_logps=rc,
                          ref_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr,
                          pair_weights=pw)
    return P


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str], dict] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    loss_weights: Optional[Sequence[float]] = None,
    pair_weights: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    **type_args,
):
    """DPO-family loss of P (chosen, rejected) pairs from their sequence log-probs.

    Args:
        chosen_logps, rejected_logps: ``[P]`` summed log-probs of each pair's chosen and
            rejected completion under the policy (float32 / bfloat16 / float16 / float64).
            Differentiable.
        ref_chosen_logps, ref_rejected_logps: ``[P]`` the same under the reference model
            (constants), required by every type but ``sft``, ``simpo`` and ``orpo``;
            ``None`` with a reference-based type raises.
        loss_type: one of :data:`LOSS_TYPES` or :data:`SORTED_TYPES`, a list of them (combined as TRL does:
            ``sum_k loss_weights[k] * mean_i term_k(i)``) or a dict ``{type: weight}``.
        beta: > 0.  label_smoothing: in [0, 1] (cDPO for ``sigmoid`` / ``simpo``; ε of
            ``robust`` (< 0.5) and ``exo_pair`` (> 0)).
        chosen_lengths, rejected_lengths: ``[P]`` completion token counts (int or float),
            required by ``ipo`` (length-averaged), ``sigmoid_norm``, ``sft``, ``simpo`` and
            ``orpo``; clamped to >= 1 where divided by.
        loss_weights: weights of the listed types (default 1 each).
        pair_weights: ``[P]`` constant per-pair weights multiplying every term (e.g. WPO's
            ``use_weighting`` weights, computed by the caller).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``; default by device.
        **type_args: ``ipo_length_normalize=True`` (``False``: OpenRLHF's IPO on summed
            log-ratios), ``simpo_gamma=0.5``, ``discopop_tau=0.05``,
            ``f_divergence_type="reverse_kl"`` (``forward_kl``, ``js_divergence``,
            ``alpha_divergence``), ``f_alpha_divergence_coef=0.5`` (TRL's defaults).

    Returns:
        ``(loss, stats)``: the scalar loss (float32; float64 for float64 inputs) and a dict
        of ``[P]`` tensors (no gradient): ``chosen_rewards`` = beta (c - c0) (beta c / L_c
        without a reference), ``rejected_rewards``, ``margins`` (their difference),
        ``accuracies`` (1 where chosen_rewards > rejected_rewards) and ``losses`` (each
        pair's weighted term; ``loss`` is their mean).  P = 0 gives a zero loss.
    """
    _check_tensors(_OP, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   chosen_lengths, rejected_lengths, pair_weights)
    ints, floats, sorted_terms = _config(
        _OP, loss_type, loss_weights, beta, label_smoothing, ref_chosen_logps is not None,
        chosen_lengths is not None, type_args, pair_weights is not None)
    chosen = _backend.resolve(backend, chosen_logps.device, _OP)
    if chosen == "torch":  # the reference itself, differentiated by autograd
        loss, stats = _reference_core(chosen_logps, rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps, chosen_lengths, rejected_lengths,
                                      pair_weights, ints, floats)
    else:
        args = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                chosen_lengths, rejected_lengths, pair_weights, list(ints), list(floats), chosen)
        if _use_library_op(*args[:7]):
            loss, stats, _, _ = _preference_op(*args)
        else:
            loss, stats = _PreferenceFunction.apply(*args)
    if sorted_terms:
        loss = loss + _sorted_loss(chosen_logps, rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps, sorted_terms, floats[0], floats[1])
    return loss, {k: stats[i] for i, k in enumerate(STATS)}


# ======================================================================================
# From hidden states: chosen and rejected stacked on the batch dimension
# ======================================================================================
class PreferenceLogps(NamedTuple):
    chosen: torch.Tensor            # [P] (weighted) sums of the chosen completions' log-probs
    rejected: torch.Tensor          # [P] the same for the rejected completions
    chosen_lengths: torch.Tensor    # [P] int64 counted tokens (mask and ignore_index)
    rejected_lengths: torch.Tensor  # [P]
    token_logprobs: torch.Tensor    # per-token log-probs, layout of token_ids


def _pair_layout(op, token_ids, cu_seqlens):
    """Number of pairs P; the first P sequences are the chosen, the next P the rejected."""
    _validate.int_tensor(op, "token_ids", token_ids)
    if cu_seqlens is None:
        if token_ids.dim() != 2:
            raise ValueError(f"{op}: token_ids must be [2P, T] (chosen rows, then rejected rows) "
                             "for the padded layout, or a packed [N] stream with cu_seqlens; got "
                             f"shape {tuple(token_ids.shape)}")
        S = token_ids.size(0)
    else:
        if not (token_ids.dim() == 1 or (token_ids.dim() == 2 and token_ids.size(0) == 1)):
            raise ValueError(f"{op}: token_ids must be a packed [N] or [1, N] stream when "
                             f"cu_seqlens is given, got shape {tuple(token_ids.shape)}")
        _validate.int_tensor(op, "cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1:
            raise ValueError(f"{op}: cu_seqlens must be 1-D [2P + 1], got shape "
                             f"{tuple(cu_seqlens.shape)}")
        S = cu_seqlens.numel() - 1
    if S < 2 or S % 2:
        raise ValueError(f"{op}: expected an even number 2P >= 2 of sequences (P chosen, then P "
                         f"rejected), got {S}")
    return S // 2


def _ld_weights(counted, cu_seqlens, ld_alpha, P, dtype):
    """LD-DPO token weights: 1 on a pair's first min(L_chosen, L_rejected) counted tokens of
    each completion, ld_alpha on the rest (TRL's ld_alpha)."""
    from rlfuse.ops.sequence import _segments

    one = torch.ones((), dtype=dtype, device=counted.device)
    alpha = torch.full((), float(ld_alpha), dtype=dtype, device=counted.device)
    if cu_seqlens is None:
        pos = counted.long().cumsum(-1)
        L = pos[:, -1] if pos.size(1) else torch.zeros(2 * P, dtype=torch.long,
                                                       device=counted.device)
        shared = torch.minimum(L[:P], L[P:]).repeat(2)
        return torch.where(pos <= shared.unsqueeze(1), one, alpha)
    flat = counted.reshape(-1).long()
    n = flat.numel()
    cu = cu_seqlens.to(device=counted.device, dtype=torch.long)
    seg = _segments(_OP, cu_seqlens, n, counted.device)
    csum = flat.cumsum(0)
    csum0 = torch.cat([csum.new_zeros(1), csum])
    start = csum0[cu[:-1]]
    L = csum0[cu[1:]] - start
    pos = csum - start[seg]
    shared = torch.minimum(L[:P], L[P:]).repeat(2)
    return torch.where(pos <= shared[seg], one, alpha).view(counted.shape)


def preference_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    ld_alpha: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
) -> PreferenceLogps:
    """Sequence log-probs of P (chosen, rejected) pairs from final hidden states, through
    :func:`~rlfuse.ops.linear_token_logprobs` (never more than one chunk of logits).

    Layouts (no label shift here: ``hidden`` must be aligned with ``token_ids``):
        padded  ``token_ids [2P, T]``, ``hidden [2P, T, H]``, ``mask [2P, T]``: rows 0..P-1
                are the chosen completions, rows P..2P-1 the rejected ones (TRL's order).
        packed  ``token_ids [N]`` (or ``[1, N]``), ``hidden [N, H]`` (or ``[1, N, H]``),
                ``cu_seqlens [2P + 1]``: sequences 0..P-1 chosen, P..2P-1 rejected.
    A position counts when ``mask`` (if given) is nonzero and its id is not ``ignore_index``;
    the others cost no matmul and give 0 in ``token_logprobs`` (a NaN hidden state there
    stays out of the results and gradients; their ids are still checked).

    ``token_weights`` (shape of ``token_ids``) multiply each counted log-prob inside the
    sums (SparsePO-style masks, any per-token weights; differentiable if they require
    grad); ``ld_alpha`` multiplies the tokens past ``min(L_chosen, L_rejected)`` of each pair
    by ``ld_alpha`` (LD-DPO, TRL's ``ld_alpha``).  Lengths always count tokens, unweighted.
    Use the same call (under ``torch.no_grad()``) on the reference model to precompute
    ``ref_chosen_logps`` / ``ref_rejected_logps``.
    """
    from rlfuse.ops.linear_logprob import linear_token_logprobs

    op = "preference_logps"
    P = _pair_layout(op, token_ids, cu_seqlens)
    ignore_index = _validate.integer(op, "ignore_index", ignore_index)
    ids = _validate.ids_for_ignore_index(token_ids, ignore_index)
    m = _mask(op, mask, token_ids)
    # Masked positions go to linear_token_logprobs as ignore_index: no matmul for them, and a
    # NaN there (padding) never reaches the gradients (as in the fused path).  Their ids are
    # still checked, as the fused path checks every row's id.
    ids_k = ids if m is None else ids.masked_fill(~m, ignore_index)
    lp = linear_token_logprobs(hidden, weight, ids_k, bias=bias, temperature=temperature,
                               ignore_index=ignore_index, chunk_size=chunk_size,
                               backend=backend)
    if m is not None:
        from rlfuse.ops.sequence import _check_masked_ids

        _check_masked_ids(ids, m, weight.size(0), ignore_index, "linear_token_logprobs")
    counted, w = _counted_and_weights(op, ids_k, m, token_ids, token_weights, ld_alpha,
                                      cu_seqlens, ignore_index, P, lp.dtype)
    values = lp if w is None else lp * w.to(lp.dtype)
    sums, counts = _sequence_sums(values, counted, cu_seqlens, op)
    return PreferenceLogps(sums[:P], sums[P:], counts[:P], counts[P:], lp)


def _mask(op, mask, token_ids):
    from rlfuse.ops.sequence import _mask_tensor

    return _mask_tensor(op, mask, token_ids.shape, token_ids.device)


def _counted_and_weights(op, ids, m, token_ids, token_weights, ld_alpha, cu_seqlens,
                         ignore_index, P, dtype):
    """(counted, w): the positions inside the sums (mask and id != ignore_index) and the
    per-token weights multiplying them (token_weights x LD-DPO weights; None if neither)."""
    counted = ids != ignore_index
    if m is not None:
        counted = counted & m
    w = None
    if token_weights is not None:
        _validate.float_tensor(op, "token_weights", token_weights)
        _validate.shape_equals(op, "token_weights", token_weights, token_ids.shape,
                               "token_ids.shape")
        _validate.same_device(op, "token_ids", token_ids, token_weights=token_weights)
        w = token_weights
    if ld_alpha is not None:
        ld_alpha = _real(op, "ld_alpha", ld_alpha)
        wl = _ld_weights(counted, cu_seqlens, ld_alpha, P, dtype)
        w = wl if w is None else w * wl
    return counted, w


def _sequence_sums(values, counted, cu_seqlens, op):
    """Per-sequence sums of the counted values and the counts, bitwise independent of the
    thread count: a float64 running sum (a serial scan per sequence, where torch's sum may
    split a row among threads), rounded once to the values' dtype."""
    from rlfuse.ops.sequence import _segments

    v = torch.where(counted, values.to(torch.float64),
                    torch.zeros((), dtype=torch.float64, device=values.device))
    if cu_seqlens is None:  # [S, T]
        counts = counted.sum(-1, dtype=torch.int64)
        if v.size(1) == 0:
            return v.sum(-1).to(values.dtype), counts
        return v.cumsum(-1)[:, -1].to(values.dtype), counts
    flat = v.reshape(-1)
    _segments(op, cu_seqlens, flat.numel(), flat.device)  # validates cu_seqlens
    cu = cu_seqlens.to(device=flat.device, dtype=torch.long)
    csum = torch.cat([flat.new_zeros(1), flat.cumsum(0)])
    ccount = torch.cat([cu.new_zeros(1), counted.reshape(-1).long().cumsum(0)])
    sums = csum[cu[1:]] - csum[cu[:-1]]
    return sums.to(values.dtype), ccount[cu[1:]] - ccount[cu[:-1]]


def preference_loss_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    loss_type: Union[str, Sequence[str], dict] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_weights: Optional[Sequence[float]] = None,
    pair_weights: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    ld_alpha: Optional[float] = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: Optional[str] = None,
    **type_args,
):
    """:func:`preference_loss` of the pairs in ``hidden`` / ``token_ids`` (layouts of
    :func:`preference_logps`), without materialising the logits: memory stays
    O(chunk x V) + O(N) on top of the inputs and gradients.

    The reference log-probs come in precomputed (``[P]``, e.g. from :func:`preference_logps`
    on the reference model under ``torch.no_grad()``).  Returns ``(loss, stats)`` with the
    statistics of :func:`preference_loss` plus ``chosen_logps`` / ``rejected_logps`` (the
    policy's sums, detached) and ``chosen_lengths`` / ``rejected_lengths``.

    When gradients are needed (and the loss is exact per chunk of pairs: no ``aot``,
    constant reference / pair / token weights, outside ``torch.compile`` tracing, a pair
    fitting the logits budget), the loss and its gradients are computed in the forward,
    a chunk of whole pairs at a time, with three matmuls per chunk (the backward scales
    them by the upstream gradient); otherwise :func:`preference_logps` then
    :func:`preference_loss`.  ``docs/ops/preference.md``: both paths.
    """
    op = "preference_loss_from_hidden"
    # Fail on inconsistent loss arguments before the expensive log-prob pass.
    ints, floats, sorted_terms = _config(
        _OP, loss_type, loss_weights, beta, label_smoothing, ref_chosen_logps is not None, True,
        type_args, pair_weights is not None)
    if _fused_eligible(hidden, weight, bias, ref_chosen_logps, ref_rejected_logps,
                       pair_weights, token_weights, sorted_terms):
        fused = _fused_call(hidden, weight, token_ids, bias, mask, cu_seqlens, token_weights,
                            ld_alpha, temperature, ignore_index, chunk_size, backend,
                            ref_chosen_logps, ref_rejected_logps, pair_weights, ints, floats)
        if fused is not None:
            return fused
    seq = preference_logps(hidden, weight, token_ids, bias=bias, mask=mask,
                           cu_seqlens=cu_seqlens, token_weights=token_weights, ld_alpha=ld_alpha,
                           temperature=temperature, ignore_index=ignore_index,
                           chunk_size=chunk_size, backend=backend)
    P = seq.chosen.numel()
    for name, x in (("ref_chosen_logps", ref_chosen_logps),
                    ("ref_rejected_logps", ref_rejected_logps)):
        if x is not None:
            _validate.tensor(op, name, x)
            _validate.shape_equals(op, name, x, (P,), f"[P] = [{P}] pairs in token_ids")
    loss, stats = preference_loss(
        seq.chosen, seq.rejected, ref_chosen_logps, ref_rejected_logps, loss_type=loss_type,
        beta=beta, label_smoothing=label_smoothing, chosen_lengths=seq.chosen_lengths,
        rejected_lengths=seq.rejected_lengths, loss_weights=loss_weights,
        pair_weights=pair_weights, backend=backend, **type_args)
    stats["chosen_logps"] = seq.chosen.detach()
    stats["rejected_logps"] = seq.rejected.detach()
    stats["chosen_lengths"] = seq.chosen_lengths
    stats["rejected_lengths"] = seq.rejected_lengths
    return loss, stats


# ======================================================================================
# From hidden states, fused: loss and gradients in one pass over chunks of whole pairs
# ======================================================================================
# Private switch (tests force either path with it).
_FUSED_FROM_HIDDEN = True
# Skip the matmuls of rows outside the sums (masked, ignore_index) in the fused path.
_FUSED_DROP_UNCOUNTED = True
# Logits buffer budget of the fused path: a chunk must hold a whole pair (both sequences).
_FUSED_CPU_BUDGET_BYTES = 256 << 20  # = max(4 x linear_logprob's CPU budget, 256 MiB)


def _fused_budget_bytes(device) -> int:
    from rlfuse.ops.linear_logprob import _CPU_BUDGET_BYTES, _GPU_BUDGET_BYTES, _free_bytes

    base = (max(_GPU_BUDGET_BYTES, _FUSED_CPU_BUDGET_BYTES) if device.type == "cuda"
            else max(4 * _CPU_BUDGET_BYTES, _FUSED_CPU_BUDGET_BYTES))
    free = _free_bytes(device)
    return min(base, free // 4) if free else base


def _pair_chunks(sizes, P, max_rows):
    """Pair ranges [(i0, i1), ...] of consecutive whole pairs whose rows (sizes[i] of
    chosen i plus sizes[P + i] of rejected P + i, summed over the chunk) total <= max_rows;
    None if one pair alone exceeds it."""
    chunks, i0, rows = [], 0, 0
    for i in range(P):
        n = sizes[i] + sizes[P + i]
        if n > max_rows:
            return None
        if rows + n > max_rows:
            chunks.append((i0, i))
            i0, rows = i, 0
        rows += n
    chunks.append((i0, P))
    return chunks


def _fused_layout(ids, counted, cu_seqlens, P):
    """(starts, ends) of the 2P sequences in the flattened rows and their counted tokens
    ([2P] int64); validates cu_seqlens."""
    n = counted.numel()
    cnt = counted.reshape(-1)
    if cu_seqlens is None:
        T = ids.size(1)
        starts = [s * T for s in range(2 * P)]
        ends = [(s + 1) * T for s in range(2 * P)]
        return starts, ends, cnt.view(2 * P, T).sum(-1, dtype=torch.int64)
    from rlfuse.ops.sequence import _segments

    _segments("preference_logps", cu_seqlens, n, cnt.device)
    cu = cu_seqlens.tolist()
    ccount = torch.cat([cnt.new_zeros(1, dtype=torch.int64), cnt.long().cumsum(0)])
    cu_t = cu_seqlens.to(device=cnt.device, dtype=torch.long)
    return cu[:-1], cu[1:], ccount[cu_t[1:]] - ccount[cu_t[:-1]]


def _chunk_pair_grads(c, r, rc, rr, lc, lr, pw, ints, floats, backend):
    """d(mean over the chunk's k pairs of the kernel terms)/d(c, r), for local types."""
    if ints[2] == 0:
        return torch.zeros_like(c), torch.zeros_like(r)
    if backend == "torch":
        with torch.enable_grad():
            cg, rg = c.detach().requires_grad_(), r.detach().requires_grad_()
            loss, _ = _reference_core(cg, rg, rc, rr, lc, lr, pw, ints, floats)
            return torch.autograd.grad(loss, (cg, rg))
    _, _, gc, gr = _pref_run(c, r, rc, rr, lc, lr, pw, ints, floats, backend)
    return gc, gr


def _without_sft(ints, floats):
    """(ints, floats) of the kernel configuration without its sft terms, and the sft
    weight (the sft term couples the batch: its gradient is added separately)."""
    K = ints[2]
    codes, weights = list(ints[3:3 + K]), list(floats[5:5 + K])
    keep = [j for j in range(K) if codes[j] != _CODES["sft"]]
    w_sft = sum(weights[j] for j in range(K) if codes[j] == _CODES["sft"])
    return ((ints[0], ints[1], len(keep)) + tuple(codes[j] for j in keep),
            tuple(floats[:5]) + tuple(weights[j] for j in keep), w_sft)


def _fused_forward(hidden, weight, bias, ids, counted, w, layout, P, rc, rr, pw, ints,
                   floats, temperature, ignore_index, chunks, drop, backend, need):
    """Loss, stats [5, P], sums, counts and the gradients (w.r.t. hidden, weight, bias, for a
    unit upstream gradient) with three matmuls per chunk of whole pairs."""
    from rlfuse.ops.linear_logprob import (_add_param_grads, _check_ids,
                                           _chunk_logits, _device_ctx, _rows_backward,
                                           _rows_forward, _uses_second_buffer)
    from rlfuse.ops.logprob import _flat_ids, _out_dtype

    H, V = hidden.size(-1), weight.size(0)
    dev = hidden.device
    h2 = hidden.reshape(-1, H)
    ids_f = _flat_ids(ids)
    N = ids_f.numel()
    out_dtype = _out_dtype(hidden)
    cnt = counted.reshape(-1)
    wf = None if w is None else w.reshape(-1).to(out_dtype)
    starts, ends, counts = layout
    _check_ids(ids_f, V, ignore_index)  # every row's id, dropped rows' included
    acc = out_dtype
    counts_l = counts.tolist()
    lc, lr = counts[:P], counts[P:]
    kints, kfloats, w_sft = _without_sft(ints, floats)
    sft_grad = 0.0
    if w_sft:
        sum_l = float(lc.sum().clamp(min=1))
        mean_pw = float(pw.to(torch.float64).mean()) if pw is not None else 1.0
        sft_grad = -w_sft * mean_pw / sum_l
    sums = torch.zeros(2 * P, dtype=out_dtype, device=dev)
    need_h, need_w, need_b = need
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
    gh2 = grad_h.view(-1, H) if need_h else None
    low_w = weight.dtype in (torch.bfloat16, torch.float16)
    grad_w = torch.zeros((V, H), dtype=torch.float32 if low_w else weight.dtype,
                         device=dev) if need_w else None
    partial_w = torch.empty((V, H), dtype=weight.dtype, device=dev) if (need_w and low_w) \
        else None
    b_dtype = torch.float64 if (bias is not None and bias.dtype == torch.float64) \
        else torch.float32
    grad_b = torch.zeros(V, dtype=b_dtype, device=dev) if need_b else None
    sizes = counts_l if drop else [e - s for s, e in zip(starts, ends)]
    rows_max = max(sum(sizes[i0:i1]) + sum(sizes[P + i0:P + i1]) for i0, i1 in chunks)
    inv_t = 1.0 / temperature
    zero64 = torch.zeros((), dtype=torch.float64, device=dev)
    with _device_ctx(hidden):
        buf = torch.empty((max(rows_max, 1), V), dtype=hidden.dtype, device=dev)
        dbuf = torch.empty_like(buf) if _uses_second_buffer(backend) else buf
        for i0, i1 in chunks:
            k = i1 - i0
            a0, a1 = starts[i0], ends[i1 - 1]
            b0, b1 = starts[P + i0], ends[P + i1 - 1]
            na, n = a1 - a0, (a1 - a0) + (b1 - b0)
            if a1 == b0:
                hc, idc, cc = h2[a0:b1], ids_f[a0:b1], cnt[a0:b1]
                wc = None if wf is None else wf[a0:b1]
            else:
                hc = torch.cat([h2[a0:a1], h2[b0:b1]])
                idc = torch.cat([ids_f[a0:a1], ids_f[b0:b1]])
                cc = torch.cat([cnt[a0:a1], cnt[b0:b1]])
                wc = None if wf is None else torch.cat([wf[a0:a1], wf[b0:b1]])
            # row -> sequence of the chunk (0..k-1 chosen, k..2k-1 rejected)
            lens = [ends[s] - starts[s] for s in list(range(i0, i1)) + list(range(P + i0, P + i1))]
            seq = torch.repeat_interleave(torch.arange(2 * k, device=dev),
                                          torch.tensor(lens, device=dev))
            rows = None  # the chunk's rows in h2 where some are dropped
            if drop:  # uncounted rows need no matmul: their g_lp is 0, their logp unused
                sel = cc.nonzero().squeeze(1)
                if sel.numel() < n:
                    rows = (torch.arange(a0, b1, device=dev) if a1 == b0 else torch.cat(
                        [torch.arange(a0, a1, device=dev), torch.arange(b0, b1, device=dev)]))[sel]
                    hc, idc, cc, seq = hc.index_select(0, sel), idc[sel], cc[sel], seq[sel]
                    wc = None if wc is None else wc[sel]
                    lens = [counts_l[s] for s in list(range(i0, i1)) + list(range(P + i0, P + i1))]
                    n = sel.numel()
                if n == 0:
                    continue  # zero sums, no rows to differentiate
            lp = torch.empty(n, dtype=acc, device=dev)
            lse = torch.empty(n, dtype=acc, device=dev)
            logits = _chunk_logits(buf, hc, weight, bias)                      # matmul 1
            _rows_forward(backend, logits, idc, lp, lp, lse, inv_t, temperature, ignore_index,
                          False)  # (ids checked above)
            vals = lp if wc is None else lp * wc
            v = torch.where(cc, vals.to(torch.float64), zero64)
            csum = torch.cat([v.new_zeros(1), v.cumsum(0)])
            bounds = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), device=dev)
            s_k = (csum[bounds[1:]] - csum[bounds[:-1]]).to(out_dtype)
            sums[i0:i1], sums[P + i0:P + i1] = s_k[:k], s_k[k:]
            gc, gr = _chunk_pair_grads(
                s_k[:k], s_k[k:], None if rc is None else rc[i0:i1],
                None if rr is None else rr[i0:i1], lc[i0:i1], lr[i0:i1],
                None if pw is None else pw[i0:i1], kints, kfloats, backend)
            g_seq = torch.cat([gc.to(torch.float64) * (k / P) + sft_grad,
                               gr.to(torch.float64) * (k / P)])
            g_lp = torch.where(cc, g_seq[seq], zero64)
            if wc is not None:
                g_lp = g_lp * wc.to(torch.float64)
            g_lp = g_lp.to(acc)
            d = _rows_backward(backend, logits, idc, lse, None, g_lp, None, dbuf[:n], inv_t,
                               temperature, ignore_index)
            if need_h:                                                          # matmul 2
                if rows is not None:
                    gh2.index_copy_(0, rows, torch.mm(d, weight))
                elif a1 == b0:
                    torch.mm(d, weight, out=gh2[a0:b1])
                else:
                    ghc = torch.mm(d, weight)
                    gh2[a0:a1].copy_(ghc[:na])
                    gh2[b0:b1].copy_(ghc[na:])
            _add_param_grads(d, hc, grad_w, partial_w, grad_b, b_dtype)          # matmul 3
    c_all, r_all = sums[:P], sums[P:]
    if backend == "torch":
        loss, stats = _reference_core(c_all, r_all, rc, rr, lc, lr, pw, ints, floats)
    else:
        loss, stats, _, _ = _pref_run(c_all, r_all, rc, rr, lc, lr, pw, ints, floats, backend)
    if need_w and grad_w.dtype != weight.dtype:
        grad_w = grad_w.to(weight.dtype)
    if need_b and grad_b.dtype != bias.dtype:
        grad_b = grad_b.to(bias.dtype)
    return loss, stats, c_all, r_all, lc, lr, (grad_h, grad_w, grad_b)


class _FusedFromHidden(torch.autograd.Function):
    """Loss and its gradients in the forward (_fused_forward); the backward scales them by
    the upstream gradient of the loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, args):
        loss, stats, c, r, lc, lr, grads = _fused_forward(hidden, weight, bias, *args)
        ctx.grads = grads
        ctx.mark_non_differentiable(stats, c, r, lc, lr)
        return loss, stats, c, r, lc, lr

    @staticmethod
    def backward(ctx, g_loss, *_unused):
        out = [None, None, None, None]
        if g_loss is None:
            return tuple(out)
        for j, g in enumerate(ctx.grads):
            if g is not None and ctx.needs_input_grad[j]:
                out[j] = (g_loss.to(g.dtype) * g).to(g.dtype)
        return tuple(out)


def _fused_eligible(hidden, weight, bias, rc, rr, pw, token_weights, sorted_terms):
    """The fused path is exact only for per-pair terms (sft's batch coupling is handled) and
    constant reference / pair / token weights; it only pays when a gradient is needed."""
    if not _FUSED_FROM_HIDDEN or sorted_terms or _backend.library_op_needed(
            hidden, weight, bias, rc, rr, pw, token_weights):
        return False  # (also under torch.compile, FakeTensorMode, for meta / fake inputs)
    if not torch.is_grad_enabled():
        return False
    tensors = (hidden, weight, bias)
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False
    return not any(isinstance(t, torch.Tensor) and t.requires_grad
                   for t in (rc, rr, pw, token_weights))


def _fused_call(hidden, weight, token_ids, bias, mask, cu_seqlens, token_weights, ld_alpha,
                temperature, ignore_index, chunk_size, backend, rc, rr, pw, ints, floats):
    """(loss, stats) through _FusedFromHidden, or None where a pair does not fit a chunk
    (the caller then takes the two-pass path)."""
    from rlfuse.ops.linear_logprob import _check_args, _chunk_arg
    from rlfuse.ops.logprob import _out_dtype

    op = "preference_logps"
    P = _pair_layout(op, token_ids, cu_seqlens)
    temperature, ignore_index, ids = _check_args(hidden, weight, token_ids, bias, temperature,
                                                 ignore_index)
    chunk_size = _chunk_arg(chunk_size) or None
    chosen = _backend.resolve(backend, hidden.device, "linear_token_logprobs")
    m = _mask(op, mask, token_ids)
    counted, w = _counted_and_weights(op, ids, m, token_ids, token_weights, ld_alpha,
                                      cu_seqlens, ignore_index, P, _out_dtype(hidden))
    for name, x in (("ref_chosen_logps", rc), ("ref_rejected_logps", rr)):
        if x is not None:
            _validate.tensor("preference_loss_from_hidden", name, x)
            _validate.shape_equals("preference_loss_from_hidden", name, x, (P,),
                                   f"[P] = [{P}] pairs in token_ids")
    _check_tensors(_OP, torch.empty(P, dtype=_out_dtype(hidden), device=hidden.device),
                   torch.empty(P, dtype=_out_dtype(hidden), device=hidden.device), rc, rr,
                   None, None, pw)
    layout = _fused_layout(ids, counted, cu_seqlens, P)
    drop = _FUSED_DROP_UNCOUNTED
    if chunk_size is not None:
        max_rows = chunk_size
    else:
        from rlfuse.ops.linear_logprob import _uses_second_buffer

        per_row = weight.size(0) * hidden.element_size() * (2 if _uses_second_buffer(chosen)
                                                              else 1)
        max_rows = _fused_budget_bytes(hidden.device) // per_row
    starts, ends, counts = layout
    # chunks of whole pairs by the rows that are computed: the counted ones when dropping
    sizes = counts.tolist() if drop else [e - s for s, e in zip(starts, ends)]
    chunks = _pair_chunks(sizes, P, max_rows)
    if chunks is None:
        return None
    need = (hidden.requires_grad, weight.requires_grad,
            isinstance(bias, torch.Tensor) and bias.requires_grad)
    args = (ids, counted, w, layout, P, rc, rr, pw, ints, floats, temperature,
            ignore_index, chunks, drop, chosen, need)
    loss, st, c, r, lc, lr = _FusedFromHidden.apply(hidden, weight, bias, args)
    stats = {k: st[i] for i, k in enumerate(STATS)}
    stats["chosen_logps"], stats["rejected_logps"] = c, r
    stats["chosen_lengths"], stats["rejected_lengths"] = lc, lr
    return loss, stats
