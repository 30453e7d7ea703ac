"""What each field of a config dataclass means, read from the comments beside it in its source, so that
``help(TrainConfig)`` (or ``TrainConfig?`` in Jupyter) shows them: the comments stay the one place a field is
explained.

A field's note is the comment block right above it (section headers ``# --- ... ---`` excluded), the comment on its
line, and comment lines right below it that are indented past the ``#`` (a continuation, as in ``ema_mode``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import linecache
import re
import textwrap
import tokenize
from typing import TypeVar

C = TypeVar("C", bound=type)


@functools.lru_cache(maxsize=None)
def field_notes(cls: type) -> dict[str, str]:
    """``{field: note}`` for the dataclass ``cls`` (fields without a comment are left out; a class whose source
    cannot be read, e.g. one typed into a prompt, gives ``{}``)."""
    source = _class_source(cls)
    if source is None:
        return {}
    fields = {f.name for f in dataclasses.fields(cls)}
    comments, comment_only = _comments(source)
    spans = [(node.target.id, node.lineno, node.end_lineno or node.lineno)
             for node in ast.parse(source).body[0].body  # type: ignore[attr-defined]
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in fields]
    below: dict[str, list[int]] = {}
    for name, _, last in spans:  # a field's continuation: comment lines right below it, indented past the "#"
        row, below[name] = last + 1, []
        while comment_only.get(row):
            below[name].append(row)
            row += 1
    claimed = {row for rows in below.values() for row in rows}
    notes = {}
    for name, first, last in spans:
        above = []
        row = first - 1
        while row in comment_only and row not in claimed and not comments[row].startswith("---"):
            above.insert(0, comments[row])
            row -= 1
        beside = [comments[r] for r in range(first, last + 1) if r in comments and r not in comment_only]
        text = " ".join(part for part in (*above, *beside, *(comments[r] for r in below[name])) if part)
        if text:
            notes[name] = text
    return notes


def _class_source(cls: type) -> str | None:
    """The source of ``cls`` alone, dedented: read from its file's lines (``inspect.getsource`` parses the whole
    module to find a class, a third of a second at import for six config classes)."""
    try:
        lines = linecache.getlines(inspect.getsourcefile(cls) or "")
    except TypeError:  # a built-in or a class without a file
        return None
    header = re.compile(rf"^(\s*)class\s+{re.escape(cls.__name__)}\b")
    starts = [(i, found) for i, line in enumerate(lines) if (found := header.match(line))]
    if len(starts) == 1:
        (i, found), = starts
        indent, end = len(found.group(1)), i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        chunk = textwrap.dedent("".join(lines[i:end]))
        try:  # a header over several lines or a string at column 0 cuts the chunk short: inspect reads it whole
            ast.parse(chunk)
            return chunk
        except SyntaxError:
            pass
    try:  # two classes of that name in the file (or none found): inspect tells them apart
        return textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return None


def _comments(source: str) -> tuple[dict[int, str], dict[int, bool]]:
    """Comment text per line, and for comment-only lines whether the text is indented past the ``#``."""
    comments: dict[int, str] = {}
    comment_only: dict[int, bool] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        row = token.start[0]
        body = token.string[1:]
        comments[row] = body.strip()
        if not token.line[:token.start[1]].strip():
            comment_only[row] = body.startswith("  ")
    return comments, comment_only


def documented(cls: C) -> C:
    """Class decorator: append the fields (``name = default``: note) and the presets to ``cls.__doc__``."""
    notes = field_notes(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        note = notes.get(f.name, "")
        lines.append(textwrap.fill(f"{f.name} = {default!r}" + (f": {note}" if note else ""), width=112,
                                   initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False))
    presets = getattr(cls, "PRESETS", None)
    text = inspect.cleandoc(cls.__doc__ or "")
    if presets and "Presets:" not in text:
        text += f"\n\nPresets: {', '.join(sorted(presets))} (``{cls.__name__}.from_preset(name, **fields)``)."
    cls.__doc__ = text + "\n\nFields (name = default: what it is):\n\n" + "\n".join(lines)
    return cls

