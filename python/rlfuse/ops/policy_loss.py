"""KL estimators, fused PPO / GRPO policy losses and the clipped value loss.

    kl_penalty(logp, ref_logp, kind="k3", *, clamp=None, semantics="rlfuse", backend=None)
    policy_loss(logp, old_logp, advantages, mask, *, variant="ppo", ...) -> (loss, stats)
    value_loss(values, old_values, returns, mask, *, cliprange_value=None, ...) -> (loss, stats)

Every tensor is ``[B, T]`` (B sequences of T tokens); ``mask`` selects the tokens that count.
The whole per-token chain (ratio, clipping, KL term, entropy bonus, aggregation, statistics)
runs in one fused pass that also produces the per-token d(l_t)/d(logp_t) and per-row scales;
the backward is one multiply of that saved gradient (measured: saving beats recomputing by the
whole kernel time).  Eager calls go through a plain torch.autograd.Function, traced calls
(torch.compile) through the registered rlfuse:: ops; both run the same code.  Full formulas:
``docs/ops/policy_loss.md``.

KL estimators, with d = logp - ref_logp (Schulman, "Approximating KL divergence"):

    k1 (kl)          d                    gradient 1
    abs              |d|                  gradient sign(d)
    k2 (mse)         d^2 / 2              gradient d
    k3 (low_var_kl)  e^-d + d - 1         gradient 1 - e^-d
    k1+, k3+, ...    value of the kind, gradient of k2 (straight-through)

Policy-gradient term per token, with the ratio r = exp(logp - old_logp) and advantage A:

    ppo      -min(A r', A clip(r, 1 - eps_low, 1 + eps_high)),  r' = min(r, delta) (TRL),
             and for A < 0 with dual-clip c: min(that, -c A)
    gspo     the same with r replaced by the sequence ratio s_i = exp(masked mean of log r)
    cispo    -sg(clip(r)) A logp
    sapo     -(4 / tau) sigmoid(tau (r - 1)) A,  tau = tau_pos if A > 0 else tau_neg
    gpg, reinforce   -A logp

    l_t = w_t pg_t + beta * kl_t (optionally kl_t * r),   w = importance weights (constants)
    loss = sum_i c_i sum_t m_it l_it - entropy_coef * sum_i e_i sum_t m_it H_it

with per-sequence aggregation coefficients c_i (and e_i for the entropy bonus) set by
``loss_agg_mode`` (see :func:`policy_loss`).  ``old_logp``, ``advantages``, ``ref_logp`` and
the weights are constants: gradients flow to ``logp`` (and ``entropy``) only, as in verl,
TRL and OpenRLHF.

``semantics`` selects the details in which the frameworks differ (clamps, epsilons, the GSPO
gradient, entropy aggregation) so that a user moving from verl, TRL or OpenRLHF gets that
framework's numbers; ``"rlfuse"`` uses the plain formulas without clamps.

Three files hold this family: this module (references, torch.library ops, dispatch),
``csrc/cpu/policy_loss.cpp`` / ``csrc/cuda/policy_loss.cu`` and ``kernels/policy_loss.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Optional

import torch

from rlfuse import _backend, _validate

__all__ = [
    "kl_penalty",
    "kl_penalty_reference",
    "policy_loss",
    "policy_loss_reference",
    "value_loss",
    "value_loss_reference",
    "SEMANTICS",
    "VARIANTS",
    "KL_KINDS",
    "LOSS_AGG_MODES",
]

SEMANTICS = ("rlfuse", "verl", "trl", "openrlhf")
VARIANTS = ("ppo", "gspo", "cispo", "sapo", "gpg", "reinforce")
_VARIANT_CODES = {name: i for i, name in enumerate(VARIANTS)}
_KL_ALIASES = {"k1": "k1", "kl": "k1", "abs": "abs", "k2": "k2", "mse": "k2", "k3": "k3",
               "low_var_kl": "k3"}
KL_KINDS = tuple(_KL_ALIASES) + tuple(k + "+" for k in _KL_ALIASES)
_KL_CODES = {"k1": 0, "abs": 1, "k2": 2, "k3": 3}
_VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
               "seq-mean-token-sum-norm")
_TRL_MODES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LOSS_AGG_MODES = _VERL_MODES + _TRL_MODES

# Which variants, KL kinds and aggregation modes each framework has (others raise).
_SEM_VARIANTS = {
    "rlfuse": VARIANTS, "verl": VARIANTS, "trl": ("ppo", "gspo", "cispo", "sapo"),
    "openrlhf": ("ppo", "gspo"),
}
_SEM_KL = {"rlfuse": KL_KINDS, "verl": KL_KINDS,
           "trl": ("k1", "kl", "k2", "mse", "k3", "low_var_kl"),
           "openrlhf": ("k1", "kl", "k2", "mse", "k3", "low_var_kl")}
_SEM_MODES = {"rlfuse": LOSS_AGG_MODES, "verl": _VERL_MODES, "trl": _TRL_MODES,
              "openrlhf": ("token-mean", "seq-mean-token-mean")}

_INF = math.inf

# Eager calls run the same implementation through a plain torch.autograd.Function: the
# torch.library dispatch of a custom op costs ~100 us per forward+backward on the CPU (argument
# normalisation, redispatch), more than the fused kernel itself.  Under torch.compile (and
# whenever this flag is False) the registered rlfuse:: ops are called, so tracing sees them.
_EAGER_AUTOGRAD_FUNCTION = True


def _use_library_op(*tensors) -> bool:
    """The registered op (not the eager autograd.Function): under torch.compile, a dispatch
    mode such as FakeTensorMode, or for meta / fake / subclass inputs (_backend)."""
    return not _EAGER_AUTOGRAD_FUNCTION or _backend.library_op_needed(*tensors)

# ---- argument layouts shared with csrc/cpu/policy_loss.h (enum PolicyI / PolicyF / ...) ----
_T4 = 4  # a tensor is (pointer, dtype code, row stride, token stride)
_PI = dict(B=0, T=1, threads=2, lp=3, old=7, adv=11, mask=15, ref=19, ent=23, isw=27,
           grad_lp=31, gscale=32, escale=33, loss=34, stats=35, variant=36, kl_mode=37,
           kl_kind=38, kl_st=39, kl_rw=40, seq_grad=41, stat_x_clamped=42, pg_denom_kind=43,
           pg_len_kind=44, ent_denom_kind=45, ent_len_kind=46)
_PI_N = 47
_PF = dict(lr_clamp=0, seq_lr_max=1, clip_lo=2, clip_hi=3, dual_c=4, delta=5, tau_pos=6,
           tau_neg=7, beta=8, kl_lr_clamp=9, kl_out_clamp=10, ent_coef=11, pg_num=12,
           pg_denom_const=13, ent_num=14, ent_denom_const=15)
_PF_N = 16
_VI = dict(B=0, T=1, threads=2, val=3, old=7, ret=11, mask=15, grad=19, loss=20, stats=21,
           clip_form=22, denom_kind=23, len_kind=24)
_VI_N = 25
_VF_N = 3
_KI = dict(R=0, C=1, threads=2, lp=3, ref=7, gout=11, out=15, backward=16, kind=17, st=18)
_KI_N = 19
_KF_N = 2

# Aggregation coefficient kinds (csrc/cpu/policy_loss.h: DenomKind, LenKind).
_DEN_CONST, _DEN_TOKENS, _DEN_SEQS = 0, 1, 2
_LEN_NONE, _LEN_INV, _LEN_INV_EPS, _LEN_INV_CLAMP = 0, 1, 2, 3

# Statistics vector (csrc/cpu/policy_loss.h: Stat).
_STATS = ("pg_loss", "kl_loss", "entropy_loss", "clip_frac", "clip_frac_low",
          "clip_frac_high", "dual_clip_frac", "approx_kl", "ratio_mean", "kl_mean",
          "entropy_mean", "num_tokens", "num_seqs")
_N_STATS = len(_STATS)
_VSTATS = ("clip_frac", "values_mean", "num_tokens", "num_seqs")
_N_VSTATS = len(_VSTATS)
# Per-row sums written by the GPU kernels (same order as RowSum in policy_loss.cpp).
_N_ROWSUMS = 10

_MASK_CODES = {torch.bool: 10, torch.uint8: 10, torch.int8: 11, torch.int32: 12,
               torch.int64: 13, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2,
               torch.float64: 3}
_MASK_DTYPES = tuple(_MASK_CODES) + (torch.int16,)


# ======================================================================================
# Resolved configuration (one place decides what every argument and semantics means)
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class _AggSpec:
    denom_kind: int
    len_kind: int
    num: float
    denom_const: float
    denom_from: int = -1  # index into the `counts` tensor whose value multiplies denom_const


def _agg_spec(op, mode, semantics, *, B, T, global_tokens, global_batch_size,
              loss_scale_factor, max_completion_length, dp_size) -> _AggSpec:
    """Coefficients c_i of loss = sum_i c_i sum_t m_it l_it for one aggregation mode.

    global_tokens / global_batch_size are numbers, None, or the string "tensor" (value read
    from the counts tensor at run time: index 0 tokens, 1 batch size).  A count that a mode
    does not use is ignored, as verl (global_batch_info goes to every agg_loss call) and TRL
    (num_items_in_batch reaches every loss_type) do.
    """
    num = float(dp_size)

    def from_count(value, index, scale=1.0):
        if value == "tensor":
            return _DEN_CONST, float(scale), index
        return _DEN_CONST, float(value) * scale, -1

    seq_len = _LEN_INV if semantics == "rlfuse" else _LEN_INV_EPS
    if mode in ("token-mean", "dapo"):
        if global_tokens is None:
            return _AggSpec(_DEN_TOKENS, _LEN_NONE, num, 1.0)
        k, c, src = from_count(global_tokens, 0)
        return _AggSpec(k, _LEN_NONE, num, c, src)
    if mode == "bnpo":  # TRL: the local micro-batch token count, always
        return _AggSpec(_DEN_TOKENS, _LEN_NONE, num, 1.0)
    if mode == "token-sum":
        return _AggSpec(_DEN_CONST, _LEN_NONE, num, 1.0)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        length = seq_len if mode == "seq-mean-token-mean" else _LEN_NONE
        scale = 1.0
        if mode == "seq-mean-token-sum-norm":
            scale = float(loss_scale_factor) if loss_scale_factor is not None else float(T)
        if global_batch_size is None:
            return _AggSpec(_DEN_SEQS, length, num, scale)
        k, c, src = from_count(global_batch_size, 1, scale)
        return _AggSpec(k, length, num, c, src)
    # TRL's remaining loss_type names: every row of the micro-batch counts, empty or not.
    if mode == "grpo":
        return _AggSpec(_DEN_CONST, _LEN_INV_CLAMP, num, float(B))
    if mode == "dr_grpo":
        C = float(max_completion_length) if max_completion_length is not None else float(T)
        return _AggSpec(_DEN_CONST, _LEN_NONE, num, float(B) * C)
    if mode == "luspo":
        return _AggSpec(_DEN_CONST, _LEN_NONE, num, float(B))
    raise ValueError(f"{op}: loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class _PolicyConfig:
    # ints
    variant: int
    kl_mode: int  # 0 no KL term, 1 k1/abs/k2, 2 k3
    kl_kind: int
    kl_st: int
    kl_rw: int
    seq_grad: int
    stat_x_clamped: int
    pg_denom_kind: int
    pg_len_kind: int
    pg_denom_from: int
    ent_denom_kind: int
    ent_len_kind: int
    ent_denom_from: int
    need_grad: int
    # floats
    lr_clamp: float
    seq_lr_max: float
    clip_lo: float
    clip_hi: float
    dual_c: float
    delta: float
    tau_pos: float
    tau_neg: float
    beta: float
    kl_lr_clamp: float
    kl_out_clamp: float
    ent_coef: float
    pg_num: float
    pg_denom_const: float
    ent_num: float
    ent_denom_const: float

    def to_lists(self):
        return ([int(getattr(self, n)) for n in _PC_INTS],
                [float(getattr(self, n)) for n in _PC_FLOATS])

    @classmethod
    def from_lists(cls, ints, floats):
        return _policy_config_from_lists(tuple(ints), tuple(floats))

    def with_counts(self, counts: list) -> "_PolicyConfig":
        """Fold run-time global counts (read from the counts tensor) into the denominators."""
        pg, en = self.pg_denom_const, self.ent_denom_const
        if self.pg_denom_from >= 0:
            pg = pg * _positive_count(counts[self.pg_denom_from], self.pg_denom_from)
        if self.ent_denom_from >= 0:
            en = en * _positive_count(counts[self.ent_denom_from], self.ent_denom_from)
        return dataclasses.replace(self, pg_denom_const=pg, ent_denom_const=en,
                                   pg_denom_from=-1, ent_denom_from=-1)


_PC_INTS = tuple(f.name for f in dataclasses.fields(_PolicyConfig) if f.type in ("int", int))
_PC_FLOATS = tuple(f.name for f in dataclasses.fields(_PolicyConfig)
                   if f.type not in ("int", int))


@functools.lru_cache(maxsize=256)
def _policy_config_from_lists(ints: tuple, floats: tuple) -> _PolicyConfig:
    if len(ints) != len(_PC_INTS) or len(floats) != len(_PC_FLOATS):
        raise ValueError("policy_loss: malformed iparams/fparams")
    kw = {n: int(v) for n, v in zip(_PC_INTS, ints)}
    kw.update({n: float(v) for n, v in zip(_PC_FLOATS, floats)})
    return _PolicyConfig(**kw)


def _positive_count(v: float, index: int, op: str = "policy_loss") -> float:
    name = "global_num_tokens / num_items_in_batch" if index == 0 else "global_batch_size"
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0, got {v}")
    return v


def _parse_kl_kind(op: str, name: str, kind, semantics: str):
    if not isinstance(kind, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(kind).__name__}")
    straight = kind.endswith("+")
    base_name = kind[:-1] if straight else kind
    if base_name not in _KL_ALIASES:
        raise ValueError(f"{op}: {name} must be one of {KL_KINDS}, got {kind!r}")
    if kind not in _SEM_KL[semantics]:
        raise ValueError(
            f"{op}: {name}={kind!r} does not exist in {semantics}; it has {_SEM_KL[semantics]}"
        )
    base = _KL_ALIASES[base_name]
    if base == "k2":
        straight = False  # k2+ is k2
    return base, straight


def _kl_clamps(op: str, base: str, clamp, semantics: str):
    """(clamp of ref - logp before exp for k3, clamp of the value)."""
    lr = _INF
    out = _INF
    if semantics == "verl" and base == "k3":
        lr, out = 20.0, 10.0  # verl kl_penalty_forward: clamp(kl, -20, 20); clamp(kld, -10, 10)
    if semantics == "openrlhf":
        out = 10.0  # OpenRLHF compute_approx_kl: log_ratio.clamp(min=-10, max=10), every kind
    if clamp is not None:
        out = _positive(op, "clamp" if op == "kl_penalty" else "kl_clamp", clamp)
    return lr, out


def _check_semantics(op: str, semantics) -> str:
    if not isinstance(semantics, str):
        raise TypeError(f"{op}: semantics must be a str, got {type(semantics).__name__}")
    if semantics not in SEMANTICS:
        raise ValueError(f"{op}: semantics must be one of {SEMANTICS}, got {semantics!r}")
    return semantics


def _real(op: str, name: str, v, *, allow_inf: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or (not allow_inf and math.isinf(v)):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


def _positive(op: str, name: str, v) -> float:
    return _validate.positive_float(op, name, v)


def _nonneg(op: str, name: str, v) -> float:
    v = _real(op, name, v)
    if v < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {v}")
    return v


def _bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def _count_arg(op: str, name: str, v, device):
    """None, a number (> 0) or a one-element tensor (checked when the op runs)."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{op}: {name} must be a number or a one-element tensor, "
                             f"got a tensor of shape {tuple(v.shape)}")
        if v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"{op}: {name} must be a real number, got a {v.dtype} tensor")
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number or a tensor, got {type(v).__name__}")
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{op}: {name} must be finite and > 0, got {v}")
    return v


