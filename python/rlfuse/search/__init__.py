"""Batched tree search: struct-of-arrays trees (:class:`Tree`), select / expand / backup
kernels (``rlfuse._C`` on the CPU, ``rlfuse._cuda`` on CUDA, a Python reference), and the
mctx-style policies :func:`puct_search` and :func:`gumbel_search`.  See docs/search.md."""

from rlfuse.search.mcts import (
    Expansion,
    RecurrentOutput,
    Root,
    SearchResult,
    completed_qvalues,
    dirichlet_noise,
    gumbel_action,
    gumbel_noise,
    gumbel_search,
    mask_logits,
    puct_search,
    select_action,
    sequential_halving_table,
    visit_policy,
)
from rlfuse.search.tree import Phases, Tree
from rlfuse.search.llm import StepSearch, beam_search, best_of_n, majority_vote  # noqa: E402, F401

__all__ = [
    "Expansion", "Phases", "RecurrentOutput", "Root", "SearchResult", "Tree",
    "completed_qvalues", "dirichlet_noise", "gumbel_action", "gumbel_noise", "gumbel_search",
    "mask_logits", "puct_search", "select_action", "sequential_halving_table", "visit_policy",
]
