"""What the pages tell the operator: a problem in the words of the form's labels, and the
notice a page shows after a form redirected to it ("3 duplicate addresses removed").

A notice travels in the redirect's query string, signed for notices alone
(:class:`shared.signing.Purpose`) and bound to the path it was written for: a link cannot make
a page say what the server did not, nor carry one page's notice to another.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from shared.signing import Purpose, SignedValues
from web.contract import Problem
from web.keys import SETTINGS

NOTICE_PARAM = "notice"
# A notice is a few sentences and ids; anything longer was not written by us.
MAX_NOTICE_CHARS = 4_000

# The form's fields as its labels name them; any other field reads as its name in words.
FIELD_LABELS = {
    "name": "Name",
    "recipients": "Recipients",
    "csv": "CSV file",
    "subject": "Subject",
    "body": "Body",
    "drafter": "Who writes each email",
    "context": "Context for the LLM",
    "review": "Review",
    "send_at": "Send at",
    "body_format": "Format",
    "from_name": "From name",
    "reply_to": "Reply-To",
}


def label_of(field: str) -> str:
    """``send_at`` as the form's label says it: "Send at"."""
    return FIELD_LABELS.get(field) or field.replace("_", " ").capitalize()


def problem_text(problem: Problem) -> str:
    """A problem as the form shows it: "Send at: more than a year ahead", "Recipients, line 3:
    …", "CSV file, lines 2, 3, 5 and 44 more: …"."""
    if problem.field is None:
        return problem.message
    where = label_of(problem.field)
    if problem.lines:
        more = (problem.count or len(problem.lines)) - len(problem.lines)
        listed = ", ".join(map(str, problem.lines))
        where += f", lines {listed}" + (f" and {more} more" if more > 0 else "")
    elif problem.line is not None:
        where += f", line {problem.line}"
    return f"{where}: {problem.message}"


def shown_problems(problems: list[Problem]) -> list[dict[str, Any]]:
    """The form's problems with their text, for the template."""
    return [{"field": p.field, "text": problem_text(p)} for p in problems]


def plural(count: int, one: str, many: str) -> str:
    """``3 dead letters``, ``1 dead letter``."""
    return f"{count} {one if count == 1 else many}"


def _signer(request: web.Request) -> SignedValues:
    secret = request.app[SETTINGS].secret_key
    assert secret is not None  # create_app requires it
    return SignedValues(secret.get_secret_value(), Purpose.NOTICE)


def with_notice(request: web.Request, path: str, lines: list[str], **data: Any) -> str:
    """``path`` with a signed notice saying ``lines`` (and carrying ``data``) for its page;
    ``path`` alone when there is nothing to say."""
    if not lines:
        return path
    signed = _signer(request).sign({"path": path, "lines": lines, **data})
    return f"{path}?{urlencode({NOTICE_PARAM: signed})}"


def notice_of(request: web.Request) -> dict[str, Any] | None:
    """The notice this request's page was sent with, if it is ours and for this path."""
    given = request.query.get(NOTICE_PARAM)
    if not given or len(given) > MAX_NOTICE_CHARS:
        return None
    value = _signer(request).read(given)
    if not isinstance(value, dict) or value.get("path") != request.path:
        return None
    lines = value.get("lines")
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        return None
    return value


def notice_lines(request: web.Request) -> list[str]:
    """What the page should say happened, from its notice (nothing without one)."""
    notice = notice_of(request) if NOTICE_PARAM in request.query else None
    return list(notice["lines"]) if notice else []
