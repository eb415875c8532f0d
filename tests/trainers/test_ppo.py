import json
import os

import pytest
import torch

from rlfuse.trainers import ConfigError, PPOConfig, copy_reference
from rlfuse.trainers.ppo import PPOTrainer, ValueModel
from tests.trainers.conftest import random_rollout
from tests.trainers.reference import (assert_grads_close, completion_logprobs_logits,
                                      double_copy, grads_of)


def _cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_completion_length=4, max_steps=2, num_ppo_epochs=2, kl_coef=0.05,
                cliprange=0.2, cliprange_value=0.1, vf_coef=0.5, progress=False, plot=False,
                seed=0)
    base.update(kw)
    return PPOConfig(**base)


def test_ppo_update_equals_plain_torch(tmp_path, tok, tiny, rows):
    cfg = _cfg(tmp_path)
    tr = PPOTrainer(tiny, lambda prompts, completions, **kw: [0.0] * len(completions),
                    args=cfg, train_dataset=rows, tokenizer=tok, ref_model=copy_reference(tiny))
    vm = tr.value_model
    with torch.no_grad():
        vm.head.weight.normal_(0, 0.1)              # a non-trivial value head
    r = random_rollout(tok, 8)
    g = torch.Generator().manual_seed(7)
    m = r.completion_mask
    with torch.no_grad():
        old = tr.batched_logprobs(tr.model, r) + 0.1 * torch.randn(8, 5, generator=g) * m
        old_v = tr.completion_values(vm, r) + 0.05 * torch.randn(8, 5, generator=g) * m
    adv = torch.randn(8, 5, generator=g) * m
    ret = torch.randn(8, 5, generator=g) * m
    r.extra.update(old_logp=old, old_values=old_v, advantages=adv, returns=ret,
                   kl=torch.zeros(8, 5))
    pol64, vm64 = double_copy(tiny), double_copy(vm)
    loss, stats = tr.accumulate_gradients(r)
    got_p, got_v = grads_of(tiny), grads_of(vm)

    N = float(m.sum())
    want = 0.0
    for i in (0, 4):
        mb = r.select(slice(i, i + 4))
        mm = mb.completion_mask.double()
        logp = completion_logprobs_logits(pol64, mb)
        ratio = torch.exp(logp - old[i:i + 4].double())
        A = adv[i:i + 4].double()
        pg = torch.max(-A * ratio, -A * torch.clamp(ratio, 0.8, 1.2))
        attn = torch.cat([mb.prompt_mask, mb.completion_mask], 1)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        v = vm64(torch.cat([mb.prompt_ids, mb.completion_ids], 1), attn, pos)
        v = v.double()[:, mb.prompt_ids.size(1) - 1:-1]
        ov, R = old_v[i:i + 4].double(), ret[i:i + 4].double()
        vc = torch.clamp(v, ov - 0.1, ov + 0.1)
        vf = 0.5 * torch.max((v - R) ** 2, (vc - R) ** 2)
        l = (pg * mm).sum() / N + 0.5 * (vf * mm).sum() / N
        l.backward()
        want += float(l.detach())
    assert loss == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert_grads_close(got_p, grads_of(pol64))
    assert_grads_close(got_v, grads_of(vm64))


def test_ppo_short_run(tmp_path, tok, tiny, rows):
    def length_reward(prompts, completions, **kw):
        return [float(len(c)) for c in completions]

    cfg = _cfg(tmp_path, save_steps=2)
    tr = PPOTrainer(tiny, length_reward, args=cfg, train_dataset=rows, tokenizer=tok,
                    ref_model=copy_reference(tiny))
    res = tr.train()
    assert res["global_step"] == 2
    hist = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert [h["step"] for h in hist] == [1, 2]
    for key in ("reward", "kl", "entropy", "value_loss", "pg_loss", "loss"):
        assert all(h[key] == h[key] for h in hist), key
    ck = os.path.join(cfg.output_dir, "checkpoint-2")
    assert os.path.isfile(os.path.join(ck, "value_model.safetensors"))


def test_ppo_bad_configs(tmp_path, rows, tiny, tok):
    with pytest.raises(ConfigError, match="lam"):
        PPOConfig(lam=1.5)
    with pytest.raises(ConfigError, match="cliprange_value"):
        PPOConfig(cliprange_value=-0.1)
    with pytest.raises(ConfigError, match="kl_coef > 0 needs a reference"):
        PPOTrainer(tiny, lambda **kw: [], args=_cfg(tmp_path), train_dataset=rows, tokenizer=tok)
    with pytest.raises(ConfigError, match="value_model"):
        PPOTrainer("/nonexistent", lambda **kw: [], args=_cfg(tmp_path), train_dataset=rows,
                   value_model="no", ref_model="x")


def _length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def test_ppo_bfloat16_model(tmp_path, tok, rows):
    """A bf16 model: the value head is stored in bf16 and computed in float32."""
    from rlfuse.models.tiny import tiny_causal_lm

    m = tiny_causal_lm(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0).to(torch.bfloat16)
    cfg = _cfg(tmp_path, max_steps=1, num_ppo_epochs=1, report_to="none")
    tr = PPOTrainer(m, _length_reward, args=cfg, train_dataset=rows, tokenizer=tok,
                    ref_model=copy_reference(m))
    assert tr.value_model.head.weight.dtype == torch.bfloat16
    r = random_rollout(tok, 4)
    v = tr.completion_values(tr.value_model, r)
    assert v.dtype == torch.float32
    tr.train()
    hist = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    assert len(hist) == 1 and all(hist[0][k] == hist[0][k] for k in ("loss", "value_loss"))


def test_ppo_value_head_sized_from_lm_head_input(tmp_path, tok, rows):
    """OPT with word_embed_proj_dim != hidden_size: the body outputs word_embed_proj_dim."""
    import transformers

    c = transformers.OPTConfig(hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=1,
                               ffn_dim=64, num_attention_heads=2, max_position_embeddings=64,
                               vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(c)
    vm = ValueModel.from_causal_lm(m)
    assert vm.head.in_features == 16
    cfg = _cfg(tmp_path, max_steps=1, num_ppo_epochs=1, kl_coef=0.0, report_to="none")
    res = PPOTrainer(m, _length_reward, args=cfg, train_dataset=rows, tokenizer=tok).train()
    assert res["global_step"] == 1


def test_ppo_step_on_an_alibi_model(tmp_path, tok, rows):
    # BLOOM (ALiBi from the 2D mask): the rollout used to crash on a ready 4D decode mask
    import transformers

    c = transformers.BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=len(tok),
                                 pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                 eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(c)
    cfg = _cfg(tmp_path, max_steps=1, num_ppo_epochs=1, kl_coef=0.0, report_to="none")
    res = PPOTrainer(m, _length_reward, args=cfg, train_dataset=rows, tokenizer=tok).train()
    assert res["global_step"] == 1