def _global_counts(op, global_num_tokens, num_items_in_batch, global_batch_size, device):
    """Resolve the global count arguments: (tokens, batch_size, counts tensor or None)."""
    gnt = _count_arg(op, "global_num_tokens", global_num_tokens, device)
    nib = _count_arg(op, "num_items_in_batch", num_items_in_batch, device)
    if gnt is not None and nib is not None and gnt is not nib:
        raise ValueError(f"{op}: pass global_num_tokens or num_items_in_batch (aliases), not both")
    tokens = gnt if gnt is not None else nib
    gbs = _count_arg(op, "global_batch_size", global_batch_size, device)
    counts = None
    if isinstance(tokens, torch.Tensor) or isinstance(gbs, torch.Tensor):
        parts = []
        for v in (tokens, gbs):
            if isinstance(v, torch.Tensor):
                parts.append(v.detach().reshape(()).to(device=device, dtype=torch.float64))
            else:
                parts.append(torch.ones((), dtype=torch.float64, device=device))
        counts = torch.stack(parts)
        tokens = "tensor" if isinstance(tokens, torch.Tensor) else tokens
        gbs = "tensor" if isinstance(gbs, torch.Tensor) else gbs
    return tokens, gbs, counts


def _resolve_policy(op, **kw) -> _PolicyConfig:
    """Resolve every option (cached: the arguments are plain numbers and strings)."""
    if torch.compiler.is_compiling():  # traced once per graph anyway
        return _resolve_policy_impl(op, **kw)
    try:
        return _resolve_policy_cached(op, **kw)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return _resolve_policy_impl(op, **kw)  # raises the argument's own TypeError


def _resolve_policy_impl(op, *, B, T, variant, epsilon, epsilon_low, epsilon_high, clip_ratio_c,
                    delta, tau_pos, tau_neg, has_ref, beta, kl_kind, kl_clamp,
                    kl_ratio_weighted, has_ent, entropy_coef, loss_agg_mode, global_tokens,
                    global_batch_size, loss_scale_factor, max_completion_length, dp_size,
                    semantics, need_grad) -> _PolicyConfig:
    semantics = _check_semantics(op, semantics)
    if not isinstance(variant, str):
        raise TypeError(f"{op}: variant must be a str, got {type(variant).__name__}")
    if variant not in VARIANTS:
        raise ValueError(f"{op}: variant must be one of {VARIANTS}, got {variant!r}")
    if variant not in _SEM_VARIANTS[semantics]:
        raise ValueError(f"{op}: variant={variant!r} does not exist in {semantics}; it has "
                         f"{_SEM_VARIANTS[semantics]}")
    eps = _nonneg(op, "epsilon", epsilon)
    eps_low = eps if epsilon_low is None else _nonneg(op, "epsilon_low", epsilon_low)
    eps_high = eps if epsilon_high is None else _nonneg(op, "epsilon_high", epsilon_high)
    clip_lo, clip_hi = 1.0 - eps_low, 1.0 + eps_high
    if variant == "cispo" and semantics == "trl":
        # TRL: clamp(coef_1, max=epsilon_high).detach(): an absolute cap, no lower bound.
        clip_lo, clip_hi = -_INF, eps_high
    ratio_variants = ("ppo", "gspo")
    if clip_ratio_c is not None:
        clip_ratio_c = _real(op, "clip_ratio_c", clip_ratio_c)
        if not clip_ratio_c > 1.0:
            raise ValueError(f"{op}: clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
        if variant not in ratio_variants:
            raise ValueError(f"{op}: clip_ratio_c applies to variant 'ppo' or 'gspo', "
                             f"not {variant!r}")
        dual_c = clip_ratio_c
    else:
        # verl's compute_policy_loss_vanilla always applies dual-clip (clip_ratio_c = 3.0).
        dual_c = 3.0 if (semantics == "verl" and variant == "ppo") else _INF
    if delta is not None:
        delta = _positive(op, "delta", delta)
        if variant not in ratio_variants:
            raise ValueError(f"{op}: delta applies to variant 'ppo' or 'gspo', not {variant!r}")
    else:
        delta = _INF
    tau_pos = _positive(op, "tau_pos", tau_pos)
    tau_neg = _positive(op, "tau_neg", tau_neg)

    # Log-ratio clamps (verl: +-20 in vanilla/cispo/sapo; OpenRLHF: +-20 for ppo).
    lr_clamp = _INF
    if semantics == "verl" and variant in ("ppo", "cispo", "sapo"):
        lr_clamp = 20.0
    if semantics == "openrlhf" and variant == "ppo":
        lr_clamp = 20.0
    stat_x_clamped = int(semantics == "verl" and variant in ("ppo", "cispo", "sapo"))
    seq_lr_max = 10.0 if (semantics == "verl" and variant == "gspo") else _INF
    seq_grad = int(variant == "gspo" and semantics in ("trl", "openrlhf"))

    # KL term
    beta = _nonneg(op, "beta", beta)
    kl_ratio_weighted = _bool(op, "kl_ratio_weighted", kl_ratio_weighted)
    base, straight = _parse_kl_kind(op, "kl_kind", kl_kind, semantics)
    kl_lr, kl_out = _kl_clamps(op, base, kl_clamp, semantics)
    if beta != 0.0 and not has_ref:
        raise ValueError(f"{op}: beta={beta} needs ref_logp (the reference policy's log-probs)")
    if kl_ratio_weighted:
        if not has_ref:
            raise ValueError(f"{op}: kl_ratio_weighted=True needs ref_logp")
        if semantics not in ("rlfuse", "trl"):
            raise ValueError(f"{op}: kl_ratio_weighted (TRL's use_bias_correction_kl) does not "
                             f"exist in {semantics}")
    kl_mode = 0 if not has_ref else (2 if base == "k3" else 1)

    # Entropy bonus
    ent_coef = _real(op, "entropy_coef", entropy_coef)
    if ent_coef != 0.0 and not has_ent:
        raise ValueError(f"{op}: entropy_coef={ent_coef} needs entropy (per-token entropies)")

    # Aggregation
    if loss_agg_mode is None:
        if semantics == "trl":
            loss_agg_mode = "grpo" if variant == "sapo" else "dapo"
        elif (semantics == "verl" and variant == "sapo") or (
                semantics == "openrlhf" and variant == "gspo"):
            loss_agg_mode = "seq-mean-token-mean"
        else:
            loss_agg_mode = "token-mean"
    elif not isinstance(loss_agg_mode, str):
        raise TypeError(f"{op}: loss_agg_mode must be a str, got {type(loss_agg_mode).__name__}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{op}: loss_agg_mode must be one of {LOSS_AGG_MODES}, "
                         f"got {loss_agg_mode!r}")
    if loss_agg_mode not in _SEM_MODES[semantics]:
        raise ValueError(f"{op}: loss_agg_mode={loss_agg_mode!r} does not exist in {semantics}; "
                         f"it has {_SEM_MODES[semantics]}")
    if semantics == "verl" and variant == "sapo" and loss_agg_mode != "seq-mean-token-mean":
        raise ValueError(f"{op}: verl's SAPO loss always aggregates with seq-mean-token-mean "
                         f"(it ignores loss_agg_mode); got loss_agg_mode={loss_agg_mode!r}")
    if semantics == "openrlhf" and variant == "gspo" and loss_agg_mode != "seq-mean-token-mean":
        raise ValueError(f"{op}: OpenRLHF's GSPO always aggregates per sequence "
                         f"(seq-mean-token-mean); got loss_agg_mode={loss_agg_mode!r}")
    if loss_scale_factor is not None:
        loss_scale_factor = _positive(op, "loss_scale_factor", loss_scale_factor)
    if max_completion_length is not None:
        max_completion_length = _validate.integer(op, "max_completion_length",
                                                  max_completion_length)
        if max_completion_length < 1:
            raise ValueError(f"{op}: max_completion_length must be >= 1, "
                             f"got {max_completion_length}")
    dp_size = _validate.integer(op, "dp_size", dp_size)
    if dp_size < 1:
        raise ValueError(f"{op}: dp_size must be >= 1, got {dp_size}")
    pg = _agg_spec(op, loss_agg_mode, semantics, B=B, T=T, global_tokens=global_tokens,
                   global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
                   max_completion_length=max_completion_length, dp_size=dp_size)
    if semantics == "trl":
        # TRL: entropy_loss = (H * mask).sum() / mask.sum().clamp(min=1), whatever loss_type.
        en = _AggSpec(_DEN_TOKENS, _LEN_NONE, 1.0, 1.0)
    else:
        en = pg
    return _PolicyConfig(
        variant=_VARIANT_CODES[variant], kl_mode=kl_mode, kl_kind=_KL_CODES[base],
        kl_st=int(straight), kl_rw=int(kl_ratio_weighted), seq_grad=seq_grad,
        stat_x_clamped=stat_x_clamped, pg_denom_kind=pg.denom_kind, pg_len_kind=pg.len_kind,
        pg_denom_from=pg.denom_from, ent_denom_kind=en.denom_kind, ent_len_kind=en.len_kind,
        ent_denom_from=en.denom_from, need_grad=int(need_grad), lr_clamp=lr_clamp,
        seq_lr_max=seq_lr_max, clip_lo=clip_lo, clip_hi=clip_hi, dual_c=dual_c, delta=delta,
        tau_pos=tau_pos, tau_neg=tau_neg, beta=beta, kl_lr_clamp=kl_lr, kl_out_clamp=kl_out,
        ent_coef=ent_coef, pg_num=pg.num, pg_denom_const=pg.denom_const, ent_num=en.num,
        ent_denom_const=en.denom_const,
    )


# typed: 1, 1.0 and True hash alike, and an untyped cache would let dp_size=1.0 or
# kl_ratio_weighted=1 skip their type checks after a valid call with 1 / True.
_resolve_policy_cached = functools.lru_cache(maxsize=512, typed=True)(_resolve_policy_impl)


# ======================================================================================
# Shared helpers
# ======================================================================================
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bt(x: Optional[torch.Tensor], B: int, T: int) -> Optional[torch.Tensor]:
    """[B, T], [B] or [B, 1] -> a [B, T] view (stride 0 along T when broadcast)."""
    if x is None:
        return None
    if x.dim() == 1:
        x = x.unsqueeze(1)
    if x.shape == (B, T):
        return x
    return x.expand(B, T)


def _mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8) if mask.dim() else mask.to(torch.uint8)
    if mask.dtype == torch.int16:
        return mask.to(torch.int32)
    return mask


