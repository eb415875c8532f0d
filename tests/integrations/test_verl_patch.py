"""rlfuse.integrations.verl: every patched verl function gives verl's own numbers (float32
tolerance) on random inputs with padding, holes and group edge cases; unpatch restores
every original object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import require_peer
from tests.integrations._common import assert_refuses_unknown_version

pytestmark = pytest.mark.peer

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def verl():
    ca = require_peer("verl.trainer.ppo.core_algos")
    tf = require_peer("verl.utils.torch_functional")
    import rlfuse.integrations.verl as rv

    yield rv, ca, tf
    rv.unpatch()


def _both(rv, get, *args, **kwargs):
    """(verl's result, patched result) of get()(*args) on fresh clones of the inputs."""
    def clone(a):
        return a.clone() if isinstance(a, torch.Tensor) else a
    rv.unpatch()
    want = get()(*[clone(a) for a in args], **kwargs)
    rv.patch()
    try:
        fn = get()
        assert getattr(fn, "__rlfuse__", False), f"{fn} is not patched"
        got = fn(*[clone(a) for a in args], **kwargs)
    finally:
        rv.unpatch()
    return want, got


def _batch(B=24, T=30, seed=0, holes=True):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    L[0] = T
    mask = (torch.arange(T)[None] < L[:, None]).float()
    if holes:  # tool-observation spans inside responses (multi-turn)
        mask[1::3, 2:6] = 0.0
        mask[1::3, 0] = 1.0
    r = torch.randn(B, T, generator=g) * 0.1
    r[torch.arange(B), L - 1] += torch.randn(B, generator=g)
    return r * mask, torch.randn(B, T, generator=g), mask


def _uids(B, seed=0):
    """String uids as verl's DataProto carries them: unsorted groups of several sizes,
    including groups of one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(B // 4, 1), (B,), generator=g).tolist()
    ids[3], ids[-1] = 1000, 1001
    return np.array([f"uid-{i}" for i in ids], dtype=object)


def _close_masked(got, want, mask):
    m = mask.bool()
    torch.testing.assert_close(got[m], want[m], **TOL)
    assert torch.all(got[~m] == 0)


def test_gae(verl):
    rv, ca, _ = verl
    r, v, m = _batch()
    (wa, wr), (ga, gr) = _both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY["gae"], r, v, m, 0.99, 0.95)
    # verl leaves whitened values at masked positions that nothing reads; rlfuse writes 0
    _close_masked(ga, wa, m)
    _close_masked(gr, wr, m)
    (wa2, _), (ga2, _) = _both(rv, lambda: ca.compute_gae_advantage_return, r, v, m, 1.0, 1.0)
    _close_masked(ga2, wa2, m)


@pytest.mark.parametrize("name,kwargs", [
    ("grpo", {}), ("grpo", dict(norm_adv_by_std_in_grpo=False)), ("grpo", dict(epsilon=1e-3)),
    ("rloo", {}), ("opo", {}), ("reinforce_plus_plus_baseline", {}), ("gpg", {}),
    ("gpg", dict(f_norm=2.0)),
])
def test_group_estimators(verl, name, kwargs):
    rv, ca, _ = verl
    r, _, m = _batch(seed=1)
    uids = _uids(r.shape[0], seed=1)
    want, got = _both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY[name], r, m, uids, **kwargs)
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    assert got[0].dtype == want[0].dtype


def test_grpo_all_equal_group_and_tensor_index(verl):
    rv, ca, _ = verl
    r, _, m = _batch(B=12, seed=2, holes=False)
    r[4:8] = 0.0  # a group whose scores are all equal
    r[4:8, 0] = 1.0
    idx = torch.arange(12) // 4
    want, got = _both(rv, lambda: ca.compute_grpo_outcome_advantage, r, m, idx.numpy())
    torch.testing.assert_close(got[0], want[0], **TOL)
    assert torch.all(got[0][4:8] == 0)
    with rv.patched():  # a tensor of ids also works (verl's own loop needs hashable uids)
        got_t = ca.compute_grpo_outcome_advantage(r, m, idx)
    torch.testing.assert_close(got_t[0], got[0], rtol=0, atol=0)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk(verl, norm):
    rv, ca, _ = verl
    r, _, m = _batch(B=20, seed=3)
    uids = np.array([f"p{i % 4}" for i in range(20)], dtype=object)
    want, got = _both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY["grpo_passk"], r, m, uids,
                      config={"norm_adv_by_std_in_grpo": norm})
    torch.testing.assert_close(got[0], want[0], **TOL)


def test_reinforce_plus_plus_and_remax(verl):
    rv, ca, _ = verl
    r, _, m = _batch(seed=4)

    class Cfg:
        gamma = 0.97

    want, got = _both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY["reinforce_plus_plus"], r, m,
                      config=Cfg())
    torch.testing.assert_close(got[0], want[0], **TOL)
    torch.testing.assert_close(got[1], want[1], **TOL)
    base = torch.randn(r.shape[0])
    want, got = _both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY["remax"], r, base, m)
    # verl's reverse cumsum leaves running sums inside masked holes; rlfuse writes 0 there
    _close_masked(got[0], want[0], m)
    _close_masked(got[1], want[1], m)


@pytest.mark.parametrize("kind", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+",
                                  "low_var_kl+"])
def test_kl_penalty(verl, kind):
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(6, 17, generator=g) * 4
    ref = lp + torch.randn(6, 17, generator=g)
    ref[0, :2] = lp[0, :2] + torch.tensor([30.0, -30.0])  # beyond verl's clamps
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    rv.unpatch()
    want = ca.kl_penalty(x1, ref, kind)
    with rv.patched():
        got = ca.kl_penalty(x2, ref, kind)
    torch.testing.assert_close(got, want, **TOL)
    go = torch.randn_like(want)
    torch.testing.assert_close(torch.autograd.grad((got * go).sum(), x2)[0],
                               torch.autograd.grad((want * go).sum(), x1)[0], **TOL)


AGG_INFOS = [{}, dict(dp_size=2, batch_num_tokens=300, global_batch_size=11),
             dict(loss_scale_factor=17)]


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("info", range(len(AGG_INFOS)))
def test_agg_loss(verl, mode, info):
    rv, ca, _ = verl
    _, v, m = _batch(B=8, T=21, seed=6)
    m[2] = 0.0  # an empty row
    x1, x2 = v.clone().requires_grad_(), v.clone().requires_grad_()
    rv.unpatch()
    want = ca.agg_loss(x1, m, mode, **AGG_INFOS[info])
    with rv.patched():
        got = ca.agg_loss(x2, m, mode, **AGG_INFOS[info])
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x2)[0], torch.autograd.grad(want, x1)[0],
                               **TOL)


def test_agg_loss_dp_without_counts_raises_like_verl(verl):
    rv, ca, _ = verl
    with rv.patched():
        with pytest.raises(ValueError, match="batch_num_tokens"):
            ca.agg_loss(torch.randn(2, 3), torch.ones(2, 3), "token-mean", dp_size=2)


def _actor_config(**kw):
    from verl.workers.config import ActorConfig

    base = dict(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4,
                ppo_micro_batch_size_per_gpu=2)
    base.update(kw)
    return ActorConfig(**base)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("use_isw,dp", [(False, False), (True, True)])
def test_policy_losses(verl, name, mode, use_isw, dp):
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(7)
    B, T = 6, 25
    lp = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    old = lp + 0.5 * torch.randn(B, T, generator=g)
    old[0, :2] = lp[0, :2] + torch.tensor([25.0, -25.0])  # beyond verl's +-20 clamp
    adv = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) < 0.8).float()
    m[1] = 0.0
    isw = (torch.rand(B, T, generator=g) + 0.5) if use_isw else None
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28,
                        clip_ratio_c=2.5)
    if dp:
        cfg.global_batch_info.update(dp_size=2, batch_num_tokens=250, global_batch_size=9)
    x1, x2 = lp.clone().requires_grad_(), lp.clone().requires_grad_()
    rv.unpatch()
    want, wm = ca.get_policy_loss_fn(name)(old, x1, adv, m, mode, cfg, isw)
    with rv.patched():
        fn = ca.get_policy_loss_fn(name)
        assert fn.__rlfuse__
        got, gm = fn(old_log_prob=old, log_prob=x2, advantages=adv, response_mask=m,
                     loss_agg_mode=mode, config=cfg, rollout_is_weights=isw)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x2)[0], torch.autograd.grad(want, x1)[0],
                               **TOL)
    assert set(gm) == set(wm)
    for k in wm:
        assert gm[k] == pytest.approx(wm[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logprobs_and_entropy_from_logits(verl, dtype):
    rv, _, tf = verl
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(3, 9, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    for name, args in (("logprobs_from_logits", (labels,)), ("entropy_from_logits", ())):
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        rv.unpatch()
        want = getattr(tf, name)(x1, *args)
        with rv.patched():
            got = getattr(tf, name)(x2, *args)
        torch.testing.assert_close(got, want, **TOL)
        go = torch.randn_like(want)
        torch.testing.assert_close(torch.autograd.grad((got * go).sum(), x2)[0],
                                   torch.autograd.grad((want * go).sum(), x1)[0], **TOL)


def test_unpatch_restores_identity_and_rebinds_importers(verl):
    rv, ca, tf = verl
    import verl.workers.utils.losses as wl

    rv.unpatch()
    names = ["kl_penalty", "agg_loss"] + list(rv._ESTIMATORS.values()) + list(
        rv._POLICY_LOSSES.values())
    before = {n: getattr(ca, n) for n in names}
    before_tf = (tf.logprobs_from_logits, tf.entropy_from_logits)
    adv_reg, pl_reg = dict(ca.ADV_ESTIMATOR_REGISTRY), dict(ca.POLICY_LOSS_REGISTRY)
    bound = (wl.agg_loss, wl.kl_penalty)
    rv.patch()
    rv.patch()  # idempotent
    assert rv.is_patched()
    assert all(getattr(ca, n) is not before[n] for n in names)
    assert wl.agg_loss is ca.agg_loss and wl.agg_loss.__rlfuse__
    for k in rv._ESTIMATORS:
        assert ca.ADV_ESTIMATOR_REGISTRY[k].__rlfuse__
    assert ca.ADV_ESTIMATOR_REGISTRY["grpo_vectorized"] is adv_reg["grpo_vectorized"]
    rv.unpatch()
    assert not rv.is_patched()
    assert all(getattr(ca, n) is before[n] for n in names)
    assert (tf.logprobs_from_logits, tf.entropy_from_logits) == before_tf
    assert ca.ADV_ESTIMATOR_REGISTRY == adv_reg and ca.POLICY_LOSS_REGISTRY == pl_reg
    assert all(ca.ADV_ESTIMATOR_REGISTRY[k] is adv_reg[k] for k in adv_reg)
    assert (wl.agg_loss, wl.kl_penalty) == bound


def test_unknown_version_refused(verl, monkeypatch):
    rv, ca, _ = verl
    assert_refuses_unknown_version(rv, "verl", "1.0.0", monkeypatch, lambda: ca.agg_loss)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo"])
def test_policy_loss_dtype_is_verls(verl, name):
    """bf16 log-probs with float32 advantages and mask: verl's loss is float32 (type
    promotion); the patched loss comes back in that dtype too, not rounded to bf16."""
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(3)
    B, T = 4, 9
    lp = -(torch.rand(B, T, generator=g) * 2 + 0.05)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) < 0.8).float()
    cfg = _actor_config(clip_ratio=0.2, clip_ratio_c=3.0)
    args = (old.bfloat16(), lp.bfloat16(), adv, m, "token-mean", cfg, None)
    rv.unpatch()
    want, _ = ca.get_policy_loss_fn(name)(*args)
    with rv.patched():
        got, _ = ca.get_policy_loss_fn(name)(*args)
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------
# Configurations the ops do not cover run verl's own code; every result has verl's dtype.
# ------------------------------------------------------------------------------------------
def _run_both(rv, get, args, kwargs=None, grad_of=0):
    """(verl's result, patched result, verl's gradient, patched gradient) of
    get()(*args, **kwargs) on fresh clones, the gradient w.r.t. args[grad_of] (None when
    grad_of is None) of the first output against a fixed random upstream gradient."""
    kwargs = kwargs or {}
    outs = []
    for patch in (False, True):
        a = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in args]
        if grad_of is not None:
            a[grad_of].requires_grad_()
        (rv.patch if patch else rv.unpatch)()
        try:
            fn = get()
            assert getattr(fn, "__rlfuse__", False) == patch
            out = fn(*a, **kwargs)
        finally:
            rv.unpatch()
        first = out[0] if isinstance(out, tuple) else out
        grad = None
        if grad_of is not None:
            go = torch.randn(first.shape, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64).to(first.dtype)
            grad = torch.autograd.grad((first * go).sum(), a[grad_of])[0]
        outs.append((out, grad))
    (want, gw), (got, gg) = outs
    return want, got, gw, gg


def _same(got, want, gw=None, gg=None):
    """The patched result is verl's own (the fallback): equal values (NaN where verl's is),
    dtypes and gradients."""
    got_t = got if isinstance(got, tuple) else (got,)
    want_t = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got_t, want_t):
        if isinstance(w, torch.Tensor):
            assert g.dtype == w.dtype
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
        else:
            assert g == pytest.approx(w, nan_ok=True)
    if gw is not None:
        assert gg.dtype == gw.dtype
        torch.testing.assert_close(gg, gw, rtol=0, atol=0, equal_nan=True)


def _weighted_mask(B, T, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m = (torch.rand(B, T, generator=g) < 0.8).to(dtype)
    m[0, :3] = torch.tensor([1.0, 0.5, 0.25], dtype=dtype)  # soft token weights
    return m


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_agg_loss_weighted_mask_runs_verl(verl, mode):
    """verl multiplies by the mask and divides by its sum: a fractional mask (or an integer
    mask holding 2) weights the tokens; the patched agg_loss gives verl's numbers."""
    rv, ca, _ = verl
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(20))
    for m in (_weighted_mask(5, 9, 21), _weighted_mask(5, 9, 22, torch.float64),
              (_weighted_mask(5, 9, 23) > 0).long() * 2):
        _same(*_run_both(rv, lambda: ca.agg_loss, (x, m, mode)))


