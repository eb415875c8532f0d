"""Step generation for LLM tree search: K candidate next steps for many prefixes at once.

Two step models share one interface (:class:`StepModel`):

* :class:`HFStepModel` wraps a Hugging Face causal LM and its tokenizer.  One call of
  :meth:`~StepModel.sample_steps` samples ``k`` continuations for every given prefix in one
  batched decoding loop that stops each row at the step delimiter or EOS.  Prefixes are
  never re-sent: every state keeps the KV cache of its tokens but the last one; a prefix
  without one (a prompt) is encoded once, not once per sample, and a child state gets
  the slice of its parent's generation cache that covers it.  Candidate log-probs come
  from the raw logits through :func:`rlfuse.ops.token_logprobs` and are reduced per
  candidate with :func:`rlfuse.ops.reduce_sequences`.
* :class:`ScriptedStepModel` returns scripted candidates (text, log-prob, terminal) per
  prefix: deterministic, for exact-behaviour tests and examples.

Both count the tokens they generate and the prefix tokens they encode
(:class:`TokenCounters`), including what re-sending every prefix would have cost.
"""

from __future__ import annotations

import array
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import torch

__all__ = ["Candidate", "HFStepModel", "ScriptedStepModel", "StepModel", "StepState",
           "TokenCounters"]


@dataclass
class TokenCounters:
    """Token and time accounting of a step model.

    ``generated``: sampled tokens (stop tokens included, padding after a stop excluded).
    ``encoded``: prefix tokens run through the model again (prefill of prompts, plus the
    one uncached last token of every sampled row).  ``encoded_naive``: what re-sending
    the whole prefix with every sampled row would have encoded.  ``model_seconds``: wall
    time inside model forward calls; ``decode_seconds``: wall time of the generation calls
    (forwards plus sampling, log-probs, stop checks and cache packing).
    ``generated_per_problem``: generated tokens by
    problem index.
    """

    generated: int = 0
    encoded: int = 0
    encoded_naive: int = 0
    model_seconds: float = 0.0
    decode_seconds: float = 0.0
    forward_calls: int = 0
    generated_per_problem: dict = field(default_factory=dict)

    def add_generated(self, problem: int, n: int) -> None:
        self.generated += n
        self.generated_per_problem[problem] = self.generated_per_problem.get(problem, 0) + n

    def snapshot(self) -> dict:
        return {"generated": self.generated, "encoded": self.encoded,
                "encoded_naive": self.encoded_naive, "model_seconds": self.model_seconds,
                "decode_seconds": self.decode_seconds,
                "forward_calls": self.forward_calls}


@dataclass(slots=True)
class StepState:
    """A node's prefix: the problem it belongs to, its steps so far and (HF) its token ids
    and the KV cache of all its tokens but the last."""

    problem: int
    prompt: str
    steps: tuple = ()
    ids: Optional[list] = None                  # prompt + steps token ids (HF)
    kv: Optional["KVSlice"] = None              # the KV cache of ids[:-1] (HF)

    @property
    def completion(self) -> str:
        return "".join(self.steps)

    @property
    def depth(self) -> int:
        return len(self.steps)


@dataclass(slots=True)
class Candidate:
    """One sampled next step: its text, token count, log-prob sum, how it ended
    (``"delimiter"``, ``"eos"`` or ``"length"``) and the child state it leads to."""

    text: str
    num_tokens: int
    logprob: float
    ended: str
    state: StepState
    returns: list = field(default_factory=list)   # rewards of the rollouts through it
    tail: Any = None            # the rest of the rollout this step was cut from (or None)
    tails: list = field(default_factory=list)     # (tail, reward) of those rollouts

    @property
    def terminal(self) -> bool:
        return self.ended != "delimiter"

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.num_tokens, 1)


class StepModel:
    """Interface of the step generators used by :class:`rlfuse.search.llm.StepSearch`."""

    step_delimiter: str = "\n"

    def __init__(self):
        self.counters = TokenCounters()

    def root_states(self, problems: Sequence[int], prompts: Sequence[str]) -> list[StepState]:
        return [StepState(problem=p, prompt=s) for p, s in zip(problems, prompts)]

    def sample_steps(self, states: Sequence[StepState], k: int) -> list[list[Candidate]]:
        """``k`` sampled next steps for each state (duplicates are kept; the search merges)."""
        raise NotImplementedError

    def rollout(self, states: Sequence[StepState], max_steps,
                repeats: int = 1) -> list[tuple[str, int]]:
        """``repeats`` sampled completions to the end (EOS) for each state (state-major):
        ``(the state's completion followed by the continuation, tokens generated)``; a
        continuation has ``max_steps`` steps at most (an int, or one per state: the search
        passes each state's steps left to ``max_depth``)."""
        raise NotImplementedError

    def sample_rollouts(self, states: Sequence[StepState], k,
                        max_steps) -> list[list[tuple[Candidate, str]]]:
        """``k`` (an int, or one count per state) sampled completions to the end for each
        state, of ``max_steps`` steps at most (an int, or one per state), each split into
        its first step (a :class:`Candidate` whose ``tail`` points at the rest of the
        rollout) and the full completion text."""
        raise NotImplementedError

    def continue_tail(self, state: StepState, tail) -> Optional[Candidate]:
        """The next step of a stored rollout ``tail`` after ``state`` (no generation), or
        None when the rollout has nothing left."""
        raise NotImplementedError

    def release(self, state: StepState) -> None:
        """Drop what a state holds (its KV cache) once it has been expanded."""
        state.kv = None


