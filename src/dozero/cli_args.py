"""Derive command-line flags from typed dataclasses, so defaults and help text are written once.

A field `micro_batch_size: int = 12` with the docstring `\"\"\"Sequences per step.\"\"\"` right under
it becomes `--micro-batch-size INT (default: 12) Sequences per step.`; booleans become
`--flag/--no-flag`. Used by every stage's `commands.py`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from functools import cache


@cache
def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(tp):
    """int | None -> int; Optional[str] -> str."""
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls, defaults=None, skip=(), group_title=None) -> None:
    """Add one `--field-name` per dataclass field. `defaults` (an instance) only changes the shown
    default; values the user did not give stay `None` so presets can fill them (see `apply_args`)."""
    target = parser.add_argument_group(group_title) if group_title else parser
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        shown = getattr(defaults, f.name) if defaults is not None else f.default
        help_text = f"{docs.get(f.name, '')} (default: {shown})".strip()
        help_text = help_text.replace("%", "%%")  # argparse formats help text with %: "+0.4%" would break --help
        if tp is bool:
            target.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif tp in (int, float, str):
            target.add_argument(flag, dest=f.name, type=tp, default=None, metavar=tp.__name__.upper(), help=help_text)
        # Other field types (lists, nested configs) are not command-line settable.


def apply_args(instance, args: argparse.Namespace):
    """A copy of `instance` with every field the user gave on the command line replaced."""
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(instance)
        if f.init and getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(instance, **given)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """Expand the escapes a user types in a shell, which passes them as a backslash and a letter:
    \\n, \\t, \\r and \\\\. One pass, so "\\\\n" stays a backslash followed by n."""
    import re

    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m[1]], text)