@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo"])
def test_policy_loss_weighted_mask_runs_verl(verl, name):
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(24)
    B, T = 5, 11
    lp = -(torch.rand(B, T, generator=g) * 2 + 0.05)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    cfg = _actor_config(clip_ratio=0.2)
    for mode in ("token-mean", "seq-mean-token-mean"):
        want, got, gw, gg = _run_both(rv, lambda: ca.get_policy_loss_fn(name),
                                      (old, lp, adv, _weighted_mask(B, T, 25), mode, cfg),
                                      grad_of=1)
        _same(got[0], want[0], gw, gg)
        assert got[1] == pytest.approx(want[1])


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "reinforce_plus_plus", "remax"])
def test_estimator_weighted_mask_runs_verl(verl, name):
    from omegaconf import OmegaConf

    rv, ca, _ = verl
    r, v, _ = _batch(B=8, T=6, seed=26)
    m = _weighted_mask(8, 6, 27)
    m[:, 0] = 1.0
    cfg = OmegaConf.create({"gamma": 0.9})
    args = {"gae": (r, v, m, 0.99, 0.95), "grpo": (r, m, _uids(8, 28)),
            "rloo": (r, m, _uids(8, 28)), "reinforce_plus_plus": (r, m, cfg),
            "remax": (r, torch.randn(8), m, cfg)}[name]
    _same(*_run_both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY[name], args, grad_of=None))


