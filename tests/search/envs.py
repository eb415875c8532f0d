"""Small deterministic environments shared by the search tests and benchmarks."""

from __future__ import annotations

import functools

import torch

from rlfuse.bench.search import HashEnv  # noqa: F401  (shared with the benchmark)
from rlfuse.search import RecurrentOutput


LINES = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 3, 6], [1, 4, 7], [2, 5, 8],
                      [0, 4, 8], [2, 4, 6]])


_POW3 = torch.tensor([3 ** i for i in range(9)])


def _line_sums(cells):
    return [sum(cells[i] for i in line) for line in LINES.tolist()]


@functools.lru_cache(maxsize=None)
def _random_play_value(cells: tuple) -> float:
    """Expected outcome of uniformly random play for the player to move (+1) on `cells`."""
    vals = []
    for a in range(9):
        if cells[a] != 0:
            continue
        b = list(cells)
        b[a] = 1
        if 3 in _line_sums(b):
            vals.append(1.0)
        elif all(x != 0 for x in b):
            vals.append(0.0)
        else:
            vals.append(-_random_play_value(tuple(-x for x in b)))
    return sum(vals) / len(vals) if vals else 0.0


@functools.lru_cache(maxsize=1)
def ttt_value_table() -> torch.Tensor:
    """[3 ** 9] float32: the random-play value of every board (index sum (cell + 1) 3^i),
    0 for boards where the game is over (what random playouts estimate, without noise)."""
    table = torch.zeros(3 ** 9)
    stack = [tuple([0] * 9)]
    seen = set()
    while stack:
        cells = stack.pop()
        if cells in seen:
            continue
        seen.add(cells)
        sums = _line_sums(cells)
        if 3 in sums or -3 in sums or all(x != 0 for x in cells):
            continue
        table[sum((c + 1) * 3 ** i for i, c in enumerate(cells))] = _random_play_value(cells)
        for a in range(9):
            if cells[a] == 0:
                b = list(cells)
                b[a] = 1
                stack.append(tuple(-x for x in b))
    return table


def ttt_step(board: torch.Tensor, action: torch.Tensor) -> RecurrentOutput:
    """Tic-tac-toe from the mover's view: the mover places +1, the next state is the
    negated board (the opponent's view), discount -1 (zero-sum), reward 1 for a win, the
    value of a new state its random-play value (ttt_value_table)."""
    M = board.shape[0]
    b = board.clone()
    b[torch.arange(M), action] = 1
    win = (b[:, LINES].sum(-1) == 3).any(-1)
    full = (b != 0).all(-1)
    nxt = -b
    value = ttt_value_table()[((nxt.long() + 1) * _POW3).sum(-1)]
    return RecurrentOutput(win.float(), torch.full((M,), -1.0), torch.zeros(M, 9),
                           value, nxt, nxt != 0, win | full)


@functools.lru_cache(maxsize=None)
def ttt_value(cells: tuple) -> int:
    """Minimax value (+1 win, 0 draw, -1 loss) for the player to move (+1) on `cells`."""
    best = -2
    for a in range(9):
        if cells[a] != 0:
            continue
        b = list(cells)
        b[a] = 1
        if any(sum(b[i] for i in line) == 3 for line in LINES.tolist()):
            return 1
        if all(x != 0 for x in b):
            v = 0
        else:
            v = -ttt_value(tuple(-x for x in b))
        best = max(best, v)
    return best


def ttt_perfect_moves(cells: tuple) -> list:
    """All optimal moves for the player to move."""
    vals = {}
    for a in range(9):
        if cells[a] != 0:
            continue
        b = list(cells)
        b[a] = 1
        if any(sum(b[i] for i in line) == 3 for line in LINES.tolist()):
            vals[a] = 1
        elif all(x != 0 for x in b):
            vals[a] = 0
        else:
            vals[a] = -ttt_value(tuple(-x for x in b))
    best = max(vals.values())
    return [a for a, v in vals.items() if v == best]
