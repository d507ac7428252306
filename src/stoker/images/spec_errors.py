"""Located errors of image specs: where a key is in the TOML text, and what went wrong.

tomllib reports no positions, so :class:`_Locator` scans the text again for the
line of every key path; :func:`_problem` turns a pydantic error into a
:class:`_Problem` (key path, line, image, message) and :func:`_format_problem`
into the ``FILE:LINE: image 'NAME': KEY.PATH: message`` line of a
:class:`~stoker.errors.UsageError`.  Used by :mod:`stoker.images.spec` and
reused by :mod:`stoker.service.config`.
"""

from __future__ import annotations

import bisect
import difflib
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel
from pydantic_core import ErrorDetails

# --- locating keys in the TOML text -------------------------------------------------------------

KeyPath = tuple[str | int, ...]
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_SCALAR_END = frozenset(",]}#\r\n")


class _Locator:
    """Line numbers of the keys, tables and array elements of a TOML text.

    tomllib reports no positions, so the (already parsed, hence valid) text is
    scanned again by a small tokenizer that only tracks paths: table headers,
    arrays of tables (their element index), dotted keys, inline tables and the
    elements of arrays.  The first line a path appears on wins.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._aot_counts: dict[KeyPath, int] = {}
        self.lines: dict[KeyPath, int] = {}
        self._scan()

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, or of its nearest ancestor that appears in the text."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    # scanning

    def _peek(self, length: int = 1) -> str:
        return self._text[self._pos : self._pos + length]

    def _record(self, path: KeyPath, pos: int) -> None:
        line = bisect.bisect_right(self._line_starts, pos)
        for end in range(1, len(path) + 1):
            self.lines.setdefault(path[:end], line)

    def _skip(self, *, newlines: bool) -> None:
        text = self._text
        while self._pos < len(text):
            char = text[self._pos]
            if char in " \t" or (newlines and char in "\r\n"):
                self._pos += 1
            elif char == "#":
                end = text.find("\n", self._pos)
                self._pos = len(text) if end < 0 else end
            else:
                return

    def _skip_past(self, token: str) -> None:
        found = self._text.find(token, self._pos)
        self._pos = len(self._text) if found < 0 else found + len(token)

    def _resolve(self, keys: list[str]) -> KeyPath:
        # A header below an array of tables refers to its latest element.
        path: KeyPath = ()
        for key in keys:
            path = (*path, key)
            count = self._aot_counts.get(path)
            if count:
                path = (*path, count - 1)
        return path

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            start = self._pos
            if self._peek(2) == "[[":
                self._pos += 2
                keys = self._key()
                self._skip_past("]]")
                if not keys:
                    continue
                array = (*self._resolve(keys[:-1]), keys[-1])
                index = self._aot_counts.get(array, 0)
                self._aot_counts[array] = index + 1
                table = (*array, index)
                self._record(table, start)
            elif self._peek() == "[":
                self._pos += 1
                keys = self._key()
                self._skip_past("]")
                table = self._resolve(keys)
                self._record(table, start)
            else:
                keys = self._key()
                if not keys:
                    self._pos += 1  # not valid TOML; tomllib would have refused it
                    continue
                self._assignment((*table, *keys), start)

    def _assignment(self, path: KeyPath, start: int) -> None:
        self._record(path, start)
        self._skip(newlines=False)
        if self._peek() == "=":
            self._pos += 1
        self._skip(newlines=False)
        self._value(path)

    def _key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self._skip(newlines=False)
            char = self._peek()
            if char in ('"', "'"):
                start = self._pos
                self._string()
                keys.append(_decode_key(self._text[start : self._pos]))
            else:
                match = _BARE_KEY_RE.match(self._text, self._pos)
                if match is None:
                    return keys
                keys.append(match.group())
                self._pos = match.end()
            self._skip(newlines=False)
            if self._peek() != ".":
                return keys
            self._pos += 1

    def _string(self) -> None:
        text = self._text
        quote = text[self._pos]
        triple = self._peek(3) == quote * 3
        self._pos += 3 if triple else 1
        while self._pos < len(text):
            char = text[self._pos]
            if char == "\\" and quote == '"':
                self._pos += 2
            elif triple and self._peek(3) == quote * 3:
                self._pos += 3
                while self._peek() == quote:  # up to two quotes may end the content
                    self._pos += 1
                return
            elif not triple and char == quote:
                self._pos += 1
                return
            else:
                self._pos += 1

    def _value(self, path: KeyPath) -> None:
        char = self._peek()
        if char in ('"', "'"):
            self._string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            while self._pos < len(self._text) and self._text[self._pos] not in _SCALAR_END:
                self._pos += 1

    def _array(self, path: KeyPath) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip(newlines=True)
            char = self._peek()
            if char in ("]", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                index += 1
                continue
            element = (*path, index)
            self._record(element, self._pos)
            before = self._pos
            self._value(element)
            if self._pos == before:
                self._pos += 1

    def _inline_table(self, path: KeyPath) -> None:
        self._pos += 1
        while True:
            self._skip(newlines=True)
            char = self._peek()
            if char in ("}", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                continue
            start = self._pos
            keys = self._key()
            if not keys:
                self._pos += 1
                continue
            self._assignment((*path, *keys), start)


def _decode_key(raw: str) -> str:
    try:
        value = tomllib.loads(f"k = {raw}")["k"]
    except tomllib.TOMLDecodeError:
        return raw[1:-1]
    return value if isinstance(value, str) else raw[1:-1]


# --- error reporting ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Problem:
    path: KeyPath
    line: int | None
    image: str | None
    message: str


def _key_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY_RE.fullmatch(part) else '"' + part.replace('"', '\\"') + '"'
            out += f".{text}" if out else text
    return out


_TOML_TYPES: dict[type, str] = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    list: "an array",
    tuple: "an array",
    dict: "a table",
}
_EXPECTED: dict[str, str] = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "tuple_type": "an array",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
}


def _toml_type(value: object) -> str:
    for kind, name in _TOML_TYPES.items():
        if isinstance(value, kind):
            return name
    return f"a {type(value).__name__}"


def _unwrap(annotation: object) -> object:
    """``Annotated[X, ...]`` and ``X | None`` -> ``X``."""
    while True:
        if typing.get_origin(annotation) is Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
            continue
        return annotation


def _model_at(root: type[BaseModel], path: KeyPath) -> type[BaseModel]:
    """The model class whose keys live at ``path`` in a document of ``root``.

    Table keys and array indices name elements, not fields (``pools.NAME``,
    ``files[0]``), and are stepped over.
    """
    annotation: object = root
    for part in path:
        annotation = _unwrap(annotation)
        if typing.get_origin(annotation) in (dict, tuple, list):
            annotation = typing.get_args(annotation)[
                -1 if typing.get_origin(annotation) is dict else 0
            ]
            continue
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        field = annotation.model_fields.get(str(part))
        if field is None:
            break
        annotation = field.annotation
    annotation = _unwrap(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return root


_BOUNDS: dict[str, str] = {
    "greater_than_equal": ">=",
    "less_than_equal": "<=",
    "greater_than": ">",
    "less_than": "<",
}


def _describe(
    error: ErrorDetails,
    path: KeyPath,
    root: type[BaseModel],
    *,
    missing: typing.Mapping[KeyPath, str] | None = None,
) -> str:
    """One line on what is wrong with the value at ``path`` of a ``root`` document.

    Shared by image specs and the service's configuration.  ``missing`` adds a
    hint to "required key is missing" for particular keys.
    """
    kind = error["type"]
    value = error.get("input")
    ctx = error.get("ctx") or {}
    if kind == "missing":
        hint = (missing or {}).get(path)
        return f"required key is missing: {hint}" if hint else "required key is missing"
    if kind == "extra_forbidden":
        key = str(path[-1]) if path else "?"
        allowed = sorted(_model_at(root, path[:-1]).model_fields)
        close = difflib.get_close_matches(key, allowed, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key {key!r}{guess}; expected one of: {', '.join(allowed)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_toml_type(value)}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind == "literal_error":
        return f"expected one of {ctx.get('expected', '?')}, got {value!r}"
    if kind in _BOUNDS:
        limit = next(iter(ctx.values()), "?")
        return f"expected a number {_BOUNDS[kind]} {limit}, got {value!r}"
    return f"{error['msg']} (got {value!r})"


#: Hints for keys an image spec is often written without.
_SPEC_MISSING: dict[KeyPath, str] = {
    ("name",): 'a file with one image names it with name = "..." '
    "(a project file uses [image.NAME] tables instead)",
}


def _problem(
    error: ErrorDetails,
    prefix: KeyPath,
    image: str | None,
    locator: _Locator,
    root: type[BaseModel],
) -> _Problem:
    """The problem ``error`` of validating ``root`` (an image) at ``prefix`` in the text."""
    loc = tuple(error["loc"])
    if loc and loc[-1] == "[key]":  # a bad key of a table (env): point at the key
        loc = loc[:-1]
    path: KeyPath = (*prefix, *loc)
    return _Problem(
        path, locator.line_of(path), image, _describe(error, loc, root, missing=_SPEC_MISSING)
    )


def _format_problem(origin: Path, problem: _Problem) -> str:
    where = f"{origin}:{problem.line}" if problem.line is not None else f"{origin}"
    who = f"image {problem.image!r}: " if problem.image else ""
    key = f"{_key_path(problem.path)}: " if problem.path else ""
    return f"{where}: {who}{key}{problem.message}"
