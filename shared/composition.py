"""How a batch's messages are written: the body's format, the sender's name and a Reply-To.

Each can be given per batch (the API's ``body_format``, ``from_name`` and ``reply_to``, the
form's *Format*, *From name* and *Reply-To*); a batch without a sender name or a Reply-To uses
``MAILROOM_FROM_NAME`` and ``MAILROOM_REPLY_TO``. The checks here are the one definition the
settings, the web tier and the worker's ``build_message`` all apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from shared.addresses import InvalidAddress, normalize_address
from shared.headers import display_name_message, unsafe_message

BodyFormat = Literal["text", "markdown"]
# "text": the body as written, escaped into the HTML part. "markdown": CommonMark, rendered to
# a sanitized HTML part and a plain-text part (shared.markdown).
BODY_FORMATS: tuple[str, ...] = get_args(BodyFormat)


@dataclass(frozen=True)
class Composition:
    """A batch's choices about how its messages are written (``None``: the setting's)."""

    body_format: str = "text"
    from_name: str | None = None
    reply_to: str | None = None


def from_name_problem(value: str) -> str | None:
    """Why ``value`` cannot be the sender's display name, or ``None`` if it can (callers trim
    the spaces around a name first: mail programs would not show them)."""
    if not value.strip():
        return "must not be blank"
    if value != value.strip(" "):
        return "must not start or end with a space"
    return display_name_message(value)


def checked_reply_to(value: str) -> str:
    """``value`` as a normalized single address, or :class:`InvalidAddress` saying why not
    (a list, a display name, angle brackets or a header-unsafe character are refused)."""
    not_allowed = unsafe_message(value)
    if not_allowed is not None:
        raise InvalidAddress(not_allowed)
    return normalize_address(value)