def _desc(ia: list, at: int, x: Optional[torch.Tensor],
          code_map=_backend.DTYPE_CODES) -> None:
    """Write a tensor descriptor (pointer, dtype code, row stride, token stride)."""
    if x is None:
        return  # ia is zero-initialised: pointer 0 = absent
    st = x.stride()
    if len(st) == 2:
        ia[at:at + _T4] = (x.data_ptr(), code_map[x.dtype], st[0], st[1])
    else:
        ia[at:at + _T4] = (x.data_ptr(), code_map[x.dtype], 0, st[0] if st else 0)


def _row_coefs(L: torch.Tensor, denom_kind: int, len_kind: int, num: float,
               denom_const: float) -> torch.Tensor:
    """Per-sequence aggregation coefficients c_i (float64) from the token counts L_i."""
    Ld = L.to(torch.float64)
    N = Ld.sum()
    G = (Ld > 0).sum().to(torch.float64)
    if denom_kind == _DEN_TOKENS:
        denom = denom_const * N
    elif denom_kind == _DEN_SEQS:
        denom = denom_const * G
    else:
        denom = torch.full_like(N, denom_const)
    ok = denom > 0
    c = torch.where(ok, num / torch.where(ok, denom, torch.ones_like(denom)),
                    torch.zeros_like(denom))
    c = c.expand_as(Ld)
    if len_kind == _LEN_INV:
        c = torch.where(Ld > 0, c / Ld.clamp(min=1), torch.zeros_like(Ld))
    elif len_kind == _LEN_INV_EPS:
        c = c / (Ld + 1e-8)
    elif len_kind == _LEN_INV_CLAMP:
        c = c / Ld.clamp(min=1)
    return c.contiguous()


