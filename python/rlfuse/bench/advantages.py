"""Benchmark of the advantage family: GAE and GRPO group advantages against verl, the best
vectorised torch we could write, and torch.compile of it.

GAE (B=256, T=1024, float32 on the CPU; right padding, int64 response mask as verl builds
it).  Every variant produces verl's output (advantages whitened over the valid tokens, and
returns):
  rlfuse        ``gae(..., whiten=True)``
  verl          ``core_algos.compute_gae_advantage_return`` (a Python loop over T), when
                verl is importable
  eager_chunk   vectorised torch: within chunks of 32 steps the recurrence with a constant
                discount is a matrix product with the [32, 32] matrix of powers of
                gamma*lam, the chunk carries are a second small matrix product; then
                verl's masked_whiten formula.  Valid for right padding (a constant
                discount), which is this case.
  eager_scan    vectorised torch for any mask (verl's skip semantics): next-valid-value
                lookup with a reverse cummin, then A_t = c^-N_t * revcumsum(c^N_k delta_k)
                in float64 (N = count of valid positions).
  compile       torch.compile of eager_chunk.
GRPO (4096 samples in groups of 8, token rewards [4096, 512] float32, response mask
int64): the advantage broadcast over the valid tokens, verl semantics.
  rlfuse        ``group_advantages(token_rewards, group_ids=..., mask=..., semantics="verl")``
                (rlfuse[group_size]: the same with ``group_size=8``; rlfuse[scores]: from
                per-sample scores, when the caller has them, so without the row sums)
  verl          ``compute_grpo_vectorized_outcome_advantage`` (and, in full runs,
                ``compute_grpo_outcome_advantage``, its loop version, as verl_loop)
  eager         sum over T, view(-1, 8) mean / std, normalise, multiply by the mask
  compile       torch.compile of eager.
"""

from __future__ import annotations

import numpy as np
import torch

from rlfuse.bench.harness import Row, time_variants
from rlfuse.ops import gae, group_advantages

NAME = "advantages"

CPU_GAE = [(256, 1024)]
CPU_GAE_QUICK = [(64, 512)]
GPU_GAE = [(1024, 4096)]
CPU_GRPO = [(4096, 8, 512)]
CPU_GRPO_QUICK = [(1024, 8, 256)]
GPU_GRPO = [(16384, 16, 2048)]


# --------------------------------------------------------------------------------------
# vectorised torch baselines
# --------------------------------------------------------------------------------------
def _masked_whiten_torch(x, mask):
    """verl / TRL masked_whiten (unbiased variance, rsqrt(var + 1e-8))."""
    m = mask.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum() / n
    var = (((x - mean) ** 2) * m).sum() / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def _gae_chunked(r, v, mask, gamma: float, lam: float, chunk: int = 32):
    """Constant-discount GAE as two levels of matrix products (right padding / zero_masked)."""
    B, T = r.shape
    m = mask.to(r.dtype)
    vz, rz = v * m, r * m
    nv = torch.cat([vz[:, 1:], vz.new_zeros(B, 1)], 1)
    delta = rz + gamma * nv - vz
    c = gamma * lam
    pad = (-T) % chunk
    if pad:
        delta = torch.cat([delta, delta.new_zeros(B, pad)], 1)
    nc = delta.shape[1] // chunk
    k = torch.arange(chunk, device=r.device)
    expo = (k[None, :] - k[:, None]).to(r.dtype)
    D = torch.where(expo >= 0, c ** expo.clamp(min=0), torch.zeros((), dtype=r.dtype,
                                                                   device=r.device))
    intra = delta.view(B, nc, chunk) @ D.T          # within-chunk discounted sums
    j = torch.arange(nc, device=r.device)
    ej = (j[None, :] - j[:, None] - 1).to(r.dtype)
    E = torch.where(ej >= 0, (c ** chunk) ** ej.clamp(min=0),
                    torch.zeros((), dtype=r.dtype, device=r.device))
    carry = intra[:, :, 0] @ E.T                    # A at the start of the next chunk
    pw = c ** (chunk - k).to(r.dtype)
    A = (intra + carry.unsqueeze(-1) * pw).reshape(B, -1)[:, :T] * m
    return A, (A + vz) * m


