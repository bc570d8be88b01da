"""Reading a JSON request body: the one way every JSON route does it.

A body is refused before any handler sees it unless it is ``application/json``, within
``client_max_size`` (413), strict UTF-8, nested at most :data:`MAX_DEPTH` deep, valid JSON with
finite numbers, an object at the top level, and free of lone UTF-16 surrogates (``"\\ud800"`` is
valid JSON but not text: PostgreSQL, the SMTP server and ``str.encode()`` all refuse it).

Nesting is measured on the text before parsing: Python's parser recurses once per level, and a
body nested a thousand deep would otherwise end in a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from aiohttp import web

from web.errors import ApiError

# Mailroom's deepest legitimate body is three levels (a batch, its recipients, one recipient).
MAX_DEPTH = 32

# A JSON string, escapes included (the unrolled form runs in C without backtracking).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_TO_SQUARE = str.maketrans("{}", "[]")


async def read_json(request: web.Request, *, invalid: str) -> dict[str, Any]:
    """The request's JSON object, or :class:`ApiError` saying what is wrong with the body.

    ``invalid`` is the route's own error code for a body that is JSON but not acceptable (not
    an object, or text that is not text), so clients see one code per route for a 422.
    """
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "send the body as application/json")
    raw = await request.read()  # over client_max_size: 413, in the error shape
    payload = parse_json(raw)
    if not isinstance(payload, dict):
        raise ApiError(
            422,
            invalid,
            "the body must be a JSON object",
            # No field: "body" is also the name of a batch's field.
            {"problems": [{"field": None, "message": "the body must be a JSON object"}]},
        )
    found = _lone_surrogate(payload, [])
    if found is not None:
        path, character = found
        where = _dotted(path)
        problem: dict[str, Any] = {
            "field": str(path[0]),
            "message": f"{where}: contains a lone surrogate (\\u{ord(character):04x}), which is "
            "not a character; send the text as UTF-8 or as a complete surrogate pair",
        }
        if len(path) > 1 and isinstance(path[1], int):
            problem["position"] = path[1]
        raise ApiError(422, invalid, problem["message"], {"problems": [problem]})
    return payload


def parse_json(raw: bytes) -> Any:
    """``raw`` as strict UTF-8 JSON (any value), or a 400 :class:`ApiError` saying why not:
    ``malformed_json`` (not UTF-8, a BOM, ``NaN``, a huge number, not JSON) or
    ``json_too_deep`` (checked on the text, before parsing)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(
            400, "malformed_json", f"the body is not valid UTF-8 (byte {exc.start})"
        ) from None
    if too_deep(text):
        raise ApiError(
            400, "json_too_deep", f"the body nests arrays and objects more than {MAX_DEPTH} deep"
        )
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:  # cannot happen after too_deep(); kept so it can never be a 500
        raise ApiError(400, "json_too_deep", "the body nests too deep") from None
    except ValueError as exc:  # JSONDecodeError, a non-finite number, an over-long integer
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None


def lone_surrogate_at(value: Any) -> str | None:
    """Where in ``value`` (parsed JSON) the first lone surrogate is, as a dotted path, or None."""
    found = _lone_surrogate(value, [])
    return _dotted(found[0]) if found else None


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` nests arrays or objects more than ``limit`` deep (outside strings).

    Strings are removed, then everything but brackets; each pass deletes the innermost empty
    pairs, so after ``limit`` passes a pair left means deeper nesting, and a run of more than
    ``limit`` openers left is a deep body that never closes (invalid, but the parser would
    still recurse into it). Every step is a C-speed scan: a 10 MB body takes a fraction of a
    second, never a Python loop per byte.
    """
    if "[" not in text and "{" not in text:
        return False
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_TO_SQUARE)
    for _ in range(limit):
        shorter = brackets.replace("[]", "")
        if shorter == brackets:
            break
        brackets = shorter
    return "[]" in brackets or "[" * (limit + 1) in brackets


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text[:40]} is too large a number")
    return number


def _lone_surrogate(value: Any, path: list[str | int]) -> tuple[list[str | int], str] | None:
    """The path to the first string (or key) holding a lone surrogate, and that character."""
    if isinstance(value, str):
        bad = _first_surrogate(value)
        return (path or ["body"], bad) if bad else None
    if isinstance(value, dict):
        for key, item in value.items():
            bad = _first_surrogate(key)
            if bad:
                return ([*path, key.encode("utf-8", "backslashreplace").decode()], bad)
            found = _lone_surrogate(item, [*path, key])
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, [*path, index])
            if found:
                return found
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _first_surrogate(text: str) -> str | None:
    match = _SURROGATE.search(text)
    return match.group() if match else None


def _dotted(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out
