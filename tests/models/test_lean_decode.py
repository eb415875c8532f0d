"""rlfuse.models.decode: the lean decode step against a float64 run of the model itself
(Llama, Qwen2, Mistral; grouped KV heads, biases, tied embeddings, left padding, fused and
separate projections), its C++ kernels against float64 references at every ISA level, the
sampler with and without it, and the models it must refuse."""

from __future__ import annotations

import copy
import math
import platform

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlfuse.models import decode as D  # noqa: E402
from rlfuse.models.generate import sample  # noqa: E402

_C = pytest.importorskip("rlfuse._C")

V = 61


def _model(kind="llama", *, hd=16, heads=4, kv=2, bias=False, tied=False, hidden=None,
           **extra):
    hidden = hidden or hd * heads
    common = dict(vocab_size=V, hidden_size=hidden, intermediate_size=3 * hidden,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv,
                  max_position_embeddings=128, tie_word_embeddings=tied)
    if kind == "llama":
        cfg = transformers.LlamaConfig(attention_bias=bias, mlp_bias=bias, head_dim=hd, **common,
                                       **extra)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, **extra)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(sliding_window=64, **common, **extra)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=hd, **common, **extra)
    else:
        cfg = transformers.GemmaConfig(head_dim=hd, **common, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # biases are zero at init: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _prompts(B, P, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :3] = 0
    if B > 2:
        mask[2, :P - 1] = 0               # a one-token prompt
    ids[mask == 0] = 0
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _check_steps(model, *, repeat=2, T=7, B0=3, P=9, fuse=True, monkeypatch=None):
    """Decode T random tokens with the lean decoder; each step's logits must equal the
    float64 model's last-position logits on the whole sequence."""
    if not fuse:
        monkeypatch.setattr(D, "_FUSE_BYTES", 0)
    ref_model = copy.deepcopy(model).double()
    ids, mask = _prompts(B0, P)
    B = B0 * repeat
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                    use_cache=True)
        dec = D.lean_decoder(model, B, P + T)
        assert dec is not None, D._why_not(model, P + T)
        assert (dec.layers[0].qkv is not None) == fuse
        dec.load_cache(out.past_key_values, repeat)
        full = torch.ones(B, P + T, dtype=torch.long)
        full[:, :P] = mask.repeat_interleave(repeat, 0)
        dec.mask[:, :P + T] = full
        dec.pos.copy_(_positions(mask)[:, -1].repeat_interleave(repeat) + 1)
        seq = ids.repeat_interleave(repeat, 0)
        g = torch.Generator().manual_seed(5)
        for t in range(T):
            tok = torch.randint(3, V, (B,), generator=g)
            for buf in (dec.qkv, dec.att, dec.gu, dec.act, dec.h):
                buf.fill_(float("nan"))   # every element must be written each step
            got = dec.step(tok, P + t)
            dec.pos += 1
            seq = torch.cat([seq, tok[:, None]], 1)
            m = full[:, :P + t + 1]
            want = ref_model(input_ids=seq, attention_mask=m,
                             position_ids=_positions(m)).logits[:, -1]
            assert got.dtype == torch.float32 and got.shape == (B, V)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind,kw", [
    ("llama", dict()),
    ("llama", dict(kv=4)),                       # no grouping
    ("llama", dict(bias=True, hd=32, heads=2, kv=1)),  # biases; hd a multiple of 16
    ("llama", dict(tied=True, hd=24)),           # hd not a multiple of 16
    ("llama", dict(hd=32, hidden=80)),           # heads x head_dim != hidden
    ("qwen2", dict(tied=True)),                  # q/k/v biases
    ("mistral", dict(hd=64, heads=2, kv=2)),
    ("qwen3", dict()),                           # per-head q/k RMSNorm
    ("qwen3", dict(hd=32, tied=True)),
    ("qwen3", dict(hd=32, hidden=48)),           # heads x head_dim != hidden
])
def test_steps_equal_the_model_in_float64(kind, kw):
    _check_steps(_model(kind, **kw))


def test_separate_projections_equal_the_model(monkeypatch):
    # large models keep q/k/v and gate/up as separate matmuls
    _check_steps(_model("qwen2"), fuse=False, monkeypatch=monkeypatch)
    _check_steps(_model("llama", bias=True), fuse=False, monkeypatch=monkeypatch)


def test_llama3_rope_scaling():
    rope = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16)
    _check_steps(_model("llama", rope_parameters=rope), T=12)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("n", [1, 3])