def _where0(cond, x):
    return torch.where(cond, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _masked_mean(x, m, n):
    return _where0(m, x).sum() / n


# ======================================================================================
# KL estimators
# ======================================================================================
def _kl_value(d: torch.Tensor, base: str, kl_lr: float, kl_out: float) -> torch.Tensor:
    """KL estimate from d = logp - ref (differentiable; the reference formulas)."""
    if base == "k1":
        v = d
    elif base == "abs":
        v = d.abs()
    elif base == "k2":
        v = 0.5 * d.square()
    else:
        q = -d  # log(pi_ref / pi)
        if math.isfinite(kl_lr):
            q = q.clamp(-kl_lr, kl_lr)
        v = torch.exp(q) - q - 1
    if math.isfinite(kl_out):
        v = v.clamp(-kl_out, kl_out)
    return v


def _kl_value_grad_torch(d, base, straight, kl_lr, kl_out):
    """(value, d value / d logp) of an estimator from d = logp - ref, in explicit torch form
    (the backend='torch' path; the kernels implement the same formulas)."""
    if base == "k1":
        v, g = d, torch.ones_like(d)
    elif base == "abs":
        v, g = d.abs(), torch.sign(d)
    elif base == "k2":
        v, g = 0.5 * d.square(), d
    else:
        q = -d
        qc = q.clamp(-kl_lr, kl_lr) if math.isfinite(kl_lr) else q
        em1 = torch.expm1(qc)
        v = em1 - qc
        g = torch.where(qc == q, -em1, torch.zeros_like(q))
    vc = v.clamp(-kl_out, kl_out) if math.isfinite(kl_out) else v
    g = torch.where(vc == v, g, torch.zeros_like(g))
    if straight:
        g = d
    return vc, g


def _kl_reference_core(logp, ref_logp, base, straight, kl_lr, kl_out):
    acc = _acc_dtype(logp)
    d = logp.to(acc) - ref_logp.detach().to(acc)
    v = _kl_value(d, base, kl_lr, kl_out)
    if straight:
        k2 = 0.5 * d.square()
        v = k2 - k2.detach() + v.detach()
    return v


def kl_penalty_reference(logp, ref_logp, kind="k3", *, clamp=None, semantics="rlfuse"):
    """Plain-torch KL estimate (the specification); differentiable w.r.t. ``logp``.

    With d = logp - ref_logp: ``k1`` d, ``abs`` |d|, ``k2`` d^2/2, ``k3`` e^-d + d - 1; a kind
    ending in ``+`` has the value of that kind and the gradient of k2 (straight-through).
    ``semantics="verl"`` clamps ref - logp to +-20 before the exp of k3 and the k3 value to
    +-10; ``"openrlhf"`` clamps every kind's value to +-10; ``clamp`` sets the value clamp.
    Computes in float64 for float64 ``logp``, else float32.
    """
    op = "kl_penalty"
    semantics = _check_semantics(op, semantics)
    base, straight = _parse_kl_kind(op, "kind", kind, semantics)
    kl_lr, kl_out = _kl_clamps(op, base, clamp, semantics)
    return _kl_reference_core(logp, ref_logp, base, straight, kl_lr, kl_out)


def _kl_geometry(x: torch.Tensor):
    """[R, C] description of x (a view when possible): (tensor, R, C)."""
    if x.dim() == 2:
        return x, x.size(0), x.size(1)
    if x.dim() < 2:
        y = x.reshape(1, -1)
        return y, 1, y.size(1)
    y = x.reshape(math.prod(x.shape[:-1]), x.size(-1))  # not -1: the last dim may be 0
    return y, y.size(0), y.size(1)


def _kl_run(logp, ref_logp, grad_out, ints, floats, backend, backward: bool):
    kind, straight = ints
    kl_lr, kl_out = floats
    acc = _acc_dtype(logp)
    shape = logp.shape
    if backend == "torch":
        base = {v: k for k, v in _KL_CODES.items()}[kind]
        if not backward:
            with torch.no_grad():
                return _kl_reference_core(logp, ref_logp, base, bool(straight), kl_lr,
                                          kl_out).contiguous()
        d = logp.to(acc) - ref_logp.to(acc)
        _, g = _kl_value_grad_torch(d, base, bool(straight), kl_lr, kl_out)
        return (grad_out.to(acc) * g).contiguous()
    lp2, R, C = _kl_geometry(logp)
    ref2, _, _ = _kl_geometry(ref_logp)
    go2 = _kl_geometry(grad_out)[0] if backward else None
    out = torch.empty((R, C), dtype=acc, device=logp.device)
    if R * C == 0:
        return out.view(shape)
    if backend in ("cpu", "cuda"):
        ia = [0] * _KI_N
        ia[_KI["R"]], ia[_KI["C"]], ia[_KI["threads"]] = R, C, _backend.threads_for(R * C)
        _desc(ia, _KI["lp"], lp2)
        _desc(ia, _KI["ref"], ref2)
        _desc(ia, _KI["gout"], go2)
        ia[_KI["out"]] = out.data_ptr()
        ia[_KI["backward"]], ia[_KI["kind"]], ia[_KI["st"]] = int(backward), kind, straight
        if backend == "cpu":
            _backend.cpu_module().kl_penalty(ia, [kl_lr, kl_out])
        else:
            with _backend.cuda_launch(logp.device) as stream:
                _backend.cuda_module().kl_penalty(ia, [kl_lr, kl_out], stream)
    else:
        with _backend.device_guard(logp.device):
            _backend.triton_kernels("policy_loss").kl_penalty(
                lp2, ref2, go2, out, kind, bool(straight), kl_lr, kl_out, bool(backward))
    return out.view(shape)


@torch.library.custom_op("rlfuse::kl_penalty", mutates_args=())
def _kl_penalty_op(logp: torch.Tensor, ref_logp: torch.Tensor, iparams: list[int],
                   fparams: list[float], backend: str) -> torch.Tensor:
    return _kl_run(logp, ref_logp, None, iparams, fparams, backend, backward=False)


@_kl_penalty_op.register_fake
def _(logp, ref_logp, iparams, fparams, backend):
    return logp.new_empty(logp.shape, dtype=_acc_dtype(logp))


@torch.library.custom_op("rlfuse::kl_penalty_backward", mutates_args=())
def _kl_penalty_backward_op(logp: torch.Tensor, ref_logp: torch.Tensor, grad_out: torch.Tensor,
                            iparams: list[int], fparams: list[float], backend: str) -> torch.Tensor:
    return _kl_run(logp, ref_logp, grad_out, iparams, fparams, backend, backward=True)


@_kl_penalty_backward_op.register_fake
def _(logp, ref_logp, grad_out, iparams, fparams, backend):
    return logp.new_empty(logp.shape, dtype=_acc_dtype(logp))


def _kl_setup_context(ctx, inputs, output):
    logp, ref_logp, iparams, fparams, backend = inputs
    ctx.save_for_backward(logp, ref_logp)
    ctx.iparams, ctx.fparams, ctx.backend = iparams, fparams, backend


def _kl_backward(ctx, grad):
    logp, ref_logp = ctx.saved_tensors
    g = None
    if ctx.needs_input_grad[0]:
        g = _kl_penalty_backward_op(logp, ref_logp, grad, ctx.iparams, ctx.fparams, ctx.backend)
        g = g.to(logp.dtype)
    return g, None, None, None, None


_kl_penalty_op.register_autograd(_kl_backward, setup_context=_kl_setup_context)


class _KlPenaltyFunction(torch.autograd.Function):
    """Eager twin of rlfuse::kl_penalty."""

    @staticmethod
    def forward(ctx, logp, ref_logp, iparams, fparams, backend):
        ctx.save_for_backward(logp, ref_logp)
        ctx.iparams, ctx.fparams, ctx.backend = iparams, fparams, backend
        return _kl_run(logp, ref_logp, None, iparams, fparams, backend, backward=False)

    @staticmethod
    def backward(ctx, grad):
        logp, ref_logp = ctx.saved_tensors
        g = None
        if ctx.needs_input_grad[0]:
            g = _kl_run(logp, ref_logp, grad, ctx.iparams, ctx.fparams, ctx.backend,
                        backward=True).to(logp.dtype)
        return g, None, None, None, None


def kl_penalty(logp, ref_logp, kind="k3", *, clamp=None, semantics="rlfuse", backend=None):
    """Per-token KL estimate between the policy and the reference policy.

    Args:
        logp: log-probabilities of the sampled tokens under the policy, any shape, float32 /
            bfloat16 / float16 / float64.  Differentiable.
        ref_logp: the reference policy's log-probabilities, same shape.  A constant (no
            gradient flows to it, as in every framework).
        kind: ``"k1"`` (``"kl"``), ``"abs"``, ``"k2"`` (``"mse"``), ``"k3"``
            (``"low_var_kl"``), or one of them followed by ``"+"`` (the value of that kind
            with the gradient of k2, verl's straight-through estimators).
        clamp: clamp the estimate to ``[-clamp, clamp]`` (gradient 0 outside), overriding
            the semantics' default.
        semantics: ``"rlfuse"`` (no clamps), ``"verl"`` (k3: ref - logp clamped to +-20
            before the exp, value clamped to +-10), ``"trl"`` (no clamps), ``"openrlhf"``
            (value of every kind clamped to +-10; k1/k2/k3 only).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"``; default by device.

    Returns:
        The estimate, shape of ``logp``, float32 (float64 for float64 ``logp``).
    """
    op = "kl_penalty"
    _validate.float_tensor(op, "logp", logp)
    _validate.float_tensor(op, "ref_logp", ref_logp)
    _validate.shape_equals(op, "ref_logp", ref_logp, logp.shape, "logp.shape")
    _validate.same_device(op, "logp", logp, ref_logp=ref_logp)
    semantics = _check_semantics(op, semantics)
    base, straight = _parse_kl_kind(op, "kind", kind, semantics)
    kl_lr, kl_out = _kl_clamps(op, base, clamp, semantics)
    chosen = _backend.resolve(backend, logp.device, op)
    args = (logp, ref_logp, [_KL_CODES[base], int(straight)], [kl_lr, kl_out], chosen)
    if _use_library_op(logp, ref_logp):
        return _kl_penalty_op(*args)
    return _KlPenaltyFunction.apply(*args)


# ======================================================================================
# Policy loss: reference (the specification)
# ======================================================================================
def _policy_reference_core(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights,
                           cfg: _PolicyConfig):
    """loss (differentiable w.r.t. logp and entropy) and the statistics vector.

    Aggregation: loss = sum_i c_i sum_t m_it l_it - entropy_coef sum_i e_i sum_t m_it H_it
    with c_i / e_i from :func:`_row_coefs`; masked tokens contribute exactly 0.
    """
    acc = _acc_dtype(logp)
    B, T = logp.shape
    m = mask != 0
    mf = m.to(acc)
    zero = torch.zeros((), dtype=acc, device=logp.device)
    one = torch.ones((), dtype=acc, device=logp.device)
    # Masked tokens contribute nothing: replace their values first, so that NaN or inf there
    # reaches neither the loss nor (through where's backward) the gradient.
    lp = torch.where(m, logp.to(acc), zero)
    old = lp.detach() if old_logp is None else torch.where(m, old_logp.detach().to(acc), zero)
    A = torch.where(m, _bt(advantages, B, T).detach().to(acc), zero)
    w = None if is_weights is None else torch.where(m, _bt(is_weights, B, T).detach().to(acc), one)
    if ref_logp is not None:
        ref_logp = torch.where(m, ref_logp.detach().to(acc), zero)
    if entropy is not None:
        entropy = torch.where(m, entropy.to(acc), zero)
    L = mf.sum(-1)
    xr = lp - old
    variant = VARIANTS[cfg.variant]
    if variant == "gspo":
        xs = _where0(m, xr).sum(-1) / L.clamp(min=1)
        if cfg.seq_grad:  # TRL / OpenRLHF: gradient through the sequence mean
            log_s = xs.unsqueeze(1).expand(B, T)
        else:  # verl / GSPO-token: s_it = sg(s_i) * pi / sg(pi)
            log_s = lp - lp.detach() + xs.detach().unsqueeze(1)
        if math.isfinite(cfg.seq_lr_max):
            log_s = log_s.clamp(max=cfg.seq_lr_max)
        r = torch.exp(log_s)
        x_stat = xr
    else:
        x = xr.clamp(-cfg.lr_clamp, cfg.lr_clamp) if math.isfinite(cfg.lr_clamp) else xr
        r = torch.exp(x)
        x_stat = x if cfg.stat_x_clamped else xr
    neg, pos = A < 0, A > 0
    clip = dual = torch.zeros_like(A)
    low = ((r < cfg.clip_lo) & neg).to(acc)
    high = ((r > cfg.clip_hi) & pos).to(acc)
    if variant in ("ppo", "gspo"):
        c1 = r.clamp(max=cfg.delta) if math.isfinite(cfg.delta) else r
        c2 = r.clamp(cfg.clip_lo, cfg.clip_hi)
        u1, u2 = A * c1, A * c2
        lc = -torch.minimum(u1, u2)
        clip = (u2 < u1).to(acc)
        if math.isfinite(cfg.dual_c):
            cap = -cfg.dual_c * A
            pg = torch.where(neg, torch.minimum(lc, cap), lc)
            dual = (neg & (lc > cap)).to(acc)
        else:
            pg = lc
    elif variant == "cispo":
        cr = r.clamp(cfg.clip_lo, cfg.clip_hi).detach()
        pg = -cr * A * lp
        clip = ((r < cfg.clip_lo) | (r > cfg.clip_hi)).to(acc)
    elif variant == "sapo":
        tau = torch.where(pos, torch.tensor(cfg.tau_pos, dtype=acc, device=A.device),
                          torch.tensor(cfg.tau_neg, dtype=acc, device=A.device))
        pg = -(torch.sigmoid(tau * (r - 1)) * 4 / tau) * A
    else:  # gpg, reinforce
        pg = -A * lp
    if w is not None:
        pg = pg * w
    ell = pg
    K = kv = None
    if cfg.kl_mode:
        base = {v: k for k, v in _KL_CODES.items()}[cfg.kl_kind]
        kv = _kl_reference_core(lp, ref_logp, base, bool(cfg.kl_st), cfg.kl_lr_clamp,
                                cfg.kl_out_clamp)
        K = r * kv if cfg.kl_rw else kv
        ell = ell + cfg.beta * K
    cpg = _row_coefs(L, cfg.pg_denom_kind, cfg.pg_len_kind, cfg.pg_num,
                     cfg.pg_denom_const).to(acc).unsqueeze(1)
    loss = (cpg * _where0(m, ell)).sum()
    pg_loss = (cpg * _where0(m, pg)).sum()
    kl_loss = (cpg * _where0(m, K)).sum() if K is not None else zero
    ent_loss = ent_mean = zero
    N = mf.sum()
    n = N.clamp(min=1)
    if entropy is not None:
        H = entropy.to(acc)
        cen = _row_coefs(L, cfg.ent_denom_kind, cfg.ent_len_kind, cfg.ent_num,
                         cfg.ent_denom_const).to(acc).unsqueeze(1)
        ent_loss = (cen * _where0(m, H)).sum()
        loss = loss - cfg.ent_coef * ent_loss
        ent_mean = _masked_mean(H, m, n)
    stats = torch.stack([
        pg_loss, kl_loss, ent_loss,
        _masked_mean(clip, m, n), _masked_mean(low, m, n), _masked_mean(high, m, n),
        _masked_mean(dual, m, n), _masked_mean(-x_stat, m, n), _masked_mean(r, m, n),
        _masked_mean(kv, m, n) if kv is not None else zero, ent_mean,
        N, (L > 0).sum().to(acc),
    ]).detach()
    return loss, stats


def _policy_grads_torch(logp, old_logp, advantages, mask, ref_logp, is_weights,
                        cfg: _PolicyConfig):
    """d(loss)/d(logp) in explicit torch form (backend='torch'; the same per-token formulas as
    the kernels, including their tie conventions)."""
    acc = _acc_dtype(logp)
    B, T = logp.shape
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=logp.device)
    lp = torch.where(m, logp.to(acc), zero)
    old = lp if old_logp is None else torch.where(m, old_logp.to(acc), zero)
    A = torch.where(m, _bt(advantages, B, T).to(acc), zero)
    w = (torch.ones_like(lp) if is_weights is None
         else torch.where(m, _bt(is_weights, B, T).to(acc), torch.ones_like(lp)))
    L = m.sum(-1).to(acc)
    cpg = _row_coefs(L, cfg.pg_denom_kind, cfg.pg_len_kind, cfg.pg_num,
                     cfg.pg_denom_const).to(acc).unsqueeze(1)
    xr = lp - old
    variant = VARIANTS[cfg.variant]
    if variant == "gspo":
        xs = _where0(m, xr).sum(-1) / L.clamp(min=1)
        ind = xs <= cfg.seq_lr_max
        s = torch.exp(xs.clamp(max=cfg.seq_lr_max) if math.isfinite(cfg.seq_lr_max) else xs)
        r = s.unsqueeze(1).expand(B, T)
        drdl = torch.zeros_like(r) if cfg.seq_grad else torch.where(ind, s, zero).unsqueeze(1)
    else:
        x = xr.clamp(-cfg.lr_clamp, cfg.lr_clamp) if math.isfinite(cfg.lr_clamp) else xr
        r = torch.exp(x)
        drdl = torch.where(x == xr, r, zero)
    dPdl = dPdr = torch.zeros_like(lp)
    if variant in ("ppo", "gspo"):
        c1 = r.clamp(max=cfg.delta) if math.isfinite(cfg.delta) else r
        c2 = r.clamp(cfg.clip_lo, cfg.clip_hi)
        u1, u2 = A * c1, A * c2
        clipped = u2 < u1
        lc = -torch.where(clipped, u2, u1)
        dPdr = -torch.where(clipped, torch.where(c2 == r, A, zero), torch.where(c1 == r, A, zero))
        if math.isfinite(cfg.dual_c):
            dPdr = torch.where((A < 0) & (lc > -cfg.dual_c * A), zero, dPdr)
    elif variant == "cispo":
        dPdl = -r.clamp(cfg.clip_lo, cfg.clip_hi) * A
    elif variant == "sapo":
        tau = torch.where(A > 0, torch.tensor(cfg.tau_pos, dtype=acc, device=A.device),
                          torch.tensor(cfg.tau_neg, dtype=acc, device=A.device))
        z = tau * (r - 1)
        # sigmoid(-z) for 1 - sigmoid(z): no cancellation where sigmoid(z) rounds to 1
        dPdr = -4 * torch.sigmoid(z) * torch.sigmoid(-z) * A
    else:
        dPdl = -A
    dl = w * (dPdl + dPdr * drdl)
    cpl = w * dPdr
    if cfg.kl_mode:
        base = {v: k for k, v in _KL_CODES.items()}[cfg.kl_kind]
        d = lp - torch.where(m, ref_logp.to(acc), zero)
        vc, g = _kl_value_grad_torch(d, base, bool(cfg.kl_st), cfg.kl_lr_clamp,
                                     cfg.kl_out_clamp)
        if cfg.kl_rw:
            dl = dl + cfg.beta * (r * g + vc * drdl)
            cpl = cpl + cfg.beta * vc
        else:
            dl = dl + cfg.beta * g
    glp = _where0(m, cpg * dl)
    if variant == "gspo" and cfg.seq_grad:
        C = _where0(m, cpl).sum(-1)
        add = torch.where(ind, cpg.squeeze(1) * C * s / L.clamp(min=1), zero)
        glp = glp + _where0(m, add.unsqueeze(1).expand(B, T))
    return glp