class ScriptedStepModel(StepModel):
    """Deterministic candidates for exact-behaviour tests.

    ``script`` maps a completion-so-far (``""`` for the root, else the concatenated steps)
    to its candidates ``[(step_text, logprob, terminal), ...]``; a prefix may also be keyed
    by ``(prompt, completion)``.  :meth:`sample_steps` returns the first ``k`` entries,
    cycling when ``k`` is larger (so duplicates appear, as sampling would give).  Every
    character counts as one generated token.  ``rollouts`` maps a completion-so-far to
    its rollout continuation (default: follow the first candidate until a terminal one).
    """

    def __init__(self, script: dict, *, rollouts: Optional[dict] = None, step_delimiter="\n"):
        super().__init__()
        if not isinstance(script, dict) or not script:
            raise ValueError("script must be a non-empty dict {completion: [(step, logprob, terminal)]}")
        self.script = script
        self.rollouts = rollouts or {}
        self.step_delimiter = step_delimiter
        self.calls: list[list[str]] = []   # the completions expanded by each sample_steps call

    def _entries(self, state: StepState):
        key = state.completion
        entries = self.script.get((state.prompt, key), self.script.get(key))
        if not entries:
            raise KeyError(f"ScriptedStepModel: no candidates scripted for prefix {key!r}")
        return entries

    def _cands(self, st: StepState, k: int) -> list[Candidate]:
        entries = self._entries(st)
        cands = []
        for j in range(k):
            text, lp, terminal = entries[j % len(entries)]
            child = StepState(problem=st.problem, prompt=st.prompt, steps=st.steps + (text,))
            n = max(len(text), 1)
            self.counters.add_generated(st.problem, n)
            cands.append(Candidate(text, n, float(lp) * n, "eos" if terminal else "delimiter",
                                   child))
        return cands

    def sample_steps(self, states, k):
        self.calls.append([s.completion for s in states])
        return [self._cands(st, k) for st in states]

    def sample_rollouts(self, states, k, max_steps):
        ks = [k] * len(states) if isinstance(k, int) else list(k)
        ms = _per_state(max_steps, len(states))
        self.calls.append([s.completion for s, n in zip(states, ks) if n])
        out = []
        for st, n, m in zip(states, ks, ms):
            row = []
            for c in self._cands(st, n):
                if c.terminal or m <= 1:
                    row.append((c, c.state.completion))
                    continue
                comp = self.rollout([c.state], m - 1)[0][0]
                c.tail = (comp, len(c.state.completion))
                row.append((c, comp))
            out.append(row)
        return out

    def continue_tail(self, state, tail):
        comp, off = tail
        rest = comp[off:]
        if not rest:
            return None
        cut = rest.find(self.step_delimiter)
        text = rest[:cut + len(self.step_delimiter)] if cut >= 0 else rest
        n = len(text)
        lp = next((e[1] for e in self.script.get((state.prompt, state.completion),
                                                 self.script.get(state.completion, []))
                   if e[0] == text), -1.0)
        child = StepState(problem=state.problem, prompt=state.prompt,
                          steps=state.steps + (text,))
        c = Candidate(text, n, float(lp) * n, "delimiter" if cut >= 0 else "eos", child)
        if cut >= 0:
            c.tail = (comp, off + n)
        return c

    def rollout(self, states, max_steps, repeats=1):
        out = []
        ms = _per_state(max_steps, len(states))
        for st, m in [(s, m) for s, m in zip(states, ms) for _ in range(repeats)]:
            text = st.completion
            if text in self.rollouts:
                cont = self.rollouts[text]
            else:
                cont, cur = "", st
                for _ in range(m):
                    step, _, terminal = self._entries(cur)[0]
                    cont += step
                    cur = StepState(st.problem, st.prompt, cur.steps + (step,))
                    if terminal:
                        break
            self.counters.add_generated(st.problem, max(len(cont), 1))
            out.append((text + cont, max(len(cont), 1)))
        return out


def _probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``softmax(logits / temperature)`` restricted to the nucleus ``top_p`` (not
    renormalised: the CDF inversion scales by the total)."""
    p = torch.softmax(logits / temperature if temperature != 1.0 else logits, -1)
    if top_p < 1.0:
        sp = p.sort(-1, descending=True).values
        # the smallest probability inside the nucleus (the top token is always kept)
        inside = (sp.cumsum(-1) - sp) < top_p
        floor = sp.masked_fill(~inside, float("inf")).min(-1, keepdim=True).values
        p = p.masked_fill(p < floor, 0.0)
    return p


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator,
            u: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One token per row from :func:`_probs` by inverting the CDF with one uniform draw per
    row (cheaper than ``torch.multinomial`` or a Gumbel draw per logit); temperature 0 is
    greedy.  ``u``: the draws ([R, 1] or [R]; drawn from ``generator`` when None)."""
    if temperature == 0:
        return logits.argmax(-1)
    p = _probs(logits, temperature, top_p)
    cdf = p.cumsum(-1)
    if u is None:
        u = torch.rand(p.shape[0], 1, generator=generator, device=p.device, dtype=p.dtype)
    else:
        u = u.reshape(p.shape[0], 1).to(p.dtype)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(1).clamp_(max=p.shape[-1] - 1)


