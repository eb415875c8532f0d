"""Advantage estimation: GAE, discounted returns, masked whitening, group advantages and
PPO token rewards.

    gae(rewards, values, mask=None, *, gamma, lam, last_values=None, cu_seqlens=None,
        semantics="skip_masked", whiten=False, backend=None) -> (advantages, returns)
    discounted_returns(rewards, mask=None, gamma=1.0, *, cu_seqlens=None,
                       semantics="skip_masked", backend=None) -> returns
    masked_mean(x, mask=None, dim=None) / masked_var(x, mask=None, dim=None, *, unbiased=True)
    masked_whiten(x, mask=None, shift_mean=True, *, unbiased=True, eps=1e-8)
    group_advantages(scores, *, group_ids=None, group_size=None, method="grpo", mask=None,
                     lengths=None, semantics="rlfuse", eps=None, std_floor=None,
                     norm_by_std=True, f_norm=1.0, backend=None)
    token_rewards(scores, mask=None, *, kl=None, kl_coef=0.0, cu_seqlens=None, backend=None)

Layouts.  Sequences are either padded rows ``[B, T]`` (right or left padding, or holes in
the middle: only the mask matters) or packed 1-D ``[N]`` segments given by ``cu_seqlens``
(``[S + 1]``, ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == N``).  A position
is valid where ``mask`` is 1 (``mask=None``: every position).  Every output is 0 at masked
positions.

GAE (per sequence, backwards over t; ``nv`` is the value of the next *kept* position and
starts at ``last_values`` (0 when absent), ``A`` starts at 0):

    r_t, v_t = (rewards_t, values_t) if m_t else (0, 0)
    keep_t   = m_t                                   semantics "skip_masked" (verl)
             = m_t or (some s > t has m_s = 1)       semantics "zero_masked" (OpenRLHF, TRL)
    if keep_t:  delta = r_t + gamma * nv - v_t;  A = delta + gamma * lam * A;  nv = v_t
    advantages_t = A if m_t else 0,   returns_t = A + v_t if m_t else 0

"skip_masked" carries A and nv across masked positions (a tool-observation span costs no
discounting, the multi-turn-safe choice); "zero_masked" recurses through masked positions
inside a sequence with zeroed value and reward (so a gap of g positions discounts by
(gamma lam)^g and bootstraps from V = 0).  Positions after the last valid token are
padding in both (so ``last_values`` bootstraps the state after the last valid token).
With ``whiten=True`` the advantages are then whitened over all valid tokens (verl's
``compute_gae_advantage_return`` does this; unbiased variance, ``rsqrt(var + 1e-8)``).

Discounted returns (REINFORCE++): GAE with values = 0 and lam = 1, i.e. G_t = r_t + gamma G_next.

Whitening: ``(x - mean) * rsqrt(var + eps)`` over the valid elements (unbiased variance by
default, as verl and TRL), ``+ mean`` again when ``shift_mean=False``; 0 at masked elements.

Group advantages: one score per sample (or ``[B, T]`` token rewards summed over T, as
verl), grouped by equal contiguous blocks (``group_size``) or arbitrary ids.  NaN scores
are left out of every statistic and get advantage 0.  With mu, sigma the mean and unbiased
standard deviation of the group's valid scores, n their number:

    grpo                   (r - mu) / (max(sigma, std_floor) + eps)
    dr_grpo                r - mu
    batch_std              (r - mu) / (max(sigma_batch, std_floor) + eps)     (TRL "batch")
    rloo                   r - (sum_g r - r) / (n - 1) = n / (n - 1) (r - mu)
    reinforce_pp_baseline  whiten_batch(r - mu), token-weighted when mask/lengths are given
    opo                    r - sum_g(len r) / sum_g(len)
    grpo_passk             (r_max - r_2nd) [/ (sigma + eps)] for the group's first argmax, 0 else
    gpg                    (n_valid / max(#nonzero r, 1)) (r - mu) / f_norm

Centred values are formed relative to the group's first valid score, so a group whose
scores are all equal gives exactly 0.  Groups with one valid score and the epsilon follow
``semantics`` (see ``_SEMANTICS`` and docs/ops/advantage.md).

Token rewards (PPO reward shaping): ``rewards_t = m_t (score [t == last valid] - kl_coef kl_t)``.

Three files hold this family: this module (reference implementations = specification,
torch.library ops, dispatch), ``csrc/cpu/advantage.cpp`` / ``csrc/cuda/advantage.cu`` and
``kernels/advantage.py`` (Triton).  None of these ops has a gradient; inputs that require
grad are detached.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from rlfuse import _backend, _validate

__all__ = [
    "gae",
    "gae_reference",
    "discounted_returns",
    "discounted_returns_reference",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "masked_mean_reference",
    "masked_var_reference",
    "masked_whiten_reference",
    "group_advantages",
    "group_advantages_reference",
    "token_rewards",
    "token_rewards_reference",
    "GROUP_METHODS",
    "GROUP_SEMANTICS",
]

GROUP_METHODS = (
    "grpo", "dr_grpo", "batch_std", "rloo", "reinforce_pp_baseline", "opo", "grpo_passk", "gpg",
)
_METHOD_CODES = {name: i for i, name in enumerate(GROUP_METHODS)}

# semantics -> (default eps, size-one convention, whitening of reinforce_pp_baseline)
#   size-one: "zero"  r - mu = 0 for a group with one valid score (TRL's result; rlfuse)
#             "self"  baseline mu = 0, sigma = 1 (verl); grpo_passk raises (as verl)
#             "error" grpo / rloo / grpo_passk raise (OpenRLHF gives NaN or divides by 0);
#                     the other methods give r - mu = 0
#   whitening: "unbiased" rsqrt(var_unbiased + 1e-8) (verl); "biased" rsqrt(max(var, 1e-8))
_SEMANTICS = {
    "rlfuse": (1e-6, "zero", "unbiased"),
    "verl": (1e-6, "self", "unbiased"),
    "trl": (1e-4, "zero", "unbiased"),
    "openrlhf": (1e-9, "error", "biased"),
}
GROUP_SEMANTICS = tuple(_SEMANTICS)
_SIZE_ONE_CODES = {"zero": 0, "self": 1, "error": 2}

_GAE_SEMANTICS = {
    "skip_masked": False,
    "zero_masked": True,
    "verl": False,
    "openrlhf": True,
    "trl": True,
}

# Mask element codes shared with csrc/cpu/advantage.h (MaskCode).
_MASK_CODES = {torch.uint8: 0, torch.int32: 1, torch.int64: 2, torch.float32: 3, torch.float64: 4}

_WHITEN_EPS = 1e-8


# Elements per OpenMP thread below which a CPU call runs on fewer threads (as torch's
# grain size): waking threads costs more than small work, and on a busy machine a parallel
# region can wait a whole scheduler slice for its second thread.  Results do not depend on
# the thread count.
_threads = _backend.threads_for


def _empty(shape, dtype, device=None):
    """Allocation of every kernel output (a seam for the tests, which poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ======================================================================================
# Reference implementations (the specification).  Plain torch, clear loops.
# ======================================================================================
def _acc_dtype(*tensors) -> torch.dtype:
    return (
        torch.float64
        if any(t is not None and t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _unpack(x: torch.Tensor, cu: torch.Tensor, fill) -> torch.Tensor:
    """Packed [N] -> padded [S, Lmax] (right padding with ``fill``)."""
    bounds = [int(v) for v in cu.tolist()]
    S = len(bounds) - 1
    lmax = max([bounds[i + 1] - bounds[i] for i in range(S)] + [0])
    out = torch.full((S, lmax), fill, dtype=x.dtype, device=x.device)
    for s in range(S):
        n = bounds[s + 1] - bounds[s]
        out[s, :n] = x[bounds[s]:bounds[s + 1]]
    return out


def _repack(x: torch.Tensor, cu: torch.Tensor) -> torch.Tensor:
    bounds = [int(v) for v in cu.tolist()]
    parts = [x[s, : bounds[s + 1] - bounds[s]] for s in range(len(bounds) - 1)]
    return torch.cat(parts) if parts else x.new_zeros(0)


def gae_reference(
    rewards: torch.Tensor,
    values: Optional[torch.Tensor],
    mask: Optional[torch.Tensor] = None,
    *,
    gamma: float,
    lam: float,
    last_values: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    semantics: str = "skip_masked",
    whiten: bool = False,
):
    """GAE as a loop over t (vectorised over sequences).  See the module docstring.

    ``values=None`` means values 0 (used by :func:`discounted_returns_reference`).
    Computes in float64 when any input is float64, else float32.  Returns
    ``(advantages, returns)`` shaped like ``rewards``.
    """
    zero = _GAE_SEMANTICS[semantics]
    acc = _acc_dtype(rewards, values, last_values)
    r = rewards.detach().to(acc)
    v = torch.zeros_like(r) if values is None else values.detach().to(acc)
    m = torch.ones_like(r, dtype=torch.bool) if mask is None else mask.detach() != 0
    packed = cu_seqlens is not None
    if packed:
        r, v = _unpack(r, cu_seqlens, 0.0), _unpack(v, cu_seqlens, 0.0)
        m = _unpack(m, cu_seqlens, False)
    S, T = r.shape
    A = torch.zeros(S, dtype=acc, device=r.device)
    nv = torch.zeros_like(A) if last_values is None else last_values.detach().to(acc).clone()
    started = torch.zeros(S, dtype=torch.bool, device=r.device)
    adv = torch.zeros_like(r)
    ret = torch.zeros_like(r)
    for t in reversed(range(T)):
        mt = m[:, t]
        rt = torch.where(mt, r[:, t], torch.zeros_like(A))
        vt = torch.where(mt, v[:, t], torch.zeros_like(A))
        started = started | mt
        keep = mt | (started & zero)
        delta = rt + gamma * nv - vt
        A = torch.where(keep, delta + gamma * lam * A, A)
        nv = torch.where(keep, vt, nv)
        adv[:, t] = torch.where(mt, A, torch.zeros_like(A))
        ret[:, t] = torch.where(mt, A + vt, torch.zeros_like(A))
    if packed:
        adv, ret = _repack(adv, cu_seqlens), _repack(ret, cu_seqlens)
        m = _repack(m, cu_seqlens)
    if whiten:
        adv = masked_whiten_reference(adv, m)
    return adv, ret


def discounted_returns_reference(
    rewards: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    semantics: str = "skip_masked",
):
    """G_t = r_t + gamma * G_next over valid positions (GAE with V = 0, lam = 1)."""
    return gae_reference(
        rewards, None, mask, gamma=gamma, lam=1.0, cu_seqlens=cu_seqlens, semantics=semantics
    )[1]


def _moments_reference(x, mask):
    acc = _acc_dtype(x)
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.detach() != 0
    vals = x.detach().to(torch.float64)[m]
    return vals, acc


def masked_mean_reference(x, mask=None, dim=None):
    """Mean of the valid elements (over ``dim``, or all of them)."""
    if dim is not None:
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
        xd = torch.where(m, x.detach().double(), torch.zeros((), dtype=torch.float64))
        return (xd.sum(dim) / m.sum(dim)).to(_acc_dtype(x))
    vals, acc = _moments_reference(x, mask)
    return vals.mean().to(acc)


def masked_var_reference(x, mask=None, dim=None, *, unbiased=True):
    """Variance of the valid elements (unbiased: divided by n - 1)."""
    if dim is not None:
        m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
        xd = torch.where(m, x.detach().double(), torch.zeros((), dtype=torch.float64))
        n = m.sum(dim).double()
        mean = xd.sum(dim, keepdim=True) / m.sum(dim, keepdim=True)
        d = torch.where(m, xd - mean, torch.zeros((), dtype=torch.float64))
        var = (d * d).sum(dim) / (n - 1 if unbiased else n)
        var = torch.where(n > (1 if unbiased else 0), var, torch.full_like(var, float("nan")))
        return var.to(_acc_dtype(x))
    vals, acc = _moments_reference(x, mask)
    n = vals.numel()
    mean = vals.mean()
    return (((vals - mean) ** 2).sum() / (n - 1 if unbiased else n)).to(acc)


def masked_whiten_reference(x, mask=None, shift_mean=True, *, unbiased=True, eps=_WHITEN_EPS):
    """``(x - mean) * rsqrt(var + eps)`` over the valid elements; 0 at masked ones."""
    vals, acc = _moments_reference(x, mask)
    mean = vals.mean()
    n = vals.numel()
    var = ((vals - mean) ** 2).sum() / (n - 1 if unbiased else n)
    out = (x.detach().double() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask != 0
    return torch.where(m, out, torch.zeros_like(out)).to(acc)


def _size_one_message(method, semantics, b):
    return (f"group_advantages: {method} with semantics={semantics!r} needs at least 2 valid "
            f"(non-NaN) scores per group (sample {b} is alone)")


def group_advantages_reference(
    scores: torch.Tensor,
    *,
    group_ids: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    method: str = "grpo",
    mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    semantics: str = "rlfuse",
    eps: Optional[float] = None,
    std_floor: Optional[float] = None,
    norm_by_std: bool = True,
    f_norm: float = 1.0,
):
    """Group advantages with a Python loop over groups (float64 inside).

    Returns ``[B]`` (float32, float64 for float64 scores), or ``[B, T]`` broadcast over the
    valid tokens of ``mask``.  Raises ``ValueError`` where the semantics make a group of
    size one an error, or when the whitening of reinforce_pp_baseline has too few tokens.
    """
    default_eps, size_one, whitening = _SEMANTICS[semantics]
    eps = default_eps if eps is None else eps
    acc = _acc_dtype(scores)
    s = scores.detach().double()
    if s.dim() == 2:
        if mask is not None:  # masked positions are never read (NaN / inf there is ignored)
            s = torch.where(mask != 0, s, torch.zeros((), dtype=s.dtype, device=s.device))
        s = s.sum(-1)
    B = s.numel()
    valid = [not math.isnan(v) for v in s.tolist()]
    sv = s.tolist()
    if group_ids is not None:
        ids = group_ids.tolist()
    else:
        ids = [b // group_size for b in range(B)]
    groups: dict = {}
    for b in range(B):
        groups.setdefault(ids[b], []).append(b)
    if lengths is not None:
        lens = [float(v) for v in lengths.tolist()]
    elif mask is not None:
        lens = [float(v) for v in (mask != 0).sum(-1).tolist()]
    else:
        lens = None

    def floored(sd):
        return max(sd, std_floor) if std_floor is not None else sd

    good = [sv[b] for b in range(B) if valid[b]]
    n_valid = len(good)
    n_nonzero = sum(1 for v in good if v != 0.0)
    batch_std = 0.0
    if n_valid >= 2:
        K = good[0]
        md = sum(v - K for v in good) / n_valid
        batch_std = math.sqrt(sum((v - K - md) ** 2 for v in good) / (n_valid - 1))
    alpha = n_valid / max(n_nonzero, 1)

    x = [0.0] * B
    for members in groups.values():
        vm = [b for b in members if valid[b]]
        n = len(vm)
        if n == 0:
            continue
        if n == 1:
            b = vm[0]
            r = sv[b]
            if size_one == "self":
                if method == "grpo_passk":
                    raise ValueError(_size_one_message(method, semantics, b))
                x[b] = {
                    "grpo": lambda: r / (floored(1.0) + eps),
                    "batch_std": lambda: r / (floored(batch_std) + eps),
                    "gpg": lambda: alpha * r / f_norm,
                }.get(method, lambda: r)()
            elif size_one == "error" and method in ("grpo", "rloo", "grpo_passk"):
                raise ValueError(_size_one_message(method, semantics, b))
            continue
        K = sv[vm[0]]
        d = {b: sv[b] - K for b in vm}
        md = sum(d.values()) / n
        sd = math.sqrt(sum((d[b] - md) ** 2 for b in vm) / (n - 1))
        for b in vm:
            c = d[b] - md
            if method == "grpo":
                x[b] = c / (floored(sd) + eps)
            elif method == "batch_std":
                x[b] = c / (floored(batch_std) + eps)
            elif method == "rloo":
                x[b] = c * (n / (n - 1))
            elif method == "gpg":
                x[b] = (alpha / f_norm) * c
            elif method in ("dr_grpo", "reinforce_pp_baseline"):
                x[b] = c
        if method == "opo":
            w = sum(lens[b] for b in vm)
            base = sum(lens[b] * d[b] for b in vm) / w if w > 0 else md
            for b in vm:
                x[b] = d[b] - base
        elif method == "grpo_passk":
            best = vm[0]
            for b in vm:
                if sv[b] > sv[best]:
                    best = b
            second = max(sv[b] for b in vm if b != best)
            adv = sv[best] - second
            if norm_by_std:
                adv = adv / (floored(sd) + eps)
            for b in vm:
                x[b] = adv if b == best else 0.0
    if method == "reinforce_pp_baseline":
        w = [(lens[b] if lens is not None else 1.0) if valid[b] else 0.0 for b in range(B)]
        W = sum(w)
        if (W <= 0) if whitening == "biased" else (W <= 1):
            raise ValueError("group_advantages: reinforce_pp_baseline whitens over the batch "
                             f"and needs at least {1 if whitening == 'biased' else 2} valid "
                             "token(s)")  # the kernels' message, word for word
        mean = sum(w[b] * x[b] for b in range(B)) / W
        m2 = sum(w[b] * (x[b] - mean) ** 2 for b in range(B))
        if whitening == "biased":
            rstd = 1.0 / math.sqrt(max(m2 / W, _WHITEN_EPS))
        else:
            rstd = 1.0 / math.sqrt(m2 / (W - 1) + _WHITEN_EPS)
        x = [(x[b] - mean) * rstd if valid[b] else 0.0 for b in range(B)]
    out = torch.tensor([x[b] if valid[b] else 0.0 for b in range(B)], dtype=torch.float64,
                       device=scores.device)
    if mask is not None:
        out = torch.where(mask != 0, out.unsqueeze(-1), torch.zeros((), dtype=torch.float64,
                                                                    device=out.device))
    return out.to(acc)


def token_rewards_reference(scores, mask=None, *, kl=None, kl_coef=0.0, cu_seqlens=None, T=None):
    """``m_t * (score * [t == last valid] - kl_coef * kl_t)`` per sequence (a loop)."""
    acc = _acc_dtype(scores, kl)
    packed = cu_seqlens is not None
    if packed:
        N = int(cu_seqlens[-1])
        m = torch.ones(N, dtype=torch.bool) if mask is None else mask != 0
        k = torch.zeros(N, dtype=acc) if kl is None else kl.detach().to(acc)
        m, k = _unpack(m, cu_seqlens, False), _unpack(k, cu_seqlens, 0.0)
    else:
        shape = mask.shape if mask is not None else (scores.shape[0], T if kl is None else kl.shape[1])
        m = torch.ones(shape, dtype=torch.bool) if mask is None else mask != 0
        k = torch.zeros(shape, dtype=acc) if kl is None else kl.detach().to(acc)
    out = torch.zeros(m.shape, dtype=acc)
    for s in range(m.shape[0]):
        valid = m[s].nonzero().flatten().tolist()
        for t in valid:
            out[s, t] = -(kl_coef * k[s, t])
        if valid:
            out[s, valid[-1]] = scores[s].to(acc) - kl_coef * k[s, valid[-1]]
    if packed:
        out = _repack(out, cu_seqlens)
    return out


# ======================================================================================
# Validation helpers (metadata only, no device sync) and data checks
# ======================================================================================
def _unit_float(op, name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{op}: {name} must lie in [0, 1], got {v}")
    return v


def _finite_float(op, name, v, *, minimum=None, strict=False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        raise ValueError(f"{op}: {name} must be {'>' if strict else '>='} {minimum}, got {v}")
    return v


def _bool(op, name, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def _choice(op, name, v, options) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{op}: {name} must be a str, got {type(v).__name__}")
    if v not in options:
        raise ValueError(f"{op}: {name} must be one of {tuple(options)}, got {v!r}")
    return v


def _mask_tensor(op, name, mask):
    """Validate a mask's type (bool, integer or floating); values are checked later."""
    _validate.tensor(op, name, mask)
    if mask.is_complex():
        raise TypeError(f"{op}: {name} must be bool, integer or floating, got {mask.dtype}")
    return mask


def _cu_tensor(op, cu):
    _validate.int_tensor(op, "cu_seqlens", cu)
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be 1-D with at least one entry, got shape "
                         f"{tuple(cu.shape)}")
    return cu


def _check_cu_values(op, cu: torch.Tensor, N: int):
    """cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == N (data check, inside the op)."""
    c = cu.to(torch.int64)
    if int(c[0]) != 0:
        raise ValueError(f"{op}: cu_seqlens must start at 0, got {int(c[0])}")
    if c.numel() > 1 and bool((c[1:] < c[:-1]).any()):
        k = int((c[1:] < c[:-1]).nonzero()[0, 0])
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing; entry {k + 1} "
                         f"({int(c[k + 1])}) < entry {k} ({int(c[k])})")
    if int(c[-1]) != N:
        raise ValueError(f"{op}: cu_seqlens[-1] must equal the number of packed elements "
                         f"{N}, got {int(c[-1])}")


def _kernel_value(x: Optional[torch.Tensor], acc: torch.dtype) -> Optional[torch.Tensor]:
    """float32 / float64 for the kernels (bf16 / f16 are widened once)."""
    if x is None:
        return None
    return x if x.dtype == acc else x.to(acc)


def _kernel_mask(mask: Optional[torch.Tensor]):
    """(tensor, code) for the CPU kernels; values are validated by the kernel."""
    if mask is None:
        return None, 0
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 0
    if mask.dtype == torch.int8:
        return mask.view(torch.uint8), 0
    if mask.dtype in _MASK_CODES:
        return mask, _MASK_CODES[mask.dtype]
    if mask.is_floating_point():
        return mask.to(torch.float32), _MASK_CODES[torch.float32]
    return mask.to(torch.int32), _MASK_CODES[torch.int32]


def _ptr(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _strides2(x: Optional[torch.Tensor]):
    """(s0, s1) element strides of a [B, T] or [N] tensor ([N]: s0 = 0)."""
    if x is None:
        return 0, 0
    if x.dim() == 1:
        return 0, x.stride(0)
    return x.stride(0), x.stride(1)


def _raise_status(op, code, seq, pos, names, tensors, cu=None):
    """Turn a kernel / torch check status into a ValueError naming the argument."""
    if code == 0:
        return
    name = names.get(code, "input")
    t = tensors.get(code)
    if code in (5, 6):  # whole-input conditions: the message is the name itself
        raise ValueError(f"{op}: {names[code]}")
    if code == 4:
        val = t.reshape(-1)[seq].item() if t is not None and t.dim() == 1 else None
        raise ValueError(f"{op}: {name} must be finite; entry {seq} holds {val}")
    if cu is not None:
        flat = int(cu[seq]) + pos
        val = t.reshape(-1)[flat].item() if t is not None else None
        where = f"packed position {flat} (sequence {seq}, offset {pos})"
    else:
        val = t[seq, pos].item() if t is not None and t.dim() == 2 else None
        where = f"position ({seq}, {pos})"
    if code == 1:
        raise ValueError(f"{op}: {name} must hold only 0 and 1 (or be bool); {where} holds {val}")
    raise ValueError(f"{op}: {name} must be finite at valid (mask = 1) positions; "
                     f"{where} holds {val}")


def _first_bad_torch(mask, checks, cu=None):
    """Torch version of the kernels' validation: returns (code, seq, pos) of the first bad
    element in (sequence, position) order.  ``checks`` is a list of (code, tensor) whose
    non-finite valid entries are errors."""
    if mask is not None:
        m = mask != 0
        bad = torch.where((mask != 0) & (mask != 1), 1, 0)
    else:
        m = None
        bad = None
    for code, t in checks:
        if t is None:
            continue
        nf = ~torch.isfinite(t)
        if m is not None:
            nf = nf & m
        term = torch.where(nf, code, 0)
        bad = term if bad is None else torch.where(bad != 0, bad, term)
    if bad is None or not bool((bad != 0).any()):
        return 0, 0, 0
    flat = bad.reshape(-1)
    idx = int((flat != 0).nonzero()[0, 0])
    code = int(flat[idx])
    if cu is not None:
        c = cu.to(torch.int64).cpu()
        seq = int(torch.searchsorted(c, torch.tensor([idx]), right=True)[0]) - 1
        return code, seq, idx - int(c[seq])
    T = bad.shape[-1]
    return code, idx // T, idx % T


# Eager calls run an op's implementation directly: these ops have no autograd, and the
# torch.library dispatch of a custom op costs ~12-20 us per call on the CPU (argument
# normalisation, redispatch), a large share of a sub-millisecond op.  Under torch.compile (or
# with this flag off) the registered rlfuse:: op is called, so tracing sees it.
_EAGER_DIRECT = True
_IMPLS: dict = {}


def _custom_op(name: str):
    """``torch.library.custom_op(name)`` that also remembers the plain implementation."""
    def deco(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        _IMPLS[op] = fn
        return op
    return deco


def _call(op, *args):
    # The registered op also for meta / fake inputs or under a dispatch mode such as
    # FakeTensorMode (its fake implementation gives the shapes; the kernels need storage).
    if _EAGER_DIRECT and not _backend.library_op_needed(
            *[a for a in args if isinstance(a, torch.Tensor)]):
        return _IMPLS[op](*args)
    return op(*args)


# ======================================================================================
# GAE / discounted returns
# ======================================================================================
def _gae_impl(rewards, values, mask, last_values, cu_seqlens, gamma, lam, zero, whiten,
              want_returns, backend, op):
    acc = _acc_dtype(rewards, values, last_values)
    packed = cu_seqlens is not None
    N = rewards.numel()
    if packed:
        _check_cu_values(op, cu_seqlens, N)
    names = {1: "mask", 2: "rewards", 3: "values", 4: "last_values"}
    tensors = {1: mask, 2: rewards, 3: values, 4: last_values}
    adv = _empty(rewards.shape, dtype=acc, device=rewards.device)
    ret = _empty(rewards.shape if want_returns else (0,), dtype=acc, device=rewards.device)
    S = cu_seqlens.numel() - 1 if packed else (rewards.shape[0] if rewards.dim() == 2 else 0)

    def check_inputs():  # raises, naming the first bad position (torch; syncs)
        code, seq, pos = _first_bad_torch(mask, [(2, rewards), (3, values)], cu_seqlens)
        if code == 0 and last_values is not None and not bool(torch.isfinite(last_values).all()):
            code, seq, pos = 4, int((~torch.isfinite(last_values)).nonzero()[0, 0]), 0
        _raise_status(op, code, seq, pos, names, tensors, cu_seqlens)

    gpu_checks = None
    if backend == "torch":
        check_inputs()
        a, r = gae_reference(rewards, values, mask, gamma=gamma, lam=lam,
                             last_values=last_values, cu_seqlens=cu_seqlens,
                             semantics="zero_masked" if zero else "skip_masked")
        adv.copy_(a)
        if want_returns:
            ret.copy_(r)
    elif N > 0 and S > 0:
        r_k = _kernel_value(rewards, acc)
        v_k = _kernel_value(values, acc)
        lv_k = _kernel_value(last_values, acc)
        T = 0 if packed else rewards.shape[1]
        if backend == "cpu":
            m_k, m_code = _kernel_mask(mask)
            cu_k = None
            if packed:
                cu_k = cu_seqlens if cu_seqlens.dtype in (torch.int32, torch.int64) else \
                    cu_seqlens.to(torch.int64)
                cu_k = cu_k.contiguous()
            rs, vs, ms = _strides2(r_k), _strides2(v_k), _strides2(m_k)
            # whitening: the kernel also returns the moments of the advantages it wrote
            row_stats = _empty((S, 3), dtype=torch.float64) if whiten else None
            code, seq, pos, n_valid, mean, m2 = _backend.cpu_module().gae_fwd(
                _backend.DTYPE_CODES[acc], S, T, _ptr(cu_k),
                0 if cu_k is None or cu_k.dtype == torch.int32 else 1,
                r_k.data_ptr(), rs[0], rs[1], _ptr(v_k), vs[0], vs[1], _ptr(m_k), ms[0], ms[1],
                m_code, _ptr(lv_k), lv_k.stride(0) if lv_k is not None else 0,
                float(gamma), float(lam), int(zero), adv.data_ptr(),
                ret.data_ptr() if want_returns else 0, _ptr(row_stats), _threads(N),
            )
            _raise_status(op, code, seq, pos, names, tensors, cu_seqlens)
            if whiten:
                if n_valid < 2:
                    raise ValueError(f"{op}: the mask selects {int(n_valid)} element(s); "
                                     "whitening needs at least 2")
                scale = 1.0 / math.sqrt(m2 / (n_valid - 1) + _WHITEN_EPS)
                a2 = _rows_view(adv)
                _apply_whiten(a2, None if mask is None else _rows_view(mask), mean, scale, 0.0,
                              "cpu", a2)
                whiten = False  # done
        else:
            # GPU backends: the inputs are checked after the kernel, with one device sync
            # (below, or in the whitening's read): a non-finite reward or value at a valid
            # position makes the advantage there non-finite, so the advantages' sum is
            # non-finite; the sums of last_values and the mask's values are read along.
            gpu_checks = ([] if last_values is None else [last_values.sum(dtype=torch.float64)],
                          check_inputs)
            cu_k = None if not packed else cu_seqlens.to(torch.int64).contiguous()
            if backend == "cuda":
                m_k = None if mask is None else (mask != 0).view(torch.uint8)
                rs, vs, ms = _strides2(r_k), _strides2(v_k), _strides2(m_k)
                with _backend.cuda_launch(rewards.device) as stream:
                    _backend.cuda_module().gae_fwd(
                        _backend.DTYPE_CODES[acc], S, T, _ptr(cu_k), r_k.data_ptr(), rs[0],
                        rs[1], _ptr(v_k), vs[0], vs[1], _ptr(m_k), ms[0], ms[1], _ptr(lv_k),
                        lv_k.stride(0) if lv_k is not None else 0, float(gamma), float(lam),
                        int(zero), adv.data_ptr(), ret.data_ptr() if want_returns else 0,
                        stream,
                    )
            elif backend == "triton":
                with _backend.device_guard(rewards.device):
                    _backend.triton_kernels("advantage").gae(
                        r_k, v_k, mask, lv_k, cu_k, S, T, float(gamma), float(lam), bool(zero),
                        adv, ret if want_returns else None,
                    )
            else:  # pragma: no cover - resolve() only returns known names
                raise RuntimeError(f"{op}: unknown backend {backend!r}")
    if N == 0 or S == 0:
        adv.zero_()
        ret.zero_()
    if whiten:
        m2d = None if mask is None else mask
        extra, on_bad = gpu_checks if gpu_checks is not None else ((), None)
        adv = _whiten_impl(adv, m2d, True, True, _WHITEN_EPS, backend, op, extra, on_bad)
    elif gpu_checks is not None:
        finite = [adv.sum(dtype=torch.float64)] + gpu_checks[0]
        _gpu_read([], mask, finite, gpu_checks[1])
    return adv, ret


@_custom_op("rlfuse::gae")
def _gae_op(
    rewards: torch.Tensor,
    values: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    last_values: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    gamma: float,
    lam: float,
    zero_masked: bool,
    whiten: bool,
    want_returns: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "gae" if want_returns else "discounted_returns"
    adv, ret = _gae_impl(rewards, values, mask, last_values, cu_seqlens, gamma, lam,
                         zero_masked, whiten, want_returns, backend, op)
    return adv, ret


@_gae_op.register_fake
def _(rewards, values, mask, last_values, cu_seqlens, gamma, lam, zero_masked, whiten,
      want_returns, backend):
    acc = _acc_dtype(rewards, values, last_values)
    adv = rewards.new_empty(rewards.shape, dtype=acc)
    ret = rewards.new_empty(rewards.shape if want_returns else (0,), dtype=acc)
    return adv, ret


def _check_seq_inputs(op, rewards, mask, cu_seqlens, others):
    """Shapes of padded [B, T] or packed [N] sequence inputs."""
    _validate.float_tensor(op, "rewards", rewards)
    if cu_seqlens is None:
        if rewards.dim() != 2:
            raise ValueError(f"{op}: rewards must be 2-D [B, T] (padded), or 1-D [N] with "
                             f"cu_seqlens (packed); got shape {tuple(rewards.shape)}")
    else:
        _cu_tensor(op, cu_seqlens)
        if rewards.dim() != 1:
            raise ValueError(f"{op}: with cu_seqlens, rewards must be 1-D [N] (packed); got "
                             f"shape {tuple(rewards.shape)}")
    if mask is not None:
        _mask_tensor(op, "mask", mask)
        _validate.shape_equals(op, "mask", mask, rewards.shape, "rewards.shape")
    for name, t in others.items():
        if t is not None:
            _validate.float_tensor(op, name, t)
            _validate.shape_equals(op, name, t, rewards.shape, "rewards.shape")
    _validate.same_device(op, "rewards", rewards, mask=mask, cu_seqlens=cu_seqlens, **others)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    gamma: float,
    lam: float,
    last_values: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    semantics: str = "skip_masked",
    whiten: bool = False,
    backend: Optional[str] = None,
):
    """Generalized advantage estimation and returns.

    Args:
        rewards: ``[B, T]`` (padded; right, left or holes) or ``[N]`` with ``cu_seqlens``.
            float32 / float64 (bf16 / f16 are widened to float32).
        values: value estimates, same shape as ``rewards``.
        mask: 0/1 (bool, integer or floating) of the same shape; ``None`` = all valid.
            Rewards and values at masked positions are never used (may hold anything).
        gamma, lam: discount and GAE lambda, each in [0, 1].
        last_values: ``[B]`` (or ``[S]``) value of the state after each sequence's last
            valid token, to bootstrap truncated sequences; ``None`` = 0.
        cu_seqlens: ``[S + 1]`` integer offsets of packed sequences.
        semantics: ``"skip_masked"`` (verl; carries A and the next value across masked
            positions) or ``"zero_masked"`` (OpenRLHF / TRL; recurses through them with
            zero value and reward).  ``"verl"``, ``"openrlhf"``, ``"trl"`` are aliases.
        whiten: whiten the advantages over all valid tokens (as verl's GAE does).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(advantages, returns)`` shaped like ``rewards``, float32 (float64 for float64
        inputs), 0 at masked positions.

    Raises:
        TypeError / ValueError naming the argument: shapes, dtypes, devices, gamma or lam
        outside [0, 1], a mask that is not 0/1, non-finite rewards/values at valid
        positions, non-finite last_values, bad cu_seqlens, whitening with < 2 valid tokens.
    """
    op = "gae"
    _check_seq_inputs(op, rewards, mask, cu_seqlens, {"values": values})
    if values is None:
        raise TypeError(f"{op}: values must be a torch.Tensor, got NoneType")
    gamma = _unit_float(op, "gamma", gamma)
    lam = _unit_float(op, "lam", lam)
    zero = _GAE_SEMANTICS[_choice(op, "semantics", semantics, _GAE_SEMANTICS)]
    whiten = _bool(op, "whiten", whiten)
    n_seq = rewards.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    if last_values is not None:
        _validate.float_tensor(op, "last_values", last_values)
        _validate.shape_equals(op, "last_values", last_values, (n_seq,), "one per sequence")
        _validate.same_device(op, "rewards", rewards, last_values=last_values)
    chosen = _backend.resolve(backend, rewards.device, op)
    adv, ret = _call(
        _gae_op,
        rewards.detach(), values.detach(), None if mask is None else mask.detach(),
        None if last_values is None else last_values.detach(), cu_seqlens, gamma, lam, zero,
        whiten, True, chosen,
    )
    return adv, ret


def discounted_returns(
    rewards: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    gamma: float = 1.0,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    semantics: str = "skip_masked",
    backend: Optional[str] = None,
):
    """Discounted returns ``G_t = r_t + gamma * G_next`` over the valid positions
    (REINFORCE++).  Layouts, mask and ``semantics`` as :func:`gae` (with values 0 and
    lam 1: ``"skip_masked"`` carries G across masked positions, as verl;
    ``"zero_masked"`` discounts through them, as OpenRLHF).  Returns float32 (float64 for
    float64 rewards), 0 at masked positions."""
    op = "discounted_returns"
    _check_seq_inputs(op, rewards, mask, cu_seqlens, {})
    gamma = _unit_float(op, "gamma", gamma)
    zero = _GAE_SEMANTICS[_choice(op, "semantics", semantics, _GAE_SEMANTICS)]
    chosen = _backend.resolve(backend, rewards.device, op)
    out, _ = _call(_gae_op, rewards.detach(), None, None if mask is None else mask.detach(),
                   None, cu_seqlens, gamma, 1.0, zero, False, False, chosen)
    return out


# ======================================================================================
# Masked moments and whitening
# ======================================================================================
def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, cols] (a view when possible)."""
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: the last dim may be 0


def _gpu_read(values, mask, finite=(), on_bad=None) -> list:
    """The one host read (device sync) of a GPU call: the 0-d tensors ``values`` as floats,
    with the checks: ``mask`` holds a value other than 0 and 1 (_validate.mask_flags), or a
    0-d tensor of ``finite`` (a sum over valid elements) is not finite.  When a check fails,
    ``on_bad`` looks for the bad input in torch and raises, naming its first position (a sum
    may also overflow: then nothing is found and the call goes on)."""
    flags = _validate.mask_flags(mask)
    got = _validate.read(list(values) + list(finite) + flags)
    nv, nf = len(values), len(finite)
    if (not all(math.isfinite(v) for v in got[nv:nv + nf])
            or _validate.mask_bad(got[nv + nf:])) and on_bad is not None:
        on_bad()
    return got[:nv]


def _row_stats(x2, m2, backend, op, names, extra=(), on_bad=None):
    """Per-row (count, mean, M2) and their combination (N, mean, M2), float64.

    GPU backends: ``extra`` (0-d tensors that must be finite) are read with the moments, and
    ``on_bad`` (the caller's own input checks, raising) runs first when a check fails."""
    R, C = x2.shape
    if backend == "cpu":
        m_k, code_m = _kernel_mask(m2)
        cnt = _empty(R, dtype=torch.int64)
        mean = _empty(R, dtype=torch.float64)
        m2o = _empty(R, dtype=torch.float64)
        xs, ms = _strides2(x2), _strides2(m_k)
        code, row, col, N, gmean, gM2 = _backend.cpu_module().masked_row_stats(
            _backend.DTYPE_CODES[x2.dtype], R, C, x2.data_ptr(), xs[0], xs[1], _ptr(m_k),
            ms[0], ms[1], code_m, cnt.data_ptr(), mean.data_ptr(), m2o.data_ptr(),
            _threads(R * C),
        )
        _raise_status(op, code, row, col, names, {1: m2, 2: x2})
        return cnt, mean, m2o, (N, gmean, gM2)

    def check_x():  # raises, naming the first bad position (torch; syncs)
        code, row, col = _first_bad_torch(m2, [(2, x2)])
        _raise_status(op, code, row, col, names, {1: m2, 2: x2})

    if backend == "torch" or R * C == 0:
        check_x()
        m = torch.ones_like(x2, dtype=torch.bool) if m2 is None else m2 != 0
        xd = torch.where(m, x2.double(), torch.zeros((), dtype=torch.float64, device=x2.device))
        cnt = m.sum(-1)
        mean = torch.where(cnt > 0, xd.sum(-1) / cnt.clamp_min(1), xd.new_zeros(R))
        d = torch.where(m, xd - mean.unsqueeze(-1), torch.zeros_like(xd))
        m2o = (d * d).sum(-1)
        # Chan's combination of the rows, in float64 (fixed-size reductions: deterministic).
        n = cnt.double()
        N = float(n.sum())
        if N == 0:
            return cnt, mean, m2o, (0.0, 0.0, 0.0)
        gmean = float((n * mean).sum() / N)
        gM2 = float((m2o + n * (mean - gmean) ** 2).sum())
        return cnt, mean, m2o, (N, gmean, gM2)
    if backend == "cuda":
        m_k = None if m2 is None else (m2 != 0).view(torch.uint8)
        cnt = _empty(R, dtype=torch.int64, device=x2.device)
        mean = _empty(R, dtype=torch.float64, device=x2.device)
        m2o = _empty(R, dtype=torch.float64, device=x2.device)
        xs, ms = _strides2(x2), _strides2(m_k)
        with _backend.cuda_launch(x2.device) as stream:
            _backend.cuda_module().masked_row_stats(
                _backend.DTYPE_CODES[x2.dtype], R, C, x2.data_ptr(), xs[0], xs[1], _ptr(m_k),
                ms[0], ms[1], cnt.data_ptr(), mean.data_ptr(), m2o.data_ptr(), stream,
            )
    else:
        with _backend.device_guard(x2.device):
            cnt, mean, m2o = _backend.triton_kernels("advantage").row_stats(x2, m2)
    # GPU backends: the same combination on the device, read once with the checks (a
    # non-finite x at a valid position makes the moments non-finite).
    n = cnt.double()
    N = n.sum()
    gmean = torch.dot(n, mean) / N.clamp(min=1)  # rows without elements have mean 0
    d = mean - gmean
    gM2 = m2o.sum() + torch.dot(n, d * d)

    def bad():
        if on_bad is not None:
            on_bad()
        check_x()

    N, gmean, gM2 = _gpu_read([N, gmean, gM2], m2, [gmean, gM2] + list(extra), bad)
    return cnt, mean, m2o, (N, gmean, gM2)


def _apply_whiten(x2, m2, mean, scale, add_back, backend, out2):
    R, C = x2.shape
    if R * C == 0:
        return
    if backend == "cpu":
        m_k, code_m = _kernel_mask(m2)
        xs, ms = _strides2(x2), _strides2(m_k)
        _backend.cpu_module().masked_whiten_apply(
            _backend.DTYPE_CODES[x2.dtype], R, C, x2.data_ptr(), xs[0], xs[1], _ptr(m_k), ms[0],
            ms[1], code_m, mean, scale, add_back, out2.data_ptr(), _threads(R * C),
        )
    elif backend == "cuda":
        m_k = None if m2 is None else (m2 != 0).view(torch.uint8)
        xs, ms = _strides2(x2), _strides2(m_k)
        with _backend.cuda_launch(x2.device) as stream:
            _backend.cuda_module().masked_whiten_apply(
                _backend.DTYPE_CODES[x2.dtype], R, C, x2.data_ptr(), xs[0], xs[1], _ptr(m_k),
                ms[0], ms[1], mean, scale, add_back, out2.data_ptr(), stream,
            )
    elif backend == "triton":
        with _backend.device_guard(x2.device):
            _backend.triton_kernels("advantage").whiten_apply(x2, m2, mean, scale, add_back,
                                                              out2)
    else:
        m = torch.ones_like(x2, dtype=torch.bool) if m2 is None else m2 != 0
        w = (x2.double() - mean) * scale + add_back
        out2.copy_(torch.where(m, w, torch.zeros_like(w)))


def _whiten_impl(x, mask, shift_mean, unbiased, eps, backend, op, extra=(), on_bad=None):
    acc = _acc_dtype(x)
    xk = _kernel_value(x, acc)
    x2 = _rows_view(xk)
    m2 = None if mask is None else _rows_view(mask)
    names = {1: "mask", 2: "x"}
    _, _, _, (N, mean, M2) = _row_stats(x2, m2, backend, op, names, extra, on_bad)
    if N < 1 or (unbiased and N < 2):
        raise ValueError(f"{op}: the mask selects {int(N)} element(s); whitening needs at least "
                         f"{2 if unbiased else 1}")
    var = M2 / (N - 1 if unbiased else N)
    scale = 1.0 / math.sqrt(var + eps)
    out = _empty(x.shape, dtype=acc, device=x.device)
    _apply_whiten(x2, m2, mean, scale, 0.0 if shift_mean else mean, backend, out.view(x2.shape))
    return out


@_custom_op("rlfuse::masked_whiten")
def _masked_whiten_op(
    x: torch.Tensor, mask: Optional[torch.Tensor], shift_mean: bool, unbiased: bool, eps: float,
    backend: str,
) -> torch.Tensor:
    return _whiten_impl(x, mask, shift_mean, unbiased, eps, backend, "masked_whiten")


@_masked_whiten_op.register_fake
def _(x, mask, shift_mean, unbiased, eps, backend):
    return x.new_empty(x.shape, dtype=_acc_dtype(x))


@_custom_op("rlfuse::masked_mean_var")
def _masked_mean_var_op(
    x: torch.Tensor, mask: Optional[torch.Tensor], dim: int, has_dim: bool, unbiased: bool,
    check_var: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "masked_var" if check_var else "masked_mean"
    acc = _acc_dtype(x)
    names = {1: "mask", 2: "x"}
    xk = _kernel_value(x, acc)
    if has_dim:
        xm = xk.movedim(dim, -1)
        mm = None if mask is None else mask.movedim(dim, -1)
        out_shape = xm.shape[:-1]
        x2 = _rows_view(xm)
        m2 = None if mm is None else _rows_view(mm)
        cnt, mean, m2o, _ = _row_stats(x2, m2, backend, op, names)
        n = cnt.double()
        mean = torch.where(n > 0, mean, torch.full_like(mean, float("nan")))
        var = m2o / (n - 1 if unbiased else n)
        var = torch.where(n > (1 if unbiased else 0), var, torch.full_like(var, float("nan")))
        return mean.to(acc).reshape(out_shape), var.to(acc).reshape(out_shape)
    x2 = _rows_view(xk)
    m2 = None if mask is None else _rows_view(mask)
    _, _, _, (N, mean, M2) = _row_stats(x2, m2, backend, op, names)
    if N < 1:
        raise ValueError(f"{op}: the mask selects no element")
    if check_var and unbiased and N < 2:
        raise ValueError(f"{op}: the mask selects a single element; the unbiased variance "
                         "needs at least 2 (pass unbiased=False)")
    var = (M2 / (N - 1 if unbiased else N)) if N > (1 if unbiased else 0) else float("nan")
    t = torch.tensor([mean, var], dtype=torch.float64).to(acc).to(x.device)
    return t[0].clone(), t[1].clone()


@_masked_mean_var_op.register_fake
def _(x, mask, dim, has_dim, unbiased, check_var, backend):
    acc = _acc_dtype(x)
    if has_dim:
        shape = x.movedim(dim, -1).shape[:-1]
    else:
        shape = ()
    return x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=acc)


def _check_masked_x(op, x, mask):
    _validate.float_tensor(op, "x", x)
    if mask is not None:
        _mask_tensor(op, "mask", mask)
        _validate.shape_equals(op, "mask", mask, x.shape, "x.shape")
        _validate.same_device(op, "x", x, mask=mask)


def _check_dim(op, x, dim):
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"{op}: dim must be an int or None, got {type(dim).__name__}")
    nd = max(x.dim(), 1)
    if not -nd <= dim < nd:
        raise ValueError(f"{op}: dim must lie in [{-nd}, {nd}), got {dim}")
    return int(dim) % nd if x.dim() > 0 else 0


def masked_mean(x, mask=None, dim=None, *, backend=None):
    """Mean of ``x`` over the elements where ``mask`` is 1 (all of them, or along ``dim``).

    float64 accumulation.  ``dim=None`` raises ``ValueError`` when the mask selects nothing;
    along ``dim`` an empty slice gives NaN.  Returns float32 (float64 for float64 ``x``).
    """
    op = "masked_mean"
    _check_masked_x(op, x, mask)
    d = _check_dim(op, x, dim)
    chosen = _backend.resolve(backend, x.device, op)
    mean, _ = _call(_masked_mean_var_op, x.detach(), None if mask is None else mask.detach(),
                    0 if d is None else d, d is not None, True, False, chosen)
    return mean


def masked_var(x, mask=None, dim=None, *, unbiased=True, backend=None):
    """Variance of ``x`` over the valid elements (unbiased: / (n - 1), as verl and TRL).

    ``dim=None`` raises ``ValueError`` when the mask selects nothing, or a single element
    with ``unbiased=True`` (as verl); along ``dim`` such slices give NaN.
    """
    op = "masked_var"
    _check_masked_x(op, x, mask)
    d = _check_dim(op, x, dim)
    unbiased = _bool(op, "unbiased", unbiased)
    chosen = _backend.resolve(backend, x.device, op)
    _, var = _call(_masked_mean_var_op, x.detach(), None if mask is None else mask.detach(),
                   0 if d is None else d, d is not None, unbiased, True, chosen)
    return var


def masked_whiten(x, mask=None, shift_mean=True, *, unbiased=True, eps=_WHITEN_EPS,
                  backend=None):
    """``(x - mean) * rsqrt(var + eps)`` with mean / variance over the valid elements
    (unbiased by default, as verl and TRL); ``+ mean`` when ``shift_mean=False``.  0 at
    masked elements.  Raises ``ValueError`` when fewer than 2 (1 if biased) valid
    elements exist, or ``x`` is not finite at a valid element."""
    op = "masked_whiten"
    _check_masked_x(op, x, mask)
    shift_mean = _bool(op, "shift_mean", shift_mean)
    unbiased = _bool(op, "unbiased", unbiased)
    eps = _finite_float(op, "eps", eps, minimum=0.0)
    chosen = _backend.resolve(backend, x.device, op)
    return _call(_masked_whiten_op, x.detach(), None if mask is None else mask.detach(),
                 shift_mean, unbiased, eps, chosen)


# ======================================================================================
# Group advantages
# ======================================================================================
def _group_impl(scores, group_ids, group_size, method, mask, lengths, eps, std_floor,
                size_one, whiten_biased, norm_by_std, f_norm, backend, semantics_name):
    op = "group_advantages"
    acc = _acc_dtype(scores)
    B = scores.shape[0]
    out = _empty(B, dtype=acc, device=scores.device)
    tok = None
    if mask is not None:
        tok = _empty(mask.shape, dtype=acc, device=scores.device)
    names = {
        1: "mask",
        4: "scores",
        5: f"{method} with semantics={semantics_name!r} needs at least 2 valid (non-NaN) "
           "scores per group",
        6: "reinforce_pp_baseline whitens over the batch and needs at least "
           f"{1 if whiten_biased else 2} valid token(s)",
    }
    if backend == "torch" or B == 0:
        code, seq, pos = _group_checks_torch(scores, mask)
        _raise_group_status(op, code, seq, pos, names, scores, mask)
        if B == 0:
            out.zero_()
            if tok is not None:
                tok.zero_()
            return out if tok is None else tok
        res = group_advantages_reference(
            scores, group_ids=group_ids, group_size=group_size, method=method, mask=mask,
            lengths=lengths, semantics=semantics_name, eps=eps,
            std_floor=None if std_floor < 0 else std_floor, norm_by_std=norm_by_std,
            f_norm=f_norm,
        )
        return res
    sk = _kernel_value(scores, acc)
    if sk.dim() == 2 and sk.shape[1] == 0:  # [B, 0] token rewards: every sum is 0
        sk = torch.zeros(B, dtype=acc, device=sk.device)
    if backend == "cpu":
        ids_k = None
        if group_ids is not None:
            ids_k = group_ids if group_ids.dtype in (torch.int32, torch.int64) else \
                group_ids.to(torch.int64)
        len_k = None
        if lengths is not None:
            len_k = lengths.to(torch.float64).contiguous()
        m_k, m_code = _kernel_mask(mask)
        ms = _strides2(m_k)
        n_cols = sk.shape[1] if sk.dim() == 2 else 0
        s0 = sk.stride(0)
        s1 = sk.stride(1) if sk.dim() == 2 else 0
        code, seq, pos = _backend.cpu_module().group_advantages(
            _backend.DTYPE_CODES[acc], B, sk.data_ptr(), s0, s1, n_cols, _ptr(ids_k),
            0 if ids_k is None or ids_k.dtype == torch.int32 else 1,
            ids_k.stride(0) if ids_k is not None else 0, group_size or 0,
            _METHOD_CODES[method], _SIZE_ONE_CODES[size_one], eps, std_floor,
            int(norm_by_std), f_norm, int(whiten_biased), _ptr(len_k), _ptr(m_k), ms[0], ms[1],
            m_code, mask.shape[1] if mask is not None else 0, out.data_ptr(), _ptr(tok),
            _threads(max(B * max(n_cols, 1), tok.numel() if tok is not None else 0)),
        )
        _raise_group_status(op, code, seq, pos, names, scores, mask)
        return out if tok is None else tok
    # GPU backends: torch prepares the group layout and batch scalars; kernels do the
    # per-group reductions and the broadcast.  One device sync: the checks (infinite scores,
    # mask values, lonely samples) and the host values of the launch are read together.
    f64 = torch.float64
    dev = sk.device
    if sk.dim() == 1:
        kept = sk
        s = sk.to(f64).contiguous()
    else:  # the row sums over the positions the mask keeps (as the CPU kernel)
        if mask is not None:
            kept = torch.where(mask if mask.dtype == torch.bool else mask != 0, sk, 0.0)
        else:
            kept = sk
        s = kept.sum(-1, dtype=f64)
    checks = [torch.isinf(kept).any()] + _validate.mask_flags(mask)
    valid = s == s  # NaN marks a missing score
    host = []  # (name, 0-d tensor) read with the checks
    if group_ids is not None:
        # the groups in the order of their ids (as torch.unique), without unique's sync
        sorted_ids, order = torch.sort(group_ids.to(torch.int64), stable=True)
        gsorted = (torch.diff(sorted_ids, prepend=sorted_ids[:1]) != 0).cumsum(0)
        seg = torch.searchsorted(gsorted, torch.arange(B + 1, device=dev))
        host += [("last_group", gsorted[-1]), ("max_count", (seg[1:] - seg[:-1]).max())]

        def group_of():
            return torch.empty_like(order).scatter_(0, order, gsorted)
    else:
        order = torch.arange(B, device=dev)
        seg = torch.arange(0, B + 1, group_size, device=dev)

        def group_of():
            return order // group_size
    lonely = None
    if (size_one == "error" and method in ("grpo", "rloo", "grpo_passk")) or \
            (size_one == "self" and method == "grpo_passk"):
        gid = group_of()
        n_valid_g = torch.zeros(B, dtype=torch.int64, device=dev).index_add_(
            0, gid, valid.to(torch.int64))
        lonely = (n_valid_g == 1)[gid] & valid
        host.append(("lonely", lonely.any()))
    if method in ("gpg", "batch_std"):
        host += [("n_valid", valid.sum()), ("n_nonzero", (valid & (s != 0)).sum())]
    if method == "batch_std":  # the unbiased std of the valid scores, relative to the first
        first = valid.to(torch.uint8).argmax().reshape(1)
        d = torch.where(valid, s - s.index_select(0, first), 0.0)
        dc = torch.where(valid, d - d.sum() / valid.sum().clamp(min=1), 0.0)
        host.append(("sq_dev", (dc * dc).sum()))
    lens = None
    if method == "opo" or (method == "reinforce_pp_baseline" and (mask is not None or
                                                                    lengths is not None)):
        if lengths is not None:
            lens = lengths.to(torch.float64).contiguous()
        else:
            lens = (mask != 0).sum(-1).to(torch.float64).contiguous()
    w = None
    if method == "reinforce_pp_baseline":
        w = torch.ones_like(s) if lens is None else lens
        w = torch.where(valid, w, torch.zeros_like(w))
        host.append(("W", w.sum()))
    got = _validate.read(checks + [t for _, t in host])
    if got[0] or _validate.mask_bad(got[1:len(checks)]):
        code, seq, pos = _group_checks_torch(scores, mask)
        _raise_group_status(op, code, seq, pos, names, scores, mask)
    hv = dict(zip((k for k, _ in host), got[len(checks):]))
    if hv.get("lonely"):
        b = int(lonely.nonzero()[0, 0])
        raise ValueError(f"{op}: {names[5]} (sample {b} is alone)")
    if group_ids is not None:
        G, max_count = int(hv["last_group"]) + 1, int(hv["max_count"])
        seg = seg[:G + 1]
    else:
        G, max_count = B // group_size, group_size
    batch_std, alpha = 0.0, 1.0  # used by batch_std / gpg only: constants for the others
    if method in ("gpg", "batch_std"):
        n_valid = int(hv["n_valid"])
        alpha = n_valid / max(int(hv["n_nonzero"]), 1)
        if method == "batch_std" and n_valid >= 2:
            batch_std = math.sqrt(hv["sq_dev"] / (n_valid - 1))
    x = torch.zeros(B, dtype=torch.float64, device=dev)  # samples without a score: 0
    params = dict(method=_METHOD_CODES[method], size_one=_SIZE_ONE_CODES[size_one], eps=eps,
                  std_floor=std_floor, norm_by_std=bool(norm_by_std), f_norm=f_norm,
                  batch_std=batch_std, alpha=alpha)
    if backend == "cuda":
        with _backend.cuda_launch(dev) as stream:
            _backend.cuda_module().group_stats(
                B, s.data_ptr(), order.data_ptr(), seg.data_ptr(), G, _ptr(lens),
                params["method"], params["size_one"], eps, std_floor, int(norm_by_std), f_norm,
                batch_std, alpha, x.data_ptr(), stream,
            )
    else:
        with _backend.device_guard(dev):
            _backend.triton_kernels("advantage").group_stats(s, order, seg, lens, x, max_count,
                                                             **params)
    if method == "reinforce_pp_baseline":
        W = hv["W"]
        if (W <= 0) if whiten_biased else (W <= 1):
            raise ValueError(f"{op}: {names[6]}")
        mean = (w * torch.where(valid, x, torch.zeros_like(x))).sum() / W
        m2 = (w * torch.where(valid, x - mean, torch.zeros_like(x)) ** 2).sum()
        if whiten_biased:
            rstd = torch.rsqrt(torch.clamp(m2 / W, min=_WHITEN_EPS))
        else:
            rstd = torch.rsqrt(m2 / (W - 1) + _WHITEN_EPS)
        x = (x - mean) * rstd
        x = torch.where(valid, x, torch.zeros_like(x))
    out.copy_(x)
    if tok is None:
        return out
    if backend == "cuda":
        m_k = (mask != 0).view(torch.uint8)
        ms = _strides2(m_k)
        with _backend.cuda_launch(dev) as stream:
            _backend.cuda_module().broadcast_rows(
                _backend.DTYPE_CODES[acc], B, mask.shape[1], out.data_ptr(), m_k.data_ptr(),
                ms[0], ms[1], tok.data_ptr(), stream,
            )
    else:
        with _backend.device_guard(dev):
            _backend.triton_kernels("advantage").broadcast_rows(out, mask, tok)
    return tok


def _group_checks_torch(scores, mask):
    """(code, b, pos): infinite scores (code 4; [B, T] scores only where the mask keeps the
    position), mask not 0/1 (code 1)."""
    inf = torch.isinf(scores)
    if scores.dim() == 2 and mask is not None:
        inf = inf & (mask != 0)
    if bool(inf.any()):
        idx = int(inf.reshape(-1).nonzero()[0, 0])
        if scores.dim() == 2:
            return 4, idx // scores.shape[1], idx % scores.shape[1]
        return 4, idx, 0
    if mask is not None:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            idx = int(bad.reshape(-1).nonzero()[0, 0])
            return 1, idx // mask.shape[1], idx % mask.shape[1]
    return 0, 0, 0


def _raise_group_status(op, code, b, pos, names, scores, mask):
    if code == 0:
        return
    if code == 4:
        val = scores[b].item() if scores.dim() == 1 else scores[b, pos].item()
        where = f"entry {b}" if scores.dim() == 1 else f"position ({b}, {pos})"
        raise ValueError(f"{op}: scores must not be infinite (NaN marks a missing score); "
                         f"{where} holds {val}")
    if code == 1:
        raise ValueError(f"{op}: mask must hold only 0 and 1 (or be bool); position ({b}, {pos}) "
                         f"holds {mask[b, pos].item()}")
    if code == 5:
        raise ValueError(f"{op}: {names[5]} (sample {b} is alone)")
    raise ValueError(f"{op}: {names[code]}")


@_custom_op("rlfuse::group_advantages")
def _group_op(
    scores: torch.Tensor,
    group_ids: Optional[torch.Tensor],
    group_size: int,
    method: str,
    mask: Optional[torch.Tensor],
    lengths: Optional[torch.Tensor],
    eps: float,
    std_floor: float,
    semantics: str,
    norm_by_std: bool,
    f_norm: float,
    backend: str,
) -> torch.Tensor:
    _, size_one, whitening = _SEMANTICS[semantics]
    return _group_impl(scores, group_ids, group_size if group_size > 0 else None, method, mask,
                       lengths, eps, std_floor, size_one, whitening == "biased", norm_by_std,
                       f_norm, backend, semantics)


@_group_op.register_fake
def _(scores, group_ids, group_size, method, mask, lengths, eps, std_floor, semantics,
      norm_by_std, f_norm, backend):
    acc = _acc_dtype(scores)
    shape = mask.shape if mask is not None else (scores.shape[0],)
    return scores.new_empty(shape, dtype=acc)


def group_advantages(
    scores: torch.Tensor,
    *,
    group_ids: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    method: str = "grpo",
    mask: Optional[torch.Tensor] = None,
    lengths: Optional[torch.Tensor] = None,
    semantics: str = "rlfuse",
    eps: Optional[float] = None,
    std_floor: Optional[float] = None,
    norm_by_std: bool = True,
    f_norm: float = 1.0,
    backend: Optional[str] = None,
):
    """Outcome advantages from per-sample scores and prompt groups.

    Args:
        scores: ``[B]`` sequence scores, or ``[B, T]`` token-level rewards summed over T
            (as verl).  NaN marks a missing score (TRL's ``None``): it is left out of every
            statistic and its advantage is 0.  ±inf is an error.
        group_ids: ``[B]`` integer group of each sample (any values, any order, groups of
            different sizes); or
        group_size: contiguous blocks of this many samples (must divide B).
        method: one of ``GROUP_METHODS`` (see the module docstring for the formulas).
        mask: ``[B, T]`` 0/1: return the advantages broadcast over the valid tokens (0
            elsewhere); also gives the response lengths for ``opo`` and the token weights
            of ``reinforce_pp_baseline``.
        lengths: ``[B]`` response lengths (override the mask's row sums).
        semantics: ``"rlfuse"`` (default), ``"verl"``, ``"trl"`` or ``"openrlhf"``: the
            default ``eps`` (1e-6 / 1e-6 / 1e-4 / 1e-9), groups with a single valid score
            (0 / verl's mean 0 and std 1 / 0 / error for grpo, rloo and grpo_passk) and
            the whitening of ``reinforce_pp_baseline`` (OpenRLHF: biased variance).
        eps: added to the standard deviation (grpo, batch_std, grpo_passk); default by
            semantics.
        std_floor: lower bound of the standard deviation before ``eps`` is added.
        norm_by_std: grpo_passk divides by the group std (verl's default).
        f_norm: gpg's normaliser.
        backend: ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[B]`` advantages, or ``[B, T]`` with ``mask``; float32 (float64 for float64 scores).
    """
    op = "group_advantages"
    _validate.float_tensor(op, "scores", scores)
    if scores.dim() not in (1, 2):
        raise ValueError(f"{op}: scores must be [B] or [B, T], got shape {tuple(scores.shape)}")
    B = scores.shape[0]
    method = _choice(op, "method", method, GROUP_METHODS)
    semantics = _choice(op, "semantics", semantics, _SEMANTICS)
    if (group_ids is None) == (group_size is None):
        raise ValueError(f"{op}: pass exactly one of group_ids and group_size")
    if group_ids is not None:
        _validate.int_tensor(op, "group_ids", group_ids)
        _validate.shape_equals(op, "group_ids", group_ids, (B,), "one id per sample")
        _validate.same_device(op, "scores", scores, group_ids=group_ids)
        gs = 0
    else:
        gs = _validate.integer(op, "group_size", group_size)
        if gs < 1:
            raise ValueError(f"{op}: group_size must be >= 1 (groups cannot be empty), got {gs}")
        if B % gs != 0:
            raise ValueError(f"{op}: group_size={gs} must divide the number of samples B={B}")
    if mask is not None:
        _mask_tensor(op, "mask", mask)
        if mask.dim() != 2 or mask.shape[0] != B:
            raise ValueError(f"{op}: mask must have shape [B, T] = [{B}, T], got "
                             f"{tuple(mask.shape)}")
        if scores.dim() == 2:
            _validate.shape_equals(op, "mask", mask, scores.shape, "scores.shape")
        _validate.same_device(op, "scores", scores, mask=mask)
    if lengths is not None:
        _validate.tensor(op, "lengths", lengths)
        if lengths.is_complex() or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: lengths must be an integer or floating tensor, got "
                            f"{lengths.dtype}")
        _validate.shape_equals(op, "lengths", lengths, (B,), "one length per sample")
        _validate.same_device(op, "scores", scores, lengths=lengths)
        if B and not bool((torch.isfinite(lengths.double()) & (lengths >= 0)).all()):
            raise ValueError(f"{op}: lengths must be finite and >= 0")
    if method == "opo" and mask is None and lengths is None:
        raise ValueError(f"{op}: method 'opo' weights the baseline by response length: pass "
                         "mask or lengths")
    default_eps = _SEMANTICS[semantics][0]
    eps = default_eps if eps is None else _finite_float(op, "eps", eps, minimum=0.0)
    floor = -1.0 if std_floor is None else _finite_float(op, "std_floor", std_floor, minimum=0.0)
    norm_by_std = _bool(op, "norm_by_std", norm_by_std)
    f_norm = _finite_float(op, "f_norm", f_norm, minimum=0.0, strict=True)
    chosen = _backend.resolve(backend, scores.device, op)
    return _call(
        _group_op,
        scores.detach(), None if group_ids is None else group_ids.detach(), gs, method,
        None if mask is None else mask.detach(),
        None if lengths is None else lengths.detach(), eps, floor, semantics, norm_by_std,
        f_norm, chosen,
    )


# ======================================================================================
# Token rewards
# ======================================================================================
def _token_rewards_impl(scores, mask, kl, cu_seqlens, T, kl_coef, backend):
    op = "token_rewards"
    acc = _acc_dtype(scores, kl)
    packed = cu_seqlens is not None
    if packed:
        N = int(cu_seqlens[-1]) if mask is None and kl is None else \
            (mask if mask is not None else kl).numel()
        _check_cu_values(op, cu_seqlens, N)
        shape = (N,)
        S = cu_seqlens.numel() - 1
    else:
        shape = (scores.shape[0], T)
        S = scores.shape[0]
    out = _empty(shape, dtype=acc, device=scores.device)
    names = {1: "mask", 2: "kl", 4: "scores"}
    tensors = {1: mask, 2: kl, 4: scores}
    if backend == "cpu":
        sk, kk = _kernel_value(scores, acc), _kernel_value(kl, acc)
        m_k, m_code = _kernel_mask(mask)
        cu_k = None
        if packed:
            cu_k = cu_seqlens if cu_seqlens.dtype in (torch.int32, torch.int64) else \
                cu_seqlens.to(torch.int64)
            cu_k = cu_k.contiguous()
        ks, ms = _strides2(kk), _strides2(m_k)
        if out.numel() or S:
            code, seq, pos = _backend.cpu_module().token_rewards(
                _backend.DTYPE_CODES[acc], S, 0 if packed else T, _ptr(cu_k),
                0 if cu_k is None or cu_k.dtype == torch.int32 else 1, sk.data_ptr(),
                sk.stride(0), _ptr(kk), ks[0], ks[1], _ptr(m_k), ms[0], ms[1], m_code,
                kl_coef, out.data_ptr(), _threads(out.numel()),
            )
            _raise_status(op, code, seq, pos, names, tensors, cu_seqlens)
        return out
    code, seq, pos = _first_bad_torch(mask, [(2, kl)], cu_seqlens)
    if code == 0 and not bool(torch.isfinite(scores).all()):
        code, seq, pos = 4, int((~torch.isfinite(scores)).nonzero()[0, 0]), 0
    _raise_status(op, code, seq, pos, names, tensors, cu_seqlens)
    if backend == "torch":
        out.copy_(token_rewards_reference(scores.cpu(), None if mask is None else mask.cpu(),
                                          kl=None if kl is None else kl.cpu(), kl_coef=kl_coef,
                                          cu_seqlens=None if cu_seqlens is None else
                                          cu_seqlens.cpu(), T=T))
        return out
    if out.numel() == 0:
        return out
    sk, kk = _kernel_value(scores, acc), _kernel_value(kl, acc)
    cu_k = None if not packed else cu_seqlens.to(torch.int64).contiguous()
    if backend == "cuda":
        m_k = None if mask is None else (mask != 0).view(torch.uint8)
        ks, ms = _strides2(kk), _strides2(m_k)
        with _backend.cuda_launch(out.device) as stream:
            _backend.cuda_module().token_rewards(
                _backend.DTYPE_CODES[acc], S, 0 if packed else T, _ptr(cu_k), sk.data_ptr(),
                sk.stride(0), _ptr(kk), ks[0], ks[1], _ptr(m_k), ms[0], ms[1], kl_coef,
                out.data_ptr(), stream,
            )
    else:
        with _backend.device_guard(out.device):
            _backend.triton_kernels("advantage").token_rewards(sk, mask, kk, cu_k, S, T,
                                                               kl_coef, out)
    return out


@_custom_op("rlfuse::token_rewards")
def _token_rewards_op(
    scores: torch.Tensor,
    mask: Optional[torch.Tensor],
    kl: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    T: int,
    kl_coef: float,
    backend: str,
) -> torch.Tensor:
    return _token_rewards_impl(scores, mask, kl, cu_seqlens, T, kl_coef, backend)


@_token_rewards_op.register_fake
def _(scores, mask, kl, cu_seqlens, T, kl_coef, backend):
    acc = _acc_dtype(scores, kl)
    if cu_seqlens is not None:
        ref = mask if mask is not None else kl
        if ref is None:
            n = torch.library.get_ctx().new_dynamic_size()
            return scores.new_empty((n,), dtype=acc)
        return scores.new_empty(ref.shape, dtype=acc)
    return scores.new_empty((scores.shape[0], T), dtype=acc)


def token_rewards(
    scores: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
):
    """PPO reward shaping: each sequence's score on its last valid token, minus
    ``kl_coef * kl`` on every valid token (verl ``apply_kl_penalty``, OpenRLHF
    ``compute_reward``):  ``r_t = m_t * (score * [t == last valid] - kl_coef * kl_t)``.

    Args:
        scores: ``[B]`` (padded) or ``[S]`` (packed) finite sequence scores.
        mask: ``[B, T]`` / ``[N]`` 0/1; ``None`` = all valid (then ``kl`` gives T, or the
            packed length comes from ``cu_seqlens``).
        kl: per-token KL estimate (e.g. ``logp - ref_logp``) of the same shape; ``None`` = 0.
        kl_coef: finite coefficient.
        cu_seqlens: ``[S + 1]`` offsets for packed inputs.

    Returns float32 (float64 for float64 inputs) shaped like the mask; a sequence without
    valid tokens gets only zeros (its score is dropped).
    """
    op = "token_rewards"
    _validate.float_tensor(op, "scores", scores)
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D (one per sequence), got shape "
                         f"{tuple(scores.shape)}")
    kl_coef = _finite_float(op, "kl_coef", kl_coef)
    if mask is not None:
        _mask_tensor(op, "mask", mask)
    if kl is not None:
        _validate.float_tensor(op, "kl", kl)
    ref = mask if mask is not None else kl
    if cu_seqlens is not None:
        _cu_tensor(op, cu_seqlens)
        if scores.shape[0] != cu_seqlens.numel() - 1:
            raise ValueError(f"{op}: scores must have one entry per packed sequence "
                             f"({cu_seqlens.numel() - 1}), got {scores.shape[0]}")
        for name, t in (("mask", mask), ("kl", kl)):
            if t is not None and t.dim() != 1:
                raise ValueError(f"{op}: with cu_seqlens, {name} must be 1-D [N], got shape "
                                 f"{tuple(t.shape)}")
        T = 0
    else:
        if ref is None:
            raise ValueError(f"{op}: pass mask (or kl) to give the [B, T] shape")
        if ref.dim() != 2 or ref.shape[0] != scores.shape[0]:
            raise ValueError(f"{op}: {'mask' if mask is not None else 'kl'} must have shape "
                             f"[B, T] with B = {scores.shape[0]}, got {tuple(ref.shape)}")
        T = ref.shape[1]
    if mask is not None and kl is not None:
        _validate.shape_equals(op, "kl", kl, mask.shape, "mask.shape")
    _validate.same_device(op, "scores", scores, mask=mask, kl=kl, cu_seqlens=cu_seqlens)
    chosen = _backend.resolve(backend, scores.device, op)
    return _call(_token_rewards_op, scores.detach(), None if mask is None else mask.detach(),
                 None if kl is None else kl.detach(), cu_seqlens, T, kl_coef, chosen)
