"""The advantage family against the peers: verl's core_algos / torch_functional functions
called directly, TRL's advantage formulas built from trl's own ``nanstd``, and OpenRLHF's
formulas (OpenRLHF is not a dependency; its few lines are transcribed below from
openrlhf/trainer/ppo_utils/experience_maker.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlfuse.ops import (
    discounted_returns,
    gae,
    group_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    token_rewards,
)
from tests.helpers import require_peer

TOL = dict(rtol=1e-6, atol=1e-6)


def _batch(B=12, T=40, holes=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < L[:, None]).to(torch.int64)
    if holes:  # a tool-observation span inside some responses (multi-turn)
        for b in range(0, B, 2):
            lo = int(torch.randint(0, max(int(L[b]) - 1, 1), (1,), generator=g))
            mask[b, lo:lo + 5] = 0
            mask[b, 0] = 1
    r = torch.randn(B, T, generator=g, dtype=dtype) * 0.1
    r[torch.arange(B), L - 1] += torch.randn(B, generator=g, dtype=dtype)
    v = torch.randn(B, T, generator=g, dtype=dtype)
    return r * mask, v, mask


def _groups(B, seed=0):
    """Unsorted string-free int ids: groups of different sizes, some of size one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, max(B // 3, 1), (B,), generator=g)
    ids[3] = 1000  # two groups of size one
    ids[B - 1] = 1001
    return ids


# ======================================================================================
# verl
# ======================================================================================
@pytest.mark.peer
@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_verl(holes):
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, v, m = _batch(holes=holes)
    want_a, want_r = ca.compute_gae_advantage_return(r, v, m, gamma=0.99, lam=0.95)
    got_a, got_r = gae(r, v, m, gamma=0.99, lam=0.95, semantics="verl", whiten=True)
    mb = m.bool()
    torch.testing.assert_close(got_a[mb], want_a[mb], **TOL)
    torch.testing.assert_close(got_r[mb], want_r[mb], **TOL)
    # float32, as verl runs it
    want_a32, _ = ca.compute_gae_advantage_return(r.float(), v.float(), m, 1.0, 0.95)
    got_a32, _ = gae(r.float(), v.float(), m, gamma=1.0, lam=0.95, whiten=True)
    torch.testing.assert_close(got_a32[mb], want_a32[mb], rtol=1e-4, atol=1e-4)


@pytest.mark.peer
def test_gae_multiturn_invariance_like_verl():
    """verl's multi-turn property: inserting masked observation tokens does not change the
    advantages of the response tokens (skip_masked), but does under zero_masked."""
    r, v, m = _batch(B=4, T=30, holes=False, seed=3)
    ins = torch.zeros(4, 7, dtype=r.dtype)
    r2 = torch.cat([r[:, :10], ins, r[:, 10:]], 1)
    v2 = torch.cat([v[:, :10], ins + 5.0, v[:, 10:]], 1)
    m2 = torch.cat([m[:, :10], ins.long(), m[:, 10:]], 1)
    a, _ = gae(r, v, m, gamma=0.9, lam=0.9, semantics="verl")
    a2, _ = gae(r2, v2, m2, gamma=0.9, lam=0.9, semantics="verl")
    keep = torch.cat([torch.ones(10), torch.zeros(7), torch.ones(30 - 10)]).bool()
    torch.testing.assert_close(a2[:, keep], a, rtol=1e-12, atol=1e-12)
    z2, _ = gae(r2, v2, m2, gamma=0.9, lam=0.9, semantics="zero_masked")
    assert not torch.allclose(z2[:, keep][:, :10], a[:, :10])


@pytest.mark.peer
def test_reinforce_pp_matches_verl():
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, _, m = _batch(holes=True)

    class Cfg:
        gamma = 0.95

    want_a, want_ret = ca.compute_reinforce_plus_plus_outcome_advantage(r, m, config=Cfg())
    ret = discounted_returns(r, m, 0.95, semantics="verl")
    torch.testing.assert_close(ret, want_ret, **TOL)
    torch.testing.assert_close(masked_whiten(ret, m), want_a, **TOL)


@pytest.mark.peer
def test_masked_helpers_match_verl():
    F = require_peer("verl.utils.torch_functional")
    x = torch.randn(7, 31, dtype=torch.float64)
    m = (torch.rand(7, 31) > 0.4).to(torch.float64)
    torch.testing.assert_close(masked_mean(x, m), F.masked_mean(x, m), **TOL)
    torch.testing.assert_close(masked_var(x, m), F.masked_var(x, m), **TOL)
    torch.testing.assert_close(masked_mean(x, m, -1), F.masked_mean(x, m, axis=-1), **TOL)
    mb = m.bool()
    for shift in (True, False):
        torch.testing.assert_close(masked_whiten(x, m, shift)[mb],
                                   F.masked_whiten(x, m, shift)[mb], **TOL)


def _verl_index(ids):
    return ids.numpy()


@pytest.mark.peer
@pytest.mark.parametrize("vectorized", [False, True])
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_matches_verl(vectorized, norm):
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, _, m = _batch(B=30)
    ids = _groups(30)
    fn = (ca.compute_grpo_vectorized_outcome_advantage if vectorized
          else ca.compute_grpo_outcome_advantage)
    want, _ = fn(r.clone(), m, _verl_index(ids), norm_adv_by_std_in_grpo=norm)
    got = group_advantages(r, group_ids=ids, method="grpo" if norm else "dr_grpo", mask=m,
                           semantics="verl")
    torch.testing.assert_close(got, want.to(got.dtype), **TOL)


@pytest.mark.peer
def test_rloo_matches_verl_loop_and_vectorized():
    """verl's loop gives r for a group of one (semantics='verl'); its vectorised version
    gives 0 there (verl#7793), which is rlfuse's default."""
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, _, m = _batch(B=30)
    ids = _groups(30)
    assert (torch.bincount(ids) == 1).any()
    want, _ = ca.compute_rloo_outcome_advantage(r.clone(), m, _verl_index(ids))
    got = group_advantages(r, group_ids=ids, method="rloo", mask=m, semantics="verl")
    torch.testing.assert_close(got, want, **TOL)
    want_v, _ = ca.compute_rloo_vectorized_outcome_advantage(r.clone(), m, _verl_index(ids))
    got_v = group_advantages(r, group_ids=ids, method="rloo", mask=m, semantics="rlfuse")
    torch.testing.assert_close(got_v, want_v, **TOL)


@pytest.mark.peer
def test_other_outcome_estimators_match_verl():
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, _, m = _batch(B=30)
    ids = _groups(30)
    idx = _verl_index(ids)
    want, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(r.clone(), m, idx)
    got = group_advantages(r, group_ids=ids, method="reinforce_pp_baseline", mask=m,
                           semantics="verl")
    torch.testing.assert_close(got, want, **TOL)
    want, _ = ca.compute_opo_outcome_advantage(r.clone(), m, idx)
    got = group_advantages(r, group_ids=ids, method="opo", mask=m, semantics="verl")
    torch.testing.assert_close(got, want, **TOL)
    want, _ = ca.compute_gpg_outcome_advantage(r.clone(), m, idx)
    got = group_advantages(r, group_ids=ids, method="gpg", mask=m, semantics="verl")
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.peer
@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_matches_verl(norm):
    ca = require_peer("verl.trainer.ppo.core_algos")
    r, _, m = _batch(B=24)
    ids = torch.arange(24) % 5  # every group has >= 2 members, unsorted
    want, _ = ca.compute_grpo_passk_outcome_advantage(
        r.clone(), m, _verl_index(ids), config={"norm_adv_by_std_in_grpo": norm})
    got = group_advantages(r, group_ids=ids, method="grpo_passk", mask=m, semantics="verl",
                           norm_by_std=norm)
    torch.testing.assert_close(got, want, **TOL)
    lonely = torch.tensor([0, 0, 1])
    with pytest.raises(Exception):
        ca.compute_grpo_passk_outcome_advantage(r[:3].clone(), m[:3], lonely.numpy(),
                                                config={"norm_adv_by_std_in_grpo": True})
    with pytest.raises(ValueError, match="grpo_passk"):
        group_advantages(r[:3], group_ids=lonely, method="grpo_passk", semantics="verl")


@pytest.mark.peer
def test_token_rewards_match_verl_kl_penalty():
    ca = require_peer("verl.trainer.ppo.core_algos")
    _, _, m = _batch(B=8, T=20, holes=True)
    score = torch.randn(8, dtype=torch.float64)
    last = m.shape[1] - 1 - m.flip(-1).argmax(-1)
    scores_tok = torch.zeros(8, 20, dtype=torch.float64)
    scores_tok[torch.arange(8), last] = score
    logp = torch.randn(8, 20, dtype=torch.float64)
    ref = torch.randn(8, 20, dtype=torch.float64)
    want = ca.compute_rewards(scores_tok, logp * m, ref * m, 0.05)  # verl masks the KL
    got = token_rewards(score, m, kl=logp - ref, kl_coef=0.05)
    torch.testing.assert_close(got, want * m, **TOL)


# ======================================================================================
# TRL (GRPOTrainer / RLOOTrainer advantage blocks, with trl's nanstd)
# ======================================================================================
def _trl_grpo(rewards, n, scale):
    nanstd = require_peer("trl.trainer.utils").nanstd
    mean = torch.nanmean(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, n), dim=1).repeat_interleave(n, dim=0) if n > 1 else \
            torch.zeros_like(rewards)
    else:
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else \
            torch.zeros_like(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0)


