"""Batched search trees as struct-of-arrays tensors, and the three phases of a simulation.

A :class:`Tree` holds ``B`` trees of capacity ``N`` nodes over ``K`` actions, preallocated
(int32 indices, float32 statistics) on the CPU or a CUDA device:

    per node [B, N]     parent, action (from the parent), visits, value (mean of the backed-up
                        returns), raw_value (the evaluation), depth, flags (1 expanded,
                        2 terminal), inflight (simulations of the running step through it)
    per edge [B, N, K]  children (-1: none), logits (prior logits), prior (softmax over the
                        valid logits), children_visits, children_values, rewards, discounts,
                        invalid (1: the action may not be taken)
    per tree [B]        next_free (the bump allocator), minmax [B, 2] (min / max Q seen)

Node 0 is the root.  Host-side payloads (the recurrent function's embeddings) live in
``tree.payload``: tensors (or dicts / tuples / lists of tensors) as ``[B, N + 1, ...]``
buffers, any other per-tree objects in ``{node: object}`` dicts, one per tree; either way
they are keyed by (tree, node).

The phases (see :class:`Phases`):

``select``  W simulations per tree walk from the root by PUCT or by the Gumbel rules; the
            in-flight counts act as virtual loss so that they spread; a walk ends at a new
            node (allocated here), at a terminal node, at ``max_depth``, or at a node that an
            earlier simulation of the same step allocated and that is still pending.
``expand``  writes the new leaves from the recurrent outputs (prior logits -> softmax over
            the valid actions, value, the parent edge's reward and discount).
``backup``  walks the recorded paths back: ``g <- r + discount * g``, running means, visits,
            min / max, and releases the virtual loss.

Backends: ``cpu`` (rlfuse._C, OpenMP over trees), ``cuda`` (rlfuse._cuda, a warp per tree),
``torch`` (the plain-Python reference below, the specification; float64 arithmetic).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import torch

from rlfuse import _backend

_F32_MAX = float(torch.finfo(torch.float32).max)

EXPANDED = 1
TERMINAL = 2
RULES = {"puct": 0, "gumbel": 1}
QNORMS = {"parent_siblings": 0, "tree_minmax": 1}

_NODE_FIELDS = (
    ("parent", torch.int32), ("action", torch.int32), ("visits", torch.int32),
    ("value", torch.float32), ("raw_value", torch.float32), ("depth", torch.int32),
    ("flags", torch.uint8), ("inflight", torch.int32),
)
_EDGE_FIELDS = (
    ("children", torch.int32), ("logits", torch.float32), ("prior", torch.float32),
    ("children_visits", torch.int32), ("children_values", torch.float32),
    ("rewards", torch.float32), ("discounts", torch.float32), ("invalid", torch.uint8),
    ("children_q", torch.float32),
)
# (tree, action) pairs per phase call from which the CPU kernels use every thread
# (rlfuse._backend.num_threads); below it they run on one.  Results never depend on it.
THREAD_MIN_PAIRS = 1 << 16
# CPU select: the walks of SELECT_GROUP trees advance in lockstep (one node of each in turn,
# the next node's rows prefetched; 1: one tree at a time), and PUCT scores only a node's
# allocated children, taking the best of the others from a per-search memo (SPARSE_SELECT;
# False: every action is scored).  The choices depend on neither (the tests check this).
SELECT_GROUP = 4
SPARSE_SELECT = True
_STATUS = {1: "tree full", 2: "recurrent_fn returned a non-finite value", 3: "no valid action"}


class Tree:
    """``B`` search trees of capacity ``N`` nodes and ``K`` actions (see the module doc)."""

    def __init__(self, batch_size: int, num_actions: int, capacity: int,
                 device: torch.device | str = "cpu"):
        B, K, N = int(batch_size), int(num_actions), int(capacity)
        if B < 1 or K < 1 or N < 1:
            raise ValueError(f"Tree: batch_size, num_actions and capacity must be >= 1, "
                             f"got {B}, {K}, {N}")
        if N >= 2**31 - 1 or B * N * K >= 2**62:
            raise ValueError(f"Tree: capacity {N} is too large")
        self.batch_size, self.num_actions, self.capacity = B, K, N
        self.device = torch.device(device)
        dev = self.device
        # Only nodes below next_free hold data: select writes a node's fields when it
        # allocates it and expand its edge row, so the arrays start uninitialised.
        for name, dt in _NODE_FIELDS:
            setattr(self, name, torch.empty(B, N, dtype=dt, device=dev))
        for name, dt in _EDGE_FIELDS:
            setattr(self, name, torch.empty(B, N, K, dtype=dt, device=dev))
        self.next_free = torch.zeros(B, dtype=torch.int32, device=dev)
        self.minmax = torch.tensor([math.inf, -math.inf], device=dev).repeat(B, 1)
        # Gumbel root data (set by gumbel_search).
        self.gumbel = torch.zeros(B, K, dtype=torch.float32, device=dev)
        self.considered = torch.zeros(B, dtype=torch.int32, device=dev)
        self.table = torch.zeros(1, 1, dtype=torch.int32, device=dev)
        self.payload: Any = None
        self._views: dict = {}

    # ----------------------------------------------------------------------------------
    def init_roots(self, prior_logits: torch.Tensor, value: torch.Tensor,
                   invalid: torch.Tensor | None = None, trees: torch.Tensor | None = None):
        """(Re)start trees from their roots: node 0 gets the logits, value and invalid mask;
        every other node is freed (next_free = 1).  ``trees`` (bool [B]) limits this to some trees."""
        B, K = self.batch_size, self.num_actions
        logits = prior_logits.to(self.device, torch.float32)
        inv = (torch.zeros(B, K, dtype=torch.bool, device=self.device) if invalid is None
               else invalid.to(self.device).bool())
        # logits of invalid actions do not matter; keep them finite for the softmax
        prior = torch.softmax(logits.masked_fill(inv, -math.inf), -1).nan_to_num(0.0)
        # every tree (the common case): plain slices instead of an index list
        rows = (slice(None) if trees is None
                else trees.to(self.device).bool().nonzero().squeeze(1))
        for name, fill in (("parent", -1), ("action", -1), ("depth", 0), ("inflight", 0)):
            getattr(self, name)[rows, 0] = fill
        for name, fill in (("children", -1), ("children_visits", 0), ("children_values", 0),
                           ("rewards", 0), ("discounts", 0), ("children_q", 0)):
            getattr(self, name)[rows, 0] = fill
        self.logits[rows, 0] = logits[rows]
        self.prior[rows, 0] = prior[rows]
        self.invalid[rows, 0] = inv[rows].to(torch.uint8)
        self.value[rows, 0] = value.to(self.device, torch.float32)[rows]
        self.raw_value[rows, 0] = value.to(self.device, torch.float32)[rows]
        self.visits[rows, 0] = 1
        self.flags[rows, 0] = EXPANDED
        self.next_free[rows] = 1
        self.minmax[rows] = torch.tensor([math.inf, -math.inf], device=self.device)

    def clear(self) -> "Tree":
        """Free every node (and drop the payloads), keeping the storage: a cleared tree
        passed as ``tree=`` to a search is filled from scratch without allocating."""
        self.next_free.zero_()
        self.payload = None
        return self

    # ----------------------------------------------------------------------------------
    # readable accessors
    def qvalues(self, node: int | torch.Tensor = 0) -> torch.Tensor:
        """Q(s, a) = r(s, a) + discount(s, a) * V(child), [B, K], for one node per tree."""
        idx = self._node_index(node)
        b = torch.arange(self.batch_size, device=self.device)
        return (self.rewards[b, idx] + self.discounts[b, idx] * self.children_values[b, idx])

    def root_visit_counts(self) -> torch.Tensor:
        return self.children_visits[:, 0]

    def num_nodes(self) -> torch.Tensor:
        return self.next_free.clone()

    def node(self, b: int, n: int) -> dict:
        """One node as a dict of Python values (for inspection and debugging)."""
        out = {name: getattr(self, name)[b, n].item() for name, _ in _NODE_FIELDS}
        out["children"] = {a: c for a, c in enumerate(self.children[b, n].tolist()) if c >= 0}
        out["children_visits"] = self.children_visits[b, n].tolist()
        return out

    def embedding(self, b: int, n: int):
        """The payload of node ``n`` of tree ``b`` (None when the search has no embeddings)."""
        return None if self.payload is None else self.payload.get(b, n)

    def _node_index(self, node):
        if isinstance(node, int):
            return torch.full((self.batch_size,), node, dtype=torch.long, device=self.device)
        return node.to(self.device, torch.long)

    def view(self, module):
        """The extension's TreeView of this tree (cached per module)."""
        key = id(module)
        v = self._views.get(key)
        if v is None:
            ptrs = [self.batch_size, self.capacity, self.num_actions]
            ptrs += [getattr(self, n).data_ptr() for n, _ in _NODE_FIELDS]
            ptrs += [getattr(self, n).data_ptr() for n, _ in _EDGE_FIELDS[:-1]]
            ptrs += [self.next_free.data_ptr(), self.minmax.data_ptr(), self.gumbel.data_ptr(),
                     self.considered.data_ptr(), self.table.data_ptr(),
                     self.children_q.data_ptr()]
            v = self._views[key] = module.TreeView(ptrs)
        return v

    def set_table(self, table: torch.Tensor) -> None:
        if not isinstance(table, torch.Tensor) or table.dim() != 2 or \
                table.shape[0] < 1 or table.shape[1] < 1:
            raise ValueError("Tree.set_table: table must be a 2-D tensor with at least one "
                             f"row and one column, got {getattr(table, 'shape', table)!r}")
        self.table = table.to(self.device, torch.int32).contiguous()
        self._views.clear()

    # ----------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError if the arrays are inconsistent (used by the tests): every
        allocated non-root node is the child of exactly its parent's edge, edge visits equal
        the child's visits, a non-terminal expanded node has 1 + the sum of its edge visits
        (unless revisited at max_depth), each value is the mean of the returns through the
        node (so within their range), nothing is in flight between steps."""
        B, N, K = self.batch_size, self.capacity, self.num_actions
        nf = self.next_free.tolist()
        par, act, vis = self.parent.tolist(), self.action.tolist(), self.visits.tolist()
        flags, infl = self.flags.tolist(), self.inflight.tolist()
        ch, cv = self.children.tolist(), self.children_visits.tolist()
        val, raw = self.value.tolist(), self.raw_value.tolist()
        rew, disc, cval = self.rewards.tolist(), self.discounts.tolist(), self.children_values.tolist()
        for b in range(B):
            n_alloc = nf[b]
            assert 0 <= n_alloc <= N, f"tree {b}: next_free {n_alloc} outside [0, {N}]"
            seen = set()
            for n in range(n_alloc):
                assert infl[b][n] == 0, f"tree {b} node {n}: {infl[b][n]} in flight"
                assert flags[b][n] & EXPANDED, f"tree {b} node {n}: allocated, not expanded"
                for a in range(K):
                    c = ch[b][n][a]
                    if c < 0:
                        assert cv[b][n][a] == 0, f"tree {b} node {n}: visits on a missing edge"
                        continue
                    assert 0 < c < n_alloc, f"tree {b} node {n}: child {c} not allocated"
                    assert c not in seen, f"tree {b}: node {c} allocated twice"
                    seen.add(c)
                    assert par[b][c] == n and act[b][c] == a, f"tree {b}: bad parent of {c}"
                    assert cv[b][n][a] == vis[b][c], f"tree {b}: edge visits != node {c} visits"
                if n > 0:
                    assert n in seen or par[b][n] < n, f"tree {b}: node {n} unreachable"
                if not flags[b][n] & TERMINAL and any(x >= 0 for x in ch[b][n]):
                    assert vis[b][n] >= 1 + sum(cv[b][n]), f"tree {b} node {n}: visits"
                assert math.isfinite(val[b][n]), f"tree {b} node {n}: value not finite"
                # value = mean of the returns through the node: its own evaluation for the
                # visits that ended there, Q(a) = r + discount * V(child) for the others
                if n < n_alloc and vis[b][n] > 0:
                    qs = [(cv[b][n][a], rew[b][n][a] + disc[b][n][a] * cval[b][n][a])
                          for a in range(K) if ch[b][n][a] >= 0 and cv[b][n][a] > 0]
                    own = vis[b][n] - sum(k for k, _ in qs)
                    total = own * raw[b][n] + sum(k * q for k, q in qs)
                    scale = max([1.0, abs(raw[b][n])] + [abs(q) for _, q in qs])
                    assert abs(val[b][n] * vis[b][n] - total) <= 1e-4 * vis[b][n] * scale, \
                        f"tree {b} node {n}: value is not the mean of its returns"
                    lo = min([raw[b][n]] + [q for _, q in qs]) if own > 0 else min(q for _, q in qs)
                    hi = max([raw[b][n]] + [q for _, q in qs]) if own > 0 else max(q for _, q in qs)
                    assert lo - 1e-4 * scale <= val[b][n] <= hi + 1e-4 * scale, \
                        f"tree {b} node {n}: value outside its returns' range"
            assert len(seen) == max(n_alloc - 1, 0), f"tree {b}: unreachable nodes"

    # ----------------------------------------------------------------------------------
    def subtree(self, actions: torch.Tensor, capacity: int | None = None) -> "Tree":
        """The subtree below each root's child ``actions[b]`` as a new Tree (root = that
        child), renumbered breadth first, payloads carried over; for tree reuse across
        moves.  A tree whose child was never expanded comes back empty (``next_free`` 0) and
        is restarted from the next search's root."""
        if not isinstance(actions, torch.Tensor) or actions.dtype not in (torch.int32, torch.int64):
            raise TypeError("Tree.subtree: actions must be an int32/int64 tensor")
        if tuple(actions.shape) != (self.batch_size,):
            raise ValueError(f"Tree.subtree: actions must have shape ({self.batch_size},), "
                             f"got {tuple(actions.shape)}")
        actions = actions.to(self.device, torch.int64).contiguous()
        if bool(((actions < 0) | (actions >= self.num_actions)).any()):
            raise ValueError(f"Tree.subtree: actions must be in [0, {self.num_actions})")
        need = max(int(self.next_free.max()) - 1, 1)
        cap = self.capacity if capacity is None else int(capacity)
        if cap < need:
            raise ValueError(f"Tree.subtree: capacity {cap} is smaller than the largest "
                             f"subtree can be ({need} nodes)")
        dst = Tree(self.batch_size, self.num_actions, cap, self.device)
        src_of = torch.full((self.batch_size, cap), -1, dtype=torch.int32, device=self.device)
        if self.device.type == "cpu" and _backend.available("cpu"):
            mod = _backend.cpu_module()
            mod.tree_subtree(self.view(mod), dst.view(mod), actions.data_ptr(),
                             src_of.data_ptr(), _backend.num_threads())
        elif _backend.available("cuda", self.device):
            mod = _backend.cuda_module()
            with _backend.cuda_launch(self.device) as stream:
                mod.tree_subtree(self.view(mod), dst.view(mod), actions.data_ptr(),
                                 src_of.data_ptr(), stream)
        else:
            subtree_reference(self, dst, actions, src_of)
        if self.payload is not None:
            dst.payload = self.payload.remap(src_of)
        return dst


