"""Drafting: turning a recipient and its batch into a subject and a body.

A :class:`Drafter` is anything with ``draft(recipient) -> Draft``. The template drafter renders
the batch's templates in the sandbox; a drafter that cannot produce a usable email raises
:class:`~worker.failures.PermanentFailure` or :class:`~worker.failures.TransientFailure`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from shared.db import RecipientForSend
from shared.headers import unsafe_message
from shared.templating import (
    TemplateProblem,
    in_render_thread,
    is_simple,
    render,
    template_values,
)
from worker.failures import PermanentFailure

MAX_SUBJECT_CHARS = 255
# How long a recipient's subject and body may take to render together, at most: a template
# that loops over a recipient's long field is stopped by this (and becomes a dead letter), well
# inside the attempt's own time limit.
DRAFT_SECONDS = 2.0


@dataclass(frozen=True)
class Draft:
    subject: str
    body: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Drafter(Protocol):
    async def draft(self, recipient: RecipientForSend) -> Draft: ...


def checked_subject(text: str) -> str:
    """A subject that can go into a header: one line without control characters
    (:mod:`shared.headers`), not empty, not too long."""
    subject = text.strip()
    if "\r" in subject or "\n" in subject:
        raise PermanentFailure("drafted subject contains a line break")
    not_allowed = unsafe_message(subject, allow_tab=True)
    if not_allowed is not None:
        raise PermanentFailure(f"drafted subject: {not_allowed}")
    if not subject:
        raise PermanentFailure("drafted subject is empty")
    if len(subject) > MAX_SUBJECT_CHARS:
        raise PermanentFailure(f"drafted subject longer than {MAX_SUBJECT_CHARS} characters")
    return subject


def storable(draft: Draft) -> Draft:
    """The draft, if PostgreSQL can store it: text may not contain NUL characters.

    Checked for every drafter (a template can produce ``\\x00``; so can a model's JSON). Left to
    the database, the insert would fail on every attempt and look like an outage.
    """
    if "\0" in draft.subject or "\0" in draft.body:
        raise PermanentFailure("drafted text contains a NUL character")
    return draft


class TemplateDrafter:
    """Renders the batch's subject and body templates with the recipient's fields (offline).

    Both renders share one budget of ``time_limit_seconds`` (``DRAFT_SECONDS``, or half the job's
    time limit if that is less, so the render stops before the attempt's timeout would give
    up on it). A template with loops, calls or costly filters renders in a render thread, off
    the event loop; a simple one (``Hello {{ name }}``) renders in place, where it costs a few
    microseconds and no thread hop.
    """

    # Rendering costs nothing and gives the same draft every time, so the worker stores it
    # with the attempt's outcome rather than in a round trip of its own before the send.
    store_before_send = False

    def __init__(self, *, job_timeout_seconds: float | None = None) -> None:
        limit = (
            DRAFT_SECONDS
            if job_timeout_seconds is None
            else min(DRAFT_SECONDS, job_timeout_seconds / 2)
        )
        self.time_limit_seconds = limit

    async def draft(self, recipient: RecipientForSend) -> Draft:
        values = template_values(recipient.fields, recipient.email)
        templates = (recipient.subject_template, recipient.body_template)
        try:
            if all(map(is_simple, templates)):
                subject, body = self._render(templates, values)
            else:
                subject, body = await in_render_thread(self._render, templates, values)
        except TemplateProblem as exc:
            raise PermanentFailure(f"template: {exc}") from None
        return Draft(subject=checked_subject(subject), body=body)

    def _render(self, templates: tuple[str, str], values: dict[str, Any]) -> tuple[str, str]:
        # The clock starts when rendering does, not while the render waits for a thread.
        deadline = time.monotonic() + self.time_limit_seconds
        subject_template, body_template = templates
        limit = self.time_limit_seconds
        subject = render(subject_template, values, time_limit_seconds=limit, deadline=deadline)
        body = render(body_template, values, time_limit_seconds=limit, deadline=deadline)
        return subject, body
