"""Plain-torch (float64, full logits) references for the trainer tests."""

import copy

import torch


def double_copy(model):
    return copy.deepcopy(model).double()


def completion_logprobs_logits(model, r, temperature=1.0):
    """[B, C] log-probs of the completion tokens from ``model(...).logits``."""
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
    P = r.prompt_ids.size(1)
    lg = logits[:, P - 1:-1].double() / temperature
    lp = torch.log_softmax(lg, -1)
    return lp.gather(-1, r.completion_ids.unsqueeze(-1)).squeeze(-1)


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, want, rtol=1e-4, atol=1e-6):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=rtol, atol=atol, msg=n)


def addition_pairs(n=16, seed=0):
    """DPO rows on one-digit additions: the right sum is chosen, a wrong one rejected."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append({"prompt": f"{a}+{b}=", "chosen": str(a + b),
                    "rejected": str(a + b + rng.choice([-1, 1, 10]))})
    return out