@pytest.mark.parametrize("kind", ["k1", "abs", "k2", "k3", "k3+"])
def test_kl_penalty_verl_broadcasts_runs_verl(verl, kind):
    """A ref_logprob verl broadcasts ([B, 1] or [T] against [B, T]), and one that takes a
    gradient (the op treats ref_logp as a constant): verl's own code, values and both
    gradients."""
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(29)
    lp = -torch.rand(4, 7, generator=g) * 3
    for ref in (-torch.rand(4, 1, generator=g) * 3, -torch.rand(7, generator=g) * 3):
        _same(*_run_both(rv, lambda: ca.kl_penalty, (lp, ref, kind)))
    ref = lp + torch.randn(4, 7, generator=g)
    _same(*_run_both(rv, lambda: ca.kl_penalty, (lp, ref, kind), grad_of=1))


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum"])
@pytest.mark.parametrize("lsf", [0, -2, 0.5, float("nan")])
def test_agg_loss_scale_factor_only_where_verl_reads_it(verl, mode, lsf):
    """verl reads loss_scale_factor only in seq-mean-token-sum-norm: elsewhere any value
    (0, negative, NaN) leaves the loss as it is, through the fused path."""
    rv, ca, _ = verl
    _, x, m = _batch(B=6, T=10, seed=30)
    want, got, gw, gg = _run_both(rv, lambda: ca.agg_loss, (x, m, mode),
                                  dict(loss_scale_factor=lsf))
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(gg, gw, **TOL)
    assert torch.isfinite(got)