# --------------------------------------------------------------------------------------
# payload stores
# --------------------------------------------------------------------------------------
def _is_tensor_tree(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return len(x) > 0 and all(_is_tensor_tree(v) for v in x)
    return False


def _tmap(fn, *xs):
    x0 = xs[0]
    if isinstance(x0, torch.Tensor):
        return fn(*xs)
    if isinstance(x0, dict):
        return {k: _tmap(fn, *(x[k] for x in xs)) for k in x0}
    return type(x0)(*(_tmap(fn, *z) for z in zip(*xs))) if hasattr(x0, "_fields") else \
        type(x0)(_tmap(fn, *z) for z in zip(*xs))


class TensorStore:
    """Embeddings that are tensors (or dicts / tuples / lists of them), each kept as a
    ``[B, N + 1, ...]`` buffer; slot N receives the rows that create no node."""

    def __init__(self, root_embedding, B: int, N: int, device):
        def alloc(x):
            if x.shape[:1] != (B,):
                raise ValueError(f"Root.embedding: tensors must have a leading dimension of "
                                 f"size {B} (one row per tree), got {tuple(x.shape)}")
            buf = torch.empty((B, N + 1) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            buf[:, 0] = x
            return buf
        self.buf = _tmap(alloc, root_embedding)
        self._fast_path()

    def _fast_path(self):
        # one plain tensor (the common case): gather / put without the pytree walk
        self._single = type(self.buf) is torch.Tensor
        self._row_shape = tuple(self.buf.shape[2:]) if self._single else None
        # ... and on the CPU the search loop's rows are copied by the extension, in its one
        # call per step (Phases.step: a memcpy per row, against ~4 us for each of torch's
        # advanced indexing gather and put): (address, bytes per row, slots per tree)
        self.rows = None
        if self._single and self.buf.device.type == "cpu" and self.buf.is_contiguous():
            buf = self.buf
            self.rows = (buf.data_ptr(), math.prod(self._row_shape) * buf.element_size(),
                         buf.shape[1])

    def gather(self, b, parent):
        if self._single:
            return self.buf[b, parent]
        return _tmap(lambda buf: buf[b, parent], self.buf)

    def empty_rows(self, M: int) -> torch.Tensor:
        """A fresh [M, ...] tensor for the extension to gather rows into (see ``rows``)."""
        return torch.empty((M,) + self._row_shape, dtype=self.buf.dtype)

    def row_source(self, value, M: int) -> int:
        """The address of ``value`` when the extension can copy it as a step's M new rows
        (``rows`` is set; a contiguous tensor of the buffer's dtype, device and row shape),
        else 0 (``put`` then checks it and writes it)."""
        buf = self.buf
        if self.rows is not None and type(value) is torch.Tensor and value.dtype is buf.dtype \
                and value.device == buf.device and value.shape[:1] == (M,) \
                and tuple(value.shape[1:]) == self._row_shape and value.is_contiguous():
            return value.data_ptr()
        return 0

    def put(self, b, store, value, M: int):
        buf = self.buf
        if self._single and type(value) is torch.Tensor and value.dtype is buf.dtype \
                and value.device == buf.device \
                and value.shape[:1] == (M,) and tuple(value.shape[1:]) == self._row_shape:
            buf.index_put_((b, store), value)
            return

        def write(buf, v):
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (M,) + tuple(buf.shape[2:]):
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"recurrent_fn: next_embedding must match the root embedding "
                                 f"with {M} rows: expected {(M,) + tuple(buf.shape[2:])}, got {got}")
            buf[b, store] = v.to(buf.dtype)
        try:
            _tmap(write, self.buf, value)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ValueError("recurrent_fn: next_embedding must have the structure of the "
                             f"root embedding ({exc})") from exc

    def get(self, b, n):
        return _tmap(lambda buf: buf[b, n], self.buf)

    def reset(self, root_embedding, trees: torch.Tensor):
        rows = trees.nonzero().squeeze(1)
        _tmap(lambda buf, x: buf.index_put_((rows, torch.zeros_like(rows)), x[rows].to(buf.dtype)),
              self.buf, root_embedding)

    def remap(self, src_of: torch.Tensor):
        out = TensorStore.__new__(TensorStore)
        idx = src_of.long()
        cap = idx.shape[1]

        def move(buf):
            N1 = buf.shape[1]
            src = torch.where(idx >= 0, idx, N1 - 1)
            new = torch.zeros((buf.shape[0], cap + 1) + tuple(buf.shape[2:]), dtype=buf.dtype,
                              device=buf.device)
            b = torch.arange(buf.shape[0], device=buf.device)[:, None]
            new[:, :cap] = buf[b, src]
            return new
        out.buf = _tmap(move, self.buf)
        out._fast_path()
        return out


class ObjectStore:
    """Embeddings that are not tensors: ``root_embedding[b]`` is tree b's root payload (a
    string, a KV-cache handle, ...); nodes' payloads are kept in one dict per tree."""

    def __init__(self, root_embedding, B: int, N: int):
        self.scratch = N
        self.rows = None  # (see TensorStore.rows)
        try:
            n = len(root_embedding)
        except TypeError as exc:
            raise TypeError("Root.embedding must be indexable by tree (a tensor, a pytree of "
                            f"tensors, or a sequence of {B} objects)") from exc
        if n != B:
            raise ValueError(f"Root.embedding must have one entry per tree ({B}), got {n}")
        self.nodes = [{0: root_embedding[b]} for b in range(B)]

    def gather(self, b, parent):
        return [self.nodes[i][p] for i, p in zip(b.tolist(), parent.tolist())]

    def put(self, b, store, value, M: int):
        try:
            n = len(value)
        except TypeError as exc:
            raise ValueError(f"recurrent_fn: next_embedding must be a sequence of {M} "
                             "payloads") from exc
        if n != M:
            raise ValueError(f"recurrent_fn: next_embedding must have {M} entries, got {n}")
        for i, (t, s) in enumerate(zip(b.tolist(), store.tolist())):
            if s != self.scratch:
                self.nodes[t][s] = value[i]

    def get(self, b, n):
        return self.nodes[b].get(n)

    def reset(self, root_embedding, trees: torch.Tensor):
        for b in trees.nonzero().squeeze(1).tolist():
            self.nodes[b] = {0: root_embedding[b]}

    def remap(self, src_of: torch.Tensor):
        out = ObjectStore.__new__(ObjectStore)
        out.scratch, out.rows = src_of.shape[1], None
        out.nodes = [{i: old[s] for i, s in enumerate(row) if s >= 0 and s in old}
                     for old, row in zip(self.nodes, src_of.tolist())]
        return out


def make_store(root_embedding, B: int, N: int, device):
    if root_embedding is None:
        return None
    if _is_tensor_tree(root_embedding):
        return TensorStore(root_embedding, B, N, device)
    return ObjectStore(root_embedding, B, N)


# --------------------------------------------------------------------------------------
# the phases: one object per search, holding the settings and the output buffers
# --------------------------------------------------------------------------------------
class Selection(NamedTuple):
    """What select returned for the step (views of the phase buffers, [B * w] rows)."""
    tree: torch.Tensor     # int64: which tree each row belongs to
    parent: torch.Tensor   # int64: node whose action is expanded
    action: torch.Tensor   # int64
    node: torch.Tensor     # int64: the new (or revisited) node
    store: torch.Tensor    # int64: node when new, else N (scratch payload slot)
    new: torch.Tensor      # uint8: 1 when the node is new and needs the recurrent output


class Phases:
    """select / expand / backup for one search over ``tree`` on one backend.

    A low-level layer under :func:`~rlfuse.search.puct_search` / ``gumbel_search``: the
    widths are checked here, but the float32 / uint8 inputs of ``expand`` and ``step``
    must already be validated (contiguous, ``[M]`` / ``[M, K]`` for ``M = B * w``), as the
    searches do, because they reach the kernels as raw pointers."""

    def __init__(self, tree: Tree, *, rule: str, W: int, max_depth: int, c1: float = 1.25,
                 c2: float = 19652.0, virtual_loss: float = 1.0, qnorm: str = "parent_siblings",
                 value_scale: float = 0.1, maxvisit_init: float = 50.0,
                 backend: str | None = None):
        self.tree = tree
        self.backend = _backend.resolve(backend, tree.device, "rlfuse.search")
        if self.backend == "triton":
            raise RuntimeError("rlfuse.search: there is no Triton backend for trees; use "
                               "'cpu', 'cuda' or 'torch'")
        B, dev = tree.batch_size, tree.device
        for name, v in (("W", W), ("max_depth", max_depth)):
            if type(v) is not int or v < 1:
                raise ValueError(f"rlfuse.search Phases: {name} must be an int >= 1, got {v!r}")
        for name, v in (("c1", c1), ("c2", c2), ("virtual_loss", virtual_loss),
                        ("value_scale", value_scale), ("maxvisit_init", maxvisit_init)):
            # the kernels read them as float32
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or \
                    not abs(float(v)) <= _F32_MAX:
                raise ValueError(f"rlfuse.search Phases: {name} must be a finite number of "
                                 f"float32 range, got {v!r}")
        if rule == "puct" and not float(c2) >= 1e-6:
            # log((N + c2 + 1) / c2) needs c2 > 0 (the reference would raise a math domain
            # error, the kernels give NaN scores); puct_search's pb_c_base has the same bound
            raise ValueError(f"rlfuse.search Phases: c2 must be >= 1e-6 with rule='puct', "
                             f"got {c2!r}")
        if bool((tree.next_free < 1).any()):
            raise ValueError("rlfuse.search Phases: every tree needs its root (Tree.init_roots) "
                             "before a search")
        # a walk passes distinct nodes, so no path is deeper than the tree's capacity: a
        # larger max_depth means the same and only sizes the path buffer
        max_depth = min(max_depth, tree.capacity)
        self.W, self.max_depth = W, max_depth
        self.rule, self.qnorm = RULES[rule], QNORMS[qnorm]
        self.c1, self.c2, self.vl = float(c1), float(c2), float(virtual_loss)
        self.value_scale, self.maxvisit_init = float(value_scale), float(maxvisit_init)
        D = max_depth + 1
        i64 = dict(dtype=torch.int64, device=dev)
        self.out_node = torch.zeros(B * W, **i64)
        self.out_parent = torch.zeros(B * W, **i64)
        self.out_action = torch.zeros(B * W, **i64)
        self.out_store = torch.zeros(B * W, **i64)
        self.out_new = torch.zeros(B * W, dtype=torch.uint8, device=dev)
        self.out_path = torch.zeros(B * W * D, dtype=torch.int32, device=dev)
        self.out_len = torch.zeros(B * W, dtype=torch.int32, device=dev)
        self.status = torch.zeros(2, dtype=torch.int64, device=dev)
        self._sel: dict = {}
        self.mod = None
        if self.backend in ("cpu", "cuda"):
            self.mod = _backend.cpu_module() if self.backend == "cpu" else _backend.cuda_module()
            self.view = tree.view(self.mod)
            ia = [self.rule, max_depth, self.qnorm, tree.table.shape[0], tree.table.shape[1]]
            ia += [t.data_ptr() for t in (self.out_node, self.out_parent, self.out_action,
                                          self.out_store, self.out_new, self.out_path,
                                          self.out_len)]
            # the memo of the sparse PUCT rule: a node's best unallocated action (-2: not yet
            # known); valid for this search only, so it is filled afresh here
            self.memo = self.kids = None
            if self.backend == "cpu" and self.rule == RULES["puct"] and SPARSE_SELECT:
                self.memo = torch.full((B * tree.capacity,), -2, dtype=torch.int32)
                # with K <= 64, each node's children as a 64-bit mask (bit a: action a has
                # a child), so that a walk reads one word instead of the child row; an entry
                # is written when the node's memo entry is, so it needs no initial value
                if tree.num_actions <= 64:
                    self.kids = torch.empty(B * tree.capacity, dtype=torch.int64)
            ia += [0 if self.memo is None else self.memo.data_ptr(),
                   0 if self.kids is None else self.kids.data_ptr(),
                   SELECT_GROUP if self.backend == "cpu" else 1]
            if self.backend == "cuda":
                ia.append(self.status.data_ptr())
            self.cfg = self.mod.SelectConfig(ia, [c1, c2, virtual_loss, value_scale, maxvisit_init])
            # Select / expand / backup take microseconds: below THREAD_MIN_PAIRS (tree,
            # action) pairs per call a second thread costs more than it gains (and far more
            # on a loaded machine), so they run on one.
            threads = (_backend.num_threads() if B * W * tree.num_actions >= THREAD_MIN_PAIRS
                       else 1)
            # CUDA: the tree's device and its current stream, at each call (_cuda_call)
            self.arg = threads if self.backend == "cpu" else None

    def selection(self, w: int) -> Selection:
        s = self._sel.get(w)
        if s is None:
            B, M = self.tree.batch_size, self.tree.batch_size * w
            b = torch.arange(B, device=self.tree.device).repeat_interleave(w)
            s = self._sel[w] = Selection(b, self.out_parent[:M], self.out_action[:M],
                                         self.out_node[:M], self.out_store[:M], self.out_new[:M])
        return s

    def _raise(self, what: str, code: int, where: int, unit: str = "tree"):
        raise RuntimeError(f"rlfuse.search {what}: {_STATUS.get(code, code)} ({unit} {where})")

    def _width(self, w, name="w", low=1):
        if type(w) is not int or not low <= w <= self.W:
            raise ValueError(f"rlfuse.search Phases: {name} must be an int in [{low}, "
                             f"{self.W}] (the W this object was built for), got {w!r}")

    def select(self, w: int) -> Selection:
        """The walks of a step, ``w`` per tree.  A walk that cannot finish (tree full, no
        valid action) raises ``RuntimeError`` here on the CPU and reference backends; on
        CUDA it is recorded and raised by :meth:`finish` (reading it here would wait for
        the GPU every step), and that tree's rows for the rest of the step are not new and
        have an empty path (``out_len`` 0), which expand and backup skip."""
        self._width(w)
        if self.mod is None:
            select_reference(self, w)
        elif self.backend == "cpu":
            rc, where = self.mod.tree_select(self.view, self.cfg, w, self.arg)
            if rc:
                self._raise("select", rc, where)
        else:
            self._cuda_call(self.mod.tree_select, self.view, self.cfg, w)
        return self.selection(w)

    def expand(self, w: int, reward, discount, logits, value, invalid=None, terminal=None):
        """Inputs: float32 contiguous [M], [M], [M, K], [M]; uint8 [M, K] and [M] or None."""
        self._width(w)
        if self.mod is None:
            expand_reference(self, w, reward, discount, logits, value, invalid, terminal)
            return
        args = (self.view, self.cfg, w, reward.data_ptr(), discount.data_ptr(),
                logits.data_ptr(), value.data_ptr(), 0 if invalid is None else invalid.data_ptr(),
                0 if terminal is None else terminal.data_ptr())
        if self.backend != "cpu":
            self._cuda_call(self.mod.tree_expand, *args)
            return
        out = self.mod.tree_expand(*args, self.arg)
        if out[0]:
            self._raise("expand", out[0], out[1], "row")

    def expand_backup(self, w: int, reward, discount, logits, value, invalid=None,
                      terminal=None):
        """expand, then backup (one call into the CPU extension)."""
        self._width(w)
        if self.backend != "cpu":
            self.expand(w, reward, discount, logits, value, invalid, terminal)
            self.backup(w)
            return
        out = self.mod.tree_expand_backup(
            self.view, self.cfg, w, reward.data_ptr(), discount.data_ptr(), logits.data_ptr(),
            value.data_ptr(), 0 if invalid is None else invalid.data_ptr(),
            0 if terminal is None else terminal.data_ptr(), self.arg)
        if out[0]:
            self._raise("expand", out[0], out[1], "row")

    def step(self, w: int, outputs, w_next: int, store=None, put_rows: int = 0,
             gather_rows: int = 0) -> None:
        """CPU, one call into the extension: ``expand_backup(w, *outputs)`` (w > 0; outputs
        as for expand), the new payload rows of a ``store`` with ``rows`` from the address
        ``put_rows`` (0: none), then ``select(w_next)`` (w_next > 0) and the parents'
        payload rows into the address ``gather_rows`` (0: none)."""
        if self.backend != "cpu" or self.mod is None:
            raise RuntimeError("rlfuse.search Phases.step: the CPU extension only")
        self._width(w_next, "w_next", 0)
        if outputs is not None:
            self._width(w)
        rows = store.rows if store is not None and store.rows is not None else (0, 0, 0)
        if store is not None and (store.rows is None or rows[2] != self.tree.capacity + 1
                                  or store.buf.shape[0] != self.tree.batch_size):
            raise ValueError("rlfuse.search Phases.step: store must be this tree's payload "
                             "store (one contiguous CPU tensor)")
        if outputs is None:
            code, where, stage = self.mod.tree_step(self.view, self.cfg, 0, 0, 0, 0, 0, 0, 0,
                                                    *rows, 0, w_next, gather_rows, self.arg)
        else:
            r, d, lg, v, inv, term = outputs
            code, where, stage = self.mod.tree_step(
                self.view, self.cfg, w, r.data_ptr(), d.data_ptr(), lg.data_ptr(), v.data_ptr(),
                0 if inv is None else inv.data_ptr(), 0 if term is None else term.data_ptr(),
                *rows, put_rows, w_next, gather_rows, self.arg)
        if code:
            self._raise("select" if stage else "expand", code, where, "tree" if stage else "row")

    def backup(self, w: int) -> None:
        self._width(w)
        if self.mod is None:
            backup_reference(self, w)
        elif self.backend == "cpu":
            self.mod.tree_backup(self.view, self.cfg, w, self.arg)
        else:
            self._cuda_call(self.mod.tree_backup, self.view, self.cfg, w)

    def _cuda_call(self, fn, *args) -> None:
        """``fn(*args, stream)``: a launcher of rlfuse._cuda, on the tree's device and its
        current stream (looked up at each call, not when this object was built)."""
        with _backend.cuda_launch(self.tree.device) as stream:
            fn(*args, stream)

    def finish(self) -> None:
        """Raise for an error a CUDA kernel recorded (checked once, at the end)."""
        if self.backend == "cuda":
            code, where = self.status.tolist()
            if code:
                self._raise("select/expand", code, where, "tree or row")


# --------------------------------------------------------------------------------------
# reference implementation (the specification): plain Python, float64
# --------------------------------------------------------------------------------------
_ARRAYS = [n for n, _ in _NODE_FIELDS] + [n for n, _ in _EDGE_FIELDS] + ["next_free", "minmax"]


def _load(tree: Tree) -> dict:
    return {n: getattr(tree, n).tolist() for n in _ARRAYS}


def _store(tree: Tree, st: dict) -> None:
    for n in _ARRAYS:
        t = getattr(tree, n)
        t.copy_(torch.tensor(st[n], dtype=t.dtype))


def _pick(valid, pending, score):
    best = arg = best_p = arg_p = None
    for a, ok in enumerate(valid):
        if not ok:
            continue
        s = score(a)
        if pending[a]:
            if arg_p is None or s > best_p:
                best_p, arg_p = s, a
        elif arg is None or s > best:
            best, arg = s, a
    return arg if arg is not None else arg_p


def _norm(q, lo, hi):
    return (q - lo) / max(hi - lo, 1e-8)


def gumbel_sigma_reference(n, q, prior, raw, value_scale, maxvisit_init):
    """Completed, rescaled, scaled Q-values of one node (lists over actions)."""
    K = len(n)
    sum_n, max_n = sum(n), max(n)
    tiny = torch.finfo(torch.float32).tiny
    vis = [a for a in range(K) if n[a] > 0]
    if vis:
        sp = sum(max(prior[a], tiny) for a in vis)
        wq = sum(max(prior[a], tiny) * q[a] for a in vis) / sp
        v_mix = (raw + sum_n * wq) / (sum_n + 1)
    else:
        v_mix = raw
    c = [q[a] if n[a] > 0 else v_mix for a in range(K)]
    lo, hi = min(c), max(c)
    return [(maxvisit_init + max_n) * value_scale * _norm(x, lo, hi) for x in c]


def select_reference(ph: Phases, w: int) -> None:
    tr = ph.tree
    st = _load(tr)
    B, N, K, D = tr.batch_size, tr.capacity, tr.num_actions, ph.max_depth + 1
    table = tr.table.tolist()
    gum, cons = tr.gumbel.tolist(), tr.considered.tolist()
    outs = {k: [0] * (B * w) for k in ("node", "parent", "action", "store", "new", "len")}
    path_out = ph.out_path.tolist()
    for b in range(B):
        ch, fl, inf = st["children"][b], st["flags"][b], st["inflight"][b]
        for i in range(w):
            o = b * w + i
            path = [0]
            s, depth, new = 0, 0, False
            while True:
                valid = [not x for x in st["invalid"][b][s]]
                pending = [c >= 0 and not fl[c] & EXPANDED for c in ch[s]]
                virt = [ph.vl * inf[c] if c >= 0 else 0.0 for c in ch[s]]
                n = st["children_visits"][b][s]
                q = [st["rewards"][b][s][a] + st["discounts"][b][s][a] * st["children_values"][b][s][a]
                     for a in range(K)]
                prior = st["prior"][b][s]
                if ph.rule == 0:
                    if ph.qnorm == 1:
                        lo, hi = st["minmax"][b]
                    else:
                        vq = [q[a] for a in range(K) if n[a] > 0]
                        lo = min([st["value"][b][s]] + vq)
                        hi = max([st["value"][b][s]] + vq)
                    npar = st["visits"][b][s] + ph.vl * inf[s]
                    expl = math.sqrt(npar) * (ph.c1 + math.log((npar + ph.c2 + 1) / ph.c2))

                    def score(a):
                        qn = 0.0
                        if n[a] > 0 and (ph.qnorm == 0 or hi > lo):
                            qn = _norm(q[a], lo, hi) * n[a] / (n[a] + virt[a])
                        return qn + expl * prior[a] / (n[a] + virt[a] + 1)
                else:
                    sig = gumbel_sigma_reference(n, q, prior, st["raw_value"][b][s],
                                                 ph.value_scale, ph.maxvisit_init)
                    lg = st["logits"][b][s]
                    if depth == 0:
                        nn = [n[a] + (inf[ch[s][a]] if ch[s][a] >= 0 else 0) for a in range(K)]
                        row = min(cons[b], len(table) - 1)
                        want = table[row][min(sum(nn), len(table[0]) - 1)]
                        mx = max(lg)

                        def score(a):
                            if nn[a] != want:
                                return -math.inf
                            return max(-1e9, gum[b][a] + lg[a] - mx + sig[a])
                    else:
                        z = [lg[a] + sig[a] for a in range(K)]
                        zm = max(z[a] for a in range(K) if valid[a])
                        zs = sum(math.exp(z[a] - zm) for a in range(K) if valid[a])
                        tot = sum(n[a] + virt[a] for a in range(K) if valid[a])

                        def score(a):
                            return math.exp(z[a] - zm) / zs - (n[a] + virt[a]) / (1 + tot)
                a = _pick(valid, pending, score)
                if a is None:
                    raise RuntimeError(f"rlfuse.search select: no valid action (tree {b})")
                c = ch[s][a]
                if c < 0:
                    c = st["next_free"][b]
                    if c >= N:
                        raise RuntimeError(f"rlfuse.search select: tree full (tree {b})")
                    st["next_free"][b] = c + 1
                    ch[s][a] = c
                    st["parent"][b][c], st["action"][b][c] = s, a
                    st["depth"][b][c] = st["depth"][b][s] + 1
                    fl[c], inf[c], st["visits"][b][c] = 0, 0, 0
                    st["value"][b][c] = st["raw_value"][b][c] = 0.0
                    new = True
                path.append(c)
                if new or not fl[c] & EXPANDED or fl[c] & TERMINAL or depth + 1 >= ph.max_depth:
                    break
                s, depth = c, depth + 1
            for x in path:  # virtual loss for the later simulations of the step
                inf[x] += 1
            outs["node"][o], outs["parent"][o], outs["action"][o] = c, path[-2], a
            outs["store"][o], outs["new"][o], outs["len"][o] = (c if new else N), int(new), len(path)
            path_out[o * D:o * D + len(path)] = path
    _store(tr, st)
    for k in ("node", "parent", "action", "store", "new", "len"):
        buf = getattr(ph, "out_" + k)
        buf[:B * w] = torch.tensor(outs[k], dtype=buf.dtype)
    ph.out_path.copy_(torch.tensor(path_out, dtype=torch.int32))


def expand_reference(ph: Phases, w, reward, discount, logits, value, invalid, terminal) -> None:
    tr = ph.tree
    st = _load(tr)
    K = tr.num_actions
    M = tr.batch_size * w
    r, d, lg, v = reward.tolist(), discount.tolist(), logits.tolist(), value.tolist()
    inv = invalid.tolist() if invalid is not None else [[0] * K] * M
    term = terminal.tolist() if terminal is not None else [0] * M
    node, par, act, new = (ph.out_node[:M].tolist(), ph.out_parent[:M].tolist(),
                           ph.out_action[:M].tolist(), ph.out_new[:M].tolist())
    for m in range(M):
        if not new[m]:
            continue
        if not all(math.isfinite(x) for x in (r[m], d[m], v[m])) or any(
                math.isnan(x) or x == math.inf for x in lg[m]):
            raise RuntimeError(f"rlfuse.search expand: {_STATUS[2]} (row {m})")
        b, n = m // w, node[m]
        bad = [bool(inv[m][a]) or lg[m][a] == -math.inf for a in range(K)]
        ok = [lg[m][a] for a in range(K) if not bad[a]]
        mx = max(ok) if ok else 0.0
        ex = [0.0 if bad[a] else math.exp(lg[m][a] - mx) for a in range(K)]
        tot = sum(ex)
        st["prior"][b][n] = [x / tot if ok else 0.0 for x in ex]
        st["invalid"][b][n] = [int(x) for x in bad]
        st["logits"][b][n] = lg[m]
        for name, fill in (("children", -1), ("children_visits", 0), ("children_values", 0.0),
                           ("rewards", 0.0), ("discounts", 0.0), ("children_q", 0.0)):
            st[name][b][n] = [fill] * K
        st["raw_value"][b][n] = st["value"][b][n] = v[m]
        st["visits"][b][n] = 0
        st["flags"][b][n] = EXPANDED | (TERMINAL if term[m] or not ok else 0)
        st["rewards"][b][par[m]][act[m]] = r[m]
        st["discounts"][b][par[m]][act[m]] = d[m]
    _store(tr, st)


def backup_reference(ph: Phases, w: int) -> None:
    tr = ph.tree
    st = _load(tr)
    D = ph.max_depth + 1
    paths, lens = ph.out_path.tolist(), ph.out_len.tolist()
    for b in range(tr.batch_size):
        lo, hi = st["minmax"][b]
        vis, val, inf = st["visits"][b], st["value"][b], st["inflight"][b]
        for i in range(w):
            o = b * w + i
            if lens[o] < 2:  # no walk (CUDA: a failed one; see Phases.select)
                continue
            path = paths[o * D:o * D + lens[o]]
            leaf = path[-1]
            g = st["raw_value"][b][leaf]
            val[leaf] = (val[leaf] * vis[leaf] + g) / (vis[leaf] + 1)
            vis[leaf] += 1
            inf[leaf] -= 1
            for j in range(len(path) - 1, 0, -1):
                c, s = path[j], path[j - 1]
                a = st["action"][b][c]
                g = st["rewards"][b][s][a] + st["discounts"][b][s][a] * g
                val[s] = (val[s] * vis[s] + g) / (vis[s] + 1)
                vis[s] += 1
                inf[s] -= 1
                st["children_visits"][b][s][a] += 1
                st["children_values"][b][s][a] = val[c]
                q = st["rewards"][b][s][a] + st["discounts"][b][s][a] * val[c]
                st["children_q"][b][s][a] = q
                lo, hi = min(lo, q), max(hi, q)
        st["minmax"][b] = [lo, hi]
    _store(tr, st)


def subtree_reference(src: Tree, dst: Tree, actions: torch.Tensor, src_of: torch.Tensor) -> None:
    s, d = _load(src), _load(dst)
    K, cap = src.num_actions, dst.capacity
    so_all = src_of.tolist()
    for b, a0 in enumerate(actions.tolist()):
        so = so_all[b]
        d["next_free"][b] = 0
        d["minmax"][b] = [math.inf, -math.inf]
        if s["next_free"][b] < 1:           # no nodes: no root row to read
            continue
        r = s["children"][b][0][a0]
        if r < 0 or r >= s["next_free"][b] or not s["flags"][b][r] & EXPANDED:
            continue
        order, new_of = [r], {r: 0}
        i = 0
        while i < len(order):
            n = order[i]
            for a in range(K):
                c = s["children"][b][n][a]
                if c >= 0 and s["flags"][b][c] & EXPANDED and len(order) < cap:
                    new_of[c] = len(order)
                    order.append(c)
            i += 1
        for i, n in enumerate(order):
            so[i] = n
            kids = [new_of.get(c, -1) if c >= 0 else -1 for c in s["children"][b][n]]
            d["children"][b][i] = kids
            for name in ("logits", "prior", "invalid"):
                d[name][b][i] = list(s[name][b][n])
            for name in ("children_visits", "children_values", "rewards", "discounts",
                         "children_q"):
                d[name][b][i] = [x if k >= 0 else 0 for x, k in zip(s[name][b][n], kids)]
            d["parent"][b][i] = -1 if i == 0 else new_of[s["parent"][b][n]]
            d["action"][b][i] = -1 if i == 0 else s["action"][b][n]
            for name in ("raw_value", "value", "visits", "flags"):
                d[name][b][i] = s[name][b][n]
            d["depth"][b][i] = s["depth"][b][n] - s["depth"][b][r]
            d["inflight"][b][i] = 0
        d["next_free"][b] = len(order)
    _store(dst, d)
    src_of.copy_(torch.tensor(so_all, dtype=torch.int32))
