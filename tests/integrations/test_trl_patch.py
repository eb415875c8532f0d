"""rlfuse.integrations.trl: every patched TRL function gives TRL's own numbers (float32
tolerance) with and without the patch, on random inputs with padding; GRPOTrainer's loss
through rlfuse.ops.policy_loss matches TRL's _compute_loss (loss, gradients, metrics) over
its loss types and options; unpatch restores every original object."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from tests.helpers import require_peer
from tests.integrations._common import assert_refuses_unknown_version

pytestmark = pytest.mark.peer

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def trl():
    utils = require_peer("trl.trainer.utils")
    grpo = require_peer("trl.trainer.grpo_trainer")
    import rlfuse.integrations.trl as rt

    yield rt, utils, grpo
    rt.unpatch()


def _grads(out, xs):
    g = torch.randn_like(out, generator=torch.Generator().manual_seed(99)) if out.dim() else None
    return torch.autograd.grad(out if g is None else (out * g).sum(), xs, allow_unused=True)


def _logits(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(4, 11, 40, generator=g) * 3).to(dtype)
    index = torch.randint(0, 40, (4, 11), generator=g)
    row_mask = (torch.rand(4, 11, generator=g) < 0.7).long()
    row_mask[0] = 1
    return logits, index, row_mask


def _run(rt, fn_get, args_fn, patched):
    (rt.patch if patched else rt.unpatch)()
    try:
        return fn_get()(*args_fn())
    finally:
        rt.unpatch()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("use_mask", [False, True])
def test_selective_log_softmax(trl, temperature, use_mask):
    rt, utils, _ = trl
    logits, index, row_mask = _logits()
    outs = []
    for patched in (False, True):
        x = logits.clone().requires_grad_()
        out = _run(rt, lambda: utils.selective_log_softmax,
                   lambda: (x, index, temperature, row_mask if use_mask else None), patched)
        outs.append((out, _grads(out, [x])[0]))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)
    if use_mask:
        assert torch.all(outs[1][0][row_mask == 0] == 0)


def test_selective_log_softmax_top_k_falls_back(trl):
    rt, utils, _ = trl
    logits, _, _ = _logits(1)
    topk = torch.randint(0, 40, (4, 11, 3))
    want = _run(rt, lambda: utils.selective_log_softmax, lambda: (logits, topk), False)
    got = _run(rt, lambda: utils.selective_log_softmax, lambda: (logits, topk), True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_entropy_and_fused_pair(trl, entropy_requires_grad):
    rt, utils, _ = trl
    logits, index, row_mask = _logits(2)
    res = []
    for patched in (False, True):
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ent = _run(rt, lambda: utils.entropy_from_logits, lambda: (x1,), patched)
        lp, ent2 = _run(rt, lambda: utils.selective_log_softmax_and_entropy,
                        lambda: (x2, index, entropy_requires_grad, 0.8, row_mask), patched)
        assert ent2.requires_grad == entropy_requires_grad
        total = lp.sum() + (ent2.sum() if entropy_requires_grad else 0)
        res.append((ent, _grads(ent, [x1])[0], lp, ent2, torch.autograd.grad(total, x2)[0]))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("outputs,bias,temperature,scale", [
    (("log_probs",), False, 1.0, 1.0),
    (("log_probs", "entropy"), True, 0.7, 1.0),
    (("log_probs", "entropy"), False, 1.0, 0.5),
])
def test_fused_lm_head(trl, outputs, bias, temperature, scale):
    rt, utils, _ = trl
    g = torch.Generator().manual_seed(3)
    N, H, V = 37, 16, 70
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    b0 = torch.randn(V, generator=g) if bias else None
    y = torch.randint(0, V, (N,), generator=g)
    res = []
    for patched in (False, True):
        (rt.patch if patched else rt.unpatch)()
        fn = utils._ChunkedLogProbFunction
        rt.unpatch()
        assert getattr(fn, "__rlfuse__", False) == patched
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        out = fn.apply(h, w, b, y, temperature, 64, None, scale, outputs)
        assert out[2:] == (None, None, None)
        assert (out[1] is None) == ("entropy" not in outputs)
        total = (out[0] * torch.linspace(-1, 1, N)).sum() + (
            out[1].sum() if out[1] is not None else 0)
        grads = torch.autograd.grad(total, [t for t in (h, w, b) if t is not None])
        res.append((out[0],) + ((out[1],) if out[1] is not None else ()) + tuple(grads))
    for a, b_ in zip(res[1], res[0]):
        torch.testing.assert_close(a, b_, rtol=3e-5, atol=3e-5)


def test_fused_lm_head_softcap_falls_back(trl):
    rt, utils, _ = trl
    h, w, y = torch.randn(5, 8), torch.randn(20, 8), torch.randint(0, 20, (5,))
    want = utils._ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, 30.0, 1.0, ("log_probs",))
    with rt.patched():
        got = utils._ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, 30.0, 1.0,
                                                   ("log_probs",))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)


# ---------------------------------------------------------------------- GRPO _compute_loss
class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trainer(grpo, lp, ent, *, loss_type="dapo", level="token", beta=0.0, bias_kl=False,
             delta=None, entropy_coef=0.0, vllm=False, accum=1, training=True, opsm=None,
             top_q=1.0, aux=None):
    f = types.SimpleNamespace()
    f.model = types.SimpleNamespace(training=training)
    f.accelerator = _Accelerator()
    f._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    f.top_entropy_quantile = top_q
    f.off_policy_mask_threshold = opsm
    f.importance_sampling_level = level
    f.beta = beta
    f.loss_type = loss_type
    f.epsilon_low, f.epsilon_high = 0.2, (4.0 if loss_type == "cispo" else 0.28)
    f.args = types.SimpleNamespace(delta=delta, use_bias_correction_kl=bias_kl,
                                   sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                   steps_per_generation=2, entropy_target=0.0)
    f.use_vllm = vllm
    f.vllm_importance_sampling_correction = vllm
    f.current_gradient_accumulation_steps = accum
    f.max_completion_length = 48
    f._entropy_bonus_enabled = entropy_coef != 0.0
    f.use_adaptive_entropy = False
    f.entropy_coef = entropy_coef
    f.aux_loss_enabled = aux is not None
    f.router_aux_loss_coef = 0.3
    f._get_per_token_logps_and_entropies = lambda *a, **k: (lp, ent, aux)
    f.get_off_policy_mask = grpo.GRPOTrainer.get_off_policy_mask
    f.get_high_entropy_mask = types.MethodType(grpo.GRPOTrainer.get_high_entropy_mask, f)
    return f


def _grpo_inputs(seed, B=6, T=40, on_policy=False, tool=False, adv_2d=False):
    g = torch.Generator().manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    L = torch.randint(0, T + 1, (B,), generator=g)
    L[0] = T
    L[1] = 0  # an empty completion
    mask = (torch.arange(T)[None] < L[:, None]).long()
    inputs = dict(prompt_ids=torch.zeros(B, 3, dtype=torch.long),
                  prompt_mask=torch.ones(B, 3, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask,
                  advantages=torch.randn(B, T, generator=g) if adv_2d else
                  torch.randn(B, generator=g),
                  ref_per_token_logps=lp + 0.3 * torch.randn(B, T, generator=g),
                  num_items_in_batch=torch.tensor(float(mask.sum()) * 2),
                  importance_sampling_ratio=torch.rand(B, T, generator=g) + 0.5,
                  sampling_per_token_logps=lp + 0.5 * torch.randn(B, T, generator=g))
    if not on_policy:
        inputs["old_per_token_logps"] = lp + 0.4 * torch.randn(B, T, generator=g)
    if tool:
        inputs["tool_mask"] = (torch.rand(B, T, generator=g) < 0.8).long()
    ent = torch.rand(B, T, generator=g) * 2
    return lp, ent, inputs


def _compare(trl, seed=0, input_kw=None, **kw):
    rt, _, grpo = trl
    lp0, ent0, inputs = _grpo_inputs(seed, **(input_kw or {}))
    res = []
    for patched in (False, True):
        lp, ent = lp0.clone().requires_grad_(), ent0.clone().requires_grad_()
        f = _trainer(grpo, lp, ent, **kw)
        (rt.patch if patched else rt.unpatch)()
        try:
            fn = grpo.GRPOTrainer._compute_loss
            assert getattr(fn, "__rlfuse__", False) == patched
            loss = fn(f, None, dict(inputs))
        finally:
            rt.unpatch()
        grads = torch.autograd.grad(loss, [lp, ent], allow_unused=True)
        metrics = {k: v for k, v in f._metrics["train" if kw.get("training", True)
                                              else "eval"].items()}
        res.append((loss, grads, metrics))
    (want, wg, wm), (got, gg, gm) = res
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(gg, wg):
        if b is None:
            assert a is None or torch.all(a == 0)
        else:
            torch.testing.assert_close(a, b, **TOL)
    assert set(gm) == set(wm), set(gm) ^ set(wm)
    for k in wm:
        assert gm[k] == pytest.approx(wm[k], rel=2e-5, abs=2e-6, nan_ok=True), k
    return got


CASES = [("grpo", "token"), ("bnpo", "token"), ("dr_grpo", "token"), ("dapo", "token"),
         ("luspo", "token"), ("grpo", "sequence"), ("dapo", "sequence"), ("cispo", "token"),
         ("sapo", "token")]


@pytest.mark.parametrize("loss_type,level", CASES)
@pytest.mark.parametrize("beta,bias_kl", [(0.0, False), (0.04, False), (0.04, True)])
def test_grpo_loss(trl, loss_type, level, beta, bias_kl):
    _compare(trl, seed=1, loss_type=loss_type, level=level, beta=beta, bias_kl=bias_kl,
             entropy_coef=0.01, accum=2)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_loss_options(trl, loss_type):
    """vLLM IS ratios, delta, the off-policy mask, tool masks, [B, T] advantages, eval
    mode, the high-entropy mask (without bonus), MoE aux loss, on-policy (no old logps)."""
    _compare(trl, seed=2, loss_type=loss_type, vllm=True, delta=1.5, opsm=0.1, beta=0.04,
             input_kw=dict(tool=True, adv_2d=True))
    _compare(trl, seed=3, loss_type=loss_type, training=False, accum=4, entropy_coef=0.02)
    _compare(trl, seed=4, loss_type=loss_type, top_q=0.5, aux=torch.tensor(0.7))
    _compare(trl, seed=5, loss_type=loss_type, level="sequence",
             input_kw=dict(on_policy=True))
    # delta below 1 + epsilon_high: TRL clamps the ratio before its clip metrics
    _compare(trl, seed=6, loss_type=loss_type, delta=1.1)


def test_grpo_loss_uncovered_config_runs_trl(trl):
    """vespo and the entropy mask together with the entropy bonus are TRL's own code."""
    rt, _, grpo = trl
    lp, ent, inputs = _grpo_inputs(6)
    f = _trainer(grpo, lp, ent, top_q=0.5, entropy_coef=0.01)
    want = grpo.GRPOTrainer._compute_loss(f, None, dict(inputs))
    f2 = _trainer(grpo, lp, ent, top_q=0.5, entropy_coef=0.01)
    with rt.patched():
        got = grpo.GRPOTrainer._compute_loss(f2, None, dict(inputs))
    assert torch.equal(got, want)


def test_unpatch_restores_identity(trl):
    rt, utils, grpo = trl
    import trl.experimental.orpo.orpo_trainer as orpo  # bound selective_log_softmax by name

    rt.unpatch()
    names = ("selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy",
             "_ChunkedLogProbFunction", "_use_triton")
    before = {n: getattr(utils, n) for n in names}
    loss_fn = vars(grpo.GRPOTrainer)["_compute_loss"]
    bound = orpo.selective_log_softmax
    assert bound is before["selective_log_softmax"]
    with rt.patched():
        assert rt.is_patched()
        assert all(getattr(utils, n) is not before[n] for n in names)
        assert orpo.selective_log_softmax is utils.selective_log_softmax
        assert grpo.GRPOTrainer._compute_loss.__rlfuse__
    assert not rt.is_patched()
    assert all(getattr(utils, n) is before[n] for n in names)
    assert vars(grpo.GRPOTrainer)["_compute_loss"] is loss_fn
    assert orpo.selective_log_softmax is bound


def test_unknown_version_refused(trl, monkeypatch):
    rt, utils, _ = trl
    assert_refuses_unknown_version(rt, "trl", "2.0.0", monkeypatch,
                                   lambda: utils.selective_log_softmax)
