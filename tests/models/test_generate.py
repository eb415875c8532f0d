"""rlfuse.models.generate.sample: the lean decode loop against ``model.generate`` (same
tokens for the same seed with the multinomial sampler, eos / pad handling, groups of
samples per prompt), the CDF sampler's distribution, the warpers against transformers'
own, the multi-process stop rule and bad input."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlfuse.models.generate import _draw, sample, supports, warp_logits  # noqa: E402

V = 53


def _model(kind="llama", attn="sdpa"):
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = (transformers.LlamaConfig(**common) if kind == "llama"
           else transformers.Qwen2Config(tie_word_embeddings=True, **common))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn).float().eval()


def _prompts(B=3, P=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0                   # left padding
    mask[2, :4] = 0
    ids[mask == 0] = 0
    return ids, mask


# several eos ids so that rows end at different steps
EOS = [5, 7, 11, 13, 17]


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("qwen2", "sdpa"),
                                       ("llama", "eager")])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 8, 1.0),
                                                     (1.3, 0, 0.85), (1.0, 12, 0.9)])
@pytest.mark.parametrize("n", [1, 4])
def test_multinomial_sampler_equals_generate(kind, attn, temperature, top_k, top_p, n,
                                             padded=True, lean=None):
    model = _model(kind, attn)
    ids, mask = _prompts()
    if not padded:
        ids, mask = ids[:1], mask[:1]
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    torch.manual_seed(123)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=20,
                         num_return_sequences=n, eos_token_id=EOS, pad_token_id=0, **kw)
    torch.manual_seed(123)
    out = sample(model, ids, mask, num_samples=n, max_new_tokens=20, eos_token_id=EOS,
                 pad_token_id=0, sampler="multinomial", lean=lean, **kw)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("qwen2", "sdpa"),
                                       ("llama", "eager")])
@pytest.mark.parametrize("n", [1, 4])
def test_model_forward_decode_equals_generate(kind, attn, n):
    # the same with the model's own forward for the decode steps (lean=False; the cases
    # above run the lean decoder)
    test_multinomial_sampler_equals_generate(kind, attn, 0.9, 10, 0.95, n, lean=False)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_unpadded_prompt_equals_generate(attn):
    # no padding: transformers passes no mask to the attention at all
    test_multinomial_sampler_equals_generate("llama", attn, 0.8, 0, 0.95, 3, padded=False)


def test_rows_end_at_eos_and_pad_afterwards():
    model = _model()
    ids, mask = _prompts()
    torch.manual_seed(0)
    out = sample(model, ids, mask, num_samples=8, max_new_tokens=30, eos_token_id=EOS,
                 pad_token_id=0)
    P = ids.size(1)
    assert out.shape[0] == 24 and P < out.shape[1] <= P + 30
    assert torch.equal(out[:, :P], ids.repeat_interleave(8, 0))
    comp = out[:, P:]
    ended = torch.isin(comp, torch.tensor(EOS))
    assert bool(ended.any())
    for row in comp:
        hits = torch.isin(row, torch.tensor(EOS)).nonzero()
        if hits.numel():
            assert bool((row[int(hits[0]) + 1:] == 0).all())   # pad after the first eos
    # the loop stops as soon as every row has ended (or at the limit)
    if out.shape[1] < P + 30:
        assert bool(ended.any(1).all())
        assert bool(ended[:, -1].any())


def test_all_done_keeps_stepping_until_every_process_is_done():
    model = _model()
    ids, mask = _prompts()
    calls = []

    def never(local):
        calls.append(local)
        return False

    torch.manual_seed(0)
    out = sample(model, ids, mask, max_new_tokens=25, eos_token_id=EOS, pad_token_id=0,
                 all_done=never)
    assert out.shape[1] == ids.size(1) + 25
    assert len(calls) == 24                 # asked after every token but the last


def test_cdf_sampler_matches_the_distribution():
    torch.manual_seed(0)
    p = torch.tensor([0.05, 0.0, 0.3, 0.15, 0.0, 0.4, 0.1])
    n = 200_000
    probs = p.expand(n, -1).clone()
    g = torch.Generator().manual_seed(7)
    draws = _draw(probs, "cdf", g)
    counts = torch.bincount(draws, minlength=p.numel()).double()
    expected = p.double() * n
    assert counts[1] == 0 and counts[4] == 0            # removed tokens are never drawn
    sigma = (expected * (1 - p.double())).sqrt().clamp(min=1)
    assert bool(((counts - expected).abs() <= 5 * sigma).all()), (counts, expected)


def test_cdf_sampler_is_inverse_cdf_of_its_uniforms():
    # the draw is the first token whose cumulative probability exceeds u * total
    probs = torch.softmax(torch.randn(64, 31), -1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draws = _draw(probs.clone(), "cdf", g1)
    u = torch.rand(64, 1, generator=g2, dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    ref = (cdf <= u * cdf[:, -1:]).sum(-1).clamp(max=30)
    assert torch.equal(draws, ref)


def test_cdf_sampler_reaches_tokens_below_float32_spacing():
    # A float32 running sum rounds every cumulative probability to its spacing (6e-8 near
    # 1): at V = 151936 (Qwen's vocabulary) thousands of tokens got an empty interval and
    # could never be drawn, and the distribution moved by a total variation of ~1e-3.
    # Uniforms at the middle of such tokens' exact (float64) intervals must draw them.
    V = 151936
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=g) * 2, -1)
    c32 = p.cumsum(-1)
    eff32 = torch.diff(c32, prepend=torch.zeros(1)).double() / c32[-1].double()
    exact = p.double() / p.double().sum()
    assert 0.5 * (eff32 - exact).abs().sum() > 5e-4      # the float32 scheme's bias
    starved = torch.nonzero((eff32 == 0) & (exact > 0)).squeeze(1)
    assert starved.numel() > 1000
    pick = starved[torch.randperm(starved.numel(), generator=g)[:16]]
    c64 = p.double().cumsum(-1)
    lo = torch.cat([torch.zeros(1, dtype=torch.float64), c64[:-1]])
    u = (lo[pick] + c64[pick]) / 2 / c64[-1]
    draws = _draw(p.expand(pick.numel(), -1), "cdf", None, u=u)
    assert torch.equal(draws, pick)
    # the same with the buffer sample() reuses across steps (stale contents ignored)
    buf = torch.full((pick.numel(), V), 7.0, dtype=torch.float64)
    assert torch.equal(_draw(p.expand(pick.numel(), -1), "cdf", None, u=u, buf=buf), pick)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.6, 0, 1.0), (1.0, 5, 1.0),
                                                     (1.0, 0, 0.7), (1.4, 9, 0.5)])
def test_warpers_equal_transformers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(16, 40) * 3
    ref = logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    out = warp_logits(logits.clone(), temperature, top_k, top_p)
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    assert torch.allclose(out[~torch.isinf(out)], ref[~torch.isinf(ref)])


def test_supports():
    assert supports(_model())

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    assert not supports(NoCache())


@pytest.mark.parametrize("kw,name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(num_samples=0), "num_samples"),
    (dict(sampler="gumbel"), "sampler"),
    (dict(pad_token_id=None), "pad_token_id"),
])
def test_bad_input_names_the_argument(kw, name):
    model = _model()
    ids, mask = _prompts()
    args = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=0)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        sample(model, ids, mask, **args)
    with pytest.raises(ValueError, match="input_ids"):
        sample(model, ids[0], None, max_new_tokens=4, eos_token_id=None, pad_token_id=None)
    with pytest.raises(ValueError, match="attention_mask"):
        sample(model, ids, mask[:, 1:], max_new_tokens=4, eos_token_id=None, pad_token_id=None)
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match="attention_mask row 1 has no real token"):
        sample(model, ids, empty, max_new_tokens=4, eos_token_id=None, pad_token_id=None)


def test_non_finite_logits_raise():
    model = _model()
    ids, mask = _prompts()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite logits"):
        sample(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=None)


def test_buffer_layer_appends_and_grows():
    from rlfuse.models.generate import _BufferLayer

    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    layer = _BufferLayer(k, v, 6)
    keys, vals = [k], [v]
    for n in (1, 1, 3, 2):                    # 4 + 7 positions: past the capacity of 6
        nk, nv = torch.randn(2, 3, n, 5), torch.randn(2, 3, n, 5)
        keys.append(nk)
        vals.append(nv)
        gk, gv = layer.update(nk, nv)
        assert torch.equal(gk, torch.cat(keys, 2)) and torch.equal(gv, torch.cat(vals, 2))
    assert layer.get_seq_length() == 11


def _odd_model(kind, attn):
    """Models that must build their own decode masks from the 2D mask: ALiBi (BLOOM,
    Falcon with alibi=True) and a composite model whose sliding layers are declared in its
    text config (Gemma3ForConditionalGeneration, window 4)."""
    if kind == "bloom":
        cfg = transformers.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4)
    elif kind == "falcon_alibi":
        cfg = transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, alibi=True)
    else:
        tc = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                  layer_types=["sliding_attention"] * 3 + ["full_attention"])
        vc = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
        cfg = transformers.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn).float().eval()


def test_decode_mask_kind():
    from rlfuse.models.generate import _decode_mask_kind

    assert _decode_mask_kind(_model()) == "bool"
    assert _decode_mask_kind(_model(attn="eager")) == "additive"
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, sliding_window=8)
    assert _decode_mask_kind(transformers.AutoModelForCausalLM.from_config(cfg)) is None
    # ALiBi models and sliding layers declared in a text config get the 2D mask
    for kind, attn in (("bloom", "eager"), ("falcon_alibi", "sdpa"),
                       ("falcon_alibi", "eager"), ("gemma3", "sdpa")):
        assert _decode_mask_kind(_odd_model(kind, attn)) is None, (kind, attn)


@pytest.mark.parametrize("kind,attn", [("bloom", "eager"), ("falcon_alibi", "sdpa"),
                                       ("falcon_alibi", "eager"), ("gemma3", "sdpa")])
def test_alibi_and_text_config_sliding_models_equal_generate(kind, attn):
    # these crashed (ALiBi built from a 4D mask) or broke past the window (a full 4D mask
    # on sliding layers) when the decode steps were handed a ready 4D mask
    model = _odd_model(kind, attn)
    ids, mask = _prompts(P=6)
    kw = dict(temperature=0.9, top_k=0)
    torch.manual_seed(9)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=10,
                         num_return_sequences=2, eos_token_id=EOS, pad_token_id=0, **kw)
    torch.manual_seed(9)
    out = sample(model, ids, mask, num_samples=2, max_new_tokens=10, eos_token_id=EOS,
                 pad_token_id=0, sampler="multinomial", **kw)
    assert out.shape == ref.shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,attn", [("gpt2", "sdpa"), ("opt", "eager"), ("falcon", "sdpa"),
                                       ("gpt_neox", "eager")])
def test_ready_4d_mask_types_equal_generate(kind, attn):
    # a sample of the types given the ready 4D decode mask, run on the model's forward
    from rlfuse.models.generate import _decode_mask_kind

    common = dict(vocab_size=V, hidden_size=32, num_attention_heads=4)
    cfg = {"gpt2": lambda: transformers.GPT2Config(n_layer=2, n_positions=128, **common),
           "opt": lambda: transformers.OPTConfig(num_hidden_layers=2, ffn_dim=64,
                                                 word_embed_proj_dim=16, **common),
           "falcon": lambda: transformers.FalconConfig(num_hidden_layers=2, **common),
           "gpt_neox": lambda: transformers.GPTNeoXConfig(num_hidden_layers=2,
                                                          intermediate_size=64, **common),
           }[kind]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation=attn).float().eval()
    assert _decode_mask_kind(model) == ("bool" if attn == "sdpa" else "additive")
    ids, mask = _prompts()
    torch.manual_seed(4)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=12,
                         num_return_sequences=2, eos_token_id=EOS, pad_token_id=0, top_k=0)
    torch.manual_seed(4)
    out = sample(model, ids, mask, num_samples=2, max_new_tokens=12, eos_token_id=EOS,
                 pad_token_id=0, sampler="multinomial", lean=False)
    assert torch.equal(out, ref)


def test_sliding_window_model_equals_generate():
    # the model builds its own (sliding-window) masks; the loop still matches generate
    cfg = transformers.MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, sliding_window=5,
                                     max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ids, mask = _prompts()
    torch.manual_seed(9)
    ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=12,
                         num_return_sequences=2, eos_token_id=EOS, pad_token_id=0, top_k=0)
    torch.manual_seed(9)
    out = sample(model, ids, mask, num_samples=2, max_new_tokens=12, eos_token_id=EOS,
                 pad_token_id=0, sampler="multinomial")
    assert torch.equal(out, ref)


def test_a_model_that_returns_no_cache_raises():
    from types import SimpleNamespace

    class NoCacheReturned(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None,
                    use_cache=None):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, V),
                                   past_key_values=None)

    ids, mask = _prompts()
    with pytest.raises(ValueError, match="returned no KV cache"):
        sample(NoCacheReturned(), ids, mask, max_new_tokens=3, eos_token_id=None,
               pad_token_id=None)
