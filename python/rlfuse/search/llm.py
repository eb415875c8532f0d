"""Step-level tree search over a language model (MCTS for LLM reasoning), and its baselines.

    search = StepSearch(model, tokenizer, reward_fn=verifier, num_candidates=4,
                        num_simulations=32, parallel=4, max_depth=8)
    results = search.run(problems)          # list[SearchResult], one per problem

A node is a prefix (the prompt and the steps so far); its actions are ``K`` sampled
candidate next steps.  Every simulation step selects ``W`` leaves in each of the ``B``
trees at once (virtual loss spreads them; :mod:`rlfuse.search` runs select / expand /
backup as batched tree kernels), then one batched generation samples ``K`` next steps for
every new leaf, stopping each at the step delimiter or EOS.  Identical candidates are
merged (the duplicates become invalid actions); priors are the softmax of the
candidates' length-normalised log-probs (``prior="logprob"``) or uniform.  A candidate
that ends with EOS (or runs past the step token limit, or reaches ``max_depth``) is a
terminal node whose reward is ``reward_fn(problem, completion)``.  Non-terminal nodes are
valued by ``value_fn(prefixes)`` (a process reward model, a value head, any callable), by
one rollout to the end scored by ``reward_fn`` (``value_fn=None``, the default), or 0
(``value_fn="zero"``).

Baselines at the same generated-token budget: :func:`best_of_n` (independent samples,
selected by the verifier or by :func:`majority_vote`) and :func:`beam_search` (step-level,
value-guided).  Exports for training are in :mod:`rlfuse.search.llm_export`.
"""

from __future__ import annotations

import array
import collections
import collections.abc
import gc
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from rlfuse.search.llm_gen import (Candidate, HFStepModel, ScriptedStepModel, StepModel,
                                   StepState)

__all__ = ["BaselineResult", "SearchResult", "StepSearch", "beam_search", "best_of_n",
           "majority_vote", "ScriptedStepModel", "HFStepModel", "StepModel"]


# -- checks and evaluation ------------------------------------------------------------------

def _prompts(problems) -> list[str]:
    if isinstance(problems, (str, dict)) or not isinstance(problems, Sequence):
        raise TypeError("problems must be a list of prompts (str) or of dicts with a 'prompt'")
    if len(problems) == 0:
        raise ValueError("problems is empty: give at least one problem")
    out = []
    for i, p in enumerate(problems):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, dict) and isinstance(p.get("prompt"), str):
            out.append(p["prompt"])
        else:
            raise TypeError(f"problems[{i}] must be a str or a dict with a str 'prompt', "
                            f"got {type(p).__name__}")
    return out


def _pos_int(name, v, lo=1):
    if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def _check_fns(reward_fn, value_fn) -> None:
    if not callable(reward_fn):
        raise TypeError("reward_fn must be callable: reward_fn(problem, completion) -> float")
    if not (value_fn is None or value_fn == "zero" or callable(value_fn)):
        raise TypeError("value_fn must be None (rollouts), 'zero' or a callable "
                        "value_fn(prefixes) -> values")


