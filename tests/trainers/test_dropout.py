"""disable_dropout: with dropout off, the first update's policy equals the sampling policy
(ratio 1: approx_kl and clip ratio 0); with it on, it does not (the test can fail)."""
import json
import os

import pytest
import torch
import transformers

from rlfuse.trainers import GRPOConfig, GRPOTrainer, PPOConfig, PPOTrainer, DPOConfig
from rlfuse.trainers.base import disable_dropout_in_model


def length_reward(prompts, completions, **kw):
    return [float(len(c)) for c in completions]


def text_reward(prompts, completions, **kw):
    # varies inside a group even when every completion runs to the length limit (the
    # group's advantages are then nonzero whatever the sampled stream)
    return [float(len(c)) + 0.1 * (sum(map(ord, c)) % 10) for c in completions]


def _gpt2(tok):        # GPT-2 configs default to dropout 0.1 (resid, embd, attn)
    c = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
    assert c.resid_pdrop > 0 and c.attn_pdrop > 0
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(c)


def _common(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), learning_rate=1e-3,
                per_device_train_batch_size=8, max_completion_length=6, max_steps=1,
                progress=False, plot=False, seed=0, report_to="none",
                # a cut run (max_steps=2) resumed to 4 matches an uninterrupted 4-step run
                # only with a schedule that does not depend on max_steps
                lr_scheduler_type="constant")
    base.update(kw)
    return base


def _first(tmp_path):
    return json.loads(open(os.path.join(str(tmp_path / "out"), "metrics.jsonl")).readline())


def test_defaults_follow_trl():
    assert PPOConfig().disable_dropout is True
    assert DPOConfig().disable_dropout is True
    assert GRPOConfig().disable_dropout is False


@pytest.mark.parametrize("disable", [True, False])
def test_ppo_first_update_is_on_policy_without_dropout(tmp_path, tok, rows, disable):
    m = _gpt2(tok)
    cfg = PPOConfig(**_common(tmp_path, kl_coef=0.0, num_ppo_epochs=1, disable_dropout=disable))
    tr = PPOTrainer(m, length_reward, args=cfg, train_dataset=rows, tokenizer=tok)
    tr.train()
    h = _first(tmp_path)
    if disable:
        assert h["approx_kl"] == 0.0 and h["clip_ratio"] == 0.0
        assert all(mod.p == 0.0 for mod in tr.value_model.modules()
                   if isinstance(mod, torch.nn.Dropout))
    else:
        assert h["approx_kl"] != 0.0


@pytest.mark.parametrize("disable", [True, False])
def test_grpo_first_iteration_is_on_policy_without_dropout(tmp_path, tok, rows, disable):
    m = _gpt2(tok)
    cfg = GRPOConfig(**_common(tmp_path, num_generations=4, num_iterations=2, epsilon=1e-6,
                               disable_dropout=disable))
    GRPOTrainer(m, text_reward, args=cfg, train_dataset=rows, tokenizer=tok).train()
    h = _first(tmp_path)
    assert h["reward_std"] > 0
    assert (h["clip_ratio"] == 0.0) == disable


def test_disable_dropout_in_model_covers_functional_rates(tok):
    """Llama-style attention passes a float rate to functional dropout (no module)."""
    c = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, vocab_size=len(tok), attention_dropout=0.3)
    m = transformers.AutoModelForCausalLM.from_config(c)
    assert disable_dropout_in_model(m) >= 1
    assert all(getattr(mod, "attention_dropout", 0.0) == 0.0 for mod in m.modules())
    x = torch.randint(4, len(tok), (2, 6))
    m.train()
    torch.testing.assert_close(m(x).logits, m(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("disable", [True, False])
def test_resume_with_dropout_model_is_exact(tmp_path, tok, rows, disable):
    def run(name, steps, resume=False):
        m = _gpt2(tok)
        cfg = PPOConfig(**_common(tmp_path, output_dir=str(tmp_path / name), max_steps=steps,
                                  per_device_train_batch_size=4, num_ppo_epochs=2,
                                  kl_coef=0.0, save_steps=1, disable_dropout=disable))
        PPOTrainer(m, length_reward, args=cfg, train_dataset=rows, tokenizer=tok).train(
            resume_from_checkpoint=resume or None)
        return [p.detach().clone() for p in m.parameters()]
    full = run("full", 4)
    run("cut", 2)
    resumed = run("cut", 4, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(full, resumed))