@pytest.mark.parametrize("info", [dict(loss_scale_factor=0), dict(loss_scale_factor=-2.0),
                                  dict(loss_scale_factor=float("inf")),
                                  dict(dp_size=2, global_batch_size=0, batch_num_tokens=5),
                                  dict(global_batch_size=-3)])
def test_agg_loss_norm_mode_degenerate_scale_runs_verl(verl, info):
    """seq-mean-token-sum-norm with loss_scale_factor <= 0 or infinite, or a
    global_batch_size <= 0: verl returns inf / NaN, a negated or a zero loss; so does the
    patched agg_loss."""
    rv, ca, _ = verl
    _, x, m = _batch(B=6, T=10, seed=31)
    _same(*_run_both(rv, lambda: ca.agg_loss, (x, m, "seq-mean-token-sum-norm"), info))


@pytest.mark.parametrize("mode,info", [
    ("token-mean", dict(batch_num_tokens=0)),
    ("token-mean", dict(dp_size=2, batch_num_tokens=0, global_batch_size=4)),
    ("token-mean", dict(batch_num_tokens=torch.tensor(0))),
    ("token-mean", dict(batch_num_tokens=-5)),
    ("seq-mean-token-mean", dict(global_batch_size=0)),
    ("seq-mean-token-sum", dict(global_batch_size=0.0)),
])
def test_agg_loss_zero_count_runs_verl(verl, mode, info):
    """A global count of 0 (or below): verl divides by it (inf / NaN / negated)."""
    rv, ca, _ = verl
    _, x, m = _batch(B=6, T=10, seed=32)
    _same(*_run_both(rv, lambda: ca.agg_loss, (x, m, mode), info))


