"""One call of every public op on fixed, seeded inputs, for the thread-safety, thread-count
and leak tests.  ``run(name, backend)`` returns the outputs (and gradients, for the
differentiable ops) as a list of tensors; calls are independent (fresh leaf tensors).

Run as a script it prints a digest of every op's cpu-backend outputs, so that a subprocess
started with another ``OMP_NUM_THREADS`` can be compared bitwise with this process:

    python -m tests.reliability._cases <size> [--threads 1,2,3 --only <name>,<name>]
"""

from __future__ import annotations

import functools
import hashlib
import sys

import torch

from rlfuse.ops import (
    discounted_returns,
    gae,
    group_advantages,
    kl_penalty,
    linear_token_logprobs,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    preference_logps,
    preference_loss,
    preference_loss_from_hidden,
    reduce_sequences,
    sequence_logprobs,
    token_logprobs,
    token_rewards,
    value_loss,
)

# (B, T, V, H): "tiny" for 10,000-call leak loops; "medium" big enough that every CPU kernel
# splits its work over several OpenMP threads.
SIZES = {"tiny": (2, 5, 11, 4), "medium": (8, 64, 65, 16)}
# the tree search: (trees, actions, simulations, parallel)
SEARCH_SIZES = {"tiny": (2, 3, 4, 2), "medium": (8, 9, 24, 4)}
SEARCH_CASE = "puct_search / gumbel_search / subtree"


