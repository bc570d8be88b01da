"""Batch names: what an operator calls a batch, so batches can be told apart in a list.

A name is one line of at most :data:`MAX_NAME_CHARS` characters with no control character
(the same characters a header may not carry, tabs included: ``shared/headers.py``). One that
is not given is made from the subject template or, for the LLM, the first words of its context
(:func:`default_name`). The web tier checks a given name (:func:`name_problem`); the database
refuses a bad one again (migration ``0012_batch_name.sql``).
"""

from __future__ import annotations

import re

from shared.headers import describe_character, find_unsafe, header_pattern

MAX_NAME_CHARS = 100
# A made-up name stops at a word boundary near this length and says it was cut with "…".
DEFAULT_NAME_CHARS = 60
FALLBACK_NAME = "Untitled batch"
_SPACE = re.compile(r"\s+")


def name_problem(value: str) -> str | None:
    """Why ``value`` (already stripped) cannot be a batch name, or ``None`` if it can."""
    if len(value) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters"
    found = find_unsafe(value)
    if found is not None:
        index, char = found
        return (
            f"character {describe_character(char)} at position {index + 1}"
            " is not allowed in a batch name"
        )
    return None


def default_name(subject: str | None, context: str | None) -> str:
    """A name for a batch that was given none: its subject template, else the start of its
    LLM context, on one line and cut at a word near :data:`DEFAULT_NAME_CHARS` characters."""
    source = subject if subject and subject.strip() else context or ""
    # Line breaks and other control characters become spaces, then runs of space one space.
    text = _SPACE.sub(" ", header_pattern().sub(" ", source)).strip()
    if not text:
        return FALLBACK_NAME
    if len(text) <= DEFAULT_NAME_CHARS:
        return text
    cut = text[: DEFAULT_NAME_CHARS - 1]
    if " " in cut[DEFAULT_NAME_CHARS // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,.;:-") + "…"
