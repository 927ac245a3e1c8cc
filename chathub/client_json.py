"""What every JSON value from a client must be, wherever it enters: a REST
body (``chathub.server.input_checks``), a socket frame
(``chathub.server.frames``) or a mode's documents (``chathub.llm.modes``).

Parsing is orjson's, which holds to RFC 8259: no ``NaN`` or ``Infinity``, no
lone surrogates, no number beyond a double. On top of that, :func:`find_problem`
refuses what parses but cannot be kept:

- a NUL character in any string or key: PostgreSQL's text refuses it (and
  SQLite would keep what PostgreSQL cannot), so no backend may be handed one;
- nesting deeper than :data:`MAX_DEPTH`: a value is stored, then serialised
  again inside larger objects (events, pages, provider requests), whose
  serialisers stop at about 255 levels.
"""

from __future__ import annotations

from typing import Any, TypeAlias

MAX_DEPTH = 64

_CONTAINERS = frozenset((dict, list, tuple))

# A path to a value, built only when a problem is reported: (parent, key).
_Path: TypeAlias = tuple["_Path", str | int] | None


def find_problem(value: Any, *, where: str = "") -> str | None:
    """The first rule ``value`` (parsed JSON) breaks, as ``"<path>: <what>"``
    (the path from ``where``, such as ``title`` or ``file_ids[2]``), or None.
    Iterative, so a deep value cannot exhaust the interpreter's stack."""
    if isinstance(value, str):
        return _nul(value, where, None)
    stack: list[tuple[Any, _Path, int]] = [(value, None, 1)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.items()
        elif isinstance(item, list | tuple):
            children = enumerate(item)
        else:
            continue
        if depth > MAX_DEPTH:
            return f"{_render(where, path, first_only=True)}: nested deeper than {MAX_DEPTH} levels"
        for key, child in children:
            if type(key) is str and "\x00" in key:
                return f"{_render(where, path)}: a key contains a NUL character (\\u0000)"
            kind = type(child)  # exact types: what a JSON parser makes, and fast
            if kind is str:
                if "\x00" in child:
                    return _nul(child, where, (path, key))
            elif kind in _CONTAINERS:
                stack.append((child, (path, key), depth + 1))
    return None


def _nul(text: str, where: str, path: _Path) -> str | None:
    if "\x00" in text:
        return f"{_render(where, path)}: contains a NUL character (\\u0000)"
    return None


def _render(where: str, path: _Path, *, first_only: bool = False) -> str:
    parts: list[str | int] = []
    while path is not None:
        path, key = path
        parts.append(key)
    parts.reverse()
    out = where
    for key in parts[:1] if first_only else parts:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else key)
    out = out or "value"
    return out if len(out) <= 80 else out[:79] + "…"