def _stats_keys(has_ref: bool, has_ent: bool):
    keys = ["pg_loss", "clip_frac", "clip_frac_low", "clip_frac_high", "dual_clip_frac",
            "approx_kl", "ratio_mean"]
    if has_ref:
        keys += ["kl_loss", "kl_mean"]
    if has_ent:
        keys += ["entropy_loss", "entropy_mean"]
    keys += ["num_tokens", "num_seqs"]
    return tuple((k, _STATS.index(k)) for k in keys)


_STATS_KEYS = {(r, e): _stats_keys(r, e) for r in (False, True) for e in (False, True)}


def _stats_dict(stats: torch.Tensor, has_ref: bool, has_ent: bool) -> dict:
    vals = stats.unbind(0)
    return {k: vals[i] for k, i in _STATS_KEYS[(has_ref, has_ent)]}


# ======================================================================================
# Policy loss: kernels
# ======================================================================================
def _check_values_torch(op, mask, adv_bt):
    """Mask values and advantages (for the GPU backends and the reference backend)."""
    if mask.dtype != torch.bool:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            b, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{op}: mask must hold only 0 and 1; row {b}, token {t} holds "
                             f"{mask[b, t].item()}")
    if adv_bt is not None:
        bad = (mask != 0) & ~torch.isfinite(adv_bt)
        if bool(bad.any()):
            b, t = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"{op}: advantages must be finite where mask is 1; row {b}, "
                             f"token {t} holds {adv_bt[b, t].item()}")


def _raise_kernel_error(op, err, mask, adv, adv_name="advantages"):
    code, b, t = err
    if code == 1:
        raise ValueError(f"{op}: mask must hold only 0 and 1; row {b}, token {t} holds "
                         f"{mask[b, t].item()}")
    if code == 2:
        raise ValueError(f"{op}: {adv_name} must be finite where mask is 1; row {b}, token "
                         f"{t} holds {adv[b, t].item()}")


def _policy_args(logp, old, adv, mask, ref, ent, isw, cfg, loss, stats, glp, gscale=None,
                 escale=None):
    """Kernel arguments in the layout of csrc/cpu/policy_loss.h (CPU and CUDA)."""
    B, T = logp.shape
    ia_static, fa = _policy_static_args(cfg)
    ia = list(ia_static)
    ia[_PI["B"]], ia[_PI["T"]], ia[_PI["threads"]] = B, T, _backend.threads_for(B * T)
    _desc(ia, _PI["lp"], logp)
    _desc(ia, _PI["old"], old)
    _desc(ia, _PI["adv"], adv)
    _desc(ia, _PI["mask"], mask, _MASK_CODES)
    _desc(ia, _PI["ref"], ref if cfg.kl_mode else None)
    _desc(ia, _PI["ent"], ent)
    _desc(ia, _PI["isw"], isw)
    for name, x in (("grad_lp", glp), ("gscale", gscale), ("escale", escale), ("loss", loss),
                    ("stats", stats)):
        ia[_PI[name]] = x.data_ptr() if x is not None and x.numel() else 0
    return ia, fa


_PI_CFG = ("variant", "kl_mode", "kl_kind", "kl_st", "kl_rw", "seq_grad", "stat_x_clamped",
           "pg_denom_kind", "pg_len_kind", "ent_denom_kind", "ent_len_kind")
_PF_ORDER = tuple(sorted(_PF, key=_PF.get))


@functools.lru_cache(maxsize=256)
def _policy_static_args(cfg: "_PolicyConfig"):
    """The configuration part of the kernel arguments (cached per configuration)."""
    ia = [0] * _PI_N
    for name in _PI_CFG:
        ia[_PI[name]] = getattr(cfg, name)
    return tuple(ia), [float(getattr(cfg, name)) for name in _PF_ORDER]


def _policy_cpu(logp, old, adv, mask, ref, ent, isw, cfg, loss, stats, glp, escale):
    # No gscale output: the kernel applies the aggregation coefficients to glp itself.
    ia, fa = _policy_args(logp, old, adv, mask, ref, ent, isw, cfg, loss, stats, glp, None,
                          escale)
    err = _backend.cpu_module().policy_loss_fwd(ia, fa)
    _raise_kernel_error("policy_loss", err, mask, adv)


def _gpu_counts(L: torch.Tensor):
    """(N, G, 1 / max(N, 1)) of the float64 token counts L_i: tokens, rows with at least one
    token, and the factor of a mean over the tokens (0 tokens: their sum, 0)."""
    N = L.sum()
    return N, (L > 0).sum(dtype=torch.float64), N.clamp(min=1).reciprocal()


def _gpu_coefs(L, N, G, inv_n, denom_kind: int, len_kind: int, num: float,
               denom_const: float, count: Optional[torch.Tensor] = None):
    """The coefficients c_i of :func:`_row_coefs` in few device ops (the GPU paths): a Python
    float or a 0-d float64 tensor when every row has the same one, else a [B] float64 tensor.
    ``count``: the global count (0-d, from the counts tensor) that multiplies a constant
    denominator (as _PolicyConfig.with_counts, without reading it on the host).

    Rows without tokens (and all rows when N or G is 0) may get any finite coefficient instead
    of 0: every sum it multiplies, and every gradient entry of such a row, is 0."""
    if denom_kind == _DEN_CONST and count is not None:
        c = (count * denom_const).reciprocal()
    elif denom_kind == _DEN_CONST:  # reciprocal, then times num: the rounding of _row_coefs
        c = (1.0 / denom_const) * num if denom_const > 0 else 0.0
    elif denom_kind == _DEN_TOKENS and denom_const == 1.0:
        c = inv_n
    else:
        # N and G are counts: 0, or >= 1 (the clamp only replaces a zero denominator)
        denom = (N if denom_kind == _DEN_TOKENS else G).clamp(min=1)
        if denom_const != 1.0:
            denom = denom * denom_const
        c = denom.reciprocal()
    if not isinstance(c, float) and num != 1.0:
        c = c * num
    if len_kind == _LEN_NONE:
        return c
    # torch.div: a true division also for a Python float c (c / x would be c * (1 / x))
    if len_kind == _LEN_INV_EPS:
        return torch.div(c, L + 1e-8)
    return torch.div(c, L.clamp(min=1))  # _LEN_INV, _LEN_INV_CLAMP


def _gpu_coef_rows(c, B: int, dtype, device) -> torch.Tensor:
    """A coefficient of :func:`_gpu_coefs` as a contiguous [B] tensor of ``dtype``."""
    if isinstance(c, float):
        return torch.full((B,), c, dtype=dtype, device=device)
    if c.dim() == 0:
        return c.expand(B).to(dtype, copy=True)  # copy: contiguous even for dtype float64
    return c.to(dtype)


def _policy_gpu(logp, old, adv, mask, ref, ent, isw, cfg, backend, counts=None,
                mask_in=None):
    """CUDA / Triton: counts and coefficients in torch, one row kernel, final sums in torch.

    Written for few device ops and one device sync: the kernel counts the non-finite
    advantages under the mask (rows[:, 11]), a few ops check the mask values, and that flag
    is read once, after everything is queued (with the global counts taken from ``counts``,
    checked there too); only when it is set are the inputs checked again in torch, for the
    message naming the first bad position.  ``mask`` is the kernels' view of ``mask_in`` (the
    caller's mask, which the checks and messages use)."""
    B, T = logp.shape
    acc = _acc_dtype(logp)
    f64 = torch.float64
    kacc = acc if backend == "cuda" else torch.float32
    dev = logp.device
    mask_in = mask if mask_in is None else mask_in
    L = mask.sum(-1, dtype=f64)  # token counts, valid once the mask is checked (below)
    N, G, inv_n = _gpu_counts(L)
    xs = None
    if cfg.variant == _VARIANT_CODES["gspo"]:
        m = mask != 0
        lpk = logp.to(kacc)
        oldk = lpk if old is None else old.to(kacc)
        xs = (_where0(m, lpk - oldk).sum(-1) / L.clamp(min=1).to(kacc)).contiguous()
    used = sorted({i for i in (cfg.pg_denom_from, cfg.ent_denom_from) if i >= 0})
    if counts is None:
        used = []
    count = {i: counts[i] for i in used}
    cpg = _gpu_coefs(L, N, G, inv_n, cfg.pg_denom_kind, cfg.pg_len_kind, cfg.pg_num,
                     cfg.pg_denom_const, count.get(cfg.pg_denom_from))
    cpg_k = _gpu_coef_rows(cpg, B, kacc, dev)
    same_ent = (cfg.ent_denom_kind, cfg.ent_len_kind, cfg.ent_num, cfg.ent_denom_const,
                cfg.ent_denom_from) == (cfg.pg_denom_kind, cfg.pg_len_kind, cfg.pg_num,
                                        cfg.pg_denom_const, cfg.pg_denom_from)
    cen = cpg
    if ent is not None and not same_ent:
        cen = _gpu_coefs(L, N, G, inv_n, cfg.ent_denom_kind, cfg.ent_len_kind, cfg.ent_num,
                         cfg.ent_denom_const, count.get(cfg.ent_denom_from))
    rows = torch.empty((B, _N_ROWSUMS + 2), dtype=kacc, device=dev)
    glp = torch.empty((B, T) if cfg.need_grad else (0,), dtype=kacc, device=dev)
    if B > 0:
        if backend == "cuda":
            ia, fa = _policy_args(logp, old, adv, mask, ref, ent, isw, cfg, None, None, glp)
            with _backend.cuda_launch(logp.device) as stream:
                _backend.cuda_module().policy_loss_rows(
                    ia, fa, cpg_k.data_ptr(), xs.data_ptr() if xs is not None else 0,
                    rows.data_ptr(), stream)
        else:
            with _backend.device_guard(logp.device):
                _backend.triton_kernels("policy_loss").policy_rows(
                    logp, old, adv, mask, ref if cfg.kl_mode else None, ent, isw, cpg_k, xs,
                    glp, rows, cfg)
        if cfg.seq_grad and glp.numel():
            # GSPO with the sequence-mean gradient (TRL / OpenRLHF): every token of row i also
            # gets c_i * (sum_u m_u dl_u/ds_i) * ds_i/dlogp_t, ds_i/dlogp_t = s_i / max(L_i, 1).
            xsv = xs.to(f64)
            ind = xsv <= cfg.seq_lr_max
            s_row = torch.exp(xsv.clamp(max=cfg.seq_lr_max))
            add = torch.where(ind, cpg * rows[:, _N_ROWSUMS].to(f64) * s_row
                              / L.clamp(min=1), torch.zeros_like(s_row))
            glp += torch.where(m, add.to(kacc).unsqueeze(1),
                               torch.zeros((), dtype=kacc, device=glp.device))
    # Final sums in float64 over the rows: the coefficient-weighted ones (with c_i as the
    # kernel saw it, rounded to kacc) as one matrix-vector product, the plain ones as one
    # column sum (its last column is the kernel's count of non-finite advantages).
    r = rows.to(f64)
    colsum = r.sum(0)
    wsum = cpg_k.to(f64) @ r[:, :3]  # pg, kl (and the entropy sum when e_i = c_i)
    pg, kl = wsum[0:1], wsum[1:2]
    en = wsum[2:3]
    if cen is not cpg:
        en = _gpu_coef_rows(cen, B, kacc, dev).to(f64) @ r[:, 2:3]
    loss = pg
    if cfg.kl_mode:
        loss = torch.add(loss, kl, alpha=cfg.beta)
    if ent is not None:
        loss = torch.sub(loss, en, alpha=cfg.ent_coef)
    means = colsum * inv_n
    # _STATS order: pg, kl, entropy, clip, low, high, dual, approx_kl, ratio, kl_mean
    # (row sums 3..9), entropy_mean (row sum 2), num_tokens, num_seqs
    stats = torch.cat([pg, kl, en, means[3:10], means[2:3], N.reshape(1), G.reshape(1)])
    escale = torch.empty(0, dtype=acc, device=dev)
    if cfg.need_grad and ent is not None:
        ce = cen.expand(B) if isinstance(cen, torch.Tensor) else torch.full(
            (B,), cen, dtype=f64, device=dev)
        escale = (ce * -cfg.ent_coef).to(acc)
    # the one device sync: the global counts used, the kernel's count of non-finite
    # advantages, and the mask check
    flags = _validate.read([count[i] for i in used] + [colsum[_N_ROWSUMS + 1]]
                           + _validate.mask_flags(mask_in))
    for i, v in zip(used, flags):
        _positive_count(v, i)
    flags = flags[len(used):]
    if flags[0] != 0 or _validate.mask_bad(flags[1:]):
        _check_values_torch("policy_loss", mask_in, adv)  # raises, naming the first position
    loss = loss.reshape(()).to(acc)
    if loss._is_view():  # a slice of wsum (float64, no KL or entropy term): an output of its own
        loss = loss.clone()
    return loss, stats.to(acc), glp.to(acc), escale