def test_sampler_tokens_equal_with_and_without_it(kind, n):
    model = _model(kind)
    ids, mask = _prompts(3, 6)
    outs = []
    for lean in (True, False):
        g = torch.Generator().manual_seed(11)
        outs.append(sample(model, ids, mask, max_new_tokens=16, eos_token_id=[5, 9],
                           pad_token_id=0, num_samples=n, temperature=0.9, top_k=20,
                           generator=g, sampler="multinomial", lean=lean))
    assert torch.equal(outs[0], outs[1])


def _hooked(m):
    m.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    return m


class _LoraLike(torch.nn.Linear):
    pass


def _adapter(m):
    at = m.model.layers[1].self_attn
    new = _LoraLike(at.q_proj.in_features, at.q_proj.out_features, bias=False)
    new.weight = at.q_proj.weight
    at.q_proj = new
    return m


@pytest.mark.parametrize("make,reason", [
    (lambda: _model("gemma"), "architecture"),
    (lambda: _model("llama").to(torch.bfloat16), "weights"),
    (lambda: _hooked(_model("llama")), "hooks"),
    (lambda: _adapter(_model("llama")), "modified projections"),
    (lambda: _model("llama", hidden_act="gelu"), "activation"),
    (lambda: _model("llama", rope_parameters=dict(rope_type="dynamic", factor=2.0,
                                                  rope_theta=10000.0)), "rope"),
    (lambda: _model("llama", attention_dropout=0.1).train(), "attention dropout"),
])
def test_refuses_what_it_cannot_run(make, reason):
    model = make()
    why = D._why_not(model, 20)
    assert why is not None and reason in why
    assert D.lean_decoder(model, 2, 20) is None
    ids, mask = _prompts(2, 5)
    with pytest.raises(ValueError, match="lean=True"):
        sample(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0,
               lean=True)
    # the default falls back to the model's forward
    out = sample(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    assert out.shape == (2, 9)


def test_sliding_window_shorter_than_the_sequence_is_refused():
    model = _model("mistral")
    model.config.sliding_window = 8
    assert D._why_not(model, 20) == "sliding window"
    assert D._why_not(model, 8) is None


def test_bad_lean_argument_and_columns():
    model = _model("llama")
    ids, mask = _prompts(2, 5)
    with pytest.raises(ValueError, match="lean"):
        sample(model, ids, mask, max_new_tokens=4, eos_token_id=None, pad_token_id=0,
               lean="yes")
    dec = D.lean_decoder(model, 2, 10)
    with pytest.raises(ValueError, match="column"):
        dec.step(torch.zeros(2, dtype=torch.long), 10)


# ------------------------------------------------------------------------------ kernels
_ISAS = (["x86-64-v2", "x86-64-v3", "x86-64-v4"]
         if platform.machine().lower() in ("x86_64", "amd64") else ["baseline"])


def _rot(x, c, s):
    h = x.shape[-1] // 2
    return x * c + torch.cat([-x[..., h:], x[..., :h]], -1) * s


def _attention_case(B, nh, nkv, hd, L, seed):
    g = torch.Generator().manual_seed(seed)
    C = -(-(L + 1 + 5) // 64) * 64
    qkv = torch.randn(B, (nh + 2 * nkv) * hd + 3, generator=g)   # padded rows
    cos = torch.randn(C + 4, hd, generator=g)
    sin = torch.randn(C + 4, hd, generator=g)
    pos = torch.randint(0, C + 4, (B,), generator=g)
    kbuf = torch.randn(B, nkv, hd, C, generator=g)
    vbuf = torch.randn(B, nkv, C, hd, generator=g)
    mask = (torch.rand(B, C, generator=g) > 0.3).to(torch.uint8)
    mask[:, L] = 1
    return qkv, cos, sin, pos, kbuf, vbuf, mask, C


@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 32), (3, 3, 24), (2, 1, 64), (2, 2, 48),
                                       (1, 1, 8)])
