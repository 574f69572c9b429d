"""A recipe field's one-line description, read from the comment beside it in the recipe class (or
the comment lines right above it): the source stays the one place a field is documented, and
``kdprune compress --help`` shows it."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from functools import lru_cache

__all__ = ["field_docs"]


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its comment, over ``cls`` and its dataclass bases (the subclass's wins)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update({k: v for k, v in _class_comments(klass).items() if v})
    return out


def _class_comments(klass: type) -> dict[str, str]:
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (a class made at run time): no descriptions
        return {}
    lines = src.splitlines()
    body = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)).body
    return {node.target.id: _trailing(lines[node.lineno - 1]) or _above(lines, node.lineno - 2)
            for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _trailing(line: str) -> str:
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(line).readline))
    except (tokenize.TokenError, IndentationError):
        return ""
    return next((t.string.lstrip("#").strip() for t in toks if t.type == tokenize.COMMENT), "")


def _above(lines: list[str], i: int) -> str:
    block: list[str] = []
    while i >= 0 and lines[i].strip().startswith("#"):
        block.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(block)
