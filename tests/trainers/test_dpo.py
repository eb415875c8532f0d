import json
import os

import pytest
import torch

from rlfuse.trainers import ConfigError, DPOConfig, copy_reference
from rlfuse.trainers.dpo import DPOTrainer
from tests.trainers.reference import addition_pairs as _pairs
from tests.trainers.reference import assert_grads_close, double_copy, grads_of


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                beta=0.2, progress=False, plot=False, seed=0)
    base.update(kw)
    return DPOConfig(**base)


def _seq_logps64(model64, tr, rows):
    ids, attn, comp, pos = tr.encode(rows)
    logits = model64(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    s = (lp * comp[:, 1:].double()).sum(1)
    P = len(rows)
    return s[:P], s[P:]


def test_dpo_update_equals_plain_torch(tmp_path, tok, tiny):
    ref = copy_reference(tiny)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    rows = _pairs()
    tr = DPOTrainer(tiny, ref, args=_cfg(tmp_path, label_smoothing=0.1),
                    train_dataset=rows, tokenizer=tok)
    idx = list(range(8))
    batch = [rows[i] for i in idx]
    loss, _ = tr.accumulate_gradients(batch, idx)
    got = grads_of(tiny)
    m64, r64 = double_copy(tiny), double_copy(ref)
    want = 0.0
    for i in (0, 4):
        mb = batch[i:i + 4]
        c, r = _seq_logps64(m64, tr, mb)
        with torch.no_grad():
            rc, rr = _seq_logps64(r64, tr, mb)
        z = 0.2 * ((c - rc) - (r - rr))
        ls = 0.1
        l = (-(1 - ls) * torch.nn.functional.logsigmoid(z)
             - ls * torch.nn.functional.logsigmoid(-z)).mean() / 2
        l.backward()
        want += float(l.detach())
    assert loss == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert_grads_close(got, grads_of(m64))
    # the precomputed reference log-probs match the float64 reference model
    c, r = _seq_logps64(r64, tr, rows)
    torch.testing.assert_close(tr.ref_logps.double(), torch.stack([c, r], 1).detach(),
                               rtol=1e-4, atol=1e-4)


def test_dpo_short_run_and_resume(tmp_path, tok, tiny):
    rows = _pairs(32)
    tr = DPOTrainer(tiny, copy_reference(tiny), args=_cfg(tmp_path, max_steps=3, save_steps=2),
                    train_dataset=rows, tokenizer=tok)
    tr.train()
    hist = [json.loads(x) for x in open(os.path.join(tmp_path / "out", "metrics.jsonl"))]
    assert [h["step"] for h in hist] == [1, 2, 3]
    with torch.no_grad():                   # trained pairs: chosen gained on rejected
        c, r, _, _ = tr.sequence_logps(tr.model, rows)
    assert float(((c - tr.ref_logps[:, 0]) - (r - tr.ref_logps[:, 1])).mean()) > 0
    # resume from checkpoint-2 on a fresh model: step 3 is reproduced exactly
    from rlfuse.models.tiny import tiny_causal_lm

    fresh = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    tr2 = DPOTrainer(fresh, copy_reference(fresh), args=_cfg(tmp_path, max_steps=3, save_steps=2),
                     train_dataset=rows, tokenizer=tok)
    tr2.train(resume_from_checkpoint=os.path.join(tmp_path / "out", "checkpoint-2"))
    hist2 = [json.loads(x) for x in open(os.path.join(tmp_path / "out", "metrics.jsonl"))]
    assert hist2[2]["loss"] == hist[2]["loss"]


def test_dpo_bad_configs(tmp_path, tiny, tok):
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type="nope")
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="needs a reference model"):
        DPOTrainer(tiny, None, args=_cfg(tmp_path), train_dataset=_pairs(), tokenizer=tok)
    with pytest.raises(ValueError, match="rejected"):
        DPOTrainer("/nonexistent", "/nonexistent", args=_cfg(tmp_path),
                   train_dataset=[{"prompt": "a", "chosen": "b"}])


@pytest.mark.parametrize("kw, match", [
    (dict(loss_type="exo_pair"), "label_smoothing: must lie in \\(0, 1\\) with loss_type='exo_pair'"),
    (dict(adam_beta1=1.0), "adam_beta1: must be < 1.0"),
    (dict(adam_beta2=1.0), "adam_beta2: must be < 1.0"),
    (dict(max_length=64, max_prompt_length=64), "max_prompt_length: must be < max_length"),
    (dict(max_length=8, max_prompt_length=100), "max_prompt_length: must be < max_length"),
])
def test_dpo_configs_that_cannot_run(kw, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig(**kw)


def test_dpo_exo_pair_with_label_smoothing_runs(tmp_path, tok, tiny):
    cfg = _cfg(tmp_path, loss_type="exo_pair", label_smoothing=1e-3, max_steps=1,
               report_to="none")
    DPOTrainer(tiny, copy_reference(tiny), args=cfg, train_dataset=_pairs(),
               tokenizer=tok).train()


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_dpo_completion_truncated_away_names_the_row(tmp_path, tok, tiny, loss_type):
    """max_prompt_length=None and a prompt longer than max_length: no completion token is
    left, which must raise (reference-based: in the precompute; reference-free: at the
    step) rather than train on nothing."""
    rows = _pairs()
    rows[5] = dict(rows[5], prompt="1+" * 40 + "1=")
    cfg = _cfg(tmp_path, loss_type=loss_type, max_length=24, max_prompt_length=None,
               max_steps=2, per_device_train_batch_size=8, gradient_accumulation_steps=1,
               report_to="none")
    with pytest.raises(ValueError, match="train_dataset row 5: the chosen completion has no "
                                         "tokens left after truncation to max_length=24"):
        ref = copy_reference(tiny) if loss_type == "sigmoid" else None
        DPOTrainer(tiny, ref, args=cfg, train_dataset=rows[:8], tokenizer=tok).train()


@pytest.mark.parametrize("epochs, steps", [(1.0, 2), (2.0, 4), (0.5, 1), (1.5, 3)])
def test_num_train_epochs_sees_each_row_once_per_epoch(tmp_path, tok, tiny, epochs, steps):
    """10 rows, 4 per step: an epoch is 2 steps (the 2 rows that do not fill a step are
    dropped, a new permutation each epoch); no row repeats within an epoch."""
    import collections

    rows = [dict(r, id=i) for i, r in enumerate(_pairs()[:10])]
    cfg = _cfg(tmp_path, max_steps=-1, num_train_epochs=epochs, gradient_accumulation_steps=1,
               report_to="none")
    tr = DPOTrainer(tiny, copy_reference(tiny), args=cfg, train_dataset=rows, tokenizer=tok)
    assert tr.total_steps() == steps
    per_epoch = collections.defaultdict(list)
    orig = tr._next_rows

    def spy():
        got = orig()
        per_epoch[tr.state["epoch"]] += [r["id"] for r in got]
        return got
    tr._next_rows = spy
    assert tr.train()["global_step"] == steps
    for ids in per_epoch.values():
        assert len(ids) == len(set(ids)) <= 8
    assert sum(len(v) for v in per_epoch.values()) == 4 * steps