def _policy_impl(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts,
                 iparams, fparams, backend):
    cfg = _PolicyConfig.from_lists(iparams, fparams)
    return _policy_run(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts,
                       cfg, backend)


def _policy_run(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts, cfg,
                backend):
    """(loss, stats, glp, escale): d loss/d logp = glp and d loss/d entropy = escale[:, None]
    where mask != 0 (empty tensors when no gradient is needed); every backend applies the
    aggregation coefficients to glp, so the backward only multiplies by the upstream
    gradient."""
    if counts is not None and backend not in ("cuda", "triton"):  # GPU: read with its checks
        cfg = cfg.with_counts([float(v) for v in counts.tolist()])
    B, T = logp.shape
    acc = _acc_dtype(logp)
    dev = logp.device
    adv = _bt(advantages, B, T)
    isw = _bt(is_weights, B, T)
    want_e = bool(cfg.need_grad) and entropy is not None
    if backend == "torch":
        _check_values_torch("policy_loss", mask, adv)
        with torch.no_grad():
            loss, stats = _policy_reference_core(logp, old_logp, adv, mask, ref_logp, entropy,
                                                 isw, cfg)
            glp = escale = torch.empty(0, dtype=acc, device=dev)
            if cfg.need_grad:
                glp = _policy_grads_torch(logp, old_logp, adv, mask, ref_logp, isw,
                                          cfg).contiguous()
            if want_e:
                L = (mask != 0).sum(-1)
                escale = (-cfg.ent_coef * _row_coefs(L, cfg.ent_denom_kind, cfg.ent_len_kind,
                                                     cfg.ent_num, cfg.ent_denom_const)).to(acc)
        return loss.contiguous(), stats.contiguous(), glp, escale
    mask_k = _mask_for_kernel(mask)
    if backend == "cpu":
        loss = torch.empty((), dtype=acc, device=dev)
        stats = torch.empty(_N_STATS, dtype=acc, device=dev)
        glp = torch.empty((B, T) if cfg.need_grad else (0,), dtype=acc, device=dev)
        escale = torch.empty(B if want_e else 0, dtype=acc, device=dev)
        _policy_cpu(logp, old_logp, adv, mask_k, ref_logp, entropy, isw, cfg, loss, stats,
                    glp, escale)
        return loss, stats, glp, escale
    return _policy_gpu(logp, old_logp, adv, mask_k, ref_logp, entropy, isw, cfg, backend,
                       counts, mask)


