"""Benchmark of the fused policy / value losses against torch eager, torch.compile, verl, TRL.

Main case (the issue's target): forward + backward of the clipped PPO loss with a k3 KL term,
token-mean aggregation, float32, CPU B=64, T=4096.

* ``rlfuse``  ``policy_loss(..., ref_logp=ref, beta=0.04, kl_kind="k3")`` (loss plus eleven
  statistics, in one pass) and ``torch.autograd.grad`` w.r.t. logp.
* ``eager``   the same chain in plain torch: ratio, clipped surrogate, k3, masked token-mean,
  plus the two statistics every trainer logs (clip fraction, approximate KL).
* ``compile`` ``torch.compile`` of that chain (default inductor).
* ``verl``    ``compute_policy_loss_vanilla`` + ``kl_penalty("low_var_kl")`` + ``agg_loss``,
  composed as verl's actor loss does (it also applies dual-clip and its clamps, and syncs its
  metrics with ``.item()``).
* ``trl``     TRL's own ``GRPOTrainer._compute_loss`` loss math (k3 with beta, clipped
  surrogate, ``dapo`` normalisation, its metrics), run on a stand-in trainer.

Other rows: forward only (no gradient), GSPO (sequence ratio), and the clipped value loss.

Every variant's result (the gradient in "fwd+bwd" rows, the loss in the "fwd" row) is
compared with the eager chain run in float64 on the same inputs; a variant beyond the
tolerance is named in the row's notes with its largest error.
"""

from __future__ import annotations

import types
from collections import defaultdict

import torch

from rlfuse.bench.harness import Row, check_agreement, time_variants
from rlfuse.ops import policy_loss, value_loss

NAME = "losses"

CPU_CASES = [(64, 4096)]
CPU_QUICK = [(16, 2048)]
GPU_CASES = [(256, 8192)]
GPU_QUICK = [(64, 4096)]

EPS_LOW, EPS_HIGH, BETA = 0.2, 0.28, 0.04


def _inputs(B, T, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lp = -(torch.rand(B, T, generator=g) * 3 + 0.05)
    d = dict(
        lp=lp,
        old=lp + 0.1 * torch.randn(B, T, generator=g),
        ref=lp + 0.1 * torch.randn(B, T, generator=g),
        adv=torch.randn(B, T, generator=g),
        values=torch.randn(B, T, generator=g),
        returns=torch.randn(B, T, generator=g),
    )
    d["old_values"] = d["values"] + 0.2 * torch.randn(B, T, generator=g)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    d["mask"] = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return {k: v.to(device) for k, v in d.items()}


# ------------------------------------------------------------------------------ chains
def eager_ppo_k3(lp, old, adv, mask, ref):
    """Clipped PPO + beta * k3, token-mean; returns (loss, clip_frac, approx_kl)."""
    log_ratio = lp - old
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
    pg = torch.maximum(pg1, pg2)
    d = ref - lp
    kl = torch.exp(d) - d - 1
    per_token = pg + BETA * kl
    n = mask.sum()
    loss = (per_token * mask).sum() / n
    clip_frac = ((pg2 > pg1).float() * mask).sum() / n
    approx_kl = (-log_ratio * mask).sum() / n
    return loss, clip_frac.detach(), approx_kl.detach()


def eager_gspo(lp, old, adv, mask):
    """GSPO-token (stop-gradient form), token-mean."""
    L = mask.sum(-1).clamp(min=1)
    seq = ((lp - old) * mask).sum(-1) / L
    log_s = lp - lp.detach() + seq.detach().unsqueeze(-1)
    s = torch.exp(log_s)
    pg = torch.maximum(-adv * s, -adv * torch.clamp(s, 1 - EPS_LOW, 1 + EPS_HIGH))
    return (pg * mask).sum() / mask.sum()


def eager_value(v, old_v, ret, mask):
    vclip = torch.clamp(v, old_v - 0.2, old_v + 0.2)
    lmax = torch.maximum((v - ret) ** 2, (vclip - ret) ** 2)
    return 0.5 * (lmax * mask).sum() / mask.sum()


def _verl():
    try:
        from verl.trainer.ppo import core_algos
        from verl.workers.config import ActorConfig

        cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_mini_batch_size=4,
                          ppo_micro_batch_size_per_gpu=2, clip_ratio=0.2,
                          clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH)
    except Exception:  # verl not installed, or its config API moved
        return None

    def ppo_k3(lp, old, adv, mask, ref):
        pg, _ = core_algos.compute_policy_loss_vanilla(old, lp, adv, mask, "token-mean",
                                                       config=cfg)
        kld = core_algos.kl_penalty(lp, ref, "low_var_kl")
        return pg + BETA * core_algos.agg_loss(kld, mask, "token-mean")

    def value(v, old_v, ret, mask):
        return core_algos.compute_value_loss(v, ret, old_v, mask, cliprange_value=0.2)[0]

    return ppo_k3, value


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl():
    """TRL's GRPOTrainer._compute_loss on a stand-in trainer (its own loss code)."""
    try:
        from trl.trainer.grpo_trainer import GRPOTrainer
    except Exception:  # TRL not installed or failed to import
        return None

    def ppo_k3(lp, old, adv, mask, ref):
        B, T = lp.shape
        f = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True), accelerator=_Accelerator(),
            _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            top_entropy_quantile=1.0, off_policy_mask_threshold=None,
            importance_sampling_level="token", beta=BETA, loss_type="dapo",
            epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
            args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                       sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
                                       steps_per_generation=1),
            use_vllm=False, vllm_importance_sampling_correction=False,
            current_gradient_accumulation_steps=1, max_completion_length=T,
            _entropy_bonus_enabled=False, use_adaptive_entropy=False, entropy_coef=0.0,
            aux_loss_enabled=False,
            _get_per_token_logps_and_entropies=lambda *a, **k: (lp, lp.detach(), None),
        )
        m = mask.long()
        inputs = dict(prompt_ids=torch.zeros(B, 1, dtype=torch.long, device=lp.device),
                      prompt_mask=torch.ones(B, 1, dtype=torch.long, device=lp.device),
                      completion_ids=torch.zeros(B, T, dtype=torch.long, device=lp.device),
                      completion_mask=m, advantages=adv, old_per_token_logps=old,
                      ref_per_token_logps=ref, num_items_in_batch=mask.sum())
        return GRPOTrainer._compute_loss(f, None, inputs)

    return ppo_k3


