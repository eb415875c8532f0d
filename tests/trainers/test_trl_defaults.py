"""The configs' defaults are TRL 1.16's / transformers' (except the documented rlfuse
choices), the LR schedule is transformers', DPO takes TRL's list of loss types with
loss_weights, and resuming a checkpoint that ran with a former default says so."""
import dataclasses
import warnings

import pytest
import torch

from rlfuse.trainers import (ConfigError, DPOConfig, DPOTrainer, GRPOConfig, PPOConfig,
                             TrainConfig)
from rlfuse.trainers.config import FORMER_DEFAULTS, field_default
from tests.helpers import require_peer
from tests.trainers.reference import addition_pairs

# rlfuse's own defaults for fields TRL has too (docs/trainers.md, "Defaults")
RLFUSE_CHOICES = {"output_dir", "logging_steps", "save_steps", "save_total_limit",
                  "report_to", "fsdp", "top_k", "loss_type"}


def test_defaults_are_trls():
    for cls in (TrainConfig, GRPOConfig, PPOConfig, DPOConfig):
        c = cls(report_to="none")
        assert c.num_train_epochs == 3.0 and c.lr_scheduler_type == "linear", cls
        assert c.warmup_steps == 0
    for cls in (GRPOConfig, PPOConfig):
        c = cls(report_to="none")
        assert c.max_prompt_length is None and c.max_completion_length == 512, cls
    assert GRPOConfig(report_to="none").use_bias_correction_kl is True
    d = DPOConfig(report_to="none")
    assert d.max_length == 1024 and d.max_prompt_length is None and d.loss_weights is None
    # TRL's DPOConfig(max_length=512): no max_prompt_length to conflict with
    assert DPOConfig(max_length=512, report_to="none").max_length == 512
    with pytest.raises(ConfigError, match="max_prompt_length: must be < max_length"):
        DPOConfig(max_length=512, max_prompt_length=512, report_to="none")
    # the former defaults are recorded for the resume warning
    for k, v in FORMER_DEFAULTS.items():
        assert any(hasattr(c, k) and field_default(c, k) != v
                   for c in (GRPOConfig, DPOConfig)), k


@pytest.mark.peer
def test_defaults_equal_trl_peer():
    trl = require_peer("trl")

    def defaults(cls):
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out

    for ours, theirs in ((GRPOConfig, trl.GRPOConfig), (DPOConfig, trl.DPOConfig)):
        t = defaults(theirs)
        differ = {f.name for f in dataclasses.fields(ours)
                  if f.name in t and str(field_default(ours, f.name)) != str(t[f.name])}
        assert differ <= RLFUSE_CHOICES, (ours.__name__, differ - RLFUSE_CHOICES)
    assert str(trl.DPOConfig.__dataclass_fields__["loss_type"].default_factory()) == "['sigmoid']"


def test_unlimited_prompts_by_default(tok):
    from rlfuse.trainers.base import encode_prompts

    long = "1+" * 300 + "1="
    n = len(tok(long)["input_ids"])
    assert n > 512
    ids, mask = encode_prompts(tok, [long, "1+1="], GRPOConfig(report_to="none").max_prompt_length,
                               "cpu")
    assert ids.shape[1] == n and int(mask[0].sum()) == n
    ids, _ = encode_prompts(tok, [long], 512, "cpu")
    assert ids.shape[1] == 512


def _dpo(tmp_path, tok, model, name="out", ref=None, **kw):
    base = dict(output_dir=str(tmp_path / name), learning_rate=1e-2, per_device_train_batch_size=4,
                max_steps=1, progress=False, plot=False, report_to="none", seed=0)
    base.update(kw)
    return DPOTrainer(model, ref, args=DPOConfig(**base), train_dataset=addition_pairs(8),
                      tokenizer=tok)


@pytest.mark.parametrize("kind,hf", [("linear", "linear"), ("cosine", "cosine"),
                                     ("constant", "constant_with_warmup")])
