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