class _Evaluator:
    """Terminal rewards and node values with checks; counts the calls and their time."""

    def __init__(self, gen: StepModel, problems, reward_fn, value_fn, max_depth: int):
        _check_fns(reward_fn, value_fn)
        self.gen, self.problems = gen, problems
        self.reward_fn, self.value_fn, self.max_depth = reward_fn, value_fn, max_depth
        self.traces: dict[int, list[tuple[str, float, str]]] = collections.defaultdict(list)
        self.seconds = 0.0

    def reward(self, problem: int, completion: str, source: str = "tree") -> float:
        return self.rewards(problem, (completion,), source)[0]

    def rewards(self, problem: int, completions, source: str = "tree") -> list[float]:
        """:meth:`reward` of several completions of one problem, in order (the calls of
        ``reward_fn`` timed together, then checked one by one)."""
        fn, prob, clock = self.reward_fn, self.problems[problem], time.perf_counter
        t0 = clock()
        try:
            raw = [fn(prob, c) for c in completions]
        finally:
            self.seconds += clock() - t0
        out = []
        for completion, r in zip(completions, raw):
            if type(r) is not float:
                try:
                    r = float(r)
                except (TypeError, ValueError):
                    raise TypeError(f"reward_fn returned {type(r).__name__} for problem "
                                    f"{problem} (completion {completion[:60]!r}); it must "
                                    "return a float") from None
            if not math.isfinite(r):
                raise ValueError(f"reward_fn returned {r} for problem {problem} "
                                 f"(completion {completion[:60]!r}); rewards must be "
                                 "finite")
            out.append(r)
        self.traces[problem].extend(zip(completions, out, [source] * len(out)))
        return out

    def values(self, states: Sequence[StepState]) -> list[float]:
        """Values of non-terminal prefixes (value_fn, rollout reward or 0)."""
        if not states:
            return []
        if self.value_fn == "zero":
            return [0.0] * len(states)
        if self.value_fn is None:
            # each to the end, or to max_depth steps in all (as a node there is terminal)
            done = [c for c, _ in self.gen.rollout(
                states, [max(self.max_depth - st.depth, 1) for st in states])]
            return [self.reward(st.problem, c, "rollout") for st, c in zip(states, done)]
        prefixes = [st.prompt + st.completion for st in states]
        t0 = time.perf_counter()
        out = self.value_fn(prefixes)
        self.seconds += time.perf_counter() - t0
        try:
            if isinstance(out, torch.Tensor):
                out = out.detach()
            vals = torch.as_tensor(out, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"value_fn must return a sequence or tensor of {len(states)} "
                            f"numbers, got {type(out).__name__}") from None
        if vals.dim() == 2 and vals.shape[1] == 1:
            vals = vals[:, 0]
        if tuple(vals.shape) != (len(states),):
            raise ValueError(f"value_fn returned shape {tuple(vals.shape)} for {len(states)} "
                             f"prefixes; expected ({len(states)},)")
        bad = (~torch.isfinite(vals)).nonzero()
        if bad.numel():
            i = int(bad[0])
            st = states[i]
            raise ValueError(f"value_fn returned {vals[i].item()} for sample {i} (problem "
                             f"{st.problem}, prefix {prefixes[i][-60:]!r}); values must be finite")
        return vals.tolist()


def _merge(cands: list[Candidate]):
    """Merge identical candidate texts: returns the kept candidates (one per action slot,
    None for a merged duplicate) and, for every slot, the slot of its first occurrence."""
    seen: dict[str, int] = {}
    kept: list[Optional[Candidate]] = []
    first = []
    for j, c in enumerate(cands):
        f = seen.setdefault(c.text, j)
        first.append(f)
        kept.append(c if f == j else None)
    return kept, first


def _zeros_f32(n: int) -> array.array:
    return array.array("f", bytes(4 * n))


_ARRAY_DTYPES = {"f": torch.float32, "q": torch.int64}


def _tensor(buf, *shape) -> torch.Tensor:
    """A tensor over a flat ``array("f")`` (float32), ``array("q")`` (int64) or
    ``bytearray`` (bool) without a pass over Python objects (``torch.tensor`` of nested
    lists costs ~0.1 us per element)."""
    dtype = _ARRAY_DTYPES[buf.typecode] if isinstance(buf, array.array) else torch.bool
    return torch.frombuffer(buf, dtype=dtype).view(*shape)