class HFStepModel(StepModel):
    """Step generation with a Hugging Face causal LM, reusing every prefix's KV cache.

    ``temperature``, ``top_p``: sampling (temperature 0 is greedy).  ``max_new_tokens``:
    tokens per step at most (a longer step ends as ``"length"``, a terminal).
    ``kv_reuse=False`` re-encodes each prefix once per call instead of keeping caches
    (lower memory; still once per prefix, not once per sample).  ``seed`` seeds the
    sampling generator; a decoding loop draws all its uniforms at once.  On the CPU each
    decoding step's sampling and bookkeeping is one ``rlfuse._C.DecodeLoop`` call (with
    top_p = 1 fused from the logits: softmax, CDF inversion, raw log-probs); setting the
    attribute ``step_kernel = False`` runs the same loop in torch ops (as on other devices;
    the same draws, so the same tokens up to float rounding at a CDF boundary, and
    log-probs to float32 accuracy).
    """

    def __init__(self, model, tokenizer, *, step_delimiter: str = "\n", temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 32, kv_reuse: bool = True,
                 seed: int = 0):
        super().__init__()
        if not hasattr(model, "config") or not callable(model):
            raise TypeError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
        if not isinstance(step_delimiter, str) or not step_delimiter:
            raise ValueError(f"step_delimiter must be a non-empty str, got {step_delimiter!r}")
        if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool)
                and math.isfinite(temperature)
                and (temperature == 0 or 1e-30 <= temperature <= 1e30)):
            raise ValueError("temperature must be 0 (greedy) or a finite number in "
                             f"[1e-30, 1e30], got {temperature!r}")
        if not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool)
                and 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id")
        self.model, self.tokenizer = model, tokenizer
        self.step_delimiter = step_delimiter
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.max_new_tokens = max_new_tokens
        self.kv_reuse = kv_reuse
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.eos_ids = torch.tensor(sorted(self._eos_set()), device=self.device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else int(self.eos_ids[0])
        # padding is masked, so any id the model can embed will do: a pad token added to
        # the tokenizer without resizing the model's embeddings is replaced by EOS
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        n_emb = getattr(emb, "num_embeddings", None)
        if n_emb is not None and not 0 <= self.pad_id < n_emb:
            self.pad_id = int(self.eos_ids[0])
        # Tokens whose text contains the delimiter end a step (one token for "\n" in most
        # vocabularies; BPE merges like ".\n\n" too).  Found once by decoding the vocabulary.
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        delim = [i for i, t in enumerate(texts) if step_delimiter in t]
        if not delim:
            raise ValueError(f"no token of the tokenizer contains step_delimiter {step_delimiter!r}")
        self._eos = set(self.eos_ids.tolist())
        self._stop_set = set(delim) | self._eos
        self.stop_ids = torch.tensor(sorted(self._stop_set), device=self.device)
        self._stop_tab, self._eos_tab = self._table(self.stop_ids), self._table(self.eos_ids)
        self._texts: dict = {}
        self._steps_memo: dict = {}
        self._ctx_decode = not _decodes_piecewise(tokenizer, texts, delim[0])
        self._decode_ids = _fast_decode(tokenizer, vocab)
        # False: the decoding loop in torch ops even where rlfuse._C.DecodeLoop applies
        self.step_kernel = True
        # False: DecodeLoop.step over torch's softmax even at top_p = 1 (for comparisons)
        self.fused_step = True
        self._cache_template = None       # an empty DynamicCache, copied for every decode

    def _eos_set(self) -> set:
        ids = {int(self.tokenizer.eos_token_id)}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, (list, tuple)):
            ids.update(int(e) for e in extra)
        return ids

    # -- model calls ------------------------------------------------------------------
    def _forward(self, **kw):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model(**kw)
        self.counters.model_seconds += time.perf_counter() - t0
        self.counters.forward_calls += 1
        return out

    def root_states(self, problems, prompts):
        states = []
        encoded = self.tokenizer(list(prompts)).input_ids if len(prompts) else []
        for p, s, ids in zip(problems, prompts, encoded):
            ids = list(ids)
            if not ids:
                raise ValueError(f"problem {p}: the prompt encodes to no tokens; the tokenizer "
                                 "must add a BOS token or the prompt must be non-empty")
            states.append(StepState(problem=p, prompt=s, ids=ids))
        return states

    def _prefill(self, states: list[StepState]) -> None:
        """Encode ``ids[:-1]`` of each state once (left-padded batch) and keep its KV."""
        seqs = [st.ids[:-1] for st in states]
        lens = [len(s) for s in seqs]
        T = max(lens)
        if T == 0:
            for st in states:
                st.kv = None
            return
        # left-padded rows built as lists: one tensor each, not two writes per row
        pad = self.pad_id
        ids = torch.tensor([[pad] * (T - n) + s for s, n in zip(seqs, lens)],
                           dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * (T - n) + [1] * n for n in lens], dtype=torch.long,
                            device=self.device)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        cache = _full_cache(self.model.config)
        self._forward(input_ids=ids, attention_mask=mask, position_ids=pos,
                      past_key_values=cache, use_cache=True, logits_to_keep=1)
        self.counters.encoded += sum(lens)
        layers = _KVLayers((layer.keys, layer.values) for layer in cache.layers)
        for i, st in enumerate(states):
            st.kv = KVSlice(layers, i, T - lens[i], T) if lens[i] else None

    def _decode(self, states: list[StepState], repeats, max_new_tokens: int,
                stop: torch.Tensor, split: Optional[torch.Tensor] = None,
                budget: Optional[list] = None, step_cap: int = 0) -> "_Decoded":
        """Sample ``repeats`` continuations per state (an int, or one count per state;
        state-major rows) until a token marked in the bool table ``stop`` (``_stop_tab``:
        step delimiters and EOS, ``_eos_tab``: EOS) or ``max_new_tokens``; ``budget`` (one
        int per row, with ``split``): a row also stops at its ``budget[r]``-th token marked
        in ``split`` (a rollout's ``max_depth`` steps); ``step_cap`` (with ``split``): a row
        also stops at its ``step_cap``-th token after its last ``split`` token (a step that
        runs to ``max_new_tokens_per_step``, where the tree's step ends too)."""
        t0 = time.perf_counter()
        try:
            return self._decode_impl(states, repeats, max_new_tokens, stop, split, budget,
                                     step_cap)
        finally:
            self.counters.decode_seconds += time.perf_counter() - t0

    def _decode_impl(self, states, repeats, max_new_tokens, stop, split, budget,
                     step_cap=0) -> "_Decoded":
        need = [st for st in states if st.kv is None and len(st.ids) > 1]
        if need:
            self._prefill(need)
        N = len(states)
        reps = [repeats] * N if isinstance(repeats, int) else list(repeats)
        lens = [len(st.ids) - 1 for st in states]    # cached tokens per state
        C = max(lens)
        dev = self.device
        # per sampled row (state-major): cached tokens, last prefix token
        row_lens = [n for n, r in zip(lens, reps) for _ in range(r)]
        R = len(row_lens)
        # the attention mask of every step is a prefix of one preallocated buffer
        pos = torch.tensor(row_lens, device=dev)
        mask = (torch.arange(C + max_new_tokens, device=dev)[None, :]
                >= (C - pos)[:, None]).long()
        pos = pos[:, None]
        tok = torch.tensor([st.ids[-1] for st, r in zip(states, reps) for _ in range(r)],
                           device=dev)[:, None]
        # Re-sent: the one uncached last token per sampled row (prompts were prefilled once).
        self.counters.encoded += R
        self.counters.encoded_naive += sum(row_lens) + R
        if self._cache_template is None:
            self._cache_template = _full_cache(self.model.config)
        # On the CPU the prefixes are packed by the first forward's cache update, straight
        # into the tensor that update makes anyway (see _packed_layer_class); elsewhere
        # packed here into a cache that the update then extends.
        plan = _cpu_plan(states, lens, C, reps) if C > 0 else None
        cache = _deferred_cache(plan, self.model.config, self._cache_template) \
            if plan is not None else None
        if cache is None:
            layer_kv = _pack(states, lens, C, reps) if C > 0 else []
            cache = _cache_from(layer_kv, self.model.config, self._cache_template)
        kernel = self._step_kernel(dev)
        loop = self._loop_kernel if kernel is not None else self._loop_torch
        if budget is not None and (split is None or len(budget) != R):
            raise ValueError("rlfuse.search.llm_gen: a step budget needs a split table and "
                             "one value per sampled row")
        if step_cap and split is None:
            raise ValueError("rlfuse.search.llm_gen: a step cap needs a split table")
        toks, length, stopped, lp, first = loop(kernel, cache, tok, pos, mask, C, R,
                                                max_new_tokens, stop, split, budget, step_cap)
        return _Decoded(toks, length, stopped, lp,
                        _KVLayers((layer.keys, layer.values) for layer in cache.layers), C,
                        row_lens, _rows(toks, length), first)

    def _step_kernel(self, dev):
        """``rlfuse._C.DecodeLoop`` where the decoding loop may use it (CPU tensors, the
        extension built, the CPU backend chosen for ``token_logprobs``), else None."""
        from rlfuse import _backend

        if not self.step_kernel or dev.type != "cpu" or \
                _backend.resolve(None, dev, "token_logprobs") != "cpu":
            return None
        return getattr(_backend.cpu_module(), "DecodeLoop", None)

    def _loop_kernel(self, kernel, cache, tok, pos, mask, C, R, max_new_tokens, stop, split,
                     budget=None, step_cap=0):
        """The decoding loop with one ``rlfuse._C.DecodeLoop`` call per step after the
        forward: with temperature > 0 and no nucleus, ``step_logits`` samples from the
        logits (softmax, CDF inversion at the loop's pre-drawn uniforms and raw log-probs
        fused); with a nucleus, ``step`` inverts the CDF of :func:`_probs`; greedy,
        ``step`` takes the argmax.  The same draws as :meth:`_loop_torch`, hence the same
        tokens except where a draw falls within rounding of a CDF boundary; log-probs to
        float32 accuracy (not the same bits)."""
        from rlfuse import _backend

        Tm = max_new_tokens
        toks = torch.empty(R, Tm, dtype=torch.long)
        lp = torch.empty(R, Tm, dtype=torch.float32)
        length = torch.zeros(R, dtype=torch.long)
        first = torch.zeros(R, dtype=torch.long) if split is not None else None
        split = split.contiguous() if split is not None else None
        done = torch.zeros(R, dtype=torch.bool)
        cur = tok.contiguous()           # [R, 1]: the input ids, rewritten by every step
        pos = pos.contiguous()           # [R, 1]: the position ids, advanced by every step
        stop = stop.contiguous()
        # steps left per row (decremented by the kernel at every split token)
        budget_t = torch.tensor(budget, dtype=torch.long) if budget is not None else None
        since = torch.zeros(R, dtype=torch.long) if step_cap else None   # tokens this step
        loop = kernel(R, Tm, self.pad_id, [
            stop.data_ptr(), stop.shape[0], split.data_ptr() if split is not None else 0,
            split.shape[0] if split is not None else 0], [
            done.data_ptr(), cur.data_ptr(), toks.data_ptr(), lp.data_ptr(), length.data_ptr(),
            first.data_ptr() if first is not None else 0, pos.data_ptr()],
            budget_t.data_ptr() if budget_t is not None else 0,
            since.data_ptr() if since is not None else 0, step_cap)
        greedy, temp, top_p = self.temperature == 0, self.temperature, self.top_p
        fused = not greedy and top_p >= 1.0 and self.fused_step
        # the loop's uniforms, drawn at once: row t for step t (as _loop_torch)
        draws = None if greedy else self._draws(Tm, R)
        u0 = draws.data_ptr() if draws is not None else 0
        nt = V = None
        t = 0
        for t in range(Tm):
            logits = self._forward(input_ids=cur, attention_mask=mask[:, :C + t + 1],
                                   position_ids=pos, past_key_values=cache,
                                   use_cache=True).logits[:, -1]
            if logits.dtype != torch.float32 or logits.stride(-1) != 1:
                logits = logits.float().contiguous()
            if nt is None:
                V = logits.shape[-1]
                nt = _backend.threads_for(R * V)
            if fused:
                live = loop.step_logits(u0 + 4 * R * t, logits.data_ptr(), logits.stride(0),
                                        V, t, temp, nt)
            else:
                if greedy:
                    am, probs = logits.argmax(-1), None
                else:
                    probs = _probs(logits, temp, top_p)
                    if not probs.is_contiguous() or probs.dtype != torch.float32:
                        probs = probs.float().contiguous()   # the kernel reads [R, V] rows
                live = loop.step(probs.data_ptr() if probs is not None else 0,
                                 u0 + 4 * R * t if not greedy else 0,
                                 am.data_ptr() if greedy else 0, logits.data_ptr(),
                                 logits.stride(0), V, t, nt)
            if live < 0:
                raise RuntimeError(f"rlfuse.search.llm_gen: sampled token id out of range "
                                   f"in row {-1 - live}")
            if live == 0:
                break
        T = t + 1
        stopped = length > 0
        return (toks[:, :T], length.masked_fill_(~stopped, T), stopped,
                lp[:, :T].contiguous(), _first_hits(first))

    def _draws(self, steps: int, R: int) -> torch.Tensor:
        """The uniforms of one decoding loop: ``[steps, R]`` float32, row t for step t,
        one generator call (both loops, so they sample with the same draws)."""
        return torch.rand(steps, R, generator=self.generator, device=self.device,
                          dtype=torch.float32)

    def _loop_torch(self, kernel, cache, tok, pos, mask, C, R, max_new_tokens, stop, split,
                    budget=None, step_cap=0):
        """The decoding loop in torch ops (any device)."""
        from rlfuse.ops import token_logprobs

        dev = tok.device
        done = torch.zeros(R, dtype=torch.bool, device=dev)
        ends = torch.zeros(R, dtype=torch.long, device=dev)   # t + 1 where a row stopped
        left = torch.tensor(budget, device=dev) if budget is not None else None
        since = torch.zeros(R, dtype=torch.long, device=dev) if step_cap else None
        out_tok, out_lp = [], []
        draws = self._draws(max_new_tokens, R) if self.temperature != 0 else None
        for t in range(max_new_tokens):
            logits = self._forward(input_ids=tok, attention_mask=mask[:, :C + t + 1],
                                   position_ids=pos, past_key_values=cache,
                                   use_cache=True).logits[:, -1].float()
            nxt = _sample(logits, self.temperature, self.top_p, self.generator,
                          draws[t] if draws is not None else None)
            if t == 0 and logits.shape[-1] > stop.shape[0]:      # wider than the vocabulary
                stop = torch.cat([stop, stop.new_zeros(logits.shape[-1] - stop.shape[0])])
            if t == 0 and split is not None and logits.shape[-1] > split.shape[0]:
                split = torch.cat([split, split.new_zeros(logits.shape[-1] - split.shape[0])])
            # log-probs of the raw distribution: kept as logits and done in one call at
            # the end while they are small, else one call per step
            out_lp.append(logits if R * logits.shape[-1] * max_new_tokens <= _LOGITS_BATCH
                          else token_logprobs(logits, nxt))
            if t:
                nxt.masked_fill_(done, self.pad_id)    # rows that stopped: padding
            out_tok.append(nxt)
            newly = stop[nxt] & ~done
            if left is not None or since is not None:
                s_hit = split[nxt] & ~done
                if left is not None:    # a row's budget-th split token stops it too
                    left -= s_hit.long()
                    newly |= s_hit & (left <= 0)
                if since is not None:   # and its step_cap-th token without one
                    since = torch.where(s_hit, 0, since + 1)
                    newly |= ~s_hit & ~done & (since >= step_cap)
            ends.masked_fill_(newly, t + 1)
            done |= newly
            if bool(done.all()):
                break
            tok, pos = nxt[:, None], pos + 1
        toks = torch.stack(out_tok, 1)                       # [R, T]
        T = toks.shape[1]
        stopped = ends > 0
        # a row's length: up to and including its stop token, else every token
        length = torch.where(stopped, ends, torch.full((R,), T, device=dev))
        if out_lp[0].dim() == 2:
            lp = token_logprobs(torch.stack(out_lp, 1), toks)
        else:
            lp = torch.stack(out_lp, 1)
        # after a row's stop: padding, log-prob 0 (as the kernel loop writes)
        lp.masked_fill_(torch.arange(T, device=dev)[None, :] >= length[:, None], 0.0)
        first = None
        if split is not None:        # the first token of each row in `split`, up to its end
            if split.shape[0] < stop.shape[0]:
                split = torch.cat([split, split.new_zeros(stop.shape[0] - split.shape[0])])
            hit = split[toks] & (torch.arange(T, device=dev)[None, :] < length[:, None])
            first = torch.where(hit.any(1), hit.int().argmax(1) + 1, 0)
        return toks, length, stopped, lp, _first_hits(first)

    def _table(self, ids: torch.Tensor) -> torch.Tensor:
        """A bool lookup table over token ids (``table[tok]``: ``tok`` is one of ``ids``):
        one index per decoding step instead of ``torch.isin``.  Sized by the larger of the
        tokenizer and the model's vocabulary (logits may be wider than the tokenizer)."""
        V = max(len(self.tokenizer), int(getattr(self.model.config, "vocab_size", 0) or 0),
                int(ids.max()) + 1)
        tab = torch.zeros(V, dtype=torch.bool, device=self.device)
        tab[ids] = True
        return tab

    def _child(self, st: StepState, d: "_Decoded", r: int, n: int, with_kv: bool) -> StepState:
        """The state after the first ``n`` sampled tokens of row ``r`` (one step)."""
        child = StepState(problem=st.problem, prompt=st.prompt, ids=st.ids + d.rows[r][:n])
        if with_kv and self.kv_reuse:
            child.kv = KVSlice(d.layers, r, d.C - d.lens[r], d.C + n)
        return child

    def _text(self, ids: list, ctx: Optional[int] = None) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=True)``, memoised: sampled steps
        repeat across rollouts and searches, and a decode call costs several microseconds
        of Python per step.  ``ctx``: the token before ``ids``; with a tokenizer that does
        not decode piece by piece (``_ctx_decode``: e.g. a SentencePiece decoder that strips
        a sequence's leading space), the text ``ids`` add after it, so that joined step
        texts equal the decode of the whole sequence."""
        if ctx is None or not self._ctx_decode:
            return _memoised(self._texts, tuple(ids), ids, self._decode_ids)
        return _memoised(self._texts, (ctx, tuple(ids)), ids,
                         lambda ids: self._decode_after(ctx, ids))

    def _decode_after(self, ctx: int, ids: list) -> str:
        dec = self._decode_ids
        head, full = dec([ctx]), dec([ctx] + list(ids))
        return full[len(head):] if full.startswith(head) else dec(ids)

    def _step_text(self, ids: list, ctx: Optional[int] = None):
        """(text, ended, n) of one step's token ids (the last may be a stop token), memoised
        like :meth:`_text`: ``n`` is the step's length in tokens, ``len(ids)`` unless the
        delimiter's text is complete before the last token (a delimiter several tokens
        can spell, such as ``"\n\n"`` from two ``"\n"``): then the step is the shortest
        prefix of ``ids`` whose text holds it."""
        key = tuple(ids) if ctx is None or not self._ctx_decode else (ctx, tuple(ids))
        return _memoised(self._steps_memo, key, ids, lambda ids: self._step_text_of(ids, ctx))

    def _step_text_of(self, ids: list, ctx: Optional[int] = None):
        if ids and ids[-1] in self._eos:
            return self._text(ids[:-1], ctx), "eos", len(ids)
        text = self._text(ids, ctx)
        delim = self.step_delimiter
        cut = text.find(delim)
        if ids and ids[-1] in self._stop_set and cut >= 0:
            if cut + len(delim) < len(text):      # text after the delimiter: where it ends
                for j in range(1, len(ids)):
                    head = self._text(ids[:j], ctx)
                    if delim in head:
                        return head, "delimiter", j
            return text, "delimiter", len(ids)
        return text, "length", len(ids)

    def _candidates(self, states, k: int, d: "_Decoded", first: torch.Tensor):
        """Candidates from the first ``first[r]`` tokens of every row."""
        from rlfuse.ops import reduce_sequences

        steps = torch.arange(d.toks.shape[1], device=self.device)[None, :]
        sums = reduce_sequences(d.lp, mask=steps < first[:, None])[0].tolist()
        first_l, rows = first.tolist(), d.rows
        out = []
        for i, st in enumerate(states):
            cands = []
            for j in range(k):
                r = i * k + j
                n = first_l[r]
                text, ended, m = self._step_text(rows[r][:n], st.ids[-1])
                lp = sums[r]
                if m < n:     # the delimiter's text ended before the stop token
                    lp, n = float(d.lp[r, :m].double().sum()), m
                child = self._child(st, d, r, n, ended == "delimiter")
                child.steps = st.steps + (text,)
                cands.append(Candidate(text, n, lp, ended, child))
            out.append(cands)
        return out

    def sample_steps(self, states, k):
        if not states:
            return []
        d = self._decode(list(states), k, self.max_new_tokens, self._stop_tab)
        for r, n in enumerate(d.length.tolist()):
            self.counters.add_generated(states[r // k].problem, n)
        return self._candidates(states, k, d, d.length)

    def sample_rollouts(self, states, k, max_steps):
        ks = [k] * len(states) if isinstance(k, int) else list(k)
        ms = _per_state(max_steps, len(states))
        live = [i for i, n in enumerate(ks) if n > 0]
        out: list[list] = [[] for _ in states]
        if not live:
            return out
        # a rollout ends at EOS, after its state's remaining steps (max_depth), or at a
        # step of max_new_tokens tokens without a delimiter (a "length" step: terminal,
        # scored on its own text), where the tree's trace would end
        d = self._decode([states[i] for i in live], [ks[i] for i in live],
                         max(1, max(ms[i] for i in live)) * self.max_new_tokens,
                         self._eos_tab, split=self._stop_tab,
                         budget=[max(ms[i], 1) for i in live for _ in range(ks[i])],
                         step_cap=self.max_new_tokens)
        ends = d.first_split
        lens = d.length.tolist()
        cap = self.max_new_tokens
        # log-prob prefix sums of every row (float64, rows of W = T + 1 starting at 0) in
        # a flat array: read at the step boundaries only, no Python float per token
        W = d.lp.shape[1] + 1
        lpc = array.array("d", bytes(8 * len(lens) * W))
        torch.cumsum(d.lp.cpu(), 1, dtype=torch.float64,
                     out=torch.frombuffer(lpc, dtype=torch.float64).view(-1, W)[:, 1:])
        # the first step of every row, as _split makes it (inlined: ~1000 rows a search,
        # and so are the memo lookups of _text and _step_text)
        eos, rows, text, step_text = self._eos, d.rows, self._text, self._step_text
        texts, steps_memo = self._texts, self._steps_memo
        cm = self._ctx_decode          # memo keys with the context token: no inline lookups
        kv = (d.layers, d.C, d.lens) if self.kv_reuse else None
        if not self.kv_reuse:      # the tails keep the rows, not the batch's cache
            d = d._replace(layers=None)
        r0 = 0
        for i in live:
            st, r1 = states[i], r0 + ks[i]
            done, row_out = st.completion, out[i]
            problem, prompt, steps, ids = st.problem, st.prompt, st.steps, st.ids
            ctx = ids[-1]          # the token before the row's (see _text)
            for r in range(r0, r1):
                n, row = lens[r], rows[r]
                # the rollout's text: its tokens but EOS (only the last one can be EOS)
                body = row[:n - 1] if n and row[n - 1] in eos else row[:n]
                got = texts.get(tuple(body)) if not cm else None
                comp = done + (got if got is not None else text(body, ctx))
                if n <= 0:
                    row_out.append((None, comp))
                    continue
                end, o = min(ends[r] or n, n, cap), r * W
                seg = row[:end]
                got = steps_memo.get(tuple(seg)) if not cm else None
                t, ended, m = got if got is not None else step_text(seg, ctx)
                if m < end:        # the delimiter's text ended before the stop token
                    end, seg = m, seg[:m]
                child = StepState(problem, prompt, steps + (t,), ids + seg)
                c = Candidate(t, end, lpc[o + end] - lpc[o], ended, child)
                if ended == "delimiter":
                    if kv is not None:
                        child.kv = KVSlice(kv[0], r, kv[1] - kv[2][r], kv[1] + end)
                    c.tail = (d, r, end, n, lpc, o)
                row_out.append((c, comp))
            self.counters.add_generated(problem, sum(lens[r0:r1]))
            r0 = r1
        return out

    def continue_tail(self, state, tail):
        return self._split(state, tail)

    def _split(self, st: StepState, tail, end: Optional[int] = None) -> Optional[Candidate]:
        """The next step of a sampled rollout: row ``r`` of ``d`` from token ``start``
        (``lpc[o + j]``: the row's log-prob sum over its first ``j`` tokens) to ``end``
        (default: found here, after the first step-stop token or at the rollout's end)."""
        d, r, start, length, lpc, o = tail
        if start >= length:
            return None
        row = d.rows[r]
        if end is None:
            stops = self._stop_set
            end = length
            for j in range(start, min(length, start + self.max_new_tokens)):
                if row[j] in stops:
                    end = j + 1
                    break
            else:       # no stop within max_new_tokens: a "length" step (terminal)
                end = min(length, start + self.max_new_tokens)
        seg = row[start:end]
        text, ended, m = self._step_text(seg, row[start - 1] if start else st.ids[-1])
        if m < len(seg):           # the delimiter's text ended before the stop token
            end, seg = start + m, seg[:m]
        n = end - start
        child = StepState(st.problem, st.prompt, st.steps + (text,), st.ids + seg)
        c = Candidate(text, n, lpc[o + end] - lpc[o + start], ended, child)
        if ended == "delimiter":
            if self.kv_reuse:
                child.kv = KVSlice(d.layers, r, d.C - d.lens[r], d.C + end)
            c.tail = (d, r, end, length, lpc, o)
        return c

    def rollout(self, states, max_steps, repeats=1):
        if not states:
            return []
        ms = _per_state(max_steps, len(states))
        d = self._decode(list(states), repeats, max(1, max(ms)) * self.max_new_tokens,
                         self._eos_tab, split=self._stop_tab,
                         budget=[max(m, 1) for m in ms for _ in range(repeats)],
                         step_cap=self.max_new_tokens)
        out = []
        lens, rows = d.length.tolist(), d.rows
        for r in range(len(rows)):
            st, n = states[r // repeats], lens[r]
            self.counters.add_generated(st.problem, n)
            text = self._text(rows[r][:n], st.ids[-1])
            out.append((st.completion + text, n))
        return out


def _decodes_piecewise(tokenizer, texts: list, ctx: int) -> bool:
    """Whether ``decode(a + b) == decode(a) + decode(b)`` for the step search's cuts: checked
    for every token b after the context token ``ctx`` (a delimiter token, which every step
    but the first follows; ``texts``: every token decoded on its own).  False for e.g.
    Llama-2 / Mistral SentencePiece tokenizers, whose decoder strips the leading space of a
    sequence (a step decoded on its own would lose the space it has in the completion)."""
    special = set(tokenizer.all_special_ids)
    dec = lambda batch: tokenizer.batch_decode(batch, skip_special_tokens=True)  # noqa: E731
    head = dec([[ctx]])[0]
    V = len(texts)
    for i in range(0, V, 8192):
        pairs = dec([[ctx, b] for b in range(i, min(i + 8192, V))])
        for b, p in enumerate(pairs, i):
            if p != head + ("" if b in special else texts[b]):
                return False
    return True


def _per_state(max_steps, n: int) -> list:
    """``max_steps`` (an int, or one per state) as a list of n ints."""
    if isinstance(max_steps, int):
        return [max_steps] * n
    out = [int(m) for m in max_steps]
    if len(out) != n:
        raise ValueError(f"max_steps: {len(out)} values for {n} states")
    return out


def _memoised(memo: dict, key, ids: list, make):
    """``make(ids)`` through ``memo`` under ``key`` (cleared when it holds ``_TEXT_MEMO``
    entries)."""
    got = memo.get(key)
    if got is None:
        if len(memo) >= _TEXT_MEMO:
            memo.clear()
        got = memo[key] = make(ids)
    return got


def _rows(toks: torch.Tensor, length: torch.Tensor) -> list:
    """Every row of ``toks`` up to its ``length`` as a Python list (the padding after a
    stop is never read: on the CPU it is not converted either)."""
    if toks.device.type != "cpu":
        return [row[:n] for row, n in zip(toks.tolist(), length.tolist())]
    a = toks.numpy()
    return [a[r, :n].tolist() for r, n in enumerate(length.tolist())]


def _first_hits(first: Optional[torch.Tensor]) -> Optional[list]:
    """Per row: 1 + the position of its first token in the ``split`` table, 0 for none."""
    return None if first is None else first.tolist()


def _fast_decode(tokenizer, vocab: int):
    """``ids -> tokenizer.decode(ids, skip_special_tokens=True)``.  For a fast tokenizer
    that cleans up no spaces that call is the Rust backend's ``decode`` behind ~2 us of
    Python wrappers, so the backend is called directly, after checking that both agree
    on the whole vocabulary (in runs of 64 ids); otherwise the tokenizer's own decode."""
    slow = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False) or \
            not callable(getattr(backend, "decode", None)):
        return slow

    def fast(ids):
        return backend.decode(ids, skip_special_tokens=True)

    try:
        for i in range(0, vocab, 64):
            ids = list(range(i, min(i + 64, vocab)))
            if fast(ids) != slow(ids):
                return slow
    except Exception:       # noqa: BLE001 (any failure: keep the tokenizer's own decode)
        return slow
    return fast


_TEXT_MEMO = 1 << 16         # decoded texts kept by HFStepModel._text
_LOGITS_BATCH = 1 << 24     # logits kept for one log-prob call per decode (64 MiB f32)


def _pack(states, lens, C: int, reps: list, kernel: bool = True) -> list:
    """Per layer (keys, values) ``[R, H, C, D]``: every state's cache slice right-aligned
    in C columns, repeated ``reps[i]`` times (state-major rows), the columns in front
    padded with finite values (attention masks them: they get weight exactly 0).

    On the CPU one call of ``rlfuse._C.kv_pack`` per tensor copies every row's slice
    from its source batch in one pass (zeros in front).  Elsewhere (or without the
    extension, or with ``kernel=False``) one ``index_select`` per layer per source batch
    gathers the rows, their repeats and the padding at once: the padding columns repeat
    the state's first cached token, rather than reading the source row's own padding,
    which may hold anything.  A state with no cached token gets zeros on both paths."""
    if kernel:
        packed = _pack_cpu(states, lens, C, reps)
        if packed is not None:
            return packed
    N = len(states)
    groups: dict[int, tuple] = {}
    empty: list[int] = []
    r = 0
    for i in range(N):
        n = reps[i]
        if not n:
            continue
        if lens[i]:
            kv = states[i].kv
            g = groups.get(id(kv.layers))
            if g is None:
                g = groups[id(kv.layers)] = (kv.layers, [], [], [], [])
            g[1].extend(range(r, r + n))
            g[2].extend([kv.row] * n)
            g[3].extend([kv.start] * n)
            g[4].extend([C - lens[i]] * n)
        else:
            empty.extend(range(r, r + n))
        r += n
    R = r
    dev = next(iter(groups.values()))[0][0][0].device
    cols = torch.arange(C, device=dev)
    plan = []
    for layers, out_rows, rows, first, off in groups.values():
        # column of the source cache for every packed column (padding: the first token)
        src = torch.tensor(first, device=dev)[:, None] + \
            (cols[None, :] - torch.tensor(off, device=dev)[:, None]).clamp_(min=0)
        whole = len(groups) == 1 and not empty          # rows already in order 0..R-1
        plan.append((layers, torch.tensor(rows, device=dev), src, {},
                     None if whole else torch.tensor(out_rows, device=dev)))
    out = []
    for li in range(len(plan[0][0])):
        packed = []
        for which in (0, 1):
            dst = None
            for layers, rows, src, flat, out_rows in plan:
                src_t = layers[li][which]
                _, H, T, D = src_t.shape
                idx = flat.get((H, T))
                if idx is None:     # row of the source viewed as [Rs * H * T, D]
                    base = rows[:, None, None] * (H * T) + \
                        torch.arange(0, H * T, T, device=dev)[None, :, None]
                    idx = flat[(H, T)] = (base + src[:, None, :]).reshape(-1)
                g = src_t.reshape(-1, D).index_select(0, idx).view(-1, H, C, D)
                if out_rows is None:
                    dst = g
                    break
                if dst is None:
                    dst = src_t.new_empty(R, H, C, D)
                    if empty:
                        dst[empty] = 0
                dst.index_copy_(0, out_rows, g)
            packed.append(dst)
        out.append(tuple(packed))
    return out


def _pack_cpu(states, lens, C: int, reps: list) -> Optional[list]:
    """``_pack`` through ``rlfuse._C.kv_pack``: the tensors of :func:`_cpu_plan`'s plan, or
    None where it does not apply."""
    plan = _cpu_plan(states, lens, C, reps)
    if plan is None:
        return None
    return [tuple(plan.tensor(li, which) for which in (0, 1)) for li in range(plan.L)]


class _CpuPlan:
    """What ``rlfuse._C.kv_pack`` needs to pack one generation batch's prefixes: the
    source tensors of every layer (pointer, byte strides, extent), one plan row per state
    (source, row, first column, columns, repeats), R, C and each layer's (H, D, dtype).
    It holds the source caches themselves too (``groups``): the packing may run later (in
    the first forward's cache update) and its raw pointers must stay valid until then."""

    __slots__ = ("sources", "plan", "R", "C", "L", "shapes", "groups")

    def tensor(self, li: int, which: int, new: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layer ``li``'s keys (``which`` 0) or values (1) packed into ``[R, H, C, D]``;
        with ``new`` (``[R, H, T, D]``) into ``[R, H, C + T, D]`` whose last T columns are
        ``new`` (a cache update's output, written once)."""
        H, D, dtype = self.shapes[li][which]
        T = 0 if new is None else new.shape[2]
        dst = torch.empty(self.R, H, self.C + T, D, dtype=dtype)
        plan = self.plan
        bad = _backend_cpu().kv_pack(dst.data_ptr(), self.R, H, self.C,
                                     D * dst.element_size(), self.sources[li][which],
                                     plan.buffer_info()[0], len(plan) // 5, self.C + T)
        if bad >= 0:
            raise RuntimeError("rlfuse.search.llm_gen: a KV slice lies outside its cache "
                               f"tensor (state {bad} of {len(plan) // 5}, layer {li})")
        if T:
            dst[:, :, self.C:] = new
        return dst


def _backend_cpu():
    from rlfuse import _backend

    return _backend.cpu_module()


def _cpu_plan(states, lens, C: int, reps: list) -> Optional[_CpuPlan]:
    """The :class:`_CpuPlan` of ``_pack`` on the CPU, or None where it does not apply:
    tensors off the CPU, without the extension, of mixed dtypes or shapes, or with a
    strided last dimension.  The kernel checks every slice against its source before it
    writes anything (a bad ``KVSlice`` must not read out of bounds)."""
    from rlfuse import _backend

    if not _backend.available("cpu"):
        return None
    index: dict = {}
    groups: list = []
    plan = array.array("q")
    for st, n, k in zip(states, lens, reps):
        if n and k:
            kv = st.kv
            g = index.get(id(kv.layers))
            if g is None:
                g = index[id(kv.layers)] = len(groups)
                groups.append(kv.layers)
            plan.extend((g, kv.row, kv.start, n, k))
        else:
            plan.extend((-1, 0, 0, 0, k))
    if not groups:
        return None
    L = len(groups[0])
    if any(len(layers) != L for layers in groups):
        return None
    descs = [_kv_desc(layers) for layers in groups]
    sources, shapes = [], []
    for li in range(L):
        pair, shape = [], []
        for which in (0, 1):
            ref = descs[0][li][which]
            if ref is None:
                return None
            key = ref[0]
            srcs = []
            for d in descs:
                t = d[li][which]
                if t is None or t[0] != key:
                    return None
                srcs.append(t[1])
            pair.append(srcs)
            shape.append(key)
        sources.append(pair)
        shapes.append(shape)
    out = _CpuPlan()
    out.sources, out.plan, out.R, out.C, out.L, out.shapes = sources, plan, sum(reps), C, L, \
        shapes
    out.groups = groups
    return out


class _KVLayers(list):
    """Per layer (keys, values) of one batch's cache (the ``layers`` of ``KVSlice`` s),
    with the kernel's view of its tensors made once (:func:`_kv_desc`), not at every
    packing that reads them."""

    __slots__ = ("desc",)


def _kv_desc(layers) -> list:
    """Per layer, per keys / values: ``((H, D, dtype), [pointer, byte strides of rows,
    heads and columns, rows, columns], tensor)`` for ``rlfuse._C.kv_pack``, or None for a
    tensor it cannot read (off the CPU, not 4-D, a strided last dimension).  A cached
    description is used only while ``layers`` still holds the very tensors it was made
    from, at the same addresses (a copy, an unpickled or an edited ``_KVLayers`` gets a
    fresh one: its raw pointers would be another tensor's)."""
    desc = getattr(layers, "desc", None)
    if desc is not None and len(desc) == len(layers) and all(
            d is None or (d[2] is t and d[1][0] == t.data_ptr())
            for pair, dp in zip(layers, desc) for t, d in zip(pair, dp)):
        return desc
    desc = []
    for pair in layers:
        out = []
        for t in pair:
            if t.device.type != "cpu" or t.dim() != 4 or t.stride(3) != 1:
                out.append(None)
                continue
            es = t.element_size()
            out.append(((t.shape[1], t.shape[3], t.dtype),
                        [t.data_ptr(), t.stride(0) * es, t.stride(1) * es, t.stride(2) * es,
                         t.shape[0], t.shape[2]], t))
        desc.append(out)
    if isinstance(layers, _KVLayers):
        layers.desc = desc
    return desc


_PACKED_LAYER = None


def _packed_layer_class():
    """``DynamicLayer`` whose first ``update`` packs the batch's prefixes (a
    :class:`_CpuPlan`) straight into its output, ahead of the new tokens' keys and values:
    the one copy that ``DynamicLayer``'s ``torch.cat`` of a packed cache and the new
    column would make, without packing the cache into a tensor of its own first.  Until
    then ``keys`` / ``values`` are [R, H, C, D] placeholders (one element, expanded: only
    their shape is read, for the cache length); later updates are ``DynamicLayer``'s."""
    global _PACKED_LAYER
    if _PACKED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class PackedLayer(DynamicLayer):
            def update(self, key_states, value_states, *args, **kwargs):
                plan = self.pending
                if plan is None:
                    return super().update(key_states, value_states, *args, **kwargs)
                self.pending = None
                li = self.pending_layer
                self.keys = plan.tensor(li, 0, key_states)
                self.values = plan.tensor(li, 1, value_states)
                return self.keys, self.values

        _PACKED_LAYER = PackedLayer
    return _PACKED_LAYER


def _deferred_cache(plan: _CpuPlan, config, template):
    """A ``DynamicCache`` whose layers pack ``plan`` at their first update
    (:func:`_packed_layer_class`), or None when the template's layers are not plain
    ``DynamicLayer`` s (the caller packs first then)."""
    import copy

    from transformers.cache_utils import DynamicLayer

    if len(template.layers) != plan.L or \
            any(type(layer) is not DynamicLayer for layer in template.layers):
        return None
    cls = _packed_layer_class()
    cache = copy.copy(template)
    cache.layers = []
    for li, layer in enumerate(template.layers):
        layer = copy.copy(layer)
        layer.__class__ = cls
        (Hk, Dk, dt), (Hv, Dv, _) = plan.shapes[li]
        one = torch.empty(1, dtype=dt)
        layer.dtype, layer.device, layer.is_initialized = dt, one.device, True
        layer.keys = one.expand(plan.R, Hk, plan.C, Dk)
        layer.values = one.expand(plan.R, Hv, plan.C, Dv)
        layer.pending, layer.pending_layer = plan, li
        cache.layers.append(layer)
    return cache


def _full_cache(config):
    """An empty ``DynamicCache(config=config)`` whose sliding-window layers keep every
    column (``DynamicLayer``): the search reads its caches back by column (``KVSlice``),
    and a ``DynamicSlidingWindowLayer`` drops the columns that leave its window.  The
    model's attention mask still applies the window (from the config), so the outputs
    are those of the model's own cache."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cache = DynamicCache(config=config)
    if any(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers):
        cache.layers = [DynamicLayer() if isinstance(layer, DynamicSlidingWindowLayer)
                        else layer for layer in cache.layers]
    return cache


def _cache_from(layer_kv: list, config, template=None):
    """A ``DynamicCache`` holding ``layer_kv`` without copying it (the constructor's
    ``ddp_cache_data`` path concatenates, i.e. copies, every layer).  ``template``: an
    empty :func:`_full_cache` to copy instead of building one (building reads the config's
    layer types, ~50 us of Python per call)."""
    import copy

    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if template is None:
        cache = _full_cache(config)
    else:
        cache = copy.copy(template)
        cache.layers = [copy.copy(layer) for layer in template.layers]
    if not layer_kv:
        return cache
    if len(cache.layers) != len(layer_kv) or \
            any(type(layer) is not DynamicLayer for layer in cache.layers):
        return DynamicCache(ddp_cache_data=layer_kv, config=config)
    for layer, (k, v) in zip(cache.layers, layer_kv):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


class KVSlice(NamedTuple):
    """Row ``row``, columns ``start:stop`` of a batch KV cache (per layer keys and values
    ``[R, H, T, D]``): the cache of one prefix, read in place (no copy) when it is packed
    into the next generation batch.  The batch tensors live as long as a slice does."""
    layers: list
    row: int
    start: int
    stop: int


class _Decoded(NamedTuple):
    toks: torch.Tensor       # [R, T] sampled tokens (padding after a stop)
    length: torch.Tensor     # [R] tokens up to and including the first stop token
    stopped: torch.Tensor    # [R] bool
    lp: torch.Tensor         # [R, T] log-probs of the sampled tokens (raw logits; 0 after a stop)
    layers: list             # per layer (keys, values) [R, H, C + T', D] of the decode cache
    C: int                   # cache columns before the first sampled token's input
    lens: list               # [R] cached prefix tokens of each row's state
    rows: list               # toks as Python lists, each up to its length
    first_split: Optional[list] = None   # [R] 1 + first position in the split table, or 0