@pytest.mark.parametrize("mode,info", [
    ("token-sum", dict(batch_num_tokens=0, global_batch_size=0)),
    ("token-mean", dict(global_batch_size=0)),
    ("seq-mean-token-mean", dict(batch_num_tokens=0)),
])
def test_agg_loss_ignores_counts_verl_ignores(verl, mode, info):
    """A count verl does not read in ``mode`` is not passed to the op (which would refuse
    a 0)."""
    rv, ca, _ = verl
    _, x, m = _batch(B=6, T=10, seed=33)
    want, got, gw, gg = _run_both(rv, lambda: ca.agg_loss, (x, m, mode), info)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(gg, gw, **TOL)


@pytest.mark.parametrize("name", ["vanilla", "cispo"])
@pytest.mark.parametrize("info", [dict(batch_num_tokens=0), dict(loss_scale_factor=0),
                                  dict(loss_scale_factor=-1.0)])
def test_policy_loss_degenerate_global_info(verl, name, info):
    """config.global_batch_info with a zero token count (verl: inf / NaN) or a
    loss_scale_factor <= 0 (read only by seq-mean-token-sum-norm)."""
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(34)
    B, T = 5, 8
    lp = -(torch.rand(B, T, generator=g) * 2 + 0.05)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    m = (torch.rand(B, T, generator=g) < 0.8).float()
    cfg = _actor_config(clip_ratio=0.2)
    cfg.global_batch_info.update(info)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        want, got, gw, gg = _run_both(rv, lambda: ca.get_policy_loss_fn(name),
                                      (old, lp, adv, m, mode, cfg), grad_of=1)
        torch.testing.assert_close(got[0], want[0], equal_nan=True, **TOL)
        torch.testing.assert_close(gg, gw, equal_nan=True, **TOL)
        assert got[0].dtype == want[0].dtype


