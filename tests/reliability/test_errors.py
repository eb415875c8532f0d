"""The error table (tests/reliability/error_table.py, rendered in docs/errors.md): every row
raises its exception with a message naming the op, data checks give the same message on
every backend, the doc is current, and every ``raise`` in the ops' source is reached by a row
(or listed as unreachable, with the reason)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import rlfuse
from tests.reliability import error_table as E
from tests.reliability._inputs import BACKENDS, CPU_BACKENDS

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")

PKG = pathlib.Path(rlfuse.__file__).resolve().parent
SOURCES = sorted((PKG / "ops").glob("*.py")) + [PKG / "_validate.py", PKG / "_backend.py",
                                                 PKG / "search" / "tree.py",
                                                 PKG / "search" / "mcts.py"]


def _row_id(row):
    return f"{row.op}: {row.condition}"[:80]


def _raise_site(exc):
    """(file, line) of the innermost frame inside the rlfuse package."""
    site = None
    tb = exc.__traceback__
    while tb is not None:
        f = pathlib.Path(tb.tb_frame.f_code.co_filename).resolve()
        if PKG in f.parents:
            site = (f, tb.tb_lineno)
        tb = tb.tb_next
    return site


def _backends(row):
    """A data check runs on every backend that takes the rows' CPU tensors (or the row's own
    list), the others once."""
    if not row.data:
        return [None]
    return [b for b in CPU_BACKENDS if row.backends is None or b in row.backends]


@pytest.mark.parametrize("row", E.ROWS, ids=_row_id)
def test_row_raises_and_names_the_op(row):
    messages = {}
    for b in _backends(row):
        exc = E.trigger(row, b)
        msg = str(exc)
        if row.prefix is not None:
            assert msg.startswith(row.prefix), msg
        elif row.op not in ("every op",):
            assert msg.startswith(row.op.replace("_reference", "") + ":"), msg
        messages[b] = msg
    assert len(set(messages.values())) == 1, f"messages differ between backends: {messages}"


def test_doc_is_current():
    assert E.doc_table() == E.render(), (
        "docs/errors.md is out of date: run `.venv/bin/python -m tests.reliability.error_table "
        "--write`")


def _sites():
    """(file, first line, last line, innermost function, source) of every raise with an
    exception."""
    for path in SOURCES:
        text = path.read_text()

        def visit(node, func):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield from visit(child, child.name)
                    continue
                if isinstance(child, ast.Raise) and child.exc is not None:
                    yield (path, child.lineno, child.end_lineno, func,
                           ast.get_source_segment(text, child))
                yield from visit(child, func)

        yield from visit(ast.parse(text), "")


def _exempt(func, src):
    out = []
    for key in E.UNREACHABLE:
        kfunc, frag = key.split("::", 1) if "::" in key else (None, key)
        if (kfunc is None or kfunc == func) and frag in src:
            out.append(key)
    return out


@pytest.mark.skipif(set(BACKENDS) != set(CPU_BACKENDS),
                    reason="the rows build CPU tensors, which compiled Triton refuses, so the "
                           "GPU path's own raises are reached only where Triton interprets "
                           "CPU tensors (the CPU CI runs this test)")
def test_every_raise_is_reached_by_a_row():
    hit = set()
    for row in E.ROWS:
        for b in _backends(row):
            site = _raise_site(E.trigger(row, b))
            assert site is not None, f"{row.op}: {row.condition}: raised outside rlfuse"
            hit.add(site)
    missing, stale = [], set(E.UNREACHABLE)
    for path, first, last, func, src in _sites():
        reached = any(f == path and first <= line <= last for f, line in hit)
        exempt = _exempt(func, src)
        stale -= set(exempt)
        if not reached and not exempt:
            missing.append(f"{path.name}:{first}: {src.splitlines()[0]}")
        assert not (reached and exempt), f"{path.name}:{first} is listed as unreachable"
    assert not missing, "raise statements no row of the error table reaches:\n" + "\n".join(
        missing)
    assert not stale, f"UNREACHABLE entries that match no raise: {stale}"


def test_option_caches_do_not_skip_type_checks():
    """policy_loss and preference_loss cache their resolved options; 1 == 1.0 == True and
    0 == False hash alike, so the caches must be keyed by type or a valid call would let a
    wrongly typed twin through."""
    import torch

    from rlfuse.ops import policy_loss, preference_loss

    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    policy_loss(x, x, x, m, dp_size=1)
    with pytest.raises(TypeError, match="dp_size must be an int"):
        policy_loss(x, x, x, m, dp_size=1.0)
    policy_loss(x, x, x, m, ref_logp=x, kl_ratio_weighted=True)
    with pytest.raises(TypeError, match="kl_ratio_weighted must be a bool"):
        policy_loss(x, x, x, m, ref_logp=x, kl_ratio_weighted=1)
    p = torch.zeros(3)
    preference_loss(p, p, p, p, loss_type="ipo", ipo_length_normalize=False)
    with pytest.raises(TypeError, match="ipo_length_normalize must be a bool"):
        preference_loss(p, p, p, p, loss_type="ipo", ipo_length_normalize=0)