def test_lr_schedule_is_transformers(tmp_path, tok, tiny, kind, hf):
    from transformers import get_scheduler

    tr = _dpo(tmp_path, tok, tiny, loss_type="sft", lr_scheduler_type=kind, warmup_steps=3,
              max_steps=8, learning_rate=1.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    want = get_scheduler(hf, opt, num_warmup_steps=3, num_training_steps=8)
    for step in range(8):
        assert tr.scheduler.get_last_lr()[0] == pytest.approx(want.get_last_lr()[0],
                                                              abs=1e-12), step
        tr.optimizer.step()
        tr.scheduler.step()
        opt.step()
        want.step()


def test_dpo_loss_type_list_with_weights(tmp_path, tok, tiny):
    from rlfuse.ops import preference_loss
    from rlfuse.trainers import copy_reference

    ref = copy_reference(tiny)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    tr = _dpo(tmp_path, tok, tiny, ref=ref, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    rows = [tr.train_dataset[i] for i in range(4)]
    idx = torch.arange(4)
    loss, _ = tr.micro_batch_loss(rows, idx)
    with torch.no_grad():
        c, r, lc, lr = tr.sequence_logps(tr.policy, rows, idx)
    refl = tr.ref_logps[idx]
    parts = [preference_loss(c, r, refl[:, 0], refl[:, 1], loss_type=t, beta=0.1,
                             chosen_lengths=lc, rejected_lengths=lr)[0] for t in ("sigmoid", "sft")]
    assert float(loss.detach()) == pytest.approx(float(parts[0] + 0.5 * parts[1]), rel=1e-5)
    assert tr.train()["global_step"] == 1


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_dpo_aot_types_train(tmp_path, tok, tiny, loss_type):
    from rlfuse.trainers import copy_reference

    tr = _dpo(tmp_path, tok, tiny, ref=copy_reference(tiny), loss_type=loss_type)
    before = [p.detach().clone() for p in tiny.parameters()]
    tr.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny.parameters()))


def test_dpo_loss_type_list_checks(tmp_path, tok, tiny):
    for kw, what in [(dict(loss_type=["sigmoid", "nope"]), "loss_type: unknown type"),
                     (dict(loss_type=[]), "loss_type: must be a loss type"),
                     (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]),
                      "loss_weights: has 1 weights for 2 loss types"),
                     (dict(loss_type="sigmoid", loss_weights=["a"]), "loss_weights"),
                     (dict(loss_type=["sft", "exo_pair"]), "label_smoothing"),
                     (dict(loss_type=["robust"], label_smoothing=0.5), "label_smoothing")]:
        with pytest.raises(ConfigError, match=what):
            DPOConfig(report_to="none", **kw)
    # reference-free lists need no reference model; one reference-based type does
    _dpo(tmp_path, tok, tiny, loss_type=["sft", "orpo"])
    with pytest.raises(ConfigError, match="needs a reference model"):
        _dpo(tmp_path, tok, tiny, loss_type=["sft", "sigmoid"])


def test_cli_parses_loss_type_lists():
    from rlfuse.trainers.cli import parse_fields

    assert parse_fields(DPOConfig, ["--loss_type", "[sigmoid, sft]", "--loss_weights",
                                    "[1.0, 0.5]"]) == {"loss_type": ["sigmoid", "sft"],
                                                       "loss_weights": [1.0, 0.5]}
    assert parse_fields(DPOConfig, ["--loss_type", "ipo"]) == {"loss_type": "ipo"}
    assert parse_fields(GRPOConfig, ["--max_prompt_length", "none"]) == {
        "max_prompt_length": None}


def test_demo_keeps_its_measured_settings():
    from rlfuse.trainers import default

    for algo, values in default.DEFAULTS.items():
        assert values["lr_scheduler_type"] == "constant", algo
    assert default.DEFAULTS["grpo"]["use_bias_correction_kl"] is False


def test_resume_of_a_checkpoint_with_former_defaults_warns(tmp_path, tok):
    """A checkpoint that ran with the former defaults (constant schedule, prompts cut at
    512 tokens), resumed under the new ones: the resume goes on and warns, naming each
    setting and the flag that keeps it; resumed with those settings, it does not warn."""
    from rlfuse.models.tiny import tiny_causal_lm

    def model():
        return tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)

    old = dict(loss_type="sft", save_steps=1, lr_scheduler_type="constant",
               max_prompt_length=512)
    _dpo(tmp_path, tok, model(), **old).train()
    with pytest.warns(RuntimeWarning) as rec:
        res = _dpo(tmp_path, tok, model(), loss_type="sft", save_steps=1,
                   max_steps=2).train(resume_from_checkpoint=True)
    assert res["global_step"] == 2
    msg = " ".join(str(w.message) for w in rec if "former defaults" in str(w.message))
    assert "lr_scheduler_type='constant' (--lr_scheduler_type constant)" in msg, msg
    assert "max_prompt_length=512 (--max_prompt_length 512)" in msg, msg
    assert "num_train_epochs" not in msg         # max_steps is set: epochs do not matter
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*former defaults.*")
        res = _dpo(tmp_path, tok, model(), **dict(old, max_steps=3)).train(
            resume_from_checkpoint=True)
    assert res["global_step"] == 3
