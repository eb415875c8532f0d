"""rlfuse.models.causal_lm_completion_logprobs: each distinct prompt encoded once, its KV
cache shared by its completions.  Values and gradients equal the full-sequence path
(causal_lm_token_logprobs on prompt + completion) and a float64 materialised reference;
the shared path really runs (the prompt pass sees one row per group); the fallbacks give
the same numbers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlfuse.models import causal_lm_completion_logprobs, causal_lm_token_logprobs  # noqa: E402

V = 97


def _model(kind="llama", tied=False):
    common = dict(vocab_size=V, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = (transformers.LlamaConfig(tie_word_embeddings=tied, **common) if kind == "llama"
           else transformers.Qwen2Config(tie_word_embeddings=True, **common))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).float()


def _batch(runs=(3, 1, 4), P=7, C=9, seed=0):
    """Groups of identical left-padded prompts (run lengths ``runs``), completions with
    different lengths (right padding after an 'eos')."""
    g = torch.Generator().manual_seed(seed)
    pids, pmask = [], []
    for i, r in enumerate(runs):
        n_pad = (2 * i) % (P - 1)
        ids = torch.randint(1, V, (P,), generator=g)
        m = torch.ones(P, dtype=torch.long)
        m[:n_pad] = 0
        ids[:n_pad] = 0
        pids += [ids] * r
        pmask += [m] * r
    B = sum(runs)
    c_ids = torch.randint(1, V, (B, C), generator=g)
    lens = torch.randint(1, C + 1, (B,), generator=g)
    lens[0] = C
    c_mask = (torch.arange(C)[None] < lens[:, None]).long()
    c_ids[c_mask == 0] = 0
    return torch.stack(pids), torch.stack(pmask), c_ids, c_mask


def _full(model, p_ids, p_mask, c_ids, c_mask, **kw):
    ids = torch.cat([p_ids, c_ids], 1)
    am = torch.cat([p_mask, c_mask], 1)
    comp = torch.cat([torch.zeros_like(p_mask), c_mask], 1)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    res = causal_lm_token_logprobs(model, ids, attention_mask=am, completion_mask=comp,
                                   position_ids=pos, **kw)
    P = p_ids.size(1)
    return tuple(r[:, P:] for r in res) if isinstance(res, tuple) else res[:, P:]


def _materialised(model, p_ids, p_mask, c_ids, c_mask, temperature=1.0):
    """float64 reference from the full logits of each row, one row at a time (no padding
    inside a row's computation besides its own)."""
    P = p_ids.size(1)
    out = torch.zeros(c_ids.shape, dtype=torch.float64)
    m64 = _to64(model)
    for b in range(p_ids.size(0)):
        real = p_mask[b].bool()
        seq = torch.cat([p_ids[b][real], c_ids[b]])
        with torch.no_grad():
            logits = m64(input_ids=seq[None]).logits[0].double() / temperature
        lsm = torch.log_softmax(logits[:-1], -1)
        lp = lsm.gather(-1, seq[1:, None]).squeeze(-1)
        n_p = int(real.sum())
        for j in range(c_ids.size(1)):
            if c_mask[b, j]:
                out[b, j] = lp[n_p - 1 + j]
    return out


_M64 = {}


def _to64(model):
    """A float64 copy of ``model``, cached while that very model lives (keyed by id, which
    a later model can reuse once this one is freed: the entry keeps the model to check)."""
    key = id(model)
    hit = _M64.get(key)
    if hit is None or hit[0] is not model:
        import copy

        hit = _M64[key] = (model, copy.deepcopy(model).double().eval())
    return hit[1]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("runs", [(3, 1, 4), (8,), (2, 2, 2, 2)])
def test_shared_equals_full_and_reference(kind, runs):
    model = _model(kind).eval()
    p_ids, p_mask, c_ids, c_mask = _batch(runs)
    with torch.no_grad():
        lp, ent = causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask,
                                                temperature=0.9, return_entropy=True)
        flp, fent = _full(model, p_ids, p_mask, c_ids, c_mask, temperature=0.9,
                          return_entropy=True)
    assert torch.allclose(lp, flp, atol=2e-5, rtol=1e-5)
    assert torch.allclose(ent, fent, atol=2e-5, rtol=1e-5)
    ref = _materialised(model, p_ids, p_mask, c_ids, c_mask, temperature=0.9)
    assert torch.allclose(lp.double(), ref, atol=5e-5)
    assert bool((lp[c_mask == 0] == 0).all())


@pytest.mark.parametrize("tied", [False, True])
def test_gradients_equal_full_path(tied):
    model = _model(tied=tied).train()
    p_ids, p_mask, c_ids, c_mask = _batch((3, 1, 4))
    w = torch.randn(c_ids.shape)
    grads = []
    for fn in (causal_lm_completion_logprobs, _full):
        model.zero_grad()
        lp, ent = fn(model, p_ids, p_mask, c_ids, c_mask, return_entropy=True)
        ((lp * w).sum() + 0.3 * (ent * w).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        a, b = grads[0][n], grads[1][n]
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), n


def test_shared_path_runs_the_prompt_once_per_group():
    model = _model().eval()
    p_ids, p_mask, c_ids, c_mask = _batch((3, 1, 4))
    rows = []
    h = model.base_model.register_forward_pre_hook(
        lambda m, a, k: rows.append(tuple(k["input_ids"].shape)), with_kwargs=True)
    try:
        with torch.no_grad():
            causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
            causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask,
                                          share_prompts=False)
    finally:
        h.remove()
    P, C = p_ids.size(1), c_ids.size(1)
    assert rows == [(3, P), (8, C), (8, P + C)]


def test_fallbacks_give_the_same_numbers():
    model = _model().eval()
    p_ids, p_mask, c_ids, c_mask = _batch((1, 1, 1))          # no repeats
    with torch.no_grad():
        a = causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        b = _full(model, p_ids, p_mask, c_ids, c_mask)
    assert torch.allclose(a, b, atol=2e-5)
    # right-padded prompt rows (not ending on a real token): full path
    p_ids, p_mask, c_ids, c_mask = _batch((2, 3))
    p_mask = p_mask.flip(1)
    with torch.no_grad():
        a = causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        b = _full(model, p_ids, p_mask, c_ids, c_mask)
    assert torch.equal(a, b)
    # gradient checkpointing turns the cache off: full path, same values
    (getattr(model, "activation_checkpointing_enable", None)
     or model.gradient_checkpointing_enable)()
    model.train()
    p_ids, p_mask, c_ids, c_mask = _batch((2, 3))
    a = causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
    b = _full(model, p_ids, p_mask, c_ids, c_mask)
    assert torch.allclose(a, b, atol=2e-5)


def test_bad_shapes_raise():
    model = _model().eval()
    p_ids, p_mask, c_ids, c_mask = _batch((2, 2))
    with pytest.raises(ValueError, match="completion_mask"):
        causal_lm_completion_logprobs(model, p_ids, p_mask, c_ids, c_mask[:, 1:])
    with pytest.raises(ValueError, match="prompt_ids"):
        causal_lm_completion_logprobs(model, p_ids[0], p_mask, c_ids, c_mask)
    with pytest.raises(TypeError, match="causal LM"):
        causal_lm_completion_logprobs(torch.nn.Linear(2, 2), p_ids, p_mask, c_ids, c_mask)