def _trl_rloo(rewards, n):
    grouped = rewards.view(-1, n)
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    base = ((total - grouped) / (counts - 1)).view(-1) if n > 1 else rewards
    return torch.nan_to_num(rewards - base, nan=0.0)


@pytest.mark.peer
@pytest.mark.parametrize("scale,method", [("group", "grpo"), ("batch", "batch_std"),
                                          ("none", "dr_grpo")])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_grpo_matches_trl(scale, method, n):
    g = torch.Generator().manual_seed(n)
    rewards = torch.randint(0, 3, (8 * 4,), generator=g).to(torch.float64)
    rewards[5] = float("nan")  # an unscorable completion (a reward function returned None)
    rewards[8:12] = float("nan")
    rewards[12:15] = float("nan")  # a group with a single scorable completion
    want = _trl_grpo(rewards, n, scale)
    got = group_advantages(rewards, group_size=n, method=method, semantics="trl")
    # trl's nanstd forms its Bessel factor count / (count - 1) in float32
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


@pytest.mark.peer
@pytest.mark.parametrize("n", [2, 4])
def test_rloo_matches_trl(n):
    g = torch.Generator().manual_seed(n)
    rewards = torch.randn(8 * n, generator=g, dtype=torch.float64)
    rewards[1] = float("nan")
    rewards[n: 2 * n - 1] = float("nan")  # one scorable member left
    want = _trl_rloo(rewards, n)
    got = group_advantages(rewards, group_size=n, method="rloo", semantics="trl")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ======================================================================================
