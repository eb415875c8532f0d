"""rlfuse.models.causal_lm_token_logprobs on tiny Llama / Qwen2 models built from configs
(no downloads): agreement with log_softmax(model(...).logits), label shift for padded
(left and right padding) and packed batches, gradients (tied embeddings included); packed
streams of models that mask causally over the whole stream (OPT, Falcon, BLOOM, MPT) equal
their sequences run alone."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlfuse.models import causal_lm_token_logprobs, scored_positions  # noqa: E402

V = 301


def _model(kind: str, attn: str = "sdpa"):
    common = dict(vocab_size=V, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        cfg = transformers.LlamaConfig(tie_word_embeddings=False, **common)
    else:  # Qwen2: tied lm_head / embedding, q/k/v biases
        cfg = transformers.Qwen2Config(tie_word_embeddings=True, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    return model.float().eval()


def _batch(B=3, T=10):
    ids = torch.randint(0, V, (B, T))
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :3] = 0   # left padding
    am[2, -4:] = 0  # right padding
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[:, 5:] = 1
    return ids, am, comp


def _reference(model, ids, am, temperature=1.0):
    """float64 log-probs and entropy from the materialised logits, aligned with ids."""
    logits = model(input_ids=ids, attention_mask=am).logits.double() / temperature
    logsm = torch.log_softmax(logits[:, :-1], -1)
    lp = logsm.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logsm.exp() * logsm).sum(-1)
    z = torch.zeros(ids.size(0), 1, dtype=torch.float64)
    return torch.cat([z, lp], 1), torch.cat([z, ent], 1)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padded_matches_materialised_logits(kind, attn):
    model = _model(kind, attn)
    ids, am, comp = _batch()
    with torch.no_grad():
        lp, ent = causal_lm_token_logprobs(model, ids, attention_mask=am, completion_mask=comp,
                                           temperature=0.8, return_entropy=True)
        rlp, rent = _reference(model, ids, am, temperature=0.8)
    scored = torch.zeros_like(am, dtype=torch.bool)
    scored[:, 1:] = (am[:, 1:] * am[:, :-1] * comp[:, 1:]).bool()
    assert torch.equal(scored, scored_positions(ids, attention_mask=am, completion_mask=comp))
    assert lp.shape == ids.shape and lp.dtype == torch.float32
    torch.testing.assert_close(lp[scored].double(), rlp[scored], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent[scored].double(), rent[scored], rtol=1e-5, atol=2e-5)
    assert (lp[~scored] == 0).all() and (ent[~scored] == 0).all()
    assert scored[1].sum() == 5 and scored[2].sum() == 1  # padding never scored


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_equals_padded(kind, how):
    model = _model(kind)
    ids, am, comp = _batch()
    with torch.no_grad():
        lp = causal_lm_token_logprobs(model, ids, attention_mask=am, completion_mask=comp)
    real = am.bool()
    lengths = am.sum(-1)
    stream, pcomp = ids[real], comp[real]
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pos = torch.cat([torch.arange(int(n)) for n in lengths])
    kw = dict(cu_seqlens=cu) if how == "cu_seqlens" else dict(position_ids=pos[None])
    with torch.no_grad():
        plp = causal_lm_token_logprobs(model, stream[None], completion_mask=pcomp[None], **kw)
    assert plp.shape == (1, stream.numel())
    torch.testing.assert_close(plp[0], lp[real], rtol=1e-5, atol=2e-5)
    # a sequence's first token is never scored from the previous sequence
    assert (plp[0, cu[:-1]] == 0).all()


def _arch_model(kind: str):
    """Tiny models of architectures that mask causally over the whole stream whatever the
    position ids (OPT, Falcon, BLOOM, MPT) and of two that keep packed sequences apart."""
    common = dict(vocab_size=V, hidden_size=32, num_attention_heads=4)
    cfg = {
        "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, ffn_dim=64,
                                              word_embed_proj_dim=16,
                                              max_position_embeddings=64, **common),
        "falcon": lambda: transformers.FalconConfig(num_hidden_layers=2, **common),
        "falcon_alibi": lambda: transformers.FalconConfig(num_hidden_layers=2, alibi=True,
                                                          **common),
        "bloom": lambda: transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2,
                                                  n_head=4),
        "mpt": lambda: transformers.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4),
        "gpt2": lambda: transformers.GPT2Config(n_layer=2, n_positions=64, **common),
        "llama": lambda: transformers.LlamaConfig(num_hidden_layers=2, intermediate_size=64,
                                                  num_key_value_heads=2, **common),
    }[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("kind", ["opt", "falcon", "falcon_alibi", "bloom", "mpt", "gpt2",
                                  "llama"])
@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_sequences_do_not_attend_to_each_other(kind, how):
    # OPT, Falcon, BLOOM and MPT ignore the position ids when masking: their packed streams
    # run as a padded batch, so each sequence's log-probs are those of the sequence alone
    from rlfuse.models import packed_runs_natively

    model = _arch_model(kind)
    assert packed_runs_natively(model) == (kind in ("gpt2", "llama"))
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (4, 6, 3)]
    other = torch.randint(3, V, (4,), generator=g)
    lengths = torch.tensor([len(x) for x in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    pos = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    kw = dict(cu_seqlens=cu) if how == "cu_seqlens" else dict(position_ids=pos)
    with torch.no_grad():
        lp = causal_lm_token_logprobs(model, torch.cat(seqs)[None], **kw)[0]
        lp2 = causal_lm_token_logprobs(model, torch.cat([other] + seqs[1:])[None], **kw)[0]
        alone = [causal_lm_token_logprobs(model, x[None], attention_mask=torch.ones(1, len(x)))[0]
                 for x in seqs]
    torch.testing.assert_close(lp, torch.cat(alone), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(lp[4:], lp2[4:], rtol=1e-5, atol=2e-5)


def test_packed_fallback_empty_sequences_cache_and_gradients():
    # an empty sequence in cu_seqlens; use_cache=True on a native model (transformers looks
    # for packed sequences only without a cache) also takes the padded route; gradients
    # through the padded route equal those of the sequences run one by one
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, V, (n,), generator=g) for n in (5, 3)]
    cu = torch.tensor([0, 5, 5, 8])
    stream = torch.cat(seqs)[None]
    for kind, extra in (("bloom", {}), ("llama", dict(use_cache=True))):
        model = _arch_model(kind)
        lp = causal_lm_token_logprobs(model, stream, cu_seqlens=cu, **extra)[0]
        w = torch.randn(lp.shape, generator=g)
        (lp * w).sum().backward()
        got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        alone = torch.cat([causal_lm_token_logprobs(model, x[None],
                                                    attention_mask=torch.ones(1, len(x)))[0]
                           for x in seqs])
        torch.testing.assert_close(lp.detach(), alone.detach(), rtol=1e-5, atol=2e-5)
        (alone * w).sum().backward()
        assert got
        for n, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_gradients_match_materialised_path(kind):
    """Parameter gradients (lm_head tied to the embedding for Qwen2) agree with those of
    the log_softmax(model(...).logits) loss."""
    model = _model(kind)
    ids, am, comp = _batch()
    adv = torch.randn(ids.shape)
    lp, ent = causal_lm_token_logprobs(model, ids, attention_mask=am, completion_mask=comp,
                                       return_entropy=True)
    (-(lp * adv).sum() - 0.1 * ent.sum()).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    scored = scored_positions(ids, attention_mask=am, completion_mask=comp)
    logits = model(input_ids=ids, attention_mask=am).logits
    logsm = torch.log_softmax(logits[:, :-1].float(), -1)
    rlp = logsm.gather(-1, ids[:, 1:, None]).squeeze(-1) * scored[:, 1:]
    rent = -(logsm.exp() * logsm).sum(-1) * scored[:, 1:]
    (-(rlp * adv[:, 1:]).sum() - 0.1 * rent.sum()).backward()
    if kind == "qwen2":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_errors_and_no_transformers_import():
    model = _model("llama")
    ids, am, comp = _batch()
    with pytest.raises(ValueError, match="completion_mask"):
        causal_lm_token_logprobs(model, ids, attention_mask=am, completion_mask=comp[:, :4])
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_token_logprobs(model, ids, attention_mask=am[:, :4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        causal_lm_token_logprobs(model, ids[:1], cu_seqlens=torch.tensor([0, 3, 4]))
    with pytest.raises(ValueError, match="packed"):
        causal_lm_token_logprobs(model, ids, cu_seqlens=torch.tensor([0, 30]))
    with pytest.raises(TypeError, match="input_ids"):
        causal_lm_token_logprobs(model, ids.float())
    with pytest.raises(TypeError, match="causal LM"):
        causal_lm_token_logprobs(torch.nn.Linear(3, 3), ids)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        causal_lm_token_logprobs(model, ids)
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, rlfuse, rlfuse.ops, rlfuse.models; print('transformers' in sys.modules)"],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_no_scored_tokens_gives_zeros():
    model = _model("llama")
    ids, am, _ = _batch()
    lp = causal_lm_token_logprobs(model, ids, attention_mask=am,
                                  completion_mask=torch.zeros_like(ids))
    assert lp.shape == ids.shape and (lp == 0).all()


def test_logit_transforms_in_text_config_are_refused():
    from types import SimpleNamespace as NS

    from rlfuse.models.hf import _check_no_logit_transform

    def cfg(top=None, text=None):
        c = NS(**(top or {}))
        t = NS(**(text or {})) if text is not None else c
        c.get_text_config = lambda: t
        return NS(config=c)

    _check_no_logit_transform(cfg())  # nothing set: accepted
    for top, text in [
        ({}, {"final_logit_softcapping": 30.0}),
        ({"lm_head_multiplier": 0.04}, None),
        ({}, {"logits_scaling": 8.0}),
        ({}, {"output_multiplier": 2.0}),
    ]:
        with pytest.raises(ValueError, match="config sets"):
            _check_no_logit_transform(cfg(top, text))
