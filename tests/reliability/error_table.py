"""Every input check of the public ops, as data: (op, condition, exception, a call that
triggers it).  ``docs/errors.md`` is generated from this table (the message column is the
message the call actually raises); ``test_errors.py`` triggers every row, checks that the doc
is current, and that every ``raise`` in the ops' source is reached by some row.

Regenerate the doc after changing a check or a message:

    .venv/bin/python -m tests.reliability.error_table --write
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import sys
from typing import Callable

import torch

from rlfuse import _backend
from rlfuse.ops import (
    discounted_returns,
    gae,
    group_advantages,
    kl_penalty,
    linear_token_logprobs,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    policy_loss_reference,
    preference_logps,
    preference_loss,
    preference_loss_from_hidden,
    reduce_sequences,
    sequence_logprobs,
    token_logprobs,
    token_rewards,
    value_loss,
)
from rlfuse.search import Phases, RecurrentOutput, Root, Tree, gumbel_search, puct_search
from rlfuse.search.tree import TensorStore

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "errors.md"
BEGIN, END = "<!-- BEGIN GENERATED TABLE -->", "<!-- END GENERATED TABLE -->"


@dataclasses.dataclass(frozen=True)
class Row:
    op: str
    condition: str
    exc: type
    call: Callable  # call(backend) raises; backend is None for argument checks
    data: bool = False  # a check of tensor values: run on every backend, same message
    prefix: str | None = None  # how the message starts, when not with "<op>:"
    backends: tuple | None = None  # the backends a data check runs on, when not all of them


# ---------------------------------------------------------------------------- inputs
def F(*shape, dtype=torch.float32):
    """Deterministic float values (messages quote them)."""
    n = 1
    for s in shape:
        n *= s
    return torch.linspace(-1.0, 1.0, max(n, 1), dtype=dtype)[:n].reshape(shape)


def I(*shape, high=5):  # noqa: E743
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n) % high).reshape(shape)


META = torch.device("meta")
NAN, INF = float("nan"), float("inf")


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _no_cpu_extension(fn):
    def call(_b):
        with _patched(_backend, "_EXTENSIONS",
                      {**_backend._EXTENSIONS, "_C": (None, "ImportError: (simulated)")}):
            fn()
    return call


def _no_triton(fn):
    def call(_b):
        with _patched(_backend, "_TRITON_FOUND", False):
            fn()
    return call


def _triton_not_interpreted(fn):
    def call(_b):
        with _env("TRITON_INTERPRET", "0"):
            fn()
    return call


def _lp(**kw):
    return token_logprobs(F(2, 3, 5), I(2, 3), **kw)


def _llp(**kw):
    return linear_token_logprobs(F(2, 3, 4), F(5, 4), I(2, 3), **kw)


def _gae(r=None, v=None, m=None, **kw):
    kw = {"gamma": 0.9, "lam": 0.95, **kw}
    return gae(F(2, 3) if r is None else r, F(2, 3) if v is None else v, m, **kw)


def _with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


def _grp(scores=None, **kw):
    kw = {"group_size": 2, **kw} if "group_ids" not in kw else kw
    return group_advantages(F(4) if scores is None else scores, **kw)


def _tr(scores=None, mask=None, **kw):
    return token_rewards(F(2) if scores is None else scores,
                         torch.ones(2, 3) if mask is None and "cu_seqlens" not in kw else mask,
                         **kw)


def _pl(logp=None, old=None, adv=None, mask=None, **kw):
    return policy_loss(F(2, 3) if logp is None else logp, F(2, 3) if old is None else old,
                       F(2, 3) if adv is None else adv,
                       torch.ones(2, 3) if mask is None else mask, **kw)


def _vl(values=None, old=None, returns=None, mask=None, **kw):
    return value_loss(F(2, 3) if values is None else values, F(2, 3) if old is None else old,
                      F(2, 3) if returns is None else returns,
                      torch.ones(2, 3) if mask is None else mask, **kw)


def _kl(**kw):
    return kl_penalty(F(2, 3), F(2, 3), **kw)


def _seq(token_ids=None, **kw):
    return sequence_logprobs(I(2, 3) if token_ids is None else token_ids, **kw)


_BACKEND_ROWS = [
    Row("every op", "`backend` not one of cpu, cuda, triton, torch", ValueError,
        lambda b: _lp(backend="numpy")),
    Row("every op", "`backend='cuda'` with CPU tensors", RuntimeError,
        lambda b: _lp(backend="cuda")),
    Row("every op", "`backend='cpu'` with tensors on another device", RuntimeError,
        lambda b: token_logprobs(F(2, 5).to(META), I(2).to(META), backend="cpu")),
    Row("every op", "`backend='cpu'` when the extension `rlfuse._C` failed to import",
        RuntimeError, _no_cpu_extension(lambda: _lp(backend="cpu"))),
    Row("every op", "`backend='triton'` when triton is not installed", RuntimeError,
        _no_triton(lambda: _lp(backend="triton"))),
    Row("every op", "`backend='triton'` with CPU tensors and `TRITON_INTERPRET` unset",
        RuntimeError, _triton_not_interpreted(lambda: _lp(backend="triton"))),
]

_LOGPROB_ROWS = [
    Row("token_logprobs", "`logits` not a tensor", TypeError,
        lambda b: token_logprobs([[0.0]], I(1))),
    Row("token_logprobs", "`logits` not floating", TypeError,
        lambda b: token_logprobs(I(2, 5), I(2))),
    Row("token_logprobs", "`token_ids` not integer", TypeError,
        lambda b: token_logprobs(F(2, 5), F(2))),
    Row("token_logprobs", "`logits` 0-d", ValueError,
        lambda b: token_logprobs(torch.tensor(1.0), torch.tensor(0))),
    Row("token_logprobs", "empty vocabulary (`logits.size(-1) == 0`)", ValueError,
        lambda b: token_logprobs(F(2, 0), I(2))),
    Row("token_logprobs", "`token_ids.shape != logits.shape[:-1]`", ValueError,
        lambda b: token_logprobs(F(2, 3, 5), I(2, 4))),
    Row("token_logprobs", "tensors on different devices", ValueError,
        lambda b: token_logprobs(F(2, 5), I(2).to(META))),
    Row("token_logprobs", "`temperature` not a real number", TypeError,
        lambda b: _lp(temperature="1")),
    Row("token_logprobs", "`temperature` <= 0, NaN or inf", ValueError,
        lambda b: _lp(temperature=0.0)),
    Row("token_logprobs", "`temperature` subnormal (1 / temperature overflows)", ValueError,
        lambda b: _lp(temperature=1e-310)),
    Row("token_logprobs", "`ignore_index` not an int", TypeError,
        lambda b: _lp(ignore_index=1.5)),
    Row("token_logprobs", "`return_entropy` not a bool", TypeError,
        lambda b: _lp(return_entropy=1)),
    Row("token_logprobs", "a token id outside [0, V) that is not `ignore_index`", ValueError,
        lambda b: token_logprobs(F(2, 3, 5), _with_value(I(2, 3), (1, 2), 5), backend=b),
        data=True),
    Row("linear_token_logprobs", "`weight` not a tensor", TypeError,
        lambda b: linear_token_logprobs(F(2, 4), "w", I(2))),
    Row("linear_token_logprobs", "`weight.dtype != hidden.dtype`", TypeError,
        lambda b: linear_token_logprobs(F(2, 4), F(5, 4, dtype=torch.float64), I(2))),
    Row("linear_token_logprobs", "`hidden` 0-d", ValueError,
        lambda b: linear_token_logprobs(torch.tensor(1.0), F(5, 1), torch.tensor(0))),
    Row("linear_token_logprobs", "`weight` not 2-D", ValueError,
        lambda b: linear_token_logprobs(F(2, 4), F(4), I(2))),
    Row("linear_token_logprobs", "`weight.size(1) != hidden.size(-1)`", ValueError,
        lambda b: linear_token_logprobs(F(2, 4), F(5, 3), I(2))),
    Row("linear_token_logprobs", "empty hidden size (H = 0)", ValueError,
        lambda b: linear_token_logprobs(F(2, 0), F(5, 0), I(2))),
    Row("linear_token_logprobs", "empty vocabulary (V = 0)", ValueError,
        lambda b: linear_token_logprobs(F(2, 4), F(0, 4), I(2))),
    Row("linear_token_logprobs", "`bias` not a tensor", TypeError, lambda b: _llp(bias=1.0)),
    Row("linear_token_logprobs", "`bias.dtype != hidden.dtype`", TypeError,
        lambda b: _llp(bias=F(5, dtype=torch.float64))),
    Row("linear_token_logprobs", "`bias.shape != [V]`", ValueError, lambda b: _llp(bias=F(4))),
    Row("linear_token_logprobs", "`return_entropy` not a bool", TypeError,
        lambda b: _llp(return_entropy="yes")),
    Row("linear_token_logprobs", "`fp32_grad_accum` not a bool", TypeError,
        lambda b: _llp(fp32_grad_accum=None)),
    Row("linear_token_logprobs", "`chunk_size` not an int", TypeError,
        lambda b: _llp(chunk_size=2.5)),
    Row("linear_token_logprobs", "`chunk_size < 1`", ValueError, lambda b: _llp(chunk_size=0)),
    Row("linear_token_logprobs", "a token id outside [0, V) that is not `ignore_index`",
        ValueError,
        lambda b: linear_token_logprobs(F(2, 3, 4), F(5, 4), _with_value(I(2, 3), (1, 0), -3),
                                        chunk_size=2, backend=b),
        data=True),
    Row("sequence_logprobs", "padded `token_ids` not 2-D", ValueError,
        lambda b: sequence_logprobs(I(6), logits=F(6, 5))),
    Row("sequence_logprobs", "packed `token_ids` (with `cu_seqlens`) not [N] or [1, N]",
        ValueError,
        lambda b: sequence_logprobs(I(2, 3), logits=F(2, 3, 5), cu_seqlens=torch.tensor([0, 6]))),
    Row("sequence_logprobs", "neither or both of `logits=` and `hidden=`", ValueError,
        lambda b: _seq()),
    Row("sequence_logprobs", "`weight=` / `bias=` given with `logits=`", ValueError,
        lambda b: _seq(logits=F(2, 3, 5), weight=F(5, 4))),
    Row("sequence_logprobs", "`chunk_size=` given with `logits=`", ValueError,
        lambda b: _seq(logits=F(2, 3, 5), chunk_size=4)),
    Row("sequence_logprobs", "`hidden=` without `weight=`", ValueError,
        lambda b: _seq(hidden=F(2, 3, 4))),
    Row("sequence_logprobs", "`mask` complex", TypeError,
        lambda b: _seq(logits=F(2, 3, 5), mask=torch.ones(2, 3, dtype=torch.complex64))),
    Row("sequence_logprobs", "`mask` on another device than the tokens", ValueError,
        lambda b: _seq(logits=F(2, 3, 5), mask=torch.ones(2, 3, device=META))),
    Row("sequence_logprobs", "`cu_seqlens` not 1-D with >= 2 entries", ValueError,
        lambda b: sequence_logprobs(I(6), logits=F(6, 5), cu_seqlens=torch.tensor([0]))),
    Row("sequence_logprobs", "`cu_seqlens` on another device than the tokens", ValueError,
        lambda b: sequence_logprobs(I(6), logits=F(6, 5),
                                    cu_seqlens=torch.tensor([0, 6], device=META))),
    Row("sequence_logprobs", "`cu_seqlens` not starting at 0, decreasing, or not ending at N",
        ValueError,
        lambda b: sequence_logprobs(I(6), logits=F(6, 5), cu_seqlens=torch.tensor([0, 4, 2, 6]))),
    Row("sequence_logprobs", "a token id outside [0, V) that is not `ignore_index` at a "
        "masked position (masked rows are not computed; their ids are still checked)",
        ValueError,
        lambda b: _seq(logits=F(2, 3, 5), token_ids=_with_value(I(2, 3), (1, 2), 7),
                       mask=_with_value(torch.ones(2, 3), (1, 2), 0), backend=b),
        data=True, prefix="token_logprobs:"),
    Row("reduce_sequences", "padded `values` not 2-D", ValueError,
        lambda b: reduce_sequences(F(6))),
    Row("reduce_sequences", "packed `values` (with `cu_seqlens`) not [N] or [1, N]", ValueError,
        lambda b: reduce_sequences(F(2, 3), cu_seqlens=torch.tensor([0, 6]))),
]

_ADVANTAGE_ROWS = [
    Row("gae", "`rewards` not 2-D (padded) or not 1-D with `cu_seqlens`", ValueError,
        lambda b: _gae(F(6), F(6))),
    Row("gae", "with `cu_seqlens`, `rewards` not 1-D", ValueError,
        lambda b: _gae(cu_seqlens=torch.tensor([0, 6]))),
    Row("gae", "`cu_seqlens` not 1-D or empty", ValueError,
        lambda b: _gae(F(6), F(6), cu_seqlens=torch.zeros(0, dtype=torch.int64))),
    Row("gae", "`mask` complex", TypeError,
        lambda b: _gae(m=torch.ones(2, 3, dtype=torch.complex64))),
    Row("gae", "`values` is None", TypeError, lambda b: gae(F(2, 3), None, gamma=0.9, lam=0.9)),
    Row("gae", "`gamma` / `lam` not a real number", TypeError, lambda b: _gae(gamma="0.9")),
    Row("gae", "`gamma` / `lam` outside [0, 1] (or NaN)", ValueError, lambda b: _gae(lam=1.5)),
    Row("gae", "`semantics` not a str", TypeError, lambda b: _gae(semantics=1)),
    Row("gae", "`semantics` unknown", ValueError, lambda b: _gae(semantics="gae")),
    Row("gae", "`whiten` not a bool", TypeError, lambda b: _gae(whiten=1)),
    Row("gae", "`last_values` not one per sequence", ValueError,
        lambda b: _gae(last_values=F(3))),
    Row("gae", "`cu_seqlens[0] != 0`", ValueError,
        lambda b: _gae(F(6), F(6), cu_seqlens=torch.tensor([1, 6]), backend=b), data=True),
    Row("gae", "`cu_seqlens` decreasing", ValueError,
        lambda b: _gae(F(6), F(6), cu_seqlens=torch.tensor([0, 4, 2, 6]), backend=b), data=True),
    Row("gae", "`cu_seqlens[-1] != N`", ValueError,
        lambda b: _gae(F(6), F(6), cu_seqlens=torch.tensor([0, 2, 5]), backend=b), data=True),
    Row("gae", "a `mask` value other than 0 / 1", ValueError,
        lambda b: _gae(m=_with_value(torch.ones(2, 3), (1, 1), 2.0), backend=b), data=True),
    Row("gae", "`rewards` / `values` NaN or inf at a valid position", ValueError,
        lambda b: _gae(v=_with_value(F(2, 3), (0, 2), INF), backend=b), data=True),
    Row("gae", "`last_values` NaN or inf", ValueError,
        lambda b: _gae(last_values=torch.tensor([0.0, NAN]), backend=b), data=True),
    Row("gae", "`whiten=True` and fewer than 2 valid positions", ValueError,
        lambda b: _gae(m=torch.tensor([[0, 1, 0], [0, 0, 0]]), whiten=True, backend=b),
        data=True),
    Row("discounted_returns", "`gamma` outside [0, 1]", ValueError,
        lambda b: discounted_returns(F(2, 3), None, 1.5)),
    Row("masked_mean", "`x` not floating", TypeError, lambda b: masked_mean(I(3))),
    Row("masked_mean", "`mask.shape != x.shape`", ValueError,
        lambda b: masked_mean(F(3), torch.ones(4))),
    Row("masked_mean", "`dim` not an int", TypeError, lambda b: masked_mean(F(3, 2), None, 1.0)),
    Row("masked_mean", "`dim` out of range", ValueError, lambda b: masked_mean(F(3, 2), None, 2)),
    Row("masked_mean", "`dim=None` and the mask selects nothing", ValueError,
        lambda b: masked_mean(F(3), torch.zeros(3), backend=b), data=True),
    Row("masked_mean", "`x` NaN or inf at a valid position", ValueError,
        lambda b: masked_mean(_with_value(F(2, 3), (1, 0), NAN), backend=b), data=True),
    Row("masked_var", "`dim=None`, `unbiased=True` and the mask selects one element",
        ValueError, lambda b: masked_var(F(3), torch.tensor([0, 1, 0]), backend=b), data=True),
    Row("masked_whiten", "`shift_mean` / `unbiased` not a bool", TypeError,
        lambda b: masked_whiten(F(3), None, 1)),
    Row("masked_whiten", "`eps` not a real number", TypeError,
        lambda b: masked_whiten(F(3), eps="1e-8")),
    Row("masked_whiten", "`eps` NaN or inf", ValueError, lambda b: masked_whiten(F(3), eps=INF)),
    Row("masked_whiten", "`eps` < 0", ValueError, lambda b: masked_whiten(F(3), eps=-1.0)),
    Row("masked_whiten", "fewer than 2 valid elements (1 with `unbiased=False`)", ValueError,
        lambda b: masked_whiten(F(4), torch.tensor([1, 0, 0, 0]), backend=b), data=True),
    Row("group_advantages", "`scores` not [B] or [B, T]", ValueError,
        lambda b: _grp(F(2, 2, 2))),
    Row("group_advantages", "`method` unknown", ValueError, lambda b: _grp(method="ppo")),
    Row("group_advantages", "neither or both of `group_ids` and `group_size`", ValueError,
        lambda b: group_advantages(F(4))),
    Row("group_advantages", "`group_ids` not one integer per sample", ValueError,
        lambda b: _grp(group_ids=I(3))),
    Row("group_advantages", "`group_size` not an int", TypeError,
        lambda b: _grp(group_size=2.0)),
    Row("group_advantages", "`group_size < 1`", ValueError, lambda b: _grp(group_size=0)),
    Row("group_advantages", "`group_size` does not divide B", ValueError,
        lambda b: _grp(group_size=3)),
    Row("group_advantages", "`mask` not [B, T]", ValueError, lambda b: _grp(mask=torch.ones(4))),
    Row("group_advantages", "`lengths` bool or complex", TypeError,
        lambda b: _grp(lengths=torch.ones(4, dtype=torch.bool))),
    Row("group_advantages", "`lengths` negative or not finite", ValueError,
        lambda b: _grp(lengths=torch.tensor([1.0, -1.0, 2.0, 2.0]))),
    Row("group_advantages", "`method='opo'` without `mask` or `lengths`", ValueError,
        lambda b: _grp(method="opo")),
    Row("group_advantages", "`f_norm <= 0`", ValueError, lambda b: _grp(f_norm=0.0)),
    Row("group_advantages", "`scores` +-inf (NaN marks a missing score)", ValueError,
        lambda b: _grp(_with_value(F(4), 2, -INF), backend=b), data=True),
    Row("group_advantages", "a `mask` value other than 0 / 1", ValueError,
        lambda b: _grp(mask=_with_value(torch.ones(4, 3), (2, 1), 3.0), backend=b), data=True),
    Row("group_advantages", "a group with one valid score, for grpo / rloo / grpo_passk with "
        "`semantics='openrlhf'`", ValueError,
        lambda b: _grp(torch.tensor([1.0, NAN, 0.5, 2.0]), semantics="openrlhf", backend=b),
        data=True),
    Row("group_advantages", "a group with one valid score, for grpo_passk with "
        "`semantics='verl'`", ValueError,
        lambda b: _grp(torch.tensor([1.0, 0.0, NAN, 2.0]), method="grpo_passk",
                       semantics="verl", backend=b), data=True),
    Row("group_advantages", "`method='reinforce_pp_baseline'` with fewer than 2 valid tokens "
        "(1 for `'openrlhf'`)", ValueError,
        lambda b: _grp(method="reinforce_pp_baseline",
                       mask=torch.tensor([[1, 0], [0, 0], [0, 0], [0, 0]]), backend=b),
        data=True),
    Row("token_rewards", "`scores` not 1-D", ValueError, lambda b: _tr(F(2, 1))),
    Row("token_rewards", "`kl_coef` NaN or inf", ValueError, lambda b: _tr(kl_coef=INF)),
    Row("token_rewards", "with `cu_seqlens`, not one score per sequence", ValueError,
        lambda b: _tr(F(3), cu_seqlens=torch.tensor([0, 2, 4]))),
    Row("token_rewards", "with `cu_seqlens`, `mask` / `kl` not 1-D", ValueError,
        lambda b: _tr(F(1), torch.ones(2, 2), cu_seqlens=torch.tensor([0, 4]))),
    Row("token_rewards", "padded and neither `mask` nor `kl` given", ValueError,
        lambda b: token_rewards(F(2))),
    Row("token_rewards", "`mask` (or `kl`) not [B, T]", ValueError,
        lambda b: _tr(mask=torch.ones(3, 4))),
    Row("token_rewards", "`kl.shape != mask.shape`", ValueError,
        lambda b: _tr(kl=F(2, 4))),
    Row("token_rewards", "`scores` NaN or inf", ValueError,
        lambda b: _tr(torch.tensor([1.0, NAN]), backend=b), data=True),
    Row("token_rewards", "`kl` NaN or inf at a valid position", ValueError,
        lambda b: _tr(kl=_with_value(F(2, 3), (1, 2), NAN), kl_coef=0.1, backend=b), data=True),
]

_POLICY_ROWS = [
    Row("kl_penalty", "`logp` / `ref_logp` not floating", TypeError,
        lambda b: kl_penalty(F(2, 3), I(2, 3))),
    Row("kl_penalty", "`ref_logp.shape != logp.shape`", ValueError,
        lambda b: kl_penalty(F(2, 3), F(3, 2))),
    Row("kl_penalty", "`kind` not a str", TypeError, lambda b: _kl(kind=3)),
    Row("kl_penalty", "`kind` unknown", ValueError, lambda b: _kl(kind="k4")),
    Row("kl_penalty", "`kind` that the semantics lacks", ValueError,
        lambda b: _kl(kind="k3+", semantics="trl")),
    Row("kl_penalty", "`semantics` not a str", TypeError, lambda b: _kl(semantics=None)),
    Row("kl_penalty", "`semantics` unknown", ValueError, lambda b: _kl(semantics="trlx")),
    Row("kl_penalty", "`clamp` not a real number", TypeError, lambda b: _kl(clamp="10")),
    Row("kl_penalty", "`clamp` <= 0 or not finite", ValueError, lambda b: _kl(clamp=0.0)),
    Row("policy_loss", "`logp` not 2-D", ValueError, lambda b: _pl(F(6), F(6), F(6))),
    Row("policy_loss", "`old_logp` / `ref_logp` / `entropy` shape != `logp.shape`",
        ValueError, lambda b: _pl(old=F(3, 2))),
    Row("policy_loss", "`advantages` not [B, T], [B] or [B, 1]", ValueError,
        lambda b: _pl(adv=F(3))),
    Row("policy_loss", "`mask` complex", TypeError,
        lambda b: _pl(mask=torch.ones(2, 3, dtype=torch.complex64))),
    Row("policy_loss", "`is_weights` not [B, T], [B] or [B, 1]", ValueError,
        lambda b: _pl(is_weights=F(3))),
    Row("policy_loss", "`variant` not a str", TypeError, lambda b: _pl(variant=0)),
    Row("policy_loss", "`variant` unknown", ValueError, lambda b: _pl(variant="trpo")),
    Row("policy_loss", "`variant` that the semantics lacks", ValueError,
        lambda b: _pl(variant="cispo", semantics="openrlhf")),
    Row("policy_loss", "`epsilon` (`_low`, `_high`) not a real number", TypeError,
        lambda b: _pl(epsilon="0.2")),
    Row("policy_loss", "`epsilon` (`_low`, `_high`, `beta`) NaN or inf", ValueError,
        lambda b: _pl(epsilon_high=NAN)),
    Row("policy_loss", "`epsilon` (`_low`, `_high`, `beta`) < 0", ValueError,
        lambda b: _pl(epsilon=-0.1)),
    Row("policy_loss", "`clip_ratio_c <= 1`", ValueError, lambda b: _pl(clip_ratio_c=1.0)),
    Row("policy_loss", "`clip_ratio_c` with a variant other than ppo / gspo", ValueError,
        lambda b: _pl(clip_ratio_c=3.0, variant="cispo")),
    Row("policy_loss", "`delta` with a variant other than ppo / gspo", ValueError,
        lambda b: _pl(delta=2.0, variant="sapo")),
    Row("policy_loss", "`tau_pos` / `tau_neg` / `delta` / `loss_scale_factor` <= 0", ValueError,
        lambda b: _pl(tau_pos=0.0)),
    Row("policy_loss", "`kl_ratio_weighted` not a bool", TypeError,
        lambda b: _pl(kl_ratio_weighted=1)),
    Row("policy_loss", "`beta != 0` without `ref_logp`", ValueError, lambda b: _pl(beta=0.1)),
    Row("policy_loss", "`kl_ratio_weighted=True` without `ref_logp`", ValueError,
        lambda b: _pl(kl_ratio_weighted=True)),
    Row("policy_loss", "`kl_ratio_weighted=True` with verl or OpenRLHF semantics", ValueError,
        lambda b: _pl(ref_logp=F(2, 3), kl_ratio_weighted=True, semantics="verl")),
    Row("policy_loss", "`entropy_coef != 0` without `entropy`", ValueError,
        lambda b: _pl(entropy_coef=0.01)),
    Row("policy_loss", "`loss_agg_mode` not a str", TypeError, lambda b: _pl(loss_agg_mode=1)),
    Row("policy_loss", "`loss_agg_mode` unknown", ValueError,
        lambda b: _pl(loss_agg_mode="mean")),
    Row("policy_loss", "`loss_agg_mode` that the semantics lacks", ValueError,
        lambda b: _pl(loss_agg_mode="dapo", semantics="verl")),
    Row("policy_loss", "verl SAPO with a `loss_agg_mode` other than seq-mean-token-mean",
        ValueError, lambda b: _pl(variant="sapo", semantics="verl", loss_agg_mode="token-mean")),
    Row("policy_loss", "OpenRLHF GSPO with a `loss_agg_mode` other than seq-mean-token-mean",
        ValueError,
        lambda b: _pl(variant="gspo", semantics="openrlhf", loss_agg_mode="token-mean")),
    Row("policy_loss", "`max_completion_length` / `dp_size` not an int", TypeError,
        lambda b: _pl(dp_size=1.0)),
    Row("policy_loss", "`max_completion_length < 1`", ValueError,
        lambda b: _pl(max_completion_length=0)),
    Row("policy_loss", "`dp_size < 1`", ValueError, lambda b: _pl(dp_size=0)),
    Row("policy_loss", "`global_num_tokens` and `num_items_in_batch` both given", ValueError,
        lambda b: _pl(global_num_tokens=4, num_items_in_batch=5)),
    Row("policy_loss", "a global count that is not a number or a tensor", TypeError,
        lambda b: _pl(global_batch_size="8")),
    Row("policy_loss", "a global count <= 0 or not finite", ValueError,
        lambda b: _pl(global_num_tokens=0)),
    Row("policy_loss", "a global count tensor with more than one element", ValueError,
        lambda b: _pl(global_num_tokens=torch.ones(2))),
    Row("policy_loss", "a global count tensor of bool or complex dtype", TypeError,
        lambda b: _pl(global_num_tokens=torch.tensor(True))),
    Row("policy_loss", "a global count tensor holding a value <= 0 (read when the op runs)",
        ValueError, lambda b: _pl(global_num_tokens=torch.tensor(0.0), backend=b), data=True),
    Row("policy_loss", "a `mask` value other than 0 / 1", ValueError,
        lambda b: _pl(mask=_with_value(torch.ones(2, 3), (1, 2), 0.5), backend=b), data=True),
    Row("policy_loss", "`advantages` NaN or inf where `mask` is 1", ValueError,
        lambda b: _pl(adv=_with_value(F(2, 3), (0, 1), NAN), backend=b), data=True),
    Row("policy_loss_reference", "an unknown keyword argument", TypeError,
        lambda b: policy_loss_reference(F(2, 3), F(2, 3), F(2, 3), torch.ones(2, 3), eps=0.2)),
    Row("value_loss", "`values` not 2-D", ValueError, lambda b: _vl(F(6), F(6), F(6))),
    Row("value_loss", "`old_values` / `returns` / `mask` shape != `values.shape`", ValueError,
        lambda b: _vl(returns=F(3, 2))),
    Row("value_loss", "`mask` complex", TypeError,
        lambda b: _vl(mask=torch.ones(2, 3, dtype=torch.complex64))),
    Row("value_loss", "`cliprange_value` without `old_values`", ValueError,
        lambda b: value_loss(F(2, 3), None, F(2, 3), torch.ones(2, 3), cliprange_value=0.2)),
    Row("value_loss", "`loss_agg_mode` not a str", TypeError, lambda b: _vl(loss_agg_mode=1)),
    Row("value_loss", "`loss_agg_mode` unknown", ValueError, lambda b: _vl(loss_agg_mode="x")),
    Row("value_loss", "`loss_agg_mode` that the semantics lacks", ValueError,
        lambda b: _vl(loss_agg_mode="grpo", semantics="openrlhf")),
    Row("value_loss", "`max_completion_length < 1`", ValueError,
        lambda b: _vl(max_completion_length=0)),
    Row("value_loss", "`dp_size < 1`", ValueError, lambda b: _vl(dp_size=-1)),
    Row("value_loss", "a global count tensor holding a value <= 0 (read when the op runs)",
        ValueError, lambda b: _vl(global_batch_size=torch.tensor(-1.0),
                                  loss_agg_mode="seq-mean-token-mean", backend=b), data=True),
    Row("value_loss", "a `mask` value other than 0 / 1", ValueError,
        lambda b: _vl(mask=_with_value(torch.ones(2, 3), (0, 0), -1.0), backend=b), data=True),
]

def _pref(**kw):
    return preference_loss(F(3), F(3), F(3), F(3), **kw)


_PREFERENCE_ROWS = [
    Row("preference_loss", "`chosen_logps` not 1-D", ValueError,
        lambda b: preference_loss(F(3, 1), F(3, 1))),
    Row("preference_loss", "`rejected_logps` / reference / `pair_weights` shape != [P]",
        ValueError, lambda b: preference_loss(F(3), F(4))),
    Row("preference_loss", "only one of `ref_chosen_logps`, `ref_rejected_logps`", ValueError,
        lambda b: preference_loss(F(3), F(3), F(3))),
    Row("preference_loss", "only one of `chosen_lengths`, `rejected_lengths`", ValueError,
        lambda b: _pref(chosen_lengths=I(3))),
    Row("preference_loss", "lengths of bool or complex dtype", TypeError,
        lambda b: _pref(chosen_lengths=torch.ones(3, dtype=torch.bool),
                        rejected_lengths=torch.ones(3, dtype=torch.bool))),
    Row("preference_loss", "`loss_type` not a str, list or dict", TypeError,
        lambda b: _pref(loss_type=3)),
    Row("preference_loss", "`loss_type` an empty list", ValueError, lambda b: _pref(loss_type=[])),
    Row("preference_loss", "more than 32 loss types", ValueError,
        lambda b: _pref(loss_type=["sigmoid"] * 33)),
    Row("preference_loss", "a `loss_type` entry not a str", TypeError,
        lambda b: _pref(loss_type=["sigmoid", 1])),
    Row("preference_loss", "`loss_type` unknown", ValueError, lambda b: _pref(loss_type="kto_pair")),
    Row("preference_loss", "`loss_type` dict and `loss_weights` both given", ValueError,
        lambda b: _pref(loss_type={"sigmoid": 1.0}, loss_weights=[1.0])),
    Row("preference_loss", "`loss_weights` not a list", TypeError,
        lambda b: _pref(loss_weights="1")),
    Row("preference_loss", "a `loss_weights` entry not a number", TypeError,
        lambda b: _pref(loss_weights=[None])),
    Row("preference_loss", "a `loss_weights` entry NaN or inf", ValueError,
        lambda b: _pref(loss_weights=[INF])),
    Row("preference_loss", "`loss_weights` not one per type", ValueError,
        lambda b: _pref(loss_weights=[1.0, 2.0])),
    Row("preference_loss", "`beta` not a real number", TypeError, lambda b: _pref(beta="0.1")),
    Row("preference_loss", "`beta` <= 0 or not finite", ValueError, lambda b: _pref(beta=0.0)),
    Row("preference_loss", "`label_smoothing` not a real number", TypeError,
        lambda b: _pref(label_smoothing=None)),
    Row("preference_loss", "`label_smoothing` outside [0, 1]", ValueError,
        lambda b: _pref(label_smoothing=1.5)),
    Row("preference_loss", "an unknown keyword argument", TypeError, lambda b: _pref(gamma=1.0)),
    Row("preference_loss", "a type argument that is not hashable (a number, bool or str)",
        TypeError, lambda b: _pref(simpo_gamma=[0.5])),
    Row("preference_loss", "`ipo_length_normalize` not a bool", TypeError,
        lambda b: _pref(loss_type="ipo", ipo_length_normalize=1)),
    Row("preference_loss", "`f_divergence_type` unknown", ValueError,
        lambda b: _pref(f_divergence_type="kl")),
    Row("preference_loss", "a non-default `f_divergence_type` with a type TRL lacks it for",
        ValueError, lambda b: _pref(loss_type="nca_pair", f_divergence_type="forward_kl")),
    Row("preference_loss", "`loss_type='robust'` with `label_smoothing >= 0.5`", ValueError,
        lambda b: _pref(loss_type="robust", label_smoothing=0.5)),
    Row("preference_loss", "`loss_type='exo_pair'` with `label_smoothing` 0 or 1", ValueError,
        lambda b: _pref(loss_type="exo_pair")),
    Row("preference_loss", "`pair_weights` with `aot` / `aot_unpaired` (per-rank terms)",
        ValueError, lambda b: _pref(loss_type="aot", pair_weights=F(3))),
    Row("preference_loss", "a reference-based type without reference log-probs", ValueError,
        lambda b: preference_loss(F(3), F(3))),
    Row("preference_loss", "a length-normalised type without lengths", ValueError,
        lambda b: _pref(loss_type="simpo")),
    Row("preference_loss", "`pair_weights` with a sorted-batch type (aot, aot_unpaired)",
        ValueError, lambda b: _pref(loss_type="aot", pair_weights=F(3))),
    Row("preference_logps", "padded `token_ids` not [2P, T]", ValueError,
        lambda b: preference_logps(F(4, 3), F(5, 3), I(4))),
    Row("preference_logps", "packed `token_ids` (with `cu_seqlens`) not [N] or [1, N]",
        ValueError,
        lambda b: preference_logps(F(2, 3, 4), F(5, 4), I(2, 3),
                                   cu_seqlens=torch.tensor([0, 3, 6]))),
    Row("preference_logps", "`cu_seqlens` not 1-D", ValueError,
        lambda b: preference_logps(F(6, 4), F(5, 4), I(6), cu_seqlens=torch.tensor([[0, 3, 6]]))),
    Row("preference_logps", "not an even number 2P >= 2 of sequences", ValueError,
        lambda b: preference_logps(F(3, 2, 4), F(5, 4), I(3, 2))),
    Row("preference_logps", "`token_weights` shape != `token_ids.shape`", ValueError,
        lambda b: preference_logps(F(2, 3, 4), F(5, 4), I(2, 3), token_weights=F(2, 2))),
    Row("preference_logps", "a token id outside [0, V) that is not `ignore_index` at a masked "
        "position (masked rows are not computed; their ids are still checked)", ValueError,
        lambda b: preference_logps(F(2, 3, 4), F(5, 4), _with_value(I(2, 3), (1, 2), -7),
                                   mask=_with_value(torch.ones(2, 3), (1, 2), 0), backend=b),
        data=True, prefix="linear_token_logprobs:"),
    Row("preference_loss_from_hidden", "`ref_chosen_logps` / `ref_rejected_logps` not [P]",
        ValueError,
        lambda b: preference_loss_from_hidden(F(2, 3, 4), F(5, 4), I(2, 3), ref_chosen_logps=F(2),
                                              ref_rejected_logps=F(2))),
]


# ---------------------------------------------------------------------------- rlfuse.search
def _root(B=2, A=3, lg=None, v=None, emb=None):
    return Root(F(B, A) if lg is None else lg, torch.zeros(B) if v is None else v, emb)


def _rec(M=None, A=3, **over):
    """A recurrent_fn returning zeros (terminal leaves), with some outputs replaced."""
    def fn(emb, action):
        m = action.shape[0]
        out = dict(reward=torch.zeros(m), discount=torch.ones(m), prior_logits=torch.zeros(m, A),
                   value=torch.zeros(m), embedding=emb, invalid_actions=None, terminal=None)
        for k, f in over.items():
            out[k] = f(m)
        return RecurrentOutput(**out)
    return fn


def _ps(root=None, fn=None, n=4, **kw):
    return puct_search(_root() if root is None else root, _rec() if fn is None else fn, n, **kw)


def _gs(root=None, fn=None, n=4, **kw):
    return gumbel_search(_root() if root is None else root, _rec() if fn is None else fn, n,
                         **kw)


def _searched_tree():
    """A tree of 2 x 3 actions whose trees hold 5 nodes (4 simulations, every action)."""
    return _ps(n=4, dirichlet_fraction=0.0).tree


def _dead_end_tree():
    """The subtrees below the chosen actions of 2 x 3 trees whose expanded nodes have no
    valid action (every prior logit -inf: finished games)."""
    fn = _rec(prior_logits=lambda m: torch.full((m, 3), -INF))
    out = _ps(fn=fn, n=3, dirichlet_fraction=0.0, temperature=0.0)
    return out.tree.subtree(out.action)


def _bare_phases(backend):
    t = Tree(2, 3, 64)
    t.init_roots(torch.zeros(2, 3), torch.zeros(2))
    return Phases(t, rule="puct", W=1, max_depth=4, backend=backend)


def _rooted_tree():
    t = Tree(2, 3, 16)
    t.init_roots(torch.zeros(2, 3), torch.zeros(2))
    return t


def _phase(backend, tree, **kw):
    return Phases(tree, rule="puct", W=1, max_depth=4, backend=backend, **kw).select(1)


def _no_valid_action(b):
    t = Tree(1, 2, 4)
    t.init_roots(torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2, dtype=torch.bool))
    _phase(b, t)


def _tree_full(b):
    t = Tree(1, 2, 1)
    t.init_roots(torch.zeros(1, 2), torch.zeros(1))
    _phase(b, t)


def _triton_phases(_b):
    with _env("TRITON_INTERPRET", "1"):
        _ps(backend="triton")


def S(condition, exc, call, **kw):
    """A check both searches make (the row calls puct_search)."""
    return Row("puct_search / gumbel_search", condition, exc, call, prefix="puct_search:", **kw)


def RF(condition, exc, call, **kw):
    """A check of recurrent_fn's outputs (both searches; the row calls puct_search)."""
    return Row("puct_search / gumbel_search", condition, exc, call, prefix="recurrent_fn", **kw)


