"""Benchmark of rollout sampling: ``rlfuse.models.generate.sample`` against
``transformers``' ``generate`` on the same model, prompts and sampling settings.

Case: B prompts of P tokens (two rows left-padded), G samples each, N new tokens (no eos:
every variant runs all N decode steps), temperature 1, a seeded tiny Llama built from a
config (``rlfuse.models.tiny``).

  rlfuse        sample(): one prefill per prompt, the lean decoder for the decode steps
                (rlfuse.models.decode: fused projections, C++ attention / RMSNorm / SwiGLU)
  model_fwd     sample(lean=False): the same loop with the model's own forward per step
  generate      model.generate(do_sample=True, num_return_sequences=G)

The note ``decode_step_us`` is each variant's time per generated token position (the
rollout time over N; it includes the prefill and the sampling).  The CPU is the target:
on a GPU the lean decoder is not used (``rlfuse`` and ``model_fwd`` then coincide).
"""

from __future__ import annotations

import torch

from rlfuse.bench.harness import Row, time_variants

NAME = "generate"

# (hidden, layers, prompts B, samples G, prompt tokens P, new tokens N)
CPU_CASES = [(128, 2, 4, 8, 12, 32), (512, 4, 4, 8, 32, 64)]
CPU_QUICK = [(64, 2, 2, 4, 8, 8)]
GPU_CASES = [(512, 4, 16, 8, 64, 128)]


def _model(hidden, layers, device):
    from rlfuse.models.tiny import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok, hidden_size=hidden, num_layers=layers, num_heads=4,
                           max_position_embeddings=512)
    return model.to(device).eval(), tok


def _prompts(B, P, V, device):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1 % B, :P // 3] = 0
    mask[(B - 1), :P // 2] = 0
    ids[mask == 0] = 0
    return ids.to(device), mask.to(device)


def run(device="cpu", quick=False, repeat=None, compile=True, backends=None) -> list[Row]:
    from rlfuse.models.decode import _why_not
    from rlfuse.models.generate import sample

    dev = torch.device(device)
    cases = CPU_QUICK if quick else (GPU_CASES if dev.type == "cuda" else CPU_CASES)
    repeat = repeat or (3 if quick else 10)
    rows = []
    for hidden, layers, B, G, P, N in cases:
        model, tok = _model(hidden, layers, dev)
        model.generation_config.eos_token_id = None   # every row runs all N steps
        ids, mask = _prompts(B, P, len(tok), dev)
        common = dict(eos_token_id=None, pad_token_id=tok.pad_token_id)

        def rl(lean):
            g = torch.Generator(device=dev).manual_seed(1)
            return lambda: sample(model, ids, mask, max_new_tokens=N, num_samples=G,
                                  generator=g, lean=lean, **common)

        def hf():
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                      max_new_tokens=N, num_return_sequences=G, top_k=0, top_p=1.0,
                                      temperature=1.0, **common)

        fns = {"rlfuse": rl(None), "model_fwd": rl(False), "generate": hf}
        times, errors = time_variants(fns, dev, warmup=2, repeat=repeat)
        why = _why_not(model, P + N)
        notes = dict(errors)
        notes["decode_step_us"] = ", ".join(
            f"{k} {v * 1e3 / N:.0f}" for k, v in times.items() if v is not None)
        notes["rlfuse_decode_steps"] = "lean decoder" if why is None else \
            f"the model's forward ({why})"
        rows.append(Row("rollout", f"hidden={hidden} layers={layers} B={B} G={G} P={P} N={N}",
                        "float32", "sample", times, 0.0, notes))
    return rows