# OpenRLHF (formulas transcribed; OpenRLHF is not installed)
# ======================================================================================
def _orl_gae(values, rewards, action_mask, gamma, lambd):
    lastgaelam = 0
    advantages_reversed = []
    T = rewards.size(1)
    values = action_mask * values
    rewards = action_mask * rewards
    for t in reversed(range(T)):
        nextvalues = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lambd * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, advantages + values


@pytest.mark.parametrize("holes", [False, True])
def test_gae_matches_openrlhf(holes):
    r, v, m = _batch(holes=holes, seed=5)
    want_a, want_r = _orl_gae(v, r, m, 0.97, 0.9)
    got_a, got_r = gae(r, v, m, gamma=0.97, lam=0.9, semantics="openrlhf")
    mb = m.bool()
    torch.testing.assert_close(got_a[mb], want_a[mb], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_r[mb], want_r[mb], rtol=1e-12, atol=1e-12)
    skip_a, _ = gae(r, v, m, gamma=0.97, lam=0.9, semantics="verl")
    if holes:
        assert not torch.allclose(skip_a[mb], want_a[mb])
    else:
        torch.testing.assert_close(skip_a, got_a, rtol=0, atol=0)


def test_cumulative_returns_match_openrlhf():
    r, _, m = _batch(holes=True, seed=6)
    rz = m * r
    ret = torch.zeros_like(r)
    cum = torch.zeros(r.size(0), dtype=r.dtype)
    for t in reversed(range(r.size(1))):
        cum = rz[:, t] + 0.9 * cum
        ret[:, t] = cum
    got = discounted_returns(r, m, 0.9, semantics="openrlhf")
    mb = m.bool()
    torch.testing.assert_close(got[mb], ret[mb], rtol=1e-12, atol=1e-12)


def test_group_estimators_match_openrlhf():
    n = 4
    g = torch.Generator().manual_seed(7)
    rewards = torch.randn(6 * n, generator=g, dtype=torch.float64)
    grouped = rewards.reshape(-1, n)
    norm = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-9))
    torch.testing.assert_close(group_advantages(rewards, group_size=n, semantics="openrlhf"),
                               norm.reshape(-1))
    rloo = grouped - (grouped.sum(-1, keepdim=True) - grouped) / (n - 1)
    torch.testing.assert_close(group_advantages(rewards, group_size=n, method="rloo",
                                                semantics="openrlhf"), rloo.reshape(-1))
    dr = grouped - grouped.mean(-1, keepdim=True)
    torch.testing.assert_close(group_advantages(rewards, group_size=n, method="dr_grpo",
                                                semantics="openrlhf"), dr.reshape(-1))
    # reinforce_baseline: r - mean, broadcast over the response (gamma = 1, no KL), then the
    # global token-level normalisation with the biased variance clamped at 1e-8
    mask = (torch.arange(9)[None] < torch.randint(1, 10, (6 * n,), generator=g)[:, None])
    adv = dr.reshape(-1)[:, None] * mask
    num = mask.sum()
    mean = (adv * mask).sum() / num
    var = ((adv - mean).pow(2) * mask).sum() / num
    want = (adv - mean) * var.clamp(min=1e-8).rsqrt()
    got = group_advantages(rewards, group_size=n, method="reinforce_pp_baseline", mask=mask,
                           semantics="openrlhf")
    torch.testing.assert_close(got[mask], want[mask])
    assert np.all(got[~mask].numpy() == 0)