# -- results ---------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """The search tree of one problem and what was chosen from it.

    ``nodes``: one dict per node, in allocation order (node 0 is the root): ``id``,
    ``parent`` (-1 for the root), ``step`` (the text of the step leading to it), ``depth``,
    ``visits``, ``value`` (mean backed-up return below the node), ``q`` (the Q value of the
    step: its reward plus its discounted value, as the parent's edge holds it), ``prior``,
    ``terminal``, ``reward`` (terminal reward, else None).  ``traces``: every full
    completion scored during the search (terminal nodes and rollouts) as
    ``(completion, reward, source)``.  ``completion`` / ``reward``: the chosen answer.
    """

    problem: Any
    prompt: str
    nodes: list
    traces: list
    completion: str
    reward: float
    tokens_generated: int
    root_visit_counts: list = field(default_factory=list)

    def children(self, node_id: int) -> list[dict]:
        return [n for n in self.nodes if n["parent"] == node_id]

    def path(self, node_id: int) -> list[dict]:
        """The nodes from the root's first step down to ``node_id``."""
        out, n = [], self.nodes[node_id]
        while n["parent"] >= 0:
            out.append(n)
            n = self.nodes[n["parent"]]
        return out[::-1]


@dataclass
class BaselineResult:
    """A baseline's answer for one problem: the chosen completion and its reward, every
    sample (``(completion, reward)``) and the generated tokens it cost."""

    problem: Any
    prompt: str
    completion: str
    reward: float
    samples: list
    tokens_generated: int


# -- the search ------------------------------------------------------------------------------

class _Payload:
    """Host-side payload of one tree node: its state and its candidate children."""

    __slots__ = ("state", "cands", "terminal", "reward")

    def __init__(self, state, cands=None, terminal=False, reward=None):
        self.state, self.cands, self.terminal, self.reward = state, cands, terminal, reward


class StepSearch:
    """Batched step-level MCTS over a causal LM (see the module docstring).

    Args:
        model, tokenizer: a Hugging Face causal LM and its tokenizer, or a
            :class:`~rlfuse.search.llm_gen.StepModel` (e.g. :class:`ScriptedStepModel`)
            with ``tokenizer=None``.
        reward_fn: ``reward_fn(problem, completion) -> float`` for terminal nodes.
        value_fn: ``value_fn(prefixes: list[str]) -> values`` (``len(prefixes)`` numbers),
            or ``"zero"``; ``None`` (default): rollout expansion, each node is valued by
            the mean ``reward_fn`` of the rollouts through it.
        expansion: ``"rollout"`` (K rollouts to the end per expansion, their first steps
            are the actions; stored rollouts through a node are continued first) or
            ``"step"`` (K next steps; the node valued by ``value_fn``, or by one rollout
            when ``value_fn`` is None).  Default: ``"rollout"`` without a ``value_fn``,
            else ``"step"``.
        num_candidates: K sampled next steps per expanded node.
        num_simulations: simulations per tree (including the ``parallel`` ones per step).
        parallel: W simulations per tree per step (one generation batch for all of them).
        max_depth: steps at most; a node at this depth is terminal.
        algorithm: ``"puct"`` or ``"gumbel"``.
        sampling: ``temperature``, ``top_p``, ``max_new_tokens_per_step`` (HF models).
        prior: ``"logprob"`` (softmax of mean token log-probs) or ``"uniform"``.
        select: how the answer is chosen: ``"reward"`` (the best-rewarded full trace
            scored in the search, ties by visits) or ``"visits"`` (follow the most
            visited children from the root; when that path ends at a node that was not
            expanded, its partial completion with reward nan).  ``"reward"`` falls back to
            ``"visits"`` when no full trace was scored.
        c_puct, c_base, dirichlet_fraction, dirichlet_alpha, gumbel_scale,
        max_num_considered_actions, virtual_loss: passed to the tree search.
        kv_reuse, seed: for HF models (see :class:`HFStepModel`).
    """

    def __init__(self, model, tokenizer=None, *, reward_fn: Callable, value_fn=None,
                 step_delimiter: str = "\n", num_candidates: int = 4,
                 num_simulations: int = 32, parallel: int = 4, max_depth: int = 8,
                 algorithm: str = "puct", sampling: Optional[dict] = None,
                 prior: str = "logprob", select: str = "reward", c_puct: float = 1.25,
                 c_base: float = 19652.0, dirichlet_fraction: float = 0.0,
                 dirichlet_alpha: float = 0.3, gumbel_scale: float = 1.0,
                 max_num_considered_actions: int = 16, virtual_loss: float = 1.0,
                 kv_reuse: bool = True, seed: int = 0, backend: Optional[str] = None,
                 expansion: Optional[str] = None):
        self.K = _pos_int("num_candidates", num_candidates)
        self.num_simulations = _pos_int("num_simulations", num_simulations)
        self.W = _pos_int("parallel", parallel)
        self.max_depth = _pos_int("max_depth", max_depth)
        if algorithm not in ("puct", "gumbel"):
            raise ValueError(f"algorithm must be 'puct' or 'gumbel', got {algorithm!r}")
        if prior not in ("logprob", "uniform"):
            raise ValueError(f"prior must be 'logprob' or 'uniform', got {prior!r}")
        if expansion is None:
            expansion = "rollout" if value_fn is None else "step"
        if expansion not in ("rollout", "step"):
            raise ValueError(f"expansion must be 'rollout' or 'step', got {expansion!r}")
        if expansion == "rollout" and value_fn is not None:
            raise ValueError("expansion='rollout' values nodes by their rollouts; pass "
                             "value_fn=None with it, or expansion='step' with a value_fn")
        self.expansion = expansion
        if select not in ("reward", "visits"):
            raise ValueError(f"select must be 'reward' or 'visits', got {select!r}")
        self.gen = make_step_model(model, tokenizer, step_delimiter=step_delimiter,
                                   sampling=sampling, kv_reuse=kv_reuse, seed=seed)
        _check_fns(reward_fn, value_fn)
        self.reward_fn, self.value_fn = reward_fn, value_fn
        self.algorithm, self.prior, self.select = algorithm, prior, select
        self.search_kwargs = dict(c_puct=c_puct, c_base=c_base,
                                  dirichlet_fraction=dirichlet_fraction,
                                  dirichlet_alpha=dirichlet_alpha, gumbel_scale=gumbel_scale,
                                  max_num_considered_actions=max_num_considered_actions,
                                  virtual_loss=virtual_loss)
        self.backend, self.seed = backend, seed
        self.stats: dict = {}

    # one batch of expansions: K candidates for every state, merged, with priors
    def _expand(self, ev: _Evaluator, states: list[StepState], tails=None):
        """Kept candidates (None for merged duplicates), prior logits and invalid masks
        (lists of S rows of K) and each state's own evaluation: its value (step expansion) or the
        rewards of its newly sampled rollouts (rollout expansion).  ``tails[i]``: the
        ``(tail, reward)`` of the rollouts that already went through state i; up to K of
        them are continued as candidates instead of sampling new ones."""
        K = self.K
        if self.expansion == "rollout":
            reused: list[list[Candidate]] = [[] for _ in states]
            for i, st in enumerate(states):
                for tail, rew in (tails[i] if tails else [])[:K]:
                    c = self.gen.continue_tail(st, tail)
                    if c is not None:
                        c.returns = [rew]
                        c.tails = [(c.tail, rew)] if c.tail is not None else []
                        reused[i].append(c)
            left = [self.max_depth - st.depth for st in states]   # steps to max_depth
            rows = self.gen.sample_rollouts(states, [K - len(r) for r in reused], left)
            cand_lists, own = [], []
            for st, old, row in zip(states, reused, rows):
                rews = ev.rewards(st.problem, [comp for _, comp in row], "rollout")
                new = [c for c, _ in row]
                for c, rew in zip(new, rews):
                    c.returns = [rew]
                    c.tails = [(c.tail, rew)] if c.tail is not None else []
                cand_lists.append(old + new)
                own.append(rews)
        else:
            cand_lists = self.gen.sample_steps(states, K)
            own = ev.values(states)
        # prior logits and invalid masks as flat float32 / byte arrays (S rows of K): made
        # tensors once per simulation step without a pass over Python lists
        logits, invalid = _zeros_f32(len(cand_lists) * K), bytearray(len(cand_lists) * K)
        kept_all = []
        use_lp = self.prior == "logprob"
        release = self.gen.release
        for i, cands in enumerate(cand_lists):
            if len(cands) != K:
                raise RuntimeError(f"step model returned {len(cands)} candidates, expected {K}")
            # _merge in the same pass: a duplicate's returns and tails go to its first copy
            seen: dict[str, int] = {}
            kept = []
            base = i * K
            for j, c in enumerate(cands):
                f = seen.setdefault(c.text, j)
                if f == j:
                    kept.append(c)
                    if use_lp:
                        logits[base + j] = c.mean_logprob
                else:
                    kept.append(None)
                    invalid[base + j] = 1
                    first = cands[f]
                    first.returns.extend(c.returns)
                    first.tails.extend(c.tails)
                    release(c.state)
            kept_all.append(kept)
        for st in states:
            release(st)
        return kept_all, logits, invalid, own

    def _new_nodes(self, ev: _Evaluator, parents: list[_Payload], actions: list[int], rows,
                   out):
        """The children reached by ``actions`` from ``parents`` (one batch): their payloads,
        and their rewards, discounts, prior logits, invalid masks, values and terminal flags
        written into the arrays ``out`` (flat, rows of K for logits and masks) at the
        positions ``rows``."""
        reward, discount, logits, invalid, value, terminal, payloads = out
        K = self.K
        grow: list[int] = []
        for i, par, a in zip(rows, parents, actions):
            if par.terminal or par.cands is None:
                raise RuntimeError("rlfuse.search.llm: the tree search expanded a terminal node")
            cand = par.cands[a]
            if cand is None:
                raise RuntimeError(f"rlfuse.search.llm: the tree search chose invalid action {a}")
            st = cand.state
            if cand.terminal or st.depth >= self.max_depth:
                if cand.ended == "eos" and cand.returns:
                    r = cand.returns[0]         # its rollout was this very completion
                else:
                    r = ev.reward(st.problem, st.completion)
                payloads[i] = _Payload(st, terminal=True, reward=r)
                reward[i], terminal[i] = r, 1        # discount 0
                self.gen.release(st)
            else:
                payloads[i] = _Payload(st)
                discount[i] = 1.0
                grow.append((i, cand))
        if grow:
            kept, lg, inv, own = self._expand(ev, [payloads[i].state for i, _ in grow],
                                              [cand.tails for _, cand in grow])
            rollout = self.expansion == "rollout"
            for j, (i, cand) in enumerate(grow):
                payloads[i].cands = kept[j]
                if rollout:      # every rollout through the node
                    seen = cand.returns + own[j]
                    value[i] = sum(seen) / max(len(seen), 1)
                else:
                    value[i] = own[j]
                logits[i * K:(i + 1) * K] = lg[j * K:(j + 1) * K]
                invalid[i * K:(i + 1) * K] = inv[j * K:(j + 1) * K]

    def run(self, problems) -> list[SearchResult]:
        """Search every problem; one tree per problem, all trees in the same batches."""
        prompts = _prompts(problems)
        # Python's cyclic collector is paused while the search runs, as in the tree search
        # loop: its passes over torch's large heap would cost more than the bookkeeping
        # they interrupt (~1 ms each here); reference counting still frees memory at once.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._run(problems, prompts)
        finally:
            if was_enabled:
                gc.enable()

    def _run(self, problems, prompts) -> list[SearchResult]:
        from rlfuse import search as _search

        B = len(prompts)
        t_start = time.perf_counter()
        c0 = self.gen.counters.snapshot()
        # this run's tokens per problem (the step model's counters add up over its life)
        self._tokens0 = dict(self.gen.counters.generated_per_problem)
        ev = _Evaluator(self.gen, problems, self.reward_fn, self.value_fn, self.max_depth)
        roots = self.gen.root_states(list(range(B)), prompts)
        kept, logits, invalid, own = self._expand(ev, roots)
        root_vals = [sum(v) / max(len(v), 1) for v in own] if self.expansion == "rollout" \
            else own
        root_payloads = [_Payload(st, cands=k) for st, k in zip(roots, kept)]

        K = self.K
        # The tree's payload is one int64 per node: an index into `payloads` (a tensor
        # payload keeps the tree loop in one extension call per step on the CPU, where a
        # list of Python objects takes the general path: separate select / expand / backup
        # calls and a gather and put per step)
        payloads: list[_Payload] = list(root_payloads)

        def recurrent_fn(embedding, action, exp):
            new = exp.new.tolist()
            M = len(new)
            rows = [i for i in range(M) if new[i]]
            acts, pids = action.tolist(), embedding.tolist()
            # rows that revisit a node get zeros (their outputs are ignored)
            out = (_zeros_f32(M), _zeros_f32(M), _zeros_f32(M * K), bytearray(M * K),
                   _zeros_f32(M), bytearray(M), [None] * M)
            self._new_nodes(ev, [payloads[pids[i]] for i in rows], [acts[i] for i in rows],
                            rows, out)
            r, d, lg, inv, v, term, full = out
            ids = array.array("q", bytes(8 * M))
            n0 = len(payloads)
            for j, i in enumerate(rows):
                ids[i] = n0 + j
            payloads.extend(full[i] for i in rows)
            return _search.RecurrentOutput(
                reward=_tensor(r, M), discount=_tensor(d, M), prior_logits=_tensor(lg, M, K),
                value=_tensor(v, M), embedding=_tensor(ids, M), invalid_actions=_tensor(inv, M, K),
                terminal=_tensor(term, M))

        gen = torch.Generator().manual_seed(self.seed)
        root = _search.Root(prior_logits=_tensor(logits, B, K),
                            value=torch.tensor(root_vals, dtype=torch.float32),
                            embedding=torch.arange(B, dtype=torch.int64))
        invalid = _tensor(invalid, B, K)
        kw = self.search_kwargs
        if self.algorithm == "puct":
            out = _search.puct_search(
                root, recurrent_fn, self.num_simulations, invalid_actions=invalid,
                max_depth=self.max_depth, parallel=self.W, virtual_loss=kw["virtual_loss"],
                dirichlet_fraction=kw["dirichlet_fraction"],
                dirichlet_alpha=kw["dirichlet_alpha"], pb_c_init=kw["c_puct"],
                pb_c_base=kw["c_base"], generator=gen, backend=self.backend)
        else:
            out = _search.gumbel_search(
                root, recurrent_fn, self.num_simulations, invalid_actions=invalid,
                max_depth=self.max_depth, parallel=self.W, virtual_loss=kw["virtual_loss"],
                gumbel_scale=kw["gumbel_scale"],
                max_num_considered_actions=kw["max_num_considered_actions"], generator=gen,
                backend=self.backend)
        results = self._results(problems, prompts, out.tree, ev, payloads)
        wall = time.perf_counter() - t_start
        c1 = self.gen.counters.snapshot()
        self.stats = {k: c1[k] - c0[k] for k in c0}
        # overhead: everything but model forwards and the caller's reward / value functions;
        # search_seconds: what is left outside the generation calls too
        self.stats.update(wall_seconds=wall, eval_seconds=ev.seconds,
                          overhead_seconds=wall - self.stats["model_seconds"] - ev.seconds,
                          search_seconds=wall - self.stats["decode_seconds"] - ev.seconds)
        return results

    def _results(self, problems, prompts, tree, ev, payloads) -> list[SearchResult]:
        """One SearchResult per tree; the tree's arrays are read once for all trees
        (``payloads``: what the tree's int64 payload of every node indexes)."""
        B, N, K = tree.batch_size, tree.capacity, tree.num_actions
        n_nodes = tree.num_nodes().tolist()
        n_max = max(n_nodes)
        pid = tree.payload.buf[:, :n_max].tolist()
        cols = {name: getattr(tree, name)[:, :n_max].tolist()
                for name in ("parent", "visits", "value")}
        # past a tree's next_free the arrays hold no data (clamped: any index is valid)
        par = tree.parent[:, :n_max].long().clamp(0, N - 1)
        act = tree.action[:, :n_max].long().clamp(0, K - 1)
        bi = torch.arange(B, device=par.device)[:, None]
        q = (tree.rewards[bi, par, act] + tree.discounts[bi, par, act]
             * tree.children_values[bi, par, act]).tolist()
        prior = tree.prior[bi, par, act].tolist()
        root_visits = tree.root_visit_counts().tolist()
        out = []
        for b in range(B):
            parent, visits, value = cols["parent"][b], cols["visits"][b], cols["value"][b]
            qb, pb, node_pl = q[b], prior[b], [payloads[i] for i in pid[b][:n_nodes[b]]]
            nodes = []
            for n in range(n_nodes[b]):
                pl = node_pl[n]
                st = pl.state
                nodes.append({
                    "id": n, "parent": parent[n] if n else -1,
                    "step": st.steps[-1] if st.steps else "",
                    "depth": len(st.steps), "visits": visits[n],
                    "value": value[n], "q": qb[n] if n else value[n],
                    "prior": pb[n] if n else 1.0,
                    "terminal": bool(pl.terminal), "reward": pl.reward,
                })
            traces = list(ev.traces.get(b, []))
            completion, reward = self._choose(nodes, traces, node_pl)
            out.append(SearchResult(
                problem=problems[b], prompt=prompts[b], nodes=nodes, traces=traces,
                completion=completion, reward=reward,
                tokens_generated=self.gen.counters.generated_per_problem.get(b, 0)
                - self._tokens0.get(b, 0),
                root_visit_counts=root_visits[b]))
        return out

    def _choose(self, nodes, traces, node_pl):
        if self.select == "reward" and traces:
            visits = {}
            for nd in nodes:
                if nd["terminal"]:
                    c = node_pl[nd["id"]].state.completion
                    visits[c] = max(visits.get(c, 0), nd["visits"])
            best = max(traces, key=lambda t: (t[1], visits.get(t[0], 0)))
            return best[0], best[1]
        # the most visited path; a partial completion (reward nan) when it ends unexpanded
        kids: dict[int, list] = {}
        for nd in nodes[1:]:
            kids.setdefault(nd["parent"], []).append(nd)
        n = nodes[0]
        while not n["terminal"] and n["id"] in kids:
            n = max(kids[n["id"]], key=lambda c: (c["visits"], c["q"]))
        reward = float(n["reward"]) if n["terminal"] else float("nan")
        return node_pl[n["id"]].state.completion, reward


def make_step_model(model, tokenizer=None, *, step_delimiter="\n", sampling=None,
                    kv_reuse=True, seed=0) -> StepModel:
    """A :class:`StepModel` for ``model``: itself when it already is one, else an
    :class:`HFStepModel` over the HF model and tokenizer."""
    if isinstance(model, StepModel):
        return model
    if tokenizer is None:
        raise ValueError("tokenizer is required with a Hugging Face model")
    if sampling is not None and not isinstance(sampling, collections.abc.Mapping):
        raise TypeError("sampling must be a dict of temperature, top_p and "
                        f"max_new_tokens_per_step, got {type(sampling).__name__}")
    s = dict(sampling or {})
    unknown = set(s) - {"temperature", "top_p", "max_new_tokens_per_step"}
    if unknown:
        raise ValueError(f"sampling: unknown keys {sorted(unknown)}; use temperature, top_p, "
                         "max_new_tokens_per_step")
    m = s.get("max_new_tokens_per_step", 32)
    if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
        raise ValueError("sampling['max_new_tokens_per_step'] must be a positive int, got "
                         f"{m!r}")
    if not isinstance(kv_reuse, bool):
        raise TypeError(f"kv_reuse must be a bool, got {kv_reuse!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return HFStepModel(model, tokenizer, step_delimiter=step_delimiter,
                       temperature=s.get("temperature", 1.0), top_p=s.get("top_p", 1.0),
                       max_new_tokens=int(m), kv_reuse=kv_reuse, seed=int(seed))


# -- baselines -------------------------------------------------------------------------------

def _default_answer(completion: str):
    from rlfuse.tasks import extract_answer

    return extract_answer(completion)


def majority_vote(completions: Sequence[str], answer_fn: Callable = _default_answer):
    """The completion whose answer (``answer_fn(completion)``, None = no answer) is the
    most frequent; ties go to the answer seen first.  Returns (completion, answer)."""
    if not completions:
        raise ValueError("majority_vote: completions is empty")
    answers = [answer_fn(c) for c in completions]
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return completions[0], None
    top = max(counts.values())
    for c, a in zip(completions, answers):
        if a is not None and counts[a] == top:
            return c, a


def _budgets(token_budget, B):
    if isinstance(token_budget, numbers.Integral) and not isinstance(token_budget, bool):
        token_budget = [int(token_budget)] * B
    if not isinstance(token_budget, Sequence) or isinstance(token_budget, str):
        raise TypeError("token_budget must be an int or a sequence of one int per problem, "
                        f"got {type(token_budget).__name__}")
    if len(token_budget) != B:
        raise ValueError(f"token_budget must be an int or one per problem ({B}), got "
                         f"{len(token_budget)}")
    for i, t in enumerate(token_budget):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1:
            raise ValueError(f"token_budget[{i}] must be a positive int, got {t!r}")
    return [int(t) for t in token_budget]


def best_of_n(model, tokenizer=None, problems=(), *, reward_fn: Optional[Callable] = None,
              n: Optional[int] = None, token_budget=None, select: str = "reward",
              answer_fn: Callable = _default_answer, max_depth: int = 8, batch: int = 4,
              sampling: Optional[dict] = None, step_delimiter: str = "\n", seed: int = 0):
    """Independent full samples per problem: ``n`` of them, or as many as fit in
    ``token_budget`` generated tokens (int or one per problem; sampling stops once the
    budget is reached, so a problem may use up to one sample more than its budget).
    ``select="reward"`` returns the best-rewarded sample (``reward_fn``),
    ``"majority"`` the majority-vote answer.  Returns ``list[BaselineResult]``."""
    prompts = _prompts(problems)
    B = len(prompts)
    if (n is None) == (token_budget is None):
        raise ValueError("best_of_n: give exactly one of n and token_budget")
    if select not in ("reward", "majority"):
        raise ValueError(f"select must be 'reward' or 'majority', got {select!r}")
    if select == "reward" and not callable(reward_fn):
        raise TypeError("best_of_n: select='reward' needs reward_fn(problem, completion)")
    _pos_int("max_depth", max_depth)
    gen = make_step_model(model, tokenizer, step_delimiter=step_delimiter, sampling=sampling,
                          seed=seed)
    budgets = _budgets(token_budget, B) if token_budget is not None else None
    if n is not None:
        _pos_int("n", n)
    _pos_int("batch", batch)
    ev = _Evaluator(gen, problems, reward_fn or (lambda p, c: 0.0), "zero", max_depth)
    roots = gen.root_states(list(range(B)), prompts)
    used = [0] * B
    samples: list[list] = [[] for _ in range(B)]
    while True:
        active = [roots[b] for b in range(B)
                  if (used[b] < budgets[b] if budgets else len(samples[b]) < n)]
        if not active:
            break
        for st, (comp, ntok) in zip([s for s in active for _ in range(batch)],
                                     gen.rollout(active, max_depth, repeats=batch)):
            b = st.problem
            if (used[b] >= budgets[b]) if budgets else len(samples[b]) >= n:
                continue                      # past the budget: not counted, not used
            used[b] += ntok
            r = ev.reward(b, comp, "sample") if reward_fn is not None else float("nan")
            samples[b].append((comp, r))
    res = []
    for b in range(B):
        if select == "reward":
            comp, r = max(samples[b], key=lambda s: s[1])
        else:
            comp, _ = majority_vote([s[0] for s in samples[b]], answer_fn)
            r = dict(samples[b])[comp]
        res.append(BaselineResult(problems[b], prompts[b], comp, r, samples[b], used[b]))
    return res


def beam_search(model, tokenizer=None, problems=(), *, reward_fn: Callable, value_fn=None,
                beam_width: int = 2, num_candidates: int = 4, max_depth: int = 8,
                token_budget=None, sampling: Optional[dict] = None,
                step_delimiter: str = "\n", seed: int = 0):
    """Step-level beam search guided by values.

    Every live beam samples ``num_candidates`` next steps (one batch over all problems and
    beams; duplicates merged); terminal candidates are scored by ``reward_fn``, the others
    by ``value_fn`` (``None``: one rollout scored by ``reward_fn``; ``"zero"``: the mean
    token log-prob of the prefix), and the ``beam_width`` best non-terminal ones per problem
    go on.  With ``token_budget`` (int or one per problem), a problem whose beams all end
    before its budget is spent starts a new beam search (fresh samples) until it is.
    The answer is the best-rewarded full trace scored (rollouts included), ties broken by
    the order found.  Returns ``list[BaselineResult]``."""
    prompts = _prompts(problems)
    B = len(prompts)
    _pos_int("beam_width", beam_width)
    K = _pos_int("num_candidates", num_candidates)
    _pos_int("max_depth", max_depth)
    budgets = _budgets(token_budget, B) if token_budget is not None else None
    gen = make_step_model(model, tokenizer, step_delimiter=step_delimiter, sampling=sampling,
                          seed=seed)
    ev = _Evaluator(gen, problems, reward_fn, value_fn, max_depth)
    c = gen.counters.generated_per_problem
    start = {b: c.get(b, 0) for b in range(B)}
    used = lambda b: c.get(b, 0) - start[b]  # noqa: E731
    roots = gen.root_states(list(range(B)), prompts)
    # a beam: (state, score, (log-prob sum, tokens) of its steps so far)
    beams: dict[int, list] = {b: [(roots[b], 0.0, (0.0, 0))] for b in range(B)}
    rounds = [1] * B
    while beams:
        live_beams = [bm for b in beams for bm in beams[b]]
        states = [bm[0] for bm in live_beams]
        cand_lists = gen.sample_steps(states, K)
        nxt: dict[int, list] = collections.defaultdict(list)
        grow = []
        for (st, _, (lp0, n0)), cands in zip(live_beams, cand_lists):
            for cand in _merge(cands)[0]:
                if cand is None:
                    continue
                child = cand.state
                if cand.terminal or child.depth >= max_depth:
                    ev.reward(child.problem, child.completion, "beam")
                    gen.release(child)
                else:
                    grow.append((child, cand, (lp0 + cand.logprob, n0 + cand.num_tokens)))
            if st is not roots[st.problem]:
                gen.release(st)
        if value_fn == "zero":      # the mean token log-prob of the whole prefix
            scores = [lp / max(n, 1) for _, _, (lp, n) in grow]
        else:
            scores = ev.values([ch for ch, _, _ in grow])
        for (child, _, acc), v in zip(grow, scores):
            nxt[child.problem].append((child, v, acc))
        beams = {}
        for b in range(B):
            live = sorted(nxt.get(b, []), key=lambda x: -x[1])
            keep, drop = live[:beam_width], live[beam_width:]
            for st, _, _ in drop:
                gen.release(st)
            if budgets is not None and used(b) >= budgets[b]:
                for st, _, _ in keep:
                    gen.release(st)
                continue
            if keep:
                beams[b] = keep
            elif budgets is not None:         # every beam ended: a fresh round
                rounds[b] += 1
                beams[b] = [(roots[b], 0.0, (0.0, 0))]
    res = []
    for b in range(B):
        tr = ev.traces.get(b, [])
        if tr:
            comp, r, _ = max(tr, key=lambda t: t[1])
        else:
            comp, r = "", float("nan")
        res.append(BaselineResult(problems[b], prompts[b], comp, r,
                                  [(t[0], t[1]) for t in tr], used(b)))
    return res