# ------------------------------------------------------------------------------ suite
def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    cases = (GPU_QUICK if quick else GPU_CASES) if dev.type == "cuda" else (
        CPU_QUICK if quick else CPU_CASES)
    repeat = repeat or (5 if quick else 20)
    extra = [b for b in (backends or []) if b]
    verl = _verl()
    trl = _trl()
    c_ppo = torch.compile(eager_ppo_k3, dynamic=False) if compile else None
    c_gspo = torch.compile(eager_gspo, dynamic=False) if compile else None
    c_value = torch.compile(eager_value, dynamic=False) if compile else None
    rows: list[Row] = []
    for B, T in cases:
        t = _inputs(B, T, dev)
        lp, old, adv, mask, ref = t["lp"], t["old"], t["adv"], t["mask"], t["ref"]
        x = lp.detach().clone().requires_grad_()
        case = f"B={B} T={T}"
        n = B * T

        def timed(fns):
            # interleaved rounds; a variant that fails is reported in the notes (time None)
            return time_variants(fns, dev, warmup=3, repeat=repeat)

        def fb(f):
            return lambda: torch.autograd.grad(f(x), x)

        d64 = {k: v.double() for k, v in t.items()}

        def ref_grad(f, z):
            z64 = z.detach().double().requires_grad_()
            return torch.autograd.grad(f(z64, d64), z64)[0]

        def rl(z, backend=None):
            return policy_loss(z, old, adv, mask, ref_logp=ref, beta=BETA, kl_kind="k3",
                               epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, backend=backend)[0]

        # ppo + k3, forward + backward (the target)
        fns = {"rlfuse": fb(rl)}
        for b in extra:
            fns[f"rlfuse[{b}]"] = fb(lambda z, b=b: rl(z, b))
        fns["eager"] = fb(lambda z: eager_ppo_k3(z, old, adv, mask, ref)[0])
        if c_ppo is not None:
            fns["compile"] = fb(lambda z: c_ppo(z, old, adv, mask, ref)[0])
        if verl is not None:
            fns["verl"] = fb(lambda z: verl[0](z, old, adv, mask, ref))
        if trl is not None:
            fns["trl"] = fb(lambda z: trl(z, old, adv, mask, ref))
        ms, notes = timed(fns)
        check_agreement(fns, ref_grad(lambda z, d: eager_ppo_k3(
            z, d["old"], d["adv"], d["mask"], d["ref"])[0], lp), notes)
        # read logp, old, adv, mask, ref; write d logp
        rows.append(Row("ppo+k3", case, "float32", "fwd+bwd", ms, 24 * n, notes))

        # forward only
        def nograd(f):
            def g():
                with torch.no_grad():
                    return f()
            return g

        fns = {"rlfuse": nograd(lambda: rl(lp))}
        fns["eager"] = nograd(lambda: eager_ppo_k3(lp, old, adv, mask, ref))
        if c_ppo is not None:
            fns["compile"] = nograd(lambda: c_ppo(lp, old, adv, mask, ref))
        ms, notes = timed(fns)
        check_agreement(fns, eager_ppo_k3(d64["lp"], d64["old"], d64["adv"], d64["mask"],
                                          d64["ref"])[0], notes)
        rows.append(Row("ppo+k3", case, "float32", "fwd", ms, 20 * n, notes))

        # GSPO
        fns = {"rlfuse": fb(lambda z: policy_loss(z, old, adv, mask, variant="gspo",
                                                  epsilon_low=EPS_LOW,
                                                  epsilon_high=EPS_HIGH)[0])}
        fns["eager"] = fb(lambda z: eager_gspo(z, old, adv, mask))
        if c_gspo is not None:
            fns["compile"] = fb(lambda z: c_gspo(z, old, adv, mask))
        ms, notes = timed(fns)
        check_agreement(fns, ref_grad(lambda z, d: eager_gspo(z, d["old"], d["adv"],
                                                              d["mask"]), lp), notes)
        rows.append(Row("gspo", case, "float32", "fwd+bwd", ms, 20 * n, notes))

        # value loss
        v = t["values"].detach().clone().requires_grad_()
        ov, ret = t["old_values"], t["returns"]

        def fbv(f):
            return lambda: torch.autograd.grad(f(v), v)

        fns = {"rlfuse": fbv(lambda z: value_loss(z, ov, ret, mask, cliprange_value=0.2)[0])}
        fns["eager"] = fbv(lambda z: eager_value(z, ov, ret, mask))
        if c_value is not None:
            fns["compile"] = fbv(lambda z: c_value(z, ov, ret, mask))
        if verl is not None:
            fns["verl"] = fbv(lambda z: verl[1](z, ov, ret, mask))
        ms, notes = timed(fns)
        check_agreement(fns, ref_grad(lambda z, d: eager_value(
            z, d["old_values"], d["returns"], d["mask"]), t["values"]), notes)
        rows.append(Row("value", case, "float32", "fwd+bwd", ms, 20 * n, notes))
        del t, x, v
    return rows