@torch.library.custom_op("rlfuse::policy_loss", mutates_args=())
def _policy_loss_op(
    logp: torch.Tensor,
    old_logp: Optional[torch.Tensor],
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logp: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    is_weights: Optional[torch.Tensor],
    counts: Optional[torch.Tensor],
    iparams: list[int],
    fparams: list[float],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _policy_impl(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts,
                        iparams, fparams, backend)


@_policy_loss_op.register_fake
def _(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts, iparams,
      fparams, backend):
    cfg = _PolicyConfig.from_lists(iparams, fparams)
    acc = _acc_dtype(logp)
    B, T = logp.shape
    g = bool(cfg.need_grad)
    glp = logp.new_empty((B, T) if g else (0,), dtype=acc)
    escale = logp.new_empty((B if g and entropy is not None else 0,), dtype=acc)
    return logp.new_empty((), dtype=acc), logp.new_empty((_N_STATS,), dtype=acc), glp, escale


def _pl_save(ctx, logp, mask, entropy, stats, glp, escale):
    ctx.save_for_backward(glp, escale, mask)
    ctx.logp_dtype = logp.dtype
    ctx.ent_dtype = entropy.dtype if entropy is not None else None


def _pl_setup_context(ctx, inputs, output):
    _, stats, glp, escale = output
    _pl_save(ctx, inputs[0], inputs[3], inputs[5], stats, glp, escale)
    ctx.mark_non_differentiable(stats, glp, escale)


# The eager backward hands the saved d loss/d logp itself to autograd only where no one else
# can read it again (_may_hand_over); False: always a fresh tensor (one multiply, plus the
# page faults of a new [B, T] buffer, +0.1-0.2 ms at B=64 T=4096).
_HAND_OVER_GRAD = True
# torch's own test of whether the running backward frees the graph (AOTAutograd reads it to
# donate saved buffers); True outside a backward pass; None on a torch without it.
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
_saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensors_plain() -> bool:
    """No saved-tensor hooks active (checkpointing, offloading, a user's pack hook), so what
    save_for_backward keeps is held by this node alone."""
    return _saved_tensor_hooks is not None and _saved_tensor_hooks(False) is None


def _may_hand_over(ctx, glp, g_loss) -> bool:
    """Whether the eager backward may return the saved glp itself as d loss/d logp: for an
    upstream gradient of exactly 1 (CPU: no device sync), without a dtype cast, when glp was
    saved without saved-tensor hooks, and in a backward pass that frees the graph.  The
    engine then releases this node's saved tensors as soon as the backward returns, before
    any hook, accumulation or caller sees the gradient, and no later pass can read glp, so
    the returned tensor is the caller's alone.  With retain_graph (or create_graph) a later
    pass reads glp again: it gets a fresh tensor, or an in-place edit of the returned
    gradient (a hook, x.grad.mul_, .data) would corrupt that pass (or make it raise) and
    two passes would return the same storage."""
    return (_HAND_OVER_GRAD and ctx.saved_plain and _keep_graph is not None
            and glp.dtype == ctx.logp_dtype and g_loss.device.type == "cpu"
            and not _backend.library_op_needed(g_loss) and not _keep_graph()
            and float(g_loss) == 1.0)


def _pl_backward(ctx, g_loss, *_unused, eager_identity=False):
    glp, escale, mask = ctx.saved_tensors
    dlogp = dent = None
    if g_loss is not None:
        if ctx.needs_input_grad[0]:
            if eager_identity and _may_hand_over(ctx, glp, g_loss):
                dlogp = glp  # loss.backward() / autograd.grad(loss): no multiply, no copy
            else:
                # always a new tensor (the product), never glp itself
                dlogp = (glp * g_loss.to(glp.dtype)).to(ctx.logp_dtype)
        if ctx.needs_input_grad[5]:
            e = (g_loss.to(escale.dtype) * escale).unsqueeze(1)
            dent = torch.where(mask != 0, e, torch.zeros((), dtype=e.dtype, device=e.device))
            dent = dent.to(ctx.ent_dtype)
    return dlogp, None, None, None, None, dent, None, None, None, None, None


_policy_loss_op.register_autograd(_pl_backward, setup_context=_pl_setup_context)


class _PolicyLossFunction(torch.autograd.Function):
    """Eager twin of rlfuse::policy_loss (same implementation and backward)."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts,
                cfg, backend):
        loss, stats, glp, escale = _policy_run(
            logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts, cfg,
            backend)
        _pl_save(ctx, logp, mask, entropy, stats, glp, escale)
        ctx.saved_plain = _saved_tensors_plain()
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        return _pl_backward(ctx, g_loss, eager_identity=True)[:10]


# ======================================================================================
# Policy loss: public API
# ======================================================================================
def _check_policy_tensors(op, logp, old_logp, advantages, mask, ref_logp, entropy, is_weights):
    _validate.float_tensor(op, "logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"{op}: logp must be 2-D [B, T] (sequences x tokens), got shape "
                         f"{tuple(logp.shape)}")
    B, T = logp.shape
    if old_logp is not None:
        _validate.float_tensor(op, "old_logp", old_logp)
        _validate.shape_equals(op, "old_logp", old_logp, (B, T), "logp.shape")
    _validate.float_tensor(op, "advantages", advantages)
    if tuple(advantages.shape) not in ((B, T), (B,), (B, 1)):
        raise ValueError(f"{op}: advantages must have shape {(B, T)}, {(B,)} or {(B, 1)} "
                         f"(logp is [B, T]), got {tuple(advantages.shape)}")
    _validate.tensor(op, "mask", mask)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{op}: mask must be a bool, integer or floating tensor of 0/1, got "
                        f"{mask.dtype}")
    _validate.shape_equals(op, "mask", mask, (B, T), "logp.shape")
    if ref_logp is not None:
        _validate.float_tensor(op, "ref_logp", ref_logp)
        _validate.shape_equals(op, "ref_logp", ref_logp, (B, T), "logp.shape")
    if entropy is not None:
        _validate.float_tensor(op, "entropy", entropy)
        _validate.shape_equals(op, "entropy", entropy, (B, T), "logp.shape")
    if is_weights is not None:
        _validate.float_tensor(op, "is_weights", is_weights)
        if tuple(is_weights.shape) not in ((B, T), (B,), (B, 1)):
            raise ValueError(f"{op}: is_weights must have shape {(B, T)}, {(B,)} or {(B, 1)}, "
                             f"got {tuple(is_weights.shape)}")
    _validate.same_device(op, "logp", logp, old_logp=old_logp, advantages=advantages,
                          mask=mask, ref_logp=ref_logp, entropy=entropy, is_weights=is_weights)


def _policy_prepare(op, logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, kw,
                    need_grad):
    _check_policy_tensors(op, logp, old_logp, advantages, mask, ref_logp, entropy, is_weights)
    B, T = logp.shape
    tokens, gbs, counts = _global_counts(op, kw.pop("global_num_tokens"),
                                         kw.pop("num_items_in_batch"),
                                         kw.pop("global_batch_size"), logp.device)
    cfg = _resolve_policy(op, B=B, T=T, has_ref=ref_logp is not None,
                          has_ent=entropy is not None, global_tokens=tokens,
                          global_batch_size=gbs, need_grad=need_grad, **kw)
    return cfg, counts


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    *,
    variant="ppo",
    epsilon=0.2,
    epsilon_low=None,
    epsilon_high=None,
    clip_ratio_c=None,
    delta=None,
    tau_pos=1.0,
    tau_neg=1.05,
    ref_logp=None,
    beta=0.0,
    kl_kind="k3",
    kl_clamp=None,
    kl_ratio_weighted=False,
    entropy=None,
    entropy_coef=0.0,
    is_weights=None,
    loss_agg_mode=None,
    global_num_tokens=None,
    num_items_in_batch=None,
    global_batch_size=None,
    loss_scale_factor=None,
    max_completion_length=None,
    dp_size=1,
    semantics="rlfuse",
    backend=None,
):
    """Fused PPO / GRPO policy loss over ``[B, T]`` tokens, with its statistics.

    Per token (r = exp(logp - old_logp), A = advantage, w = is_weights):

    ==========  =============================================================================
    ppo         -min(A min(r, delta), A clip(r, 1-epsilon_low, 1+epsilon_high)); for A < 0
                with ``clip_ratio_c`` = c: min(that, -c A) (dual-clip)
    gspo        ppo with r -> s_i = exp(sum_t m log r / max(L_i, 1)), the sequence ratio
    cispo       -sg(clip(r, 1-epsilon_low, 1+epsilon_high)) A logp
    sapo        -(4/tau) sigmoid(tau (r - 1)) A, tau = tau_pos if A > 0 else tau_neg
    gpg         -A logp
    reinforce   -A logp (verl's REINFORCE; importance weights via ``is_weights``)
    ==========  =============================================================================

    l_t = w_t pg_t + beta * kl_t, where kl_t = kl_penalty(logp, ref_logp, kl_kind) (times r
    when ``kl_ratio_weighted``, TRL's ``use_bias_correction_kl``).  Then

        loss = sum_i c_i sum_t m_it l_it  -  entropy_coef * sum_i e_i sum_t m_it H_it

    with, for L_i tokens in row i, N = sum_i L_i, G = #{i: L_i > 0}, dp = ``dp_size``:

    =========================  ================================================================
    token-mean                 c = dp / N   (N -> ``global_num_tokens`` when given)
    token-sum                  c = dp
    seq-mean-token-mean        c_i = dp / (G L_i)  (G -> ``global_batch_size``)
    seq-mean-token-sum         c = dp / G
    seq-mean-token-sum-norm    c = dp / (G * C), C = ``loss_scale_factor`` or T
    grpo (TRL)                 c_i = dp / (B max(L_i, 1))
    bnpo (TRL)                 c = dp / N  (local tokens)
    dr_grpo (TRL)              c = dp / (B * ``max_completion_length``) (default T)
    dapo (TRL)                 c = dp / ``num_items_in_batch`` (default N)
    luspo (TRL)                c = dp / B
    =========================  ================================================================

    and e_i = c_i (TRL semantics: e = 1 / N).  A zero denominator (no tokens) gives a zero loss.

    Args:
        logp: ``[B, T]`` log-probabilities of the sampled tokens under the current policy
            (float32 / bfloat16 / float16 / float64).  Differentiable.
        old_logp: ``[B, T]`` log-probabilities under the policy that sampled (constants), or
            None for on-policy (``logp.detach()``: r = 1).
        advantages: ``[B, T]``, ``[B]`` or ``[B, 1]`` (per-sequence, broadcast); constants.
        mask: ``[B, T]`` of 0/1 (bool, integer or floating).
        variant: see the table above.
        epsilon, epsilon_low, epsilon_high: clip range (``epsilon_low``/``_high`` default to
            ``epsilon``).  TRL semantics and ``cispo``: ``epsilon_high`` is the absolute cap.
        clip_ratio_c: dual-clip constant (> 1) for A < 0.  Default off, except verl's vanilla
            PPO (3.0).
        delta: TRL's cap on the unclipped ratio.
        tau_pos, tau_neg: SAPO temperatures.
        ref_logp, beta, kl_kind, kl_clamp, kl_ratio_weighted: the KL term (see
            :func:`kl_penalty`); ``beta != 0`` needs ``ref_logp``.
        entropy, entropy_coef: per-token entropies (differentiable) and the bonus coefficient.
        is_weights: ``[B, T]``, ``[B]`` or ``[B, 1]`` importance weights multiplying the
            policy-gradient term (truncated IS for rollout/trainer mismatch); constants.
        loss_agg_mode: see the table; default ``"token-mean"`` (TRL semantics: ``"dapo"``,
            ``"grpo"`` for sapo; verl SAPO and OpenRLHF GSPO: ``"seq-mean-token-mean"``).
        global_num_tokens / num_items_in_batch (aliases), global_batch_size: global counts for
            gradient accumulation and data parallelism (numbers or one-element tensors).
        loss_scale_factor, max_completion_length, dp_size: see the table.
        semantics: ``"rlfuse"``, ``"verl"``, ``"trl"`` or ``"openrlhf"``; see
            ``docs/ops/policy_loss.md`` for every difference.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"torch"``; default by device.

    Returns:
        ``(loss, stats)``: the scalar loss (float32; float64 for float64 ``logp``) and a dict
        of 0-d tensors: ``pg_loss`` (the aggregated policy-gradient part), ``clip_frac``
        (tokens whose clipped term is active, verl's pg_clipfrac), ``clip_frac_low``
        (r < 1-eps_low and A < 0), ``clip_frac_high`` (r > 1+eps_high and A > 0),
        ``dual_clip_frac``, ``approx_kl`` (mean of old_logp - logp), ``ratio_mean``, and
        with ``ref_logp`` ``kl_loss`` / ``kl_mean``, with ``entropy`` ``entropy_loss`` /
        ``entropy_mean``, and ``num_tokens`` / ``num_seqs`` (local).  Means are over the
        tokens under the mask (0 when there are none).

    Raises:
        TypeError / ValueError naming the argument (shapes, dtypes, devices, option values,
        options a semantics lacks) before any kernel; ValueError for a mask value other than
        0/1 or a non-finite advantage under the mask, naming the first position.
    """
    op = "policy_loss"
    need_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (logp, entropy))
    kw = dict(variant=variant, epsilon=epsilon, epsilon_low=epsilon_low,
              epsilon_high=epsilon_high, clip_ratio_c=clip_ratio_c, delta=delta,
              tau_pos=tau_pos, tau_neg=tau_neg, beta=beta, kl_kind=kl_kind,
              kl_clamp=kl_clamp, kl_ratio_weighted=kl_ratio_weighted,
              entropy_coef=entropy_coef, loss_agg_mode=loss_agg_mode,
              global_num_tokens=global_num_tokens, num_items_in_batch=num_items_in_batch,
              global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
              max_completion_length=max_completion_length, dp_size=dp_size,
              semantics=semantics)
    cfg, counts = _policy_prepare(op, logp, old_logp, advantages, mask, ref_logp, entropy,
                                  is_weights, kw, need_grad)
    chosen = _backend.resolve(backend, logp.device, op)
    if _use_library_op(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, counts):
        ints, floats = cfg.to_lists()
        loss, stats, _, _ = _policy_loss_op(logp, old_logp, advantages, mask, ref_logp,
                                               entropy, is_weights, counts, ints, floats, chosen)
    else:
        loss, stats = _PolicyLossFunction.apply(logp, old_logp, advantages, mask, ref_logp,
                                                entropy, is_weights, counts, cfg, chosen)
    return loss, _stats_dict(stats, ref_logp is not None, entropy is not None)


def policy_loss_reference(logp, old_logp, advantages, mask, *, ref_logp=None, entropy=None,
                          is_weights=None, **kwargs):
    """Plain-torch :func:`policy_loss` (the specification): same arguments, same results,
    differentiable through autograd.  Computes in float64 for float64 ``logp``, else float32."""
    op = "policy_loss"
    kwargs.pop("backend", None)
    kw = dict(variant="ppo", epsilon=0.2, epsilon_low=None, epsilon_high=None,
              clip_ratio_c=None, delta=None, tau_pos=1.0, tau_neg=1.05, beta=0.0,
              kl_kind="k3", kl_clamp=None, kl_ratio_weighted=False, entropy_coef=0.0,
              loss_agg_mode=None, global_num_tokens=None, num_items_in_batch=None,
              global_batch_size=None, loss_scale_factor=None, max_completion_length=None,
              dp_size=1, semantics="rlfuse")
    unknown = set(kwargs) - set(kw)
    if unknown:
        raise TypeError(f"{op}: unexpected keyword arguments {sorted(unknown)}")
    kw.update(kwargs)
    cfg, counts = _policy_prepare(op, logp, old_logp, advantages, mask, ref_logp, entropy,
                                  is_weights, kw, True)
    if counts is not None:
        cfg = cfg.with_counts([float(v) for v in counts.tolist()])
    B, T = logp.shape
    loss, stats = _policy_reference_core(logp, old_logp, _bt(advantages, B, T), mask,
                                         ref_logp, entropy, _bt(is_weights, B, T), cfg)
    return loss, _stats_dict(stats, ref_logp is not None, entropy is not None)


# ======================================================================================
# Value loss
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class _ValueConfig:
    clip_form: int
    denom_kind: int
    len_kind: int
    denom_from: int
    need_grad: int
    clip: float
    num: float
    denom_const: float

    def to_lists(self):
        return ([self.clip_form, self.denom_kind, self.len_kind, self.denom_from,
                 self.need_grad], [self.clip, self.num, self.denom_const])

    @classmethod
    def from_lists(cls, ints, floats):
        return cls(*[int(v) for v in ints], *[float(v) for v in floats])


def _value_reference_core(values, old_values, returns, mask, cfg: _ValueConfig):
    acc = _acc_dtype(values)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=values.device)
    v = torch.where(m, values.to(acc), zero)
    y = torch.where(m, returns.detach().to(acc), zero)
    L = m.to(acc).sum(-1)
    if math.isfinite(cfg.clip):
        o = torch.where(m, old_values.detach().to(acc), zero)
        if cfg.clip_form == 0:  # verl / TRL: clamp(v, old - c, old + c)
            vc = torch.maximum(torch.minimum(v, o + cfg.clip), o - cfg.clip)
        else:  # OpenRLHF: old + clamp(v - old, -c, c)
            vc = o + (v - o).clamp(-cfg.clip, cfg.clip)
    else:
        vc = v
    l1 = (v - y).square()
    l2 = (vc - y).square()
    lmax = torch.maximum(l1, l2)
    c = _row_coefs(L, cfg.denom_kind, cfg.len_kind, cfg.num, cfg.denom_const).to(acc)
    loss = 0.5 * (c.unsqueeze(1) * _where0(m, lmax)).sum()
    N = L.sum()
    n = N.clamp(min=1)
    stats = torch.stack([_masked_mean((l2 > l1).to(acc), m, n), _masked_mean(v, m, n), N,
                         (L > 0).sum().to(acc)]).detach()
    return loss, stats


def _value_grad_torch(values, old_values, returns, mask, cfg: _ValueConfig):
    """d(loss)/d(values) in explicit torch form (backend='torch')."""
    acc = _acc_dtype(values)
    m = mask != 0
    zero = torch.zeros((), dtype=acc, device=values.device)
    v = torch.where(m, values.to(acc), zero)
    y = torch.where(m, returns.to(acc), zero)
    if math.isfinite(cfg.clip):
        o = torch.where(m, old_values.to(acc), zero)
        if cfg.clip_form == 0:
            vc = torch.maximum(torch.minimum(v, o + cfg.clip), o - cfg.clip)
            ind = vc == v
        else:
            dc = (v - o).clamp(-cfg.clip, cfg.clip)
            vc = o + dc
            ind = dc == (v - o)
    else:
        vc, ind = v, torch.ones_like(m)
    e1, e2 = v - y, vc - y
    l1, l2 = e1 * e1, e2 * e2
    g1, g2 = 2 * e1, torch.where(ind, 2 * e2, zero)
    g = torch.where(l2 > l1, g2, torch.where(l1 > l2, g1, 0.5 * (g1 + g2)))
    c = _row_coefs(m.sum(-1), cfg.denom_kind, cfg.len_kind, cfg.num,
                   cfg.denom_const).to(acc).unsqueeze(1)
    return _where0(m, 0.5 * c * g)


def _value_impl(values, old_values, returns, mask, counts, iparams, fparams, backend):
    cfg = _ValueConfig.from_lists(iparams, fparams)
    count = None  # GPU backends: the global count, read with the checks
    if cfg.denom_from >= 0 and counts is not None and backend in ("cuda", "triton"):
        count = counts[cfg.denom_from]
    elif cfg.denom_from >= 0 and counts is not None:
        cfg = dataclasses.replace(
            cfg, denom_const=cfg.denom_const * _positive_count(
                float(counts.tolist()[cfg.denom_from]), cfg.denom_from, "value_loss"),
            denom_from=-1)
    B, T = values.shape
    acc = _acc_dtype(values)
    dev = values.device
    if backend == "torch":
        _check_values_torch("value_loss", mask, None)
        with torch.no_grad():
            loss, stats = _value_reference_core(values, old_values, returns, mask, cfg)
            g = torch.empty(0, dtype=acc, device=dev)
            if cfg.need_grad:
                g = _value_grad_torch(values, old_values, returns, mask, cfg).contiguous()
        return loss.contiguous(), stats.contiguous(), g
    mask_k = _mask_for_kernel(mask)

    def args(grad, loss, stats):
        ia = [0] * _VI_N
        ia[_VI["B"]], ia[_VI["T"]], ia[_VI["threads"]] = B, T, _backend.threads_for(B * T)
        _desc(ia, _VI["val"], values)
        _desc(ia, _VI["old"], old_values if math.isfinite(cfg.clip) else None)
        _desc(ia, _VI["ret"], returns)
        _desc(ia, _VI["mask"], mask_k, _MASK_CODES)
        ia[_VI["grad"]] = grad.data_ptr() if grad.numel() else 0
        ia[_VI["loss"]] = loss.data_ptr() if loss is not None else 0
        ia[_VI["stats"]] = stats.data_ptr() if stats is not None else 0
        ia[_VI["clip_form"]] = cfg.clip_form
        ia[_VI["denom_kind"]], ia[_VI["len_kind"]] = cfg.denom_kind, cfg.len_kind
        return ia, [cfg.clip, cfg.num, cfg.denom_const]

    if backend == "cpu":
        grad = torch.empty((B, T) if cfg.need_grad else (0,), dtype=acc, device=dev)
        loss = torch.empty((), dtype=acc, device=dev)
        stats = torch.empty(_N_VSTATS, dtype=acc, device=dev)
        err = _backend.cpu_module().value_loss_fwd(*args(grad, loss, stats))
        _raise_kernel_error("value_loss", err, mask_k, None)
        return loss, stats, grad
    # GPU backends: as _policy_gpu (few device ops; the mask check read once, at the end)
    f64 = torch.float64
    kacc = acc if backend == "cuda" else torch.float32
    L = mask_k.sum(-1, dtype=f64)
    N, G, inv_n = _gpu_counts(L)
    ck = _gpu_coef_rows(_gpu_coefs(L, N, G, inv_n, cfg.denom_kind, cfg.len_kind, cfg.num,
                                   cfg.denom_const, count), B, kacc, dev)
    rows = torch.empty((B, 3), dtype=kacc, device=dev)
    gk = torch.empty((B, T) if cfg.need_grad else (0,), dtype=kacc, device=dev)
    old = old_values if math.isfinite(cfg.clip) else None
    if B > 0:
        if backend == "cuda":
            with _backend.cuda_launch(dev) as stream:
                _backend.cuda_module().value_loss_rows(*args(gk, None, None), ck.data_ptr(),
                                                       rows.data_ptr(), stream)
        else:
            with _backend.device_guard(dev):
                _backend.triton_kernels("policy_loss").value_rows(
                    values, old, returns, mask_k, ck, gk, rows, cfg.clip_form, cfg.clip)
    r = rows.to(f64)
    loss = (ck.to(f64) @ r[:, 0]) * 0.5
    means = r.sum(0) * inv_n  # clip fraction, values mean (row sums 1, 2)
    stats = torch.cat([means[1:3], N.reshape(1), G.reshape(1)])
    # one device sync (none for a bool mask without a global count tensor)
    flags = _validate.read(([] if count is None else [count]) + _validate.mask_flags(mask))
    if count is not None:
        _positive_count(flags.pop(0), cfg.denom_from, "value_loss")
    if _validate.mask_bad(flags):
        _check_values_torch("value_loss", mask, None)  # raises, naming the first position
    return loss.to(acc), stats.to(acc), gk.to(acc)


@torch.library.custom_op("rlfuse::value_loss", mutates_args=())
def _value_loss_op(values: torch.Tensor, old_values: Optional[torch.Tensor],
                   returns: torch.Tensor, mask: torch.Tensor, counts: Optional[torch.Tensor],
                   iparams: list[int], fparams: list[float],
                   backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _value_impl(values, old_values, returns, mask, counts, iparams, fparams, backend)


@_value_loss_op.register_fake
def _(values, old_values, returns, mask, counts, iparams, fparams, backend):
    cfg = _ValueConfig.from_lists(iparams, fparams)
    acc = _acc_dtype(values)
    g = values.new_empty(tuple(values.shape) if cfg.need_grad else (0,), dtype=acc)
    return values.new_empty((), dtype=acc), values.new_empty((_N_VSTATS,), dtype=acc), g


def _vl_setup_context(ctx, inputs, output):
    _, stats, grad = output
    ctx.save_for_backward(grad)
    ctx.values_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(stats, grad)


def _vl_backward(ctx, g_loss, _g_stats, _g_grad):
    (grad,) = ctx.saved_tensors
    dv = None
    if g_loss is not None and ctx.needs_input_grad[0]:
        dv = (g_loss.to(grad.dtype) * grad).to(ctx.values_dtype)
    return dv, None, None, None, None, None, None, None


_value_loss_op.register_autograd(_vl_backward, setup_context=_vl_setup_context)


class _ValueLossFunction(torch.autograd.Function):
    """Eager twin of rlfuse::value_loss."""

    @staticmethod
    def forward(ctx, values, old_values, returns, mask, counts, iparams, fparams, backend):
        loss, stats, grad = _value_impl(values, old_values, returns, mask, counts, iparams,
                                        fparams, backend)
        ctx.save_for_backward(grad)
        ctx.values_dtype = values.dtype
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, g_loss, _g_stats):
        return _vl_backward(ctx, g_loss, None, None)


def _value_prepare(op, values, old_values, returns, mask, cliprange_value, loss_agg_mode,
                   global_num_tokens, num_items_in_batch, global_batch_size, loss_scale_factor,
                   max_completion_length, dp_size, semantics, need_grad):
    _validate.float_tensor(op, "values", values)
    if values.dim() != 2:
        raise ValueError(f"{op}: values must be 2-D [B, T], got shape {tuple(values.shape)}")
    B, T = values.shape
    if old_values is not None:
        _validate.float_tensor(op, "old_values", old_values)
        _validate.shape_equals(op, "old_values", old_values, (B, T), "values.shape")
    _validate.float_tensor(op, "returns", returns)
    _validate.shape_equals(op, "returns", returns, (B, T), "values.shape")
    _validate.tensor(op, "mask", mask)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{op}: mask must be a bool, integer or floating tensor of 0/1, got "
                        f"{mask.dtype}")
    _validate.shape_equals(op, "mask", mask, (B, T), "values.shape")
    _validate.same_device(op, "values", values, old_values=old_values, returns=returns, mask=mask)
    semantics = _check_semantics(op, semantics)
    if cliprange_value is None:
        clip = _INF
    else:
        clip = _nonneg(op, "cliprange_value", cliprange_value)
        if old_values is None:
            raise ValueError(f"{op}: cliprange_value needs old_values (the values at rollout)")
    if loss_agg_mode is None:
        loss_agg_mode = "bnpo" if semantics == "trl" else "token-mean"
    elif not isinstance(loss_agg_mode, str):
        raise TypeError(f"{op}: loss_agg_mode must be a str, got {type(loss_agg_mode).__name__}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"{op}: loss_agg_mode must be one of {LOSS_AGG_MODES}, "
                         f"got {loss_agg_mode!r}")
    if loss_agg_mode not in _SEM_MODES[semantics]:
        raise ValueError(f"{op}: loss_agg_mode={loss_agg_mode!r} does not exist in {semantics}; "
                         f"it has {_SEM_MODES[semantics]}")
    tokens, gbs, counts = _global_counts(op, global_num_tokens, num_items_in_batch,
                                         global_batch_size, values.device)
    if loss_scale_factor is not None:
        loss_scale_factor = _positive(op, "loss_scale_factor", loss_scale_factor)
    if max_completion_length is not None:
        max_completion_length = _validate.integer(op, "max_completion_length",
                                                  max_completion_length)
        if max_completion_length < 1:
            raise ValueError(f"{op}: max_completion_length must be >= 1, "
                             f"got {max_completion_length}")
    dp_size = _validate.integer(op, "dp_size", dp_size)
    if dp_size < 1:
        raise ValueError(f"{op}: dp_size must be >= 1, got {dp_size}")
    spec = _agg_spec(op, loss_agg_mode, semantics, B=B, T=T, global_tokens=tokens,
                     global_batch_size=gbs, loss_scale_factor=loss_scale_factor,
                     max_completion_length=max_completion_length, dp_size=dp_size)
    cfg = _ValueConfig(clip_form=int(semantics == "openrlhf"), denom_kind=spec.denom_kind,
                       len_kind=spec.len_kind, denom_from=spec.denom_from,
                       need_grad=int(need_grad), clip=clip, num=spec.num,
                       denom_const=spec.denom_const)
    return cfg, counts


def value_loss(values, old_values, returns, mask, *, cliprange_value=None, loss_agg_mode=None,
               global_num_tokens=None, num_items_in_batch=None, global_batch_size=None,
               loss_scale_factor=None, max_completion_length=None, dp_size=1,
               semantics="rlfuse", backend=None):
    """Clipped PPO value loss with its statistics.

    Per token, with v = values, v_old = old_values, R = returns, c = cliprange_value:

        v_clip = clamp(v, v_old - c, v_old + c)      (OpenRLHF: v_old + clamp(v - v_old, -c, c))
        l_t    = max((v - R)^2, (v_clip - R)^2)       (c = None: (v - R)^2)
        loss   = 1/2 * sum_i c_i sum_t m_it l_it

    with the aggregation coefficients c_i of :func:`policy_loss` (``loss_agg_mode``, default
    ``"token-mean"``; TRL semantics ``"bnpo"``).  Gradients flow to ``values`` only.

    Returns:
        ``(loss, stats)`` with stats ``clip_frac`` (tokens where the clipped error is the
        larger, verl's vf_clipfrac), ``values_mean``, ``num_tokens``, ``num_seqs``.
    """
    op = "value_loss"
    need_grad = (torch.is_grad_enabled() and isinstance(values, torch.Tensor)
                 and values.requires_grad)
    cfg, counts = _value_prepare(op, values, old_values, returns, mask, cliprange_value,
                                 loss_agg_mode, global_num_tokens, num_items_in_batch,
                                 global_batch_size, loss_scale_factor, max_completion_length,
                                 dp_size, semantics, need_grad)
    chosen = _backend.resolve(backend, values.device, op)
    ints, floats = cfg.to_lists()
    args = (values, old_values, returns, mask, counts, ints, floats, chosen)
    if _use_library_op(values, old_values, returns, mask, counts):
        loss, stats, _ = _value_loss_op(*args)
    else:
        loss, stats = _ValueLossFunction.apply(*args)
    return loss, {k: stats[i] for i, k in enumerate(_VSTATS)}


def value_loss_reference(values, old_values, returns, mask, *, cliprange_value=None,
                         loss_agg_mode=None, global_num_tokens=None, num_items_in_batch=None,
                         global_batch_size=None, loss_scale_factor=None,
                         max_completion_length=None, dp_size=1, semantics="rlfuse"):
    """Plain-torch :func:`value_loss` (the specification), differentiable w.r.t. ``values``."""
    cfg, counts = _value_prepare("value_loss", values, old_values, returns, mask,
                                 cliprange_value, loss_agg_mode, global_num_tokens,
                                 num_items_in_batch, global_batch_size, loss_scale_factor,
                                 max_completion_length, dp_size, semantics, True)
    if counts is not None and cfg.denom_from >= 0:
        cfg = dataclasses.replace(cfg, denom_const=cfg.denom_const * _positive_count(
            float(counts.tolist()[cfg.denom_from]), cfg.denom_from, "value_loss"),
            denom_from=-1)
    loss, stats = _value_reference_core(values, old_values, returns, mask, cfg)
    return loss, {k: stats[i] for i, k in enumerate(_VSTATS)}