SEARCH = ("cpu", "torch")
_SEARCH_ROWS = [
    Row("puct_search / gumbel_search", "`backend` not one of cpu, cuda, triton, torch",
        ValueError, lambda b: _ps(backend="numpy"), prefix="rlfuse.search:"),
    Row("puct_search / gumbel_search", "`backend='triton'` (there are no Triton tree kernels)",
        RuntimeError, _triton_phases, prefix="rlfuse.search:"),
    S("`root` not an `rlfuse.search.Root`", TypeError, lambda b: _ps(root=(F(2, 3), F(2)))),
    S("`root.prior_logits` not a 2-D float tensor [B, A]", ValueError,
      lambda b: _ps(root=_root(lg=I(2, 3)))),
    S("`root.prior_logits` with B = 0 or A = 0", ValueError,
      lambda b: _ps(root=_root(A=0, lg=F(2, 0)))),
    S("`root.value` not a float tensor [B]", ValueError,
      lambda b: _ps(root=_root(v=torch.zeros(3)))),
    S("`root.value` on another device than `root.prior_logits`", ValueError,
      lambda b: _ps(root=_root(v=torch.zeros(2, device=META)))),
    S("`root.value` not finite", ValueError,
      lambda b: _ps(root=_root(v=torch.tensor([0.0, NAN])), backend=b), data=True,
      backends=SEARCH),
    S("`root.prior_logits` holding NaN or +inf", ValueError,
      lambda b: _ps(root=_root(lg=_with_value(F(2, 3), (1, 2), INF)), backend=b), data=True,
      backends=SEARCH),
    S("`invalid_actions` not a tensor [B, A]", ValueError,
      lambda b: _ps(invalid_actions=torch.zeros(2, 2, dtype=torch.bool))),
    S("float `invalid_actions` holding values other than 0 / 1", ValueError,
      lambda b: _ps(invalid_actions=_with_value(torch.zeros(2, 3), (0, 1), 0.5), backend=b),
      data=True, backends=SEARCH),
    S("every action of a root invalid (by the mask or a -inf logit)", ValueError,
      lambda b: _ps(root=_root(lg=_with_value(F(2, 3), (1, 0), -INF)),
                    invalid_actions=torch.tensor([[0, 0, 1], [0, 1, 1]]), backend=b),
      data=True, backends=SEARCH),
    S("`num_simulations` (or `parallel`, `max_depth`, `capacity`, "
      "`max_num_considered_actions`) not an int", TypeError, lambda b: _ps(n=2.5)),
    S("`num_simulations`, `parallel`, `max_depth`, `capacity` or "
      "`max_num_considered_actions` < 1", ValueError, lambda b: _ps(parallel=0)),
    S("a real option (`virtual_loss`, `dirichlet_*`, `pb_c_*`, `temperature`, "
      "`gumbel_scale`, `value_scale`, `maxvisit_init`) not a finite real number", TypeError,
      lambda b: _ps(virtual_loss=NAN)),
    S("a real option outside its range (`dirichlet_fraction` in [0, 1], `dirichlet_alpha`, "
      "`pb_c_base` > 0, the others >= 0; those the kernels read as float32 at most its "
      "largest value, 3.4e38)", ValueError, lambda b: _ps(dirichlet_fraction=1.5)),
    S("`capacity` < `num_simulations` + 1", ValueError, lambda b: _ps(n=4, capacity=4)),
    S("`tree` not an `rlfuse.search.Tree`", TypeError, lambda b: _ps(tree="tree")),
    S("`tree` of another batch size, action count or device than the root", ValueError,
      lambda b: _ps(tree=Tree(3, 3, 8))),
    S("`tree` without room for `num_simulations` more nodes", ValueError,
      lambda b: _ps(n=4, tree=_searched_tree().subtree(torch.tensor([0, 1]), capacity=4))),
    Row("puct_search", "`tree` (from `Tree.subtree`) whose kept root has no valid action (by "
        "its mask, a -inf logit, or `invalid_actions`)", ValueError,
        lambda b: _ps(n=1, tree=_dead_end_tree(), backend=b), data=True, backends=SEARCH),
    Row("puct_search", "`qtransform` not 'parent_siblings' or 'tree_minmax'", ValueError,
        lambda b: _ps(qtransform="minmax")),
    Row("gumbel_search", "`tree` not cleared (Gumbel search does not continue trees)",
        ValueError, lambda b: _gs(tree=_searched_tree())),
    RF("`recurrent_fn` returning neither a 5-tuple nor a `RecurrentOutput`", TypeError,
       lambda b: _ps(fn=lambda e, a: (1, 2))),
    RF("an output (`reward`, `discount`, `prior_logits`, `value`) not a tensor", TypeError,
       lambda b: _ps(fn=_rec(value=lambda m: [0.0] * m))),
    RF("an output of the wrong shape ([M], [M], [M, A], [M])", ValueError,
       lambda b: _ps(fn=_rec(prior_logits=lambda m: torch.zeros(m, 4)))),
    RF("an output on another device than the tree", ValueError,
       lambda b: _ps(fn=_rec(reward=lambda m: torch.zeros(m, device=META)))),
    RF("`invalid_actions` / `terminal` not a tensor of shape [M, A] / [M]", ValueError,
       lambda b: _ps(fn=_rec(terminal=lambda m: torch.zeros(m, 1, dtype=torch.bool)))),
    RF("`invalid_actions` / `terminal` on another device than the tree", ValueError,
       lambda b: _ps(fn=_rec(invalid_actions=lambda m: torch.zeros(m, 3, dtype=torch.bool,
                                                                   device=META)))),
    Row("puct_search / gumbel_search",
        "`recurrent_fn` returning NaN or +-inf `reward` / `discount` / `value`, or a NaN or "
        "+inf prior logit, for a new node", RuntimeError,
        lambda b: _ps(fn=_rec(reward=lambda m: torch.full((m,), NAN)), backend=b), data=True,
        backends=SEARCH, prefix="rlfuse.search expand:"),
    Row("puct_search / gumbel_search",
        "`Root.embedding` tensors without a leading dimension of B", ValueError,
        lambda b: _ps(root=_root(emb=torch.zeros(3, 2))), prefix="Root.embedding:"),
    Row("puct_search / gumbel_search",
        "`Root.embedding` neither tensors nor a sequence (not indexable by tree)", TypeError,
        lambda b: _ps(root=_root(emb=object())), prefix="Root.embedding"),
    Row("puct_search / gumbel_search", "`Root.embedding` a sequence without one entry per tree",
        ValueError, lambda b: _ps(root=_root(emb=["a"])), prefix="Root.embedding"),
    RF("tensor `next_embedding` whose shapes do not match the root embedding's with M rows",
       ValueError, lambda b: _ps(root=_root(emb=torch.zeros(2, 2)),
                                 fn=_rec(embedding=lambda m: torch.zeros(m, 3)))),
    RF("tensor `next_embedding` without the structure of the root embedding (dict keys, "
       "tuple fields)", ValueError,
       lambda b: _ps(root=_root(emb={"x": torch.zeros(2)}),
                     fn=_rec(embedding=lambda m: {"y": torch.zeros(m)}))),
    RF("object `next_embedding` not a sequence", ValueError,
       lambda b: _ps(root=_root(emb=["a", "b"]), fn=_rec(embedding=lambda m: None))),
    RF("object `next_embedding` without M entries", ValueError,
       lambda b: _ps(root=_root(emb=["a", "b"]), fn=_rec(embedding=lambda m: ["c"] * (m + 1)))),
    Row("Tree", "`batch_size`, `num_actions` or `capacity` < 1", ValueError,
        lambda b: Tree(0, 3, 4)),
    Row("Tree", "`capacity` >= 2**31 - 1 (int32 node indices)", ValueError,
        lambda b: Tree(1, 1, 2**31)),
    Row("Tree.subtree", "`actions` not an int32 / int64 tensor", TypeError,
        lambda b: _searched_tree().subtree([0, 1])),
    Row("Tree.subtree", "`actions` not of shape [B]", ValueError,
        lambda b: _searched_tree().subtree(torch.tensor([0]))),
    Row("Tree.subtree", "an action outside [0, A)", ValueError,
        lambda b: _searched_tree().subtree(torch.tensor([0, 3]))),
    Row("Tree.subtree", "`capacity` below the largest subtree the tree can hold", ValueError,
        lambda b: _searched_tree().subtree(torch.tensor([0, 1]), capacity=2)),
    Row("Phases.select", "no valid action at a node that is not terminal (only reachable "
        "through `Phases`: the searches check roots, and a node expanded without a valid action "
        "is terminal)", RuntimeError, _no_valid_action, data=True, backends=SEARCH,
        prefix="rlfuse.search select:"),
    Row("Phases.select", "the tree is full (only reachable through `Phases`: the searches "
        "check the capacity first)", RuntimeError, _tree_full, data=True, backends=SEARCH,
        prefix="rlfuse.search select:"),
    Row("Phases.select / expand / backup / step", "a width `w` outside [1, W] (`w_next`: "
        "[0, W]), W the one the `Phases` was built with", ValueError,
        lambda b: _bare_phases("cpu").step(0, None, 16), prefix="rlfuse.search Phases:"),
    Row("Phases.step", "`store` not the tree's payload store (another capacity or batch)",
        ValueError, lambda b: _bare_phases("cpu").step(
            0, None, 1, TensorStore(torch.zeros(2, 4), 2, 8, "cpu")),
        prefix="rlfuse.search Phases.step:"),
    Row("Phases.step", "a backend other than the CPU extension", RuntimeError,
        lambda b: _bare_phases("torch").step(0, None, 1), prefix="rlfuse.search Phases.step:"),
    Row("Phases", "`W` or `max_depth` not an int >= 1", ValueError,
        lambda b: Phases(_rooted_tree(), rule="puct", W=1, max_depth=0, backend="cpu"),
        prefix="rlfuse.search Phases:"),
    Row("Phases", "`c1`, `c2`, `virtual_loss`, `value_scale` or `maxvisit_init` not a finite "
        "number of float32 range (the kernels read them as float32)", ValueError,
        lambda b: _phase("cpu", _rooted_tree(), virtual_loss=1e39),
        prefix="rlfuse.search Phases:"),
    Row("Phases", "`c2` below 1e-6 with `rule='puct'` (the exploration term's log needs "
        "c2 > 0)", ValueError, lambda b: _phase("cpu", _rooted_tree(), c2=0.0),
        prefix="rlfuse.search Phases:"),
    Row("Phases", "a tree without its root (`next_free` 0: `Tree.init_roots` not called)",
        ValueError, lambda b: _phase("cpu", Tree(2, 3, 8)), prefix="rlfuse.search Phases:"),
    Row("Tree.set_table", "`table` not a 2-D tensor with at least one row and one column",
        ValueError, lambda b: Tree(1, 3, 8).set_table(torch.zeros(0, 3, dtype=torch.int32))),
]

