"""MCTS policies over batched array trees, in the style of mctx: :func:`puct_search`
(MuZero's PUCT with Dirichlet noise at the root) and :func:`gumbel_search` (Gumbel MuZero:
Gumbel top-k with sequential halving at the root, the deterministic improved-policy rule
inside), plus the root helpers they are made of.

    root = Root(prior_logits=[B, A], value=[B], embedding=anything indexable by tree)
    out = puct_search(root, recurrent_fn, num_simulations=64, parallel=4)
    out.action [B], out.action_weights [B, A], out.root_visit_counts [B, A], out.tree

``recurrent_fn(embedding, action)`` is called once per simulation step with the B * W leaves
that the step expands (``parallel=W`` simulations per tree; the last step may have fewer)
and returns ``(reward, discount, prior_logits, value, next_embedding)`` for them: tensors
[M], [M], [M, A], [M] and the embeddings (structure of the root's, M rows), or a
:class:`RecurrentOutput`, which may also carry ``invalid_actions`` [M, A] and ``terminal``
[M].  A function with a third positional parameter also receives an :class:`Expansion`
that says which (tree, parent node, new node, action, depth) each row is, and whether it
is new: rows that revisit an existing node (a terminal node, ``max_depth``, or a leaf that
another simulation of the step is already expanding) are still passed, so that the call
keeps its B * W shape, but their outputs are ignored.
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import numbers
from typing import Any, Callable, NamedTuple

import torch

from rlfuse.search.tree import Phases, Tree, make_store

_TINY = torch.finfo(torch.float32).tiny


class Root(NamedTuple):
    prior_logits: torch.Tensor   # [B, A]
    value: torch.Tensor          # [B]
    embedding: Any = None        # indexable by tree: tensor(s) [B, ...] or a sequence of B


class RecurrentOutput(NamedTuple):
    reward: torch.Tensor         # [M]
    discount: torch.Tensor       # [M]
    prior_logits: torch.Tensor   # [M, A]; -inf marks an invalid action
    value: torch.Tensor          # [M]
    embedding: Any = None        # the rows' next embeddings
    invalid_actions: torch.Tensor | None = None  # [M, A] bool: actions not allowed there
    terminal: torch.Tensor | None = None         # [M] bool: never expanded further


class Expansion(NamedTuple):
    tree: torch.Tensor    # [M] int64
    parent: torch.Tensor  # [M] int64: the node whose action is taken
    node: torch.Tensor    # [M] int64: the node the row creates (or revisits)
    action: torch.Tensor  # [M] int64
    depth: torch.Tensor   # [M] int64: depth of `node` (root = 0)
    new: torch.Tensor     # [M] bool: False for rows whose outputs are ignored


class SearchResult(NamedTuple):
    action: torch.Tensor             # [B] int64
    action_weights: torch.Tensor     # [B, A]: the policy target
    root_visit_counts: torch.Tensor  # [B, A] int32
    root_value: torch.Tensor         # [B]: the search value of the root
    tree: Tree


# --------------------------------------------------------------------------------------
# root helpers
# --------------------------------------------------------------------------------------
def _gamma(alpha: float, shape, generator, device) -> torch.Tensor:
    """Gamma(alpha, 1) samples (Marsaglia and Tsang; boosted for alpha < 1)."""
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.zeros(shape, device=device)
    todo = torch.ones(shape, dtype=torch.bool, device=device)
    while bool(todo.any()):
        x = torch.randn(shape, generator=generator, device=device)
        u = torch.rand(shape, generator=generator, device=device)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-30)))
        take = ok & todo
        out = torch.where(take, d * v, out)
        todo &= ~take
    if alpha < 1.0:
        u = torch.rand(shape, generator=generator, device=device)
        out = out * u.pow(1.0 / alpha)
    return out


def dirichlet_noise(probs: torch.Tensor, *, fraction: float, alpha: float,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """``(1 - fraction) * probs + fraction * Dirichlet(alpha)`` row by row (as mctx)."""
    if fraction == 0:
        return probs
    g = _gamma(alpha, probs.shape, generator, probs.device).double()
    noise = (g / g.sum(-1, keepdim=True).clamp_min(1e-300)).to(probs.dtype)
    return (1 - fraction) * probs + fraction * noise


def gumbel_noise(shape, *, scale: float = 1.0, generator=None, device="cpu") -> torch.Tensor:
    if scale == 0:
        return torch.zeros(shape, device=device)
    u = torch.rand(shape, generator=generator, device=device).clamp(_TINY, 1.0 - 1e-7)
    return scale * -torch.log(-torch.log(u))


def mask_logits(logits: torch.Tensor, invalid: torch.Tensor | None) -> torch.Tensor:
    """Logits minus their maximum, invalid actions at the lowest finite float (as mctx)."""
    if invalid is None:
        return logits
    logits = logits - logits.max(-1, keepdim=True).values
    return logits.masked_fill(invalid, torch.finfo(logits.dtype).min)


def sequential_halving_table(max_considered: int, num_simulations: int) -> torch.Tensor:
    """[max_considered + 1, num_simulations]: row m is the visit count a root action must
    have to be chosen by simulation i when m actions are considered.  Each phase gives every
    remaining action max(1, n // (ceil(log2 m) * live)) more visits and then halves the
    number of live actions (down to 2), as in Gumbel MuZero."""
    return _halving_table(int(max_considered), int(num_simulations)).clone()


@functools.lru_cache(maxsize=64)
def _halving_table(max_considered: int, num_simulations: int) -> torch.Tensor:
    # built once per (m, n): a search calls for it every time (~0.2 ms in Python)
    rows = []
    n = num_simulations
    for m in range(max_considered + 1):
        if m <= 1:
            rows.append(list(range(n)))
            continue
        rounds = math.ceil(math.log2(m))
        seq, count, live = [], 0, m
        while len(seq) < n:
            for _ in range(max(1, n // (rounds * live))):
                seq += [count] * live
                count += 1
            live = max(2, live // 2)
        rows.append(seq[:n])
    return torch.tensor(rows, dtype=torch.int32)


def completed_qvalues(tree: Tree, node: int = 0, *, value_scale: float = 0.1,
                      maxvisit_init: float = 50.0) -> torch.Tensor:
    """sigma(completed Q) at one node per tree, [B, A]: unvisited actions take the mixed
    value (raw value and the prior-weighted Q of the visited ones), min-max rescaled, times
    (maxvisit_init + max N) * value_scale."""
    b = torch.arange(tree.batch_size, device=tree.device)
    n = tree.children_visits[b, node].float()
    q = tree.qvalues(node)
    p = tree.prior[b, node].clamp_min(_TINY)
    raw = tree.raw_value[b, node]
    vis = n > 0
    sum_n = n.sum(-1)
    sp = torch.where(vis, p, 0).sum(-1)
    wq = torch.where(vis, p * q, 0).sum(-1) / torch.where(sp > 0, sp, 1)
    v_mix = torch.where(sum_n > 0, (raw + sum_n * wq) / (sum_n + 1), raw)
    c = torch.where(vis, q, v_mix[:, None])
    lo, hi = c.min(-1, keepdim=True).values, c.max(-1, keepdim=True).values
    scale = (maxvisit_init + n.max(-1).values) * value_scale
    return scale[:, None] * (c - lo) / (hi - lo).clamp_min(1e-8)


def visit_policy(visit_counts: torch.Tensor) -> torch.Tensor:
    """Root visit distribution (uniform where there are no visits)."""
    v = visit_counts.float()
    tot = v.sum(-1, keepdim=True)
    return torch.where(tot > 0, v / tot.clamp_min(1), 1.0 / v.shape[-1])


def select_action(visit_counts: torch.Tensor, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample an action with probability proportional to ``N(a) ** (1 / temperature)``;
    temperature 0 takes the most visited action (lowest index on ties).  Actions without
    visits are never taken."""
    v = visit_counts.float()
    if temperature == 0:
        return v.argmax(-1)
    logits = torch.log(v).masked_fill(v <= 0, -math.inf)
    logits = (logits - logits.max(-1, keepdim=True).values) / max(temperature, _TINY)
    probs = torch.softmax(logits.nan_to_num(-math.inf), -1)
    bad = ~torch.isfinite(probs).all(-1) | (v.sum(-1) <= 0)
    probs = torch.where(bad[:, None], torch.ones_like(probs), probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def gumbel_action(tree: Tree, gumbel: torch.Tensor, logits: torch.Tensor,
                  invalid: torch.Tensor | None, *, value_scale: float = 0.1,
                  maxvisit_init: float = 50.0):
    """Gumbel MuZero's final choice and policy target: among the most visited root actions
    the argmax of ``g + logits + sigma(q)``; weights ``softmax(logits + sigma(q))``."""
    n = tree.root_visit_counts()
    sigma = completed_qvalues(tree, 0, value_scale=value_scale, maxvisit_init=maxvisit_init)
    centred = logits - logits.max(-1, keepdim=True).values
    score = torch.clamp(gumbel + centred + sigma, min=-1e9)
    score = score.masked_fill(n != n.max(-1, keepdim=True).values, -math.inf)
    if invalid is not None:
        score = score.masked_fill(invalid, -math.inf)
    action = score.argmax(-1)
    weights = torch.softmax(mask_logits(logits + sigma, invalid), -1)
    return action, weights


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _int(op, name, v, lo):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{op}: {name} must be >= {lo}, got {v}")
    return int(v)


# the kernels read the search's parameters as float32: larger magnitudes would become inf
_F32_MAX = float(torch.finfo(torch.float32).max)


def _real(op, name, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise TypeError(f"{op}: {name} must be a finite real number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}], got {v}")
    return float(v)


def _check_root(op, root, invalid_actions):
    if not isinstance(root, Root):
        raise TypeError(f"{op}: root must be an rlfuse.search.Root, got {type(root).__name__}")
    lg, v = root.prior_logits, root.value
    if not isinstance(lg, torch.Tensor) or not lg.is_floating_point() or lg.dim() != 2:
        raise ValueError(f"{op}: root.prior_logits must be a float tensor [B, A]")
    B, A = lg.shape
    if B < 1 or A < 1:
        raise ValueError(f"{op}: root.prior_logits must be non-empty, got {tuple(lg.shape)}")
    if not isinstance(v, torch.Tensor) or not v.is_floating_point() or tuple(v.shape) != (B,):
        raise ValueError(f"{op}: root.value must be a float tensor of shape ({B},)")
    if v.device != lg.device:
        raise ValueError(f"{op}: root.value is on {v.device} but root.prior_logits on {lg.device}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{op}: root.value must be finite")
    if bool(torch.isnan(lg).any() | (lg == math.inf).any()):
        raise ValueError(f"{op}: root.prior_logits must not contain NaN or +inf")
    inv = None
    if invalid_actions is not None:
        if not isinstance(invalid_actions, torch.Tensor) or tuple(invalid_actions.shape) != (B, A):
            raise ValueError(f"{op}: invalid_actions must be a tensor of shape ({B}, {A})")
        if invalid_actions.is_floating_point():
            if not bool(((invalid_actions == 0) | (invalid_actions == 1)).all()):
                raise ValueError(f"{op}: invalid_actions must hold 0 / 1")
        inv = invalid_actions.to(lg.device).bool()
    dead = lg == -math.inf
    if bool(dead.any()):
        inv = dead if inv is None else inv | dead
    if inv is not None and bool(inv.all(-1).any()):
        b = int(inv.all(-1).nonzero()[0, 0])
        raise ValueError(f"{op}: every action is invalid at the root of tree {b}")
    return B, A, inv


def _wants_expansion(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    pos = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                           inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return len(pos) >= 3


def _f32(name, x, shape, device):
    # the common case (a float32 contiguous tensor of the right shape and device) without a
    # conversion call: this runs four times per simulation step
    if (type(x) is torch.Tensor and x.dtype is torch.float32 and x.shape == shape
            and x.device == device and x.is_contiguous()):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"recurrent_fn: {name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"recurrent_fn: {name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"recurrent_fn: {name} is on {x.device}, the tree on {device}")
    return x.to(torch.float32).contiguous()


def _u8(name, x, shape, device):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
        raise ValueError(f"recurrent_fn: {name} must be a tensor of shape {shape}")
    if x.device != device:
        raise ValueError(f"recurrent_fn: {name} is on {x.device}, the tree on {device}")
    return x.to(torch.bool).to(torch.uint8).contiguous()


# --------------------------------------------------------------------------------------
# the search loop
# --------------------------------------------------------------------------------------
def _simulate(ph: Phases, recurrent_fn: Callable, num_simulations: int) -> None:
    """One call of each phase per step; ``parallel`` simulations of every tree per step."""
    pass_exp = _wants_expansion(recurrent_fn)
    # The loop allocates a few small objects per step; with a large heap (torch, JAX) the
    # cyclic collector's passes would cost more than the kernels, so it is paused here.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        _steps(ph, recurrent_fn, num_simulations, pass_exp)
    finally:
        if gc_was_enabled:
            gc.enable()
    ph.finish()


def _steps(ph: Phases, recurrent_fn: Callable, num_simulations: int, pass_exp: bool) -> None:
    tree, W = ph.tree, ph.W
    B, K, dev, store = tree.batch_size, tree.num_actions, tree.device, tree.payload
    # CPU: one call into the extension per step (expand, backup and the payload rows of
    # this step, select and the payload rows of the next; Phases.step), when the payload
    # is none or one contiguous tensor (TensorStore.rows)
    fused = ph.backend == "cpu" and (store is None or store.rows is not None)
    w = min(W, num_simulations)
    if fused:
        emb = None if store is None else store.empty_rows(B * w)
        ph.step(0, None, w, store, 0, 0 if emb is None else emb.data_ptr())
        sel = ph.selection(w)
    else:
        sel = ph.select(w)
        emb = None if store is None else store.gather(sel.tree, sel.parent)
    done = 0
    while True:
        M = B * w
        # fresh tensors: the phase buffers are rewritten by the next step
        action = sel.action.clone()
        if pass_exp:
            depth = tree.depth[sel.tree, sel.parent].long() + 1
            exp = Expansion(sel.tree, sel.parent.clone(), sel.node.clone(), action, depth,
                            sel.new.bool())
            out = recurrent_fn(emb, action, exp)
        else:
            out = recurrent_fn(emb, action)
        if not isinstance(out, tuple) or len(out) not in (5, 7):
            raise TypeError("recurrent_fn must return (reward, discount, prior_logits, value, "
                            "next_embedding) or a RecurrentOutput")
        inv = term = None
        if len(out) == 7:
            inv, term = out[5], out[6]
        outputs = (_f32("reward", out[0], (M,), dev), _f32("discount", out[1], (M,), dev),
                   _f32("prior_logits", out[2], (M, K), dev), _f32("value", out[3], (M,), dev),
                   _u8("invalid_actions", inv, (M, K), dev), _u8("terminal", term, (M,), dev))
        done += w
        w_next = min(W, num_simulations - done)
        src = store.row_source(out[4], M) if fused and store is not None else 0
        if fused and (store is None or src):
            emb = store.empty_rows(B * w_next) if store is not None and w_next else None
            ph.step(w, outputs, w_next, store, src, 0 if emb is None else emb.data_ptr())
            sel = ph.selection(w_next) if w_next else sel
        else:
            # the payload rows are written after the backup (neither phase reads them)
            ph.expand_backup(w, *outputs)
            if store is not None:
                store.put(sel.tree, sel.store, out[4], M)
            if w_next:
                sel = ph.select(w_next)
                emb = None if store is None else store.gather(sel.tree, sel.parent)
        if not w_next:
            return
        w = w_next


def _prepare(op, root, invalid_actions, num_simulations, parallel, virtual_loss, max_depth,
             tree, capacity):
    B, A, inv = _check_root(op, root, invalid_actions)
    num_simulations = _int(op, "num_simulations", num_simulations, 1)
    parallel = _int(op, "parallel", parallel, 1)
    _real(op, "virtual_loss", virtual_loss, 0.0, _F32_MAX)
    max_depth = num_simulations if max_depth is None else _int(op, "max_depth", max_depth, 1)
    dev = root.prior_logits.device
    if tree is None:
        cap = num_simulations + 1 if capacity is None else _int(op, "capacity", capacity, 1)
        if cap < num_simulations + 1:
            raise ValueError(f"{op}: num_simulations ({num_simulations}) exceeds the capacity "
                             f"of the tree ({cap} nodes, one is the root)")
        tree = Tree(B, A, cap, dev)
        fresh = torch.ones(B, dtype=torch.bool, device=dev)
    else:
        if not isinstance(tree, Tree):
            raise TypeError(f"{op}: tree must be an rlfuse.search.Tree")
        if (tree.batch_size, tree.num_actions) != (B, A) or tree.device != dev:
            raise ValueError(f"{op}: tree holds {tree.batch_size} trees of {tree.num_actions} "
                             f"actions on {tree.device}; the root has {B} x {A} on {dev}")
        fresh = tree.next_free == 0
        used = int(torch.where(fresh, 1, tree.next_free).max())
        if used + num_simulations > tree.capacity:
            raise ValueError(f"{op}: num_simulations ({num_simulations}) exceeds the free "
                             f"capacity of the tree ({tree.capacity} nodes, {used} in use)")
    return B, A, inv, num_simulations, parallel, max_depth, tree, fresh


def _set_payload(tree: Tree, root: Root, fresh: torch.Tensor):
    if tree.payload is None:
        tree.payload = make_store(root.embedding, tree.batch_size, tree.capacity,
                                  tree.device)
    elif bool(fresh.any()):
        tree.payload.reset(root.embedding, fresh)


def puct_search(root: Root, recurrent_fn: Callable, num_simulations: int, *,
                invalid_actions: torch.Tensor | None = None, max_depth: int | None = None,
                parallel: int = 1, virtual_loss: float = 1.0,
                dirichlet_fraction: float = 0.25, dirichlet_alpha: float = 0.3,
                pb_c_init: float = 1.25, pb_c_base: float = 19652.0,
                temperature: float = 1.0, qtransform: str = "parent_siblings",
                generator: torch.Generator | None = None, tree: Tree | None = None,
                capacity: int | None = None, backend: str | None = None) -> SearchResult:
    """MuZero search: PUCT ``Q_hat + c(s) P sqrt(N(s)) / (1 + N(s, a))`` with
    ``c(s) = pb_c_init + log((N(s) + pb_c_base + 1) / pb_c_base)``, Q min-max normalised over
    the parent and its visited children (``qtransform="parent_siblings"``, mctx) or over the
    whole tree (``"tree_minmax"``); Dirichlet noise mixed into the root prior; the action is
    sampled from the root visit counts at ``temperature`` and ``action_weights`` is the
    visit distribution.  ``tree`` continues a tree from :meth:`Tree.subtree` (trees that
    came back empty restart from ``root``; the others keep their root), or reuses the
    storage of a cleared one (:meth:`Tree.clear`)."""
    op = "puct_search"
    B, A, inv, n_sim, W, max_depth, tree, fresh = _prepare(
        op, root, invalid_actions, num_simulations, parallel, virtual_loss, max_depth, tree,
        capacity)
    _real(op, "dirichlet_fraction", dirichlet_fraction, 0.0, 1.0)
    _real(op, "dirichlet_alpha", dirichlet_alpha, 1e-6, _F32_MAX)
    _real(op, "pb_c_init", pb_c_init, -_F32_MAX, _F32_MAX)
    _real(op, "pb_c_base", pb_c_base, 1e-6, _F32_MAX)
    _real(op, "temperature", temperature, 0.0)
    if qtransform not in ("parent_siblings", "tree_minmax"):
        raise ValueError(f"{op}: qtransform must be 'parent_siblings' or 'tree_minmax'")
    dev = tree.device
    logits = torch.where(fresh[:, None], root.prior_logits.float(), tree.logits[:, 0])
    if not bool(fresh.all()):
        if inv is None:  # kept roots keep their mask
            inv = tree.invalid[:, 0].bool() & ~fresh[:, None]
        # a kept root's -inf logits mark invalid actions, as a new root's do (_check_root);
        # a kept root without a valid action (a finished game) cannot be searched
        dead = (logits == -math.inf) & ~fresh[:, None]
        inv = inv | dead
        if bool(inv.all(-1).any()):
            b = int(inv.all(-1).nonzero()[0, 0])
            raise ValueError(f"{op}: every action is invalid at the kept root of tree {b} "
                             "(the subtree passed as tree=)")
    probs = torch.softmax(mask_logits(logits, inv), -1)
    noisy = dirichlet_noise(probs, fraction=dirichlet_fraction, alpha=dirichlet_alpha,
                            generator=generator)
    root_logits = mask_logits(torch.log(noisy.clamp_min(_TINY)), inv)
    kept_value = torch.where(fresh, root.value.float(), tree.raw_value[:, 0])
    if bool(fresh.all()):
        tree.init_roots(root_logits, kept_value, inv)
    else:
        if bool(fresh.any()):
            tree.init_roots(root_logits, kept_value, inv, trees=fresh)
        keep = ~fresh
        ip = torch.zeros_like(root_logits, dtype=torch.bool) if inv is None else inv
        tree.logits[keep, 0] = root_logits[keep]
        tree.prior[keep, 0] = torch.softmax(root_logits.masked_fill(ip, -math.inf), -1)[keep]
        tree.invalid[keep, 0] = ip[keep].to(torch.uint8)
    _set_payload(tree, root, fresh)
    ph = Phases(tree, rule="puct", W=W, max_depth=max_depth, c1=pb_c_init, c2=pb_c_base,
                virtual_loss=virtual_loss, qnorm=qtransform, backend=backend)
    _simulate(ph, recurrent_fn, n_sim)
    counts = tree.root_visit_counts()
    action = select_action(counts, temperature, generator)
    return SearchResult(action, visit_policy(counts), counts, tree.value[:, 0].clone(), tree)


def gumbel_search(root: Root, recurrent_fn: Callable, num_simulations: int, *,
                  invalid_actions: torch.Tensor | None = None, max_depth: int | None = None,
                  parallel: int = 1, virtual_loss: float = 1.0,
                  max_num_considered_actions: int = 16, gumbel_scale: float = 1.0,
                  value_scale: float = 0.1, maxvisit_init: float = 50.0,
                  generator: torch.Generator | None = None, tree: Tree | None = None,
                  capacity: int | None = None, backend: str | None = None) -> SearchResult:
    """Gumbel MuZero search: at the root, Gumbel top-k (``max_num_considered_actions``)
    with sequential halving over ``g + logits + sigma(q)``; inside, the argmax of
    ``softmax(logits + sigma(q)) - N(a) / (1 + sum N)``; the action is the best of the most
    visited root actions and ``action_weights = softmax(logits + sigma(completed q))``.
    ``tree`` may be a cleared :class:`Tree` whose storage is reused."""
    op = "gumbel_search"
    if tree is not None and isinstance(tree, Tree) and bool((tree.next_free != 0).any()):
        raise ValueError(f"{op}: tree must be cleared (Tree.clear()): Gumbel search does not "
                         "continue earlier trees; pass tree= only to reuse the storage")
    B, A, inv, n_sim, W, max_depth, tree, _ = _prepare(
        op, root, invalid_actions, num_simulations, parallel, virtual_loss, max_depth, tree,
        capacity)
    m = _int(op, "max_num_considered_actions", max_num_considered_actions, 1)
    _real(op, "gumbel_scale", gumbel_scale, 0.0, _F32_MAX)
    _real(op, "value_scale", value_scale, 0.0, _F32_MAX)
    _real(op, "maxvisit_init", maxvisit_init, 0.0, _F32_MAX)
    dev = tree.device
    logits = mask_logits(root.prior_logits.float(), inv)
    tree.init_roots(logits, root.value.float(), inv)
    tree.gumbel.copy_(gumbel_noise((B, A), scale=gumbel_scale, generator=generator, device=dev))
    n_valid = A - (inv.sum(-1) if inv is not None else torch.zeros(B, device=dev))
    tree.considered.copy_(torch.clamp(n_valid, max=m).to(torch.int32))
    tree.set_table(sequential_halving_table(m, n_sim))
    _set_payload(tree, root, torch.ones(B, dtype=torch.bool, device=dev))
    ph = Phases(tree, rule="gumbel", W=W, max_depth=max_depth, virtual_loss=virtual_loss,
                value_scale=value_scale, maxvisit_init=maxvisit_init, backend=backend)
    _simulate(ph, recurrent_fn, n_sim)
    action, weights = gumbel_action(tree, tree.gumbel, logits, inv, value_scale=value_scale,
                                    maxvisit_init=maxvisit_init)
    return SearchResult(action, weights, tree.root_visit_counts(), tree.value[:, 0].clone(),
                        tree)
