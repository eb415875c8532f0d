"""A lean one-token decode step for Llama-family models on the CPU.

At a rollout's batch sizes a decode step of a small model costs more in per-op dispatch
than in arithmetic: ``transformers``' Llama layer runs some 35 tensor ops and a dozen module
calls per token, of which only the seven projections do real work.  :class:`LeanDecoder`
runs the same arithmetic from the model's own weights with about ten ops per layer:

* the q/k/v projections as one matmul, and gate/up as one, on weights concatenated once per
  rollout (when they are small; a large model keeps separate matmuls, whose cost then
  dwarfs the dispatch);
* (Qwen3's per-head q/k RMSNorm,) rotary embedding, the KV write, the masked attention over the cache and the softmax in
  one C++ kernel (``rlfuse._C.decode_attention``), and SwiGLU's ``silu(g) * u`` in another;
* residual adds fused into the output matmuls (``addmm``), preallocated intermediates.

The prompt is still encoded by the model's own forward (the prefill); its KV cache is copied
into the decoder's buffers.  The numbers are those of the model's forward up to float32
rounding (tested against it to 1e-5 for Llama, Qwen2, Qwen3 and Mistral, with padding and grouped
KV heads); the sampled tokens equal ``generate``'s for the tested seeds.

:func:`lean_decoder` returns None, and the sampler uses the model's forward, for anything
else: another architecture or a modified one (adapters, hooks, quantised or sharded
weights), a non-float32 or non-CPU model, CPU autocast, sliding windows shorter than the
sequence, position-dependent RoPE scaling, or attention dropout in training mode.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["LeanDecoder", "lean_decoder"]

_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# weights (bytes per layer) up to which q/k/v and gate/up are concatenated per rollout
_FUSE_BYTES = 16 << 20


def _plain_linear(mod) -> bool:
    return type(mod) is torch.nn.Linear


def _why_not(model, total_len: int) -> Optional[str]:
    """None if :class:`LeanDecoder` can run ``model`` for sequences of ``total_len``
    positions, else the reason."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _MODEL_TYPES:
        return "architecture"
    if getattr(cfg, "hidden_act", None) != "silu":
        return "activation"
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if base is None or not _plain_linear(head):
        return "structure"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, name):
            return "structure"
    if type(base.embed_tokens) is not torch.nn.Embedding or \
            type(base.norm).__name__ not in _NORMS:
        return "structure"
    if getattr(base.rotary_emb, "rope_type", "default") not in _ROPE_TYPES:
        return "rope"
    for rope in (getattr(cfg, "rope_parameters", None), getattr(cfg, "rope_scaling", None)):
        # (rope_scaling: the name in transformers before 5)
        if isinstance(rope, dict) and \
                rope.get("rope_type", rope.get("type", "default")) not in _ROPE_TYPES:
            return "rope"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and total_len > window:
        return "sliding window"
    if any(t not in ("full_attention", "sliding_attention") for t in
           (getattr(cfg, "layer_types", None) or [])):
        return "layer types"
    if model.training and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return "logit scaling"
    nh, nkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or \
        cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // nh
    if nh % nkv or hd % 2:
        return "heads"
    if len(base.layers) != cfg.num_hidden_layers:
        return "structure"
    for layer in base.layers:
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None:
            return "structure"
        projs = [getattr(at, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
            [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(_plain_linear(p) for p in projs):
            return "modified projections"
        q, k, v = projs[:3]
        if (q.out_features, k.out_features, v.out_features) != (nh * hd, nkv * hd, nkv * hd):
            return "heads"
        o, g, u, d = projs[3:]
        H = cfg.hidden_size
        if (q.in_features, k.in_features, v.in_features, o.in_features, o.out_features) != \
                (H, H, H, nh * hd, H) or g.in_features != H or u.in_features != H or \
                g.out_features != u.out_features or d.in_features != g.out_features or \
                d.out_features != H or g.out_features != base.layers[0].mlp.gate_proj.out_features:
            return "layer shapes"
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
            return "activation"
        for n in ("input_layernorm", "post_attention_layernorm"):
            if type(getattr(layer, n, None)).__name__ not in _NORMS:
                return "structure"
        norms = [getattr(at, n, None) for n in ("q_norm", "k_norm")]
        if cfg.model_type == "qwen3":
            if any(type(n).__name__ not in _NORMS or n.weight.shape != (hd,) for n in norms) \
                    or norms[0].variance_epsilon != norms[1].variance_epsilon:
                return "structure"
        elif any(n is not None for n in norms):
            return "structure"
    for mod in model.modules():
        if mod._forward_hooks or mod._forward_pre_hooks:
            return "hooks"
    for p in model.parameters():
        if type(p.data) is not torch.Tensor or p.device.type != "cpu" or \
                p.dtype != torch.float32:
            return "weights (CPU float32 tensors only)"
    return None


def lean_decoder(model, batch: int, capacity: int) -> Optional["LeanDecoder"]:
    """A :class:`LeanDecoder` for ``batch`` rows of up to ``capacity`` positions, or None when
    ``model`` is not one it can run (see the module docstring)."""
    try:
        from rlfuse import _C
    except ImportError:
        return None
    if not hasattr(_C, "decode_attention") or _why_not(model, capacity) is not None:
        return None
    if torch.is_autocast_enabled("cpu"):   # the model's forward would run in lower precision
        return None
    return LeanDecoder(model, batch, capacity)


class _Layer:
    __slots__ = ("n1", "n2", "eps1", "eps2", "qn", "kn", "qk_eps", "qkv", "qkv_b", "q", "k", "v", "q_b", "k_b", "v_b",
                 "o", "o_b", "gu", "g", "u", "d", "d_b", "kbuf", "vbuf", "scale")


class LeanDecoder:
    """Runs one-token decode steps of a Llama-family model from its current weights.

    ``load_cache(cache, repeat)`` takes the prefill's KV cache (repeating each row
    ``repeat`` times); ``step(tokens, L)`` feeds one token per row at cache column ``L``
    (the positions come from ``self.pos``, which the caller sets and advances) and returns
    the next-token logits ``[B, V]`` (float32, a fresh tensor)."""

    def __init__(self, model, batch: int, capacity: int):
        from rlfuse import _C

        self._C = _C
        cfg = model.config
        base = model.model
        self.B, self.capacity = batch, capacity
        self.C = -(-capacity // 64) * 64  # the kernel's column blocks
        self.H = cfg.hidden_size
        self.nh = cfg.num_attention_heads
        self.nkv = getattr(cfg, "num_key_value_heads", None) or self.nh
        self.hd = getattr(cfg, "head_dim", None) or self.H // self.nh
        self.threads = torch.get_num_threads()
        self.embed = base.embed_tokens.weight
        self.norm_w, self.norm_eps = base.norm.weight.contiguous(), base.norm.variance_epsilon
        self.head_w, self.head_b = model.lm_head.weight, model.lm_head.bias
        B, nq, nk = batch, self.nh * self.hd, self.nkv * self.hd
        f32 = torch.float32   # whatever torch's default dtype is
        with torch.no_grad():
            # rotary tables for every position the rows can reach
            probe = self.embed.new_empty(1, 1, self.H)
            cos, sin = base.rotary_emb(probe, torch.arange(capacity)[None])
            self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
            self.layers = []
            inter = 0
            for layer in base.layers:
                at, mlp = layer.self_attn, layer.mlp
                ly = _Layer()
                ly.n1 = layer.input_layernorm.weight.contiguous()
                ly.eps1 = layer.input_layernorm.variance_epsilon
                ly.n2 = layer.post_attention_layernorm.weight.contiguous()
                ly.eps2 = layer.post_attention_layernorm.variance_epsilon
                ly.scale = float(getattr(at, "scaling", self.hd ** -0.5))
                if getattr(at, "q_norm", None) is not None:  # Qwen3: RMSNorm per head
                    ly.qn, ly.kn = at.q_norm.weight.contiguous(), at.k_norm.weight.contiguous()
                    ly.qk_eps = at.q_norm.variance_epsilon
                else:
                    ly.qn = ly.kn = None
                    ly.qk_eps = 0.0
                fuse = 4 * (nq + 2 * nk) * self.H <= _FUSE_BYTES
                ws = (at.q_proj, at.k_proj, at.v_proj)
                if fuse:
                    ly.qkv = torch.cat([w.weight for w in ws]).t()
                    bs = [w.bias for w in ws]
                    ly.qkv_b = None if all(b is None for b in bs) else torch.cat(
                        [b if b is not None else w.weight.new_zeros(w.out_features)
                         for w, b in zip(ws, bs)])
                else:
                    ly.qkv = ly.qkv_b = None
                ly.q, ly.k, ly.v = (w.weight for w in ws)
                ly.q_b, ly.k_b, ly.v_b = (w.bias for w in ws)
                ly.o, ly.o_b = at.o_proj.weight.t(), at.o_proj.bias
                inter = mlp.gate_proj.out_features
                if 4 * 2 * inter * self.H <= _FUSE_BYTES and mlp.gate_proj.bias is None and \
                        mlp.up_proj.bias is None:
                    ly.gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t()
                else:
                    ly.gu = None
                ly.g = (mlp.gate_proj.weight, mlp.gate_proj.bias)
                ly.u = (mlp.up_proj.weight, mlp.up_proj.bias)
                ly.d, ly.d_b = mlp.down_proj.weight.t(), mlp.down_proj.bias
                ly.kbuf = torch.zeros(B, self.nkv, self.hd, self.C, dtype=f32)  # keys^T
                ly.vbuf = torch.zeros(B, self.nkv, self.C, self.hd, dtype=f32)
                self.layers.append(ly)
        self.inter = inter
        self.h = torch.empty(B, self.H, dtype=f32)
        self.qkv = torch.empty(B, nq + 2 * nk, dtype=f32)
        self.att = torch.empty(B, nq, dtype=f32)
        self.gu = torch.empty(B, 2 * inter, dtype=f32)
        self.act = torch.empty(B, inter, dtype=f32)
        self.pos = torch.zeros(B, dtype=torch.int64)
        self.mask = torch.zeros(B, self.C, dtype=torch.uint8)

    def cache_fits(self, cache, repeat: int = 1) -> bool:
        """Whether ``cache`` is a prefill cache :meth:`load_cache` takes: one layer per
        decoder layer with ``keys`` / ``values`` of ``[B / repeat, nkv, P, hd]``, P below
        the capacity."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != len(self.layers) or self.B % repeat:
            return False
        for layer in layers:
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or \
                    k.dim() != 4 or k.shape != v.shape or \
                    k.shape[:2] != (self.B // repeat, self.nkv) or k.shape[3] != self.hd or \
                    not 0 < k.shape[2] < self.capacity or k.dtype != torch.float32:
                return False
        return True

    def load_cache(self, cache, repeat: int = 1) -> int:
        """Copy the prefill's cache (``[B / repeat, nkv, P, hd]`` per layer, each row
        ``repeat`` times) into the buffers; returns P."""
        if not self.cache_fits(cache, repeat):
            raise ValueError("LeanDecoder.load_cache: not a prefill cache of this model, "
                             f"batch {self.B // repeat} and fewer than {self.capacity} positions")
        B0, P = self.B // repeat, cache.layers[0].keys.shape[2]
        for ly, layer in zip(self.layers, cache.layers):
            k, v = layer.keys, layer.values
            # each prompt row written to its `repeat` sample rows in one broadcast copy
            ly.kbuf.view(B0, repeat, self.nkv, self.hd, self.C)[..., :P] = \
                k.transpose(2, 3)[:, None]
            ly.vbuf.view(B0, repeat, self.nkv, self.C, self.hd)[:, :, :, :P] = v[:, None]
        return P

    def _qkv(self, ly, h):
        if ly.qkv is not None:
            if ly.qkv_b is not None:
                torch.addmm(ly.qkv_b, h, ly.qkv, out=self.qkv)
            else:
                torch.mm(h, ly.qkv, out=self.qkv)
            return self.qkv
        nq, nk = self.nh * self.hd, self.nkv * self.hd
        out = self.qkv
        for w, b, sl in ((ly.q, ly.q_b, slice(0, nq)), (ly.k, ly.k_b, slice(nq, nq + nk)),
                         (ly.v, ly.v_b, slice(nq + nk, nq + 2 * nk))):
            out[:, sl] = F.linear(h, w, b)
        return out

    def _mlp(self, ly, h):
        if ly.gu is not None:
            torch.mm(h, ly.gu, out=self.gu)
            g, u = self.gu, self.gu[:, self.inter:]
        else:
            g = F.linear(h, *ly.g)
            u = F.linear(h, *ly.u)
        self._C.silu_mul(g.data_ptr(), u.data_ptr(), g.stride(0), u.stride(0),
                         self.act.data_ptr(), self.act.stride(0), self.B, self.inter,
                         self.threads)
        return self.act

    def _norm(self, x, w, eps):
        if x.dtype != torch.float32 or x.shape != (self.B, self.H) or not x.is_contiguous():
            raise RuntimeError(f"LeanDecoder: hidden states of {x.dtype} {tuple(x.shape)}, "
                               f"expected contiguous float32 ({self.B}, {self.H})")
        self._C.rms_norm(x.data_ptr(), x.stride(0), w.data_ptr(), eps, self.h.data_ptr(),
                         self.h.stride(0), self.B, self.H, self.threads)
        return self.h

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, L: int) -> torch.Tensor:
        if not 0 <= L < self.capacity:
            raise ValueError(f"LeanDecoder.step: column {L} outside the buffers "
                             f"({self.capacity})")
        if not isinstance(tokens, torch.Tensor) or tokens.shape != (self.B,) or \
                tokens.dtype != torch.int64 or tokens.device.type != "cpu":
            raise ValueError(f"LeanDecoder.step: tokens must be a CPU int64 tensor of shape "
                             f"({self.B},)")
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("LeanDecoder.step: CPU autocast is on (the decoder computes "
                               "in float32 only)")
        nq, nk, hd = self.nh * self.hd, self.nkv * self.hd, self.hd
        x = F.embedding(tokens, self.embed)
        if not x.is_contiguous():
            x = x.contiguous()
        qkv, att = self.qkv, self.att
        base, st = qkv.data_ptr(), qkv.stride(0)
        for ly in self.layers:
            h = self._norm(x, ly.n1, ly.eps1)
            self._qkv(ly, h)
            self._C.decode_attention(
                base, base + 4 * nq, base + 4 * (nq + nk), st, st, st,
                self.cos.data_ptr(), self.sin.data_ptr(), self.cos.stride(0),
                self.pos.data_ptr(), 0 if ly.qn is None else ly.qn.data_ptr(),
                0 if ly.kn is None else ly.kn.data_ptr(), ly.qk_eps, self.cos.shape[0],
                ly.kbuf.data_ptr(), ly.vbuf.data_ptr(),
                self.mask.data_ptr(), self.mask.stride(0), att.data_ptr(), att.stride(0),
                self.B, self.nh, self.nkv, hd, self.C, L, ly.scale, self.threads)
            x = torch.addmm(x, att, ly.o)
            if ly.o_b is not None:
                x += ly.o_b
            h = self._norm(x, ly.n2, ly.eps2)
            x = torch.addmm(x, self._mlp(ly, h), ly.d)
            if ly.d_b is not None:
                x += ly.d_b
        h = self._norm(x, self.norm_w, self.norm_eps)
        return F.linear(h, self.head_w, self.head_b)