def _gae_scan(r, v, mask, gamma: float, lam: float):
    """verl's skip_masked GAE for any mask, vectorised (float64 scaling trick)."""
    B, T = r.shape
    mb = mask.bool()
    idx = torch.arange(T, device=r.device).expand(B, T)
    nxt = torch.where(mb, idx, T)
    after = torch.cat([nxt[:, 1:], torch.full((B, 1), T, device=r.device)], 1)
    after = after.flip(-1).cummin(-1).values.flip(-1)
    nv = torch.cat([v, v.new_zeros(B, 1)], 1).gather(1, after)
    delta = torch.where(mb, r + gamma * nv - v, torch.zeros((), dtype=r.dtype, device=r.device))
    c = gamma * lam
    w = torch.pow(torch.tensor(c, dtype=torch.float64, device=r.device),
                  mb.to(torch.float64).cumsum(-1))
    S = (w * delta.double()).flip(-1).cumsum(-1).flip(-1)
    A = torch.where(mb, S / w, torch.zeros((), dtype=torch.float64, device=r.device)).to(r.dtype)
    return A, torch.where(mb, A + v, torch.zeros((), dtype=r.dtype, device=r.device))


def _gae_chunked_whiten(r, v, mask, gamma, lam):
    A, R = _gae_chunked(r, v, mask, gamma, lam)
    return _masked_whiten_torch(A, mask), R


def _gae_scan_whiten(r, v, mask, gamma, lam):
    A, R = _gae_scan(r, v, mask, gamma, lam)
    return _masked_whiten_torch(A, mask), R


def _grpo_eager(tok, mask, n: int, eps: float = 1e-6):
    s = tok.sum(-1).view(-1, n)
    adv = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + eps)
    return adv.reshape(-1, 1) * mask


def _verl():
    try:
        from verl.trainer.ppo import core_algos
    except Exception:  # verl not installed, or it failed to import
        return None
    return core_algos


# --------------------------------------------------------------------------------------
def _timed(fns: dict, dev, repeat: int):
    """Median ms per variant, interleaved (one call of each per round, after two warm-up
    calls of each: compilation, allocator growth, thread pools); a variant that fails is
    reported in the notes with time None."""
    return time_variants(fns, dev, warmup=2, repeat=repeat)


def _agree(got, want, name, notes, tol=1e-4):
    """Record in the notes when a variant's output differs from rlfuse's (it would not be a
    fair comparison)."""
    try:
        if not torch.allclose(got.double(), want.double(), rtol=tol, atol=tol):
            notes[f"{name} output"] = "differs from rlfuse's"
    except Exception as exc:  # pragma: no cover - informational
        notes[f"{name} output"] = f"{type(exc).__name__}: {exc}"