_LOW = (torch.bfloat16, torch.float16)
_MASK_DTYPES = (torch.bool, torch.int64, torch.float32, torch.bfloat16, torch.float64)


def _verl_exact(rv, get, args, kwargs=None):
    """verl's own function on the inputs widened to float64 (exact: the inputs are the
    same numbers; masks too, since verl divides integer mask sums in float32): the
    reference the patched results are checked against."""
    rv.unpatch()
    wide = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    return get()(*wide, **(kwargs or {}))


def _close_in(got, exact, dtype):
    """got (in ``dtype``) holds the exact result rounded once to ``dtype`` (plus float32
    accumulation)."""
    t = {torch.bfloat16: dict(rtol=1e-2, atol=1e-2), torch.float16: dict(rtol=2e-3, atol=2e-3),
         torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}
    torch.testing.assert_close(got.double(), exact.double(), **t[dtype])


@pytest.mark.parametrize("mode", ["token-mean", "token-sum", "seq-mean-token-mean",
                                  "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_agg_loss_dtype_is_verls(verl, mode):
    """verl's agg_loss promotes loss_mat with the mask (and with a tensor count) and goes
    through float32 in the seq-mean modes; the patched result has that dtype, the
    gradient loss_mat's, and both hold the exact values to that precision."""
    rv, ca, _ = verl
    _, x, m = _batch(B=6, T=10, seed=35)
    m[2] = 0.0
    cases = [(xd, md, {}) for xd in _LOW + (torch.float32,) for md in _MASK_DTYPES]
    cases += [  # tensor counts take part in verl's promotion (0-d by 0-d division)
        (torch.bfloat16, torch.bool, dict(batch_num_tokens=torch.tensor(40.0),
                                          global_batch_size=torch.tensor(5.0))),
        (torch.float32, torch.int64, dict(batch_num_tokens=torch.tensor(40.0).double(),
                                          global_batch_size=torch.tensor(5.0).double())),
        (torch.float32, torch.float32, dict(dp_size=2, batch_num_tokens=40,
                                            global_batch_size=7)),
    ]
    for xd, md, info in cases:
        args = (x.to(xd), m.to(md), mode)
        want, got, gw, gg = _run_both(rv, lambda: ca.agg_loss, args, info)
        assert got.dtype == want.dtype, (xd, md, info)
        assert gg.dtype == gw.dtype == xd
        _close_in(got, _verl_exact(rv, lambda: ca.agg_loss, args, info), got.dtype)
        _close_in(gg, gw.double(), xd)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "cispo"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_policy_loss_dtype_is_verls_every_mode(verl, name, mode):
    """All-bf16 (or float16) inputs with a bool / integer mask: verl's token-mean loss is
    bf16, its seq-mean losses float32 (seq_mask.float()); a float64 mask or advantages
    make it float64."""
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(36)
    B, T = 5, 9
    lp = -(torch.rand(B, T, generator=g) * 2 + 0.05)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) < 0.8
    m[:, 0] = True
    cfg = _actor_config(clip_ratio=0.2)
    for dt, md, advd in [(torch.bfloat16, torch.bool, None), (torch.bfloat16, torch.int64, None),
                         (torch.float16, torch.bool, None),
                         (torch.bfloat16, torch.float64, None),
                         (torch.float32, torch.bool, torch.float64)]:
        args = (old.to(dt), lp.to(dt), adv.to(advd or dt), m.to(md), mode, cfg)
        want, got, gw, gg = _run_both(rv, lambda: ca.get_policy_loss_fn(name), args,
                                      grad_of=1)
        assert got[0].dtype == want[0].dtype, (dt, md, advd)
        assert gg.dtype == gw.dtype
        _close_in(got[0], _verl_exact(rv, lambda: ca.get_policy_loss_fn(name), args)[0],
                  got[0].dtype)


def test_kl_penalty_dtype_is_verls(verl):
    """verl's kl_penalty is in the promotion of logprob and ref_logprob: bf16 with a
    float32 reference gives float32, float32 with float64 gives float64 (computed in
    float64)."""
    rv, ca, _ = verl
    g = torch.Generator().manual_seed(37)
    lp = -torch.rand(4, 9, generator=g) * 3
    ref = lp + torch.randn(4, 9, generator=g)
    for kind in ("k1", "abs", "k2", "k3", "k3+"):
        for ld, rd in [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16),
                       (torch.float32, torch.float64), (torch.bfloat16, torch.bfloat16)]:
            args = (lp.to(ld), ref.to(rd), kind)
            want, got, gw, gg = _run_both(rv, lambda: ca.kl_penalty, args)
            assert got.dtype == want.dtype, (kind, ld, rd)
            assert gg.dtype == gw.dtype == ld
            _close_in(got, _verl_exact(rv, lambda: ca.kl_penalty, args), got.dtype)