@functools.lru_cache(maxsize=None)
def inputs(size: str) -> dict:
    B, T, V, H = SIZES[size]
    g = torch.Generator().manual_seed(1234)

    def rn(*s):
        return torch.randn(*s, generator=g)

    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0] = False
    lp = -torch.rand(B, T, generator=g) * 3
    cu = torch.tensor([0, T // 3, T // 3, B * T // 2, B * T])
    return dict(
        logits=rn(B, T, V) * 3, ids=torch.randint(0, V, (B, T), generator=g),
        hidden=rn(B, T, H), weight=rn(V, H) * 0.3, bias=rn(V) * 0.1, mask=mask,
        r=rn(B, T), v=rn(B, T), lv=rn(B), cu=cu, flat=rn(B * T),
        scores=rn(B * 4), gids=torch.randint(0, max(B // 2, 1), (B * 4,), generator=g),
        smask=torch.rand(B * 4, T, generator=g) > 0.2, lp=lp, old=lp + 0.1 * rn(B, T),
        ref=lp + 0.1 * rn(B, T), adv=rn(B, T), ent=torch.rand(B, T, generator=g) * 2,
        kl=rn(B, T) * 0.1, search=SEARCH_SIZES[size],
    )


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _token_logprobs(t, backend):
    x = _leaf(t["logits"])
    lp, ent = token_logprobs(x, t["ids"], return_entropy=True, temperature=0.9, backend=backend)
    (g,) = torch.autograd.grad(lp.sum() + 0.5 * ent.sum(), x)
    return [lp, ent, g]


def _linear_token_logprobs(t, backend):
    h, w = _leaf(t["hidden"]), _leaf(t["weight"])
    lp, ent = linear_token_logprobs(h, w, t["ids"], bias=t["bias"], return_entropy=True,
                                    chunk_size=64, backend=backend)
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (h, w))
    return [lp, ent, gh, gw]


def _sequence_logprobs(t, backend):
    out = sequence_logprobs(t["ids"], logits=t["logits"], mask=t["mask"], backend=backend)
    s, m, n = reduce_sequences(t["flat"], cu_seqlens=t["cu"])
    return [out.sum, out.mean, out.count, s, m, n]


def _gae(t, backend):
    a, r = gae(t["r"], t["v"], t["mask"], gamma=0.99, lam=0.95, last_values=t["lv"],
               whiten=True, backend=backend)
    d = discounted_returns(t["flat"], None, 0.9, cu_seqlens=t["cu"], backend=backend)
    return [a, r, d]


def _moments(t, backend):
    x, m = t["r"], t["mask"]
    return [masked_mean(x, m, backend=backend), masked_var(x, m, 1, backend=backend),
            masked_whiten(x, m, backend=backend)]


def _group_advantages(t, backend):
    return [group_advantages(t["scores"], group_size=4, method="grpo", backend=backend),
            group_advantages(t["scores"], group_ids=t["gids"], method="rloo", backend=backend),
            group_advantages(t["scores"], group_size=4, mask=t["smask"],
                             method="reinforce_pp_baseline", backend=backend)]


def _token_rewards(t, backend):
    return [token_rewards(t["lv"], t["mask"], kl=t["kl"], kl_coef=0.05, backend=backend)]


def _kl_penalty(t, backend):
    x = _leaf(t["lp"])
    k = kl_penalty(x, t["ref"], "k3", backend=backend)
    (g,) = torch.autograd.grad(k.sum(), x)
    return [k, g]


def _policy_loss(t, backend):
    x, e = _leaf(t["lp"]), _leaf(t["ent"])
    loss, stats = policy_loss(x, t["old"], t["adv"], t["mask"], ref_logp=t["ref"], beta=0.04,
                              entropy=e, entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean",
                              backend=backend)
    gx, ge = torch.autograd.grad(loss, (x, e))
    return [loss, gx, ge, *stats.values()]


def _value_loss(t, backend):
    v = _leaf(t["v"])
    loss, stats = value_loss(v, t["r"], t["lv"][:, None].expand_as(t["r"]), t["mask"],
                             cliprange_value=0.2, backend=backend)
    (g,) = torch.autograd.grad(loss, v)
    return [loss, g, *stats.values()]


def _preference(t, backend):
    P = t["ids"].shape[0] // 2
    h, w = _leaf(t["hidden"][: 2 * P]), _leaf(t["weight"])
    seq = preference_logps(h, w, t["ids"][: 2 * P], mask=t["mask"][: 2 * P], ld_alpha=0.5,
                           chunk_size=64, backend=backend)
    ref = t["lp"][:P, 0] * 4
    loss, stats = preference_loss(seq.chosen, seq.rejected, ref, ref - 0.3,
                                  loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1, .5, .2],
                                  chosen_lengths=seq.chosen_lengths,
                                  rejected_lengths=seq.rejected_lengths, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return [loss, gh, gw, *stats.values()]


def _preference_fused(t, backend):
    """preference_loss_from_hidden with gradients: the fused pair-chunked path."""
    P = t["ids"].shape[0] // 2
    h, w = _leaf(t["hidden"][: 2 * P]), _leaf(t["weight"])
    ref = t["lp"][:P, 0] * 4
    T = t["ids"].shape[1]
    loss, stats = preference_loss_from_hidden(
        h, w, t["ids"][: 2 * P], mask=t["mask"][: 2 * P], ld_alpha=0.5, chunk_size=2 * T,
        ref_chosen_logps=ref, ref_rejected_logps=ref - 0.3,
        loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1, .5, .2], backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, w))
    return [loss, gh, gw, *stats.values()]


def _search(t, backend):
    """puct_search (Dirichlet noise, sampled action), gumbel_search (Gumbel noise) and a
    subtree of the PUCT trees, on a hash environment (tests/search/envs.py's HashEnv)."""
    from rlfuse.search import gumbel_search, puct_search

    B, K, n, W = t["search"]
    env = hash_env(K)
    root = env.root(B)
    g = torch.Generator().manual_seed(7)
    p = puct_search(root, env.step, n, parallel=W, generator=g, backend=backend)
    q = gumbel_search(root, env.step, n, parallel=W, max_num_considered_actions=4, generator=g,
                      backend=backend)
    sub = p.tree.subtree(p.action)
    out = []
    for r in (p, q):
        out += [r.action, r.action_weights, r.root_visit_counts, r.root_value]
    for t in (p.tree, q.tree, sub):
        out += tree_arrays(t)
    return out


@functools.lru_cache(maxsize=None)
def hash_env(K):
    from rlfuse.bench.search import HashEnv

    return HashEnv(K, seed=11)


def tree_arrays(t) -> list:
    """The arrays of a Tree that hold data: node fields of the allocated nodes, edge fields
    of the expanded ones (the rest of the storage is never written)."""
    used = torch.arange(t.capacity)[None, :] < t.next_free[:, None]
    expanded = used & (t.flags & 1).bool()
    out = [t.next_free, t.minmax]
    for name in ("parent", "action", "visits", "value", "raw_value", "depth", "flags",
                 "inflight"):
        out.append(getattr(t, name)[used])
    for name in ("children", "logits", "prior", "children_visits", "children_values",
                 "rewards", "discounts", "invalid", "children_q"):
        out.append(getattr(t, name)[expanded])
    return out


CASES = {
    "token_logprobs": _token_logprobs,
    "linear_token_logprobs": _linear_token_logprobs,
    "sequence_logprobs / reduce_sequences": _sequence_logprobs,
    "gae / discounted_returns": _gae,
    "masked_mean / masked_var / masked_whiten": _moments,
    "group_advantages": _group_advantages,
    "token_rewards": _token_rewards,
    "kl_penalty": _kl_penalty,
    "policy_loss": _policy_loss,
    "value_loss": _value_loss,
    "preference_logps / preference_loss": _preference,
    "preference_loss_from_hidden (fused)": _preference_fused,
    SEARCH_CASE: _search,
}
# backends that serve each case (default: every backend that runs here)
CASE_BACKENDS = {SEARCH_CASE: ("cpu", "torch")}


def run(name: str, backend: str, size: str = "medium") -> list:
    return CASES[name](inputs(size), backend)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for x in tensors:
        x = x.detach().contiguous().reshape(-1)
        h.update(str((x.dtype, x.numel())).encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return h.hexdigest()


def _full_threads():
    """Let the CPU kernels use every thread on these inputs (their grain size would keep
    small inputs on one thread)."""
    from rlfuse import _backend
    from rlfuse.search import tree

    _backend.THREAD_GRAIN = 64
    tree.THREAD_MIN_PAIRS = 0


def _main(argv):
    """argv: size [--threads 1,2,... --only name,name].  Prints torch's thread count, one
    line per op ("name digest") at that count, then with --threads one line per thread
    count and named op ("threads name digest")."""
    _full_threads()
    size = argv[0] if argv else "medium"
    print(torch.get_num_threads())
    for name in CASES:
        print(name, digest(run(name, "cpu", size)))
    if "--threads" in argv:
        names = argv[argv.index("--only") + 1].split(",")
        for n in argv[argv.index("--threads") + 1].split(","):
            torch.set_num_threads(int(n))
            for name in names:
                print(n, name, digest(run(name, "cpu", size)))


if __name__ == "__main__":
    _main(sys.argv[1:])