def run(device: str = "cpu", quick: bool = False, repeat: int | None = None,
        compile: bool = True, backends: list[str] | None = None) -> list[Row]:
    dev = torch.device(device)
    gpu = dev.type == "cuda"
    explicit_repeat = repeat
    repeat = repeat or (5 if quick else 10)
    verl = _verl()
    extra = [b for b in (backends or []) if b]
    rows: list[Row] = []
    gamma, lam = 1.0, 0.95

    compiled_gae = torch.compile(_gae_chunked_whiten, dynamic=False) if compile else None
    compiled_gae_nw = torch.compile(_gae_chunked, dynamic=False) if compile else None
    for B, T in (GPU_GAE if gpu else (CPU_GAE_QUICK if quick else CPU_GAE)):
        g = torch.Generator(device="cpu").manual_seed(0)
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64).to(dev)
        r = (torch.randn(B, T, generator=g) * 0.1).to(dev) * mask
        v = torch.randn(B, T, generator=g).to(dev)
        case = f"B={B} T={T}"
        nbytes = B * T * (4 + 4 + 8 + 4 + 4)
        mb = mask.bool()

        for whiten in (True, False):
            fns = {"rlfuse": lambda w=whiten: gae(r, v, mask, gamma=gamma, lam=lam, whiten=w)}
            for b in extra:
                fns[f"rlfuse[{b}]"] = lambda b=b, w=whiten: gae(r, v, mask, gamma=gamma,
                                                                lam=lam, whiten=w, backend=b)
            if whiten and verl is not None:
                fns["verl"] = lambda: verl.compute_gae_advantage_return(r, v, mask, gamma, lam)
            if whiten:
                fns["eager_chunk"] = lambda: _gae_chunked_whiten(r, v, mask, gamma, lam)
                fns["eager_scan"] = lambda: _gae_scan_whiten(r, v, mask, gamma, lam)
                if compiled_gae is not None:
                    fns["compile"] = lambda: compiled_gae(r, v, mask, gamma, lam)
            else:
                fns["eager_chunk"] = lambda: _gae_chunked(r, v, mask, gamma, lam)
                fns["eager_scan"] = lambda: _gae_scan(r, v, mask, gamma, lam)
                if compiled_gae_nw is not None:
                    fns["compile"] = lambda: compiled_gae_nw(r, v, mask, gamma, lam)
            t, notes = _timed(fns, dev, repeat)
            ours = fns["rlfuse"]()[0]
            for name in ("verl", "eager_chunk", "eager_scan", "compile"):
                if name in fns and t.get(name) is not None:
                    _agree(fns[name]()[0] * mb, ours, name, notes)
            rows.append(Row("gae", case, "float32", "whiten" if whiten else "no-whiten", t,
                            nbytes, notes))

    compiled_grpo = torch.compile(_grpo_eager, dynamic=False) if compile else None
    for B, n, T in (GPU_GRPO if gpu else (CPU_GRPO_QUICK if quick else CPU_GRPO)):
        g = torch.Generator(device="cpu").manual_seed(1)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None] < lengths[:, None]).to(torch.int64).to(dev)
        tok = torch.zeros(B, T)
        tok[torch.arange(B), lengths - 1] = torch.randint(0, 2, (B,), generator=g).float()
        tok = tok.to(dev)
        index = np.repeat(np.arange(B // n), n)
        ids = torch.from_numpy(index).to(dev)
        case = f"B={B} n={n} T={T}"
        nbytes = B * T * (4 + 8 + 4)
        fns = {"rlfuse": lambda: group_advantages(tok, group_ids=ids, mask=mask,
                                                  semantics="verl")}
        fns["rlfuse[group_size]"] = lambda: group_advantages(tok, group_size=n, mask=mask,
                                                             semantics="verl")
        scores = tok.sum(-1)
        fns["rlfuse[scores]"] = lambda: group_advantages(scores, group_ids=ids, mask=mask,
                                                         semantics="verl")
        for b in extra:
            fns[f"rlfuse[{b}]"] = lambda b=b: group_advantages(tok, group_ids=ids, mask=mask,
                                                               semantics="verl", backend=b)
        if verl is not None:
            fns["verl"] = lambda: verl.compute_grpo_vectorized_outcome_advantage(tok, mask,
                                                                                 index)[0]
            if not quick:
                fns["verl_loop"] = lambda: verl.compute_grpo_outcome_advantage(tok.clone(), mask,
                                                                               index)[0]
        fns["eager"] = lambda: _grpo_eager(tok, mask, n)
        if compiled_grpo is not None:
            fns["compile"] = lambda: compiled_grpo(tok, mask, n)
        # --quick times the GRPO row 3 times unless --repeat says otherwise
        t, notes = _timed(fns, dev, explicit_repeat or (3 if quick else repeat))
        ours = fns["rlfuse"]()
        for name in ("verl", "eager", "compile"):
            if name in fns and t.get(name) is not None:
                _agree(fns[name](), ours, name, notes)
        rows.append(Row("grpo", case, "float32", "broadcast", t, nbytes, notes))
    return rows