@pytest.mark.parametrize("name", ["gae", "grpo", "rloo", "opo", "reinforce_plus_plus_baseline",
                                  "gpg", "grpo_passk", "reinforce_plus_plus", "remax"])
def test_estimator_dtypes_are_verls(verl, name):
    """Every estimator's outputs in verl's dtypes (rewards promoted with the mask, the
    values, the baselines; reinforce++ returns in the rewards' dtype) for low-precision
    rewards with float32 / float64 / integer masks and other operands."""
    from omegaconf import OmegaConf

    rv, ca, _ = verl
    r, v, m = _batch(B=8, T=6, seed=38, holes=False)
    uids = np.array([f"p{i % 3}" for i in range(8)], dtype=object)
    cfg = OmegaConf.create({"gamma": 0.9, "norm_adv_by_std_in_grpo": True})
    base = torch.randn(8, generator=torch.Generator().manual_seed(39))
    bf, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    combos = [  # (rewards, mask, values / baselines)
        (bf, f32, f32), (f16, torch.int64, bf), (bf, bf, f32), (f32, f64, f32),
        (f32, torch.int64, f64), (f16, f32, f16),
    ]
    for rd, md, od in combos:
        rr, mm, other = r.to(rd), m.to(md), (v.to(od) if name == "gae" else base.to(od))
        args = {"gae": (rr, other, mm, 0.99, 0.95), "reinforce_plus_plus": (rr, mm, cfg),
                "remax": (rr, other, mm, cfg)}.get(name, (rr, mm, uids))
        kwargs = {} if name in ("gae", "reinforce_plus_plus", "remax", "grpo") else \
            dict(config=cfg)
        want, got, _, _ = _run_both(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY[name], args, kwargs,
                                    grad_of=None)
        exact = _verl_exact(rv, lambda: ca.ADV_ESTIMATOR_REGISTRY[name], args, kwargs)
        valid = m.bool()
        for k in range(2):
            assert got[k].dtype == want[k].dtype, (name, k, rd, md, od)
            _close_in(got[k][valid], exact[k][valid].to(got[k].dtype), got[k].dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logprobs_and_entropy_dtype_is_verls(verl, dtype, monkeypatch):
    """verl's entropy_from_logits returns the logits' dtype, and so does its
    logprobs_from_logits without flash-attn (with it: float32): the patched functions
    compute in float32 and return that dtype."""
    rv, _, tf = verl
    g = torch.Generator().manual_seed(40)
    logits = (torch.randn(3, 7, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (3, 7), generator=g)
    exact_lp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    p = torch.softmax(logits.double(), -1)
    exact_ent = -(p * torch.log_softmax(logits.double(), -1)).sum(-1)
    for name, args, exact in (("logprobs_from_logits", (logits, labels), exact_lp),
                              ("entropy_from_logits", (logits,), exact_ent)):
        want, got, gw, gg = _run_both(rv, lambda: getattr(tf, name), args)
        assert got.dtype == want.dtype == dtype
        assert gg.dtype == gw.dtype == dtype
        _close_in(got, exact, dtype)
    # verl's flash-attn cross-entropy path returns float32 log-probs (not installed here:
    # the flag stands in for it); VERL_DISABLE_FLASH_ATTN_CE=1 takes the torch path again
    monkeypatch.setattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", True)
    with rv.patched():
        assert tf.logprobs_from_logits(logits, labels).dtype == torch.float32
        monkeypatch.setenv("VERL_DISABLE_FLASH_ATTN_CE", "1")
        assert tf.logprobs_from_logits(logits, labels).dtype == dtype