@pytest.mark.parametrize("L", [0, 17, 63, 64, 100])
@pytest.mark.parametrize("norm", [False, True])
def test_decode_attention_kernel(isa, nh, nkv, hd, L, norm):
    old = _C.active_isa()
    if not _C.set_isa(isa):
        pytest.skip(f"this CPU (or build) lacks {isa}")
    try:
        B = 3
        qkv, cos, sin, pos, kbuf, vbuf, mask, C = _attention_case(B, nh, nkv, hd, L, L + hd)
        k0, v0 = kbuf.clone(), vbuf.clone()
        out = torch.full((B, nh * hd + 2), float("nan"))
        scale = hd ** -0.5
        base, st, nq, nk = qkv.data_ptr(), qkv.stride(0), nh * hd, nkv * hd
        qn = torch.rand(hd, generator=torch.Generator().manual_seed(9)) + 0.5 if norm else None
        kn = torch.rand(hd, generator=torch.Generator().manual_seed(8)) + 0.5 if norm else None
        _C.decode_attention(base, base + 4 * nq, base + 4 * (nq + nk), st, st, st,
                            cos.data_ptr(), sin.data_ptr(), cos.stride(0), pos.data_ptr(),
                            qn.data_ptr() if norm else 0, kn.data_ptr() if norm else 0, 1e-6,
                            cos.shape[0], kbuf.data_ptr(), vbuf.data_ptr(), mask.data_ptr(), C,
                            out.data_ptr(), out.stride(0), B, nh, nkv, hd, C, L, scale, 2)
        q = qkv[:, :nq].double().view(B, nh, hd)
        k = qkv[:, nq:nq + nk].double().view(B, nkv, hd)
        v = qkv[:, nq + nk:nq + 2 * nk].double().view(B, nkv, hd)
        if norm:
            q = qn.double() * q / (q.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
            k = kn.double() * k / (k.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        c, s = cos[pos].double()[:, None], sin[pos].double()[:, None]
        q, k = _rot(q, c, s), _rot(k, c, s)
        # the new column written, every other one untouched
        torch.testing.assert_close(kbuf[:, :, :, L].double(), k, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(vbuf[:, :, L].double(), v)
        keep = torch.ones(C, dtype=torch.bool)
        keep[L] = False
        assert torch.equal(kbuf[..., keep], k0[..., keep])
        assert torch.equal(vbuf[:, :, keep], v0[:, :, keep])
        keys = kbuf.double().transpose(2, 3)[:, :, :L + 1]       # [B, nkv, L+1, hd]
        vals = vbuf.double()[:, :, :L + 1]
        rep = nh // nkv
        keys, vals = keys.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
        sc = torch.einsum("bhd,bhjd->bhj", q, keys) * scale
        sc = sc.masked_fill(mask[:, None, :L + 1] == 0, -math.inf)
        want = torch.einsum("bhj,bhjd->bhd", sc.softmax(-1), vals).reshape(B, nq)
        torch.testing.assert_close(out[:, :nq].double(), want, rtol=1e-5, atol=1e-5)
        assert out[:, nq:].isnan().all()   # nothing written past the row
    finally:
        _C.set_isa(old)


@pytest.mark.parametrize("isa", _ISAS)
def test_silu_mul_and_rms_norm_kernels(isa):
    old = _C.active_isa()
    if not _C.set_isa(isa):
        pytest.skip(f"this CPU (or build) lacks {isa}")
    try:
        g = torch.Generator().manual_seed(3)
        B, n = 5, 77
        gu = torch.randn(B, 2 * n + 1, generator=g) * 6
        gu[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
        out = torch.full((B, n + 3), float("nan"))
        _C.silu_mul(gu.data_ptr(), gu.data_ptr() + 4 * n, gu.stride(0), gu.stride(0),
                    out.data_ptr(), out.stride(0), B, n, 2)
        x = gu.double()
        want = torch.nn.functional.silu(x[:, :n]) * x[:, n:2 * n]
        torch.testing.assert_close(out[:, :n].double(), want, rtol=1e-6, atol=1e-6)
        assert out[:, n:].isnan().all()
        w = torch.randn(n, generator=g)
        out.fill_(float("nan"))
        _C.rms_norm(gu.data_ptr(), gu.stride(0), w.data_ptr(), 1e-6, out.data_ptr(),
                    out.stride(0), B, n, 2)
        xr = x[:, :n]
        want = w.double() * xr / (xr.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        torch.testing.assert_close(out[:, :n].double(), want, rtol=1e-5, atol=1e-6)
        assert out[:, n:].isnan().all()
    finally:
        _C.set_isa(old)


def test_a_cache_that_does_not_fit_is_refused():
    model = _model("llama")
    ids, mask = _prompts(2, 5)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    dec = D.lean_decoder(model, 4, 12)
    assert dec.cache_fits(cache, 2)
    assert not dec.cache_fits(cache, 1)             # 2 rows for a batch of 4
    assert not dec.cache_fits(object(), 2)          # no layers
    assert not D.lean_decoder(model, 4, 5).cache_fits(cache, 2)   # no room left
    with pytest.raises(ValueError, match="prefill cache"):
        dec.load_cache(cache, 1)
    assert dec.load_cache(cache, 2) == 5
    # each prompt's cache went to both of its sample rows
    k = cache.layers[1].keys
    assert torch.equal(dec.layers[1].kbuf[:, :, :, :5], k.transpose(2, 3).repeat_interleave(2, 0))


def _one_head_call(qkv, kbuf, vbuf, mask, out, *, hd, L, C, pos=None, rows=None):
    cos, sin = torch.ones(C, hd), torch.zeros(C, hd)      # rotary = identity
    pos = torch.zeros(1, dtype=torch.int64) if pos is None else pos
    b = qkv.data_ptr()
    _C.decode_attention(b, b + 4 * hd, b + 8 * hd, 3 * hd, 3 * hd, 3 * hd, cos.data_ptr(),
                        sin.data_ptr(), hd, pos.data_ptr(), 0, 0, 1e-6,
                        C if rows is None else rows, kbuf.data_ptr(), vbuf.data_ptr(),
                        mask.data_ptr(), C, out.data_ptr(), hd, 1, 1, 1, hd, C, L, 1.0, 1)


@pytest.mark.parametrize("isa", _ISAS)
@pytest.mark.parametrize("s", [-50.0, -88.7, -89.0, -266.2, -1000.0])
def test_masked_and_unused_columns_never_poison_the_softmax(isa, s):
    # every attended score is s; the unused columns past L (zero keys) and a masked column
    # score higher, by amounts whose exponential overflows: the output must stay the mean
    # of the attended values (a product exp * 0 would be inf * 0 = NaN)
    old = _C.active_isa()
    if not _C.set_isa(isa):
        pytest.skip(f"this CPU (or build) lacks {isa}")
    try:
        hd, L, C = 16, 5, 64
        qkv = torch.zeros(1, 3 * hd)
        qkv[0, 0], qkv[0, hd], qkv[0, 2 * hd:] = 1.0, s, 2.0
        kbuf = torch.zeros(1, 1, hd, C)
        kbuf[0, 0, 0, :L] = s
        kbuf[0, 0, 0, 2] = float("nan")       # a masked column's key may hold anything
        vbuf = torch.zeros(1, 1, C, hd)
        vbuf[0, 0, :L] = torch.arange(L, dtype=torch.float32)[:, None]
        vbuf[0, 0, 2] = 100.0                 # masked: must not count
        mask = torch.ones(1, C, dtype=torch.uint8)
        mask[0, 2] = 0
        out = torch.full((1, hd), float("nan"))
        _one_head_call(qkv, kbuf, vbuf, mask, out, hd=hd, L=L, C=C)
        want = torch.tensor([0.0, 1, 3, 4, 2]).mean()     # columns 0, 1, 3, 4 and L's 2.0
        torch.testing.assert_close(out[0], want.expand(hd), rtol=1e-5, atol=1e-5)
    finally:
        _C.set_isa(old)


def test_kernel_rejects_positions_outside_the_table():
    hd, L, C = 16, 3, 64
    qkv, out = torch.randn(1, 3 * hd), torch.empty(1, hd)
    kbuf, vbuf = torch.zeros(1, 1, hd, C), torch.zeros(1, 1, C, hd)
    mask = torch.ones(1, C, dtype=torch.uint8)
    for bad in (-1, C, 10 ** 9):
        with pytest.raises(ValueError, match="rotary table"):
            _one_head_call(qkv, kbuf, vbuf, mask, out, hd=hd, L=L, C=C,
                           pos=torch.tensor([bad]))


def test_step_checks_its_tokens():
    model = _model("llama")
    dec = D.lean_decoder(model, 2, 10)
    for bad in (torch.tensor([3]), torch.tensor([3, 4], dtype=torch.int32),
                torch.tensor([[3, 4]])):
        with pytest.raises(ValueError, match="tokens"):
            dec.step(bad, 0)


def test_autocast_and_default_dtype():
    model = _model("llama")
    ids, mask = _prompts(2, 5)
    kw = dict(max_new_tokens=4, eos_token_id=None, pad_token_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert D.lean_decoder(model, 2, 20) is None      # the forward would be bf16
        assert sample(model, ids, mask, **kw).shape == (2, 9)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        a = sample(model, ids, mask, generator=g, lean=True, sampler="multinomial", **kw)
    finally:
        torch.set_default_dtype(old)
    g = torch.Generator().manual_seed(0)
    b = sample(model, ids, mask, generator=g, lean=False, sampler="multinomial", **kw)
    assert torch.equal(a, b)


def test_layers_of_different_sizes_are_refused():
    model = _model("llama")
    mlp = model.model.layers[1].mlp
    H, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features - 8
    mlp.gate_proj = torch.nn.Linear(H, inter, bias=False)
    mlp.up_proj = torch.nn.Linear(H, inter, bias=False)
    mlp.down_proj = torch.nn.Linear(inter, H, bias=False)
    assert D._why_not(model, 20) == "layer shapes"
