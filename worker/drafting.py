"""Drafting: turning a recipient and its batch into a subject and a body.

A :class:`Drafter` is anything with ``draft(recipient) -> Draft``. The template drafter renders
the batch's templates in the sandbox; a drafter that cannot produce a usable email raises
:class:`~worker.failures.PermanentFailure` or :class:`~worker.failures.TransientFailure`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from shared.db import RecipientForSend
from shared.headers import unsafe_message
from shared.templating import TemplateProblem, render, template_values
from worker.failures import PermanentFailure

MAX_SUBJECT_CHARS = 255


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
    """Renders the batch's subject and body templates with the recipient's fields (offline)."""

    # Rendering costs nothing and gives the same draft every time, so the worker stores it
    # with the attempt's outcome rather than in a round trip of its own before the send.
    store_before_send = False

    async def draft(self, recipient: RecipientForSend) -> Draft:
        values = template_values(recipient.fields, recipient.email)
        try:
            subject = render(recipient.subject_template, values)
            body = render(recipient.body_template, values)
        except TemplateProblem as exc:
            raise PermanentFailure(f"template: {exc}") from None
        return Draft(subject=checked_subject(subject), body=body)
