"""User-supplied templates: a sandboxed jinja2 environment shared by validation and rendering.

Templates come from whoever submits a batch, so they run in jinja2's immutable sandbox with
``StrictUndefined`` (a missing field is an error, not an empty string) and with the operators
that can build huge strings from a tiny template (``*`` and ``**``) bounded.
"""

from __future__ import annotations

import operator
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RENDERED_CHARS = 100_000
_MAX_REPEAT = 10_000
_MAX_EXPONENT = 100


# A body template may place the unsubscribe link itself with {{ unsubscribe_url }}: drafts
# store this marker, and the worker puts each recipient's link in its place when it builds the
# message (and then adds no footer of its own).
UNSUBSCRIBE_MARKER = "%%unsubscribe_url%%"


def template_values(fields: dict[str, Any], email: str) -> dict[str, Any]:
    """What a template can read: the recipient's fields, ``email`` and ``unsubscribe_url``."""
    return {**fields, "email": email, "unsubscribe_url": UNSUBSCRIBE_MARKER}


class TemplateProblem(ValueError):
    """A template that cannot be parsed or rendered; the message says where."""


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        if op == "*" and any(isinstance(v, str | list | tuple) for v in (left, right)):
            count = right if isinstance(left, str | list | tuple) else left
            if isinstance(count, int) and count > _MAX_REPEAT:
                raise SecurityError("repetition too large")
        if op == "**" and isinstance(right, int | float) and right > _MAX_EXPONENT:
            raise SecurityError("exponent too large")
        return operator.mul(left, right) if op == "*" else operator.pow(left, right)


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one sandboxed environment (autoescape off: HTML escaping happens per part)."""
    return _Sandbox(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)


def fields_used(source: str) -> set[str]:
    """Top-level names a template reads; raises :class:`TemplateProblem` on a syntax error."""
    try:
        tree = environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}") from None
    return meta.find_undeclared_variables(tree)


@lru_cache(maxsize=256)
def _compiled(source: str) -> jinja2.Template:
    return environment().from_string(source)


def render(source: str, values: dict[str, Any]) -> str:
    """Render ``source`` with ``values``; any failure becomes :class:`TemplateProblem`."""
    try:
        text = _compiled(source).render(values)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(f"line {exc.lineno}: {exc.message}") from None
    except jinja2.UndefinedError as exc:
        raise TemplateProblem(f"undefined: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateProblem(f"not allowed in a template: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise TemplateProblem(f"template failed: {exc}") from None
    if len(text) > MAX_RENDERED_CHARS:
        raise TemplateProblem(f"rendered text longer than {MAX_RENDERED_CHARS} characters")
    return text