ROWS: list[Row] = (_BACKEND_ROWS + _LOGPROB_ROWS + _ADVANTAGE_ROWS + _POLICY_ROWS
                   + _PREFERENCE_ROWS + _SEARCH_ROWS)

# `raise` statements no public call can reach, keyed by a fragment of their source
# ("function::fragment" to pick one function's raise).
UNREACHABLE = {
    "unknown backend {backend!r}": "resolve() returns only known backend names",
    "backend {chosen!r} is unavailable for {device}": "every unavailable case raises above it",
    "rlfuse backend 'triton' is unavailable: {err}": "resolve() raises first",
    "rlfuse backend 'cuda' is unavailable": "needs a CUDA device (resolve() refuses CPU "
                                            "tensors first)",
    "_raise_status::{names[code]}": "status codes 5 and 6 come only from the group kernel, "
                                    "which reports through _raise_group_status",
    "malformed iparams/fparams": "only reachable by calling torch.ops.rlfuse.policy_loss "
                                 "by hand with wrong lists",
    "loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}": "validated before "
                                                                   "_agg_spec is called",
}


def trigger(row: Row, backend=None) -> BaseException:
    """Run a row's call; return the exception it raised (AssertionError if none)."""
    try:
        row.call(backend)
    except row.exc as exc:
        return exc
    raise AssertionError(f"{row.op}: '{row.condition}' did not raise {row.exc.__name__}")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = ["| op | condition | exception | message (example) |", "|---|---|---|---|"]
    for row in ROWS:
        msg = str(trigger(row, "cpu" if row.data else None))  # cpu: in every data row's backends
        where = "every backend" if row.backends is None else "backends " + ", ".join(row.backends)
        cond = row.condition + (f" *(data check, {where})*" if row.data else "")
        lines.append(f"| `{row.op}` | {_cell(cond)} | `{row.exc.__name__}` | {_cell(msg)} |")
    return "\n".join(lines) + "\n"


def doc_table() -> str:
    text = DOC.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def write_doc() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{render()}{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_doc()
    else:
        sys.stdout.write(render())
