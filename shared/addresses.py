"""Email address syntax: the one place that decides what Mailroom accepts as an address."""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

MAX_ADDRESS_LENGTH = 254  # RFC 5321's limit on a forward path


class InvalidAddress(ValueError):
    """The text is not a single, deliverable-looking email address."""


def normalize_address(text: str) -> str:
    """Return ``text`` as a normalized address (domain lower-cased, IDNA) or raise.

    Only syntax is checked: no DNS lookups, so validation is fast and works offline.
    """
    candidate = text.strip()
    if not candidate:
        raise InvalidAddress("empty address")
    if any(ch in candidate for ch in "\r\n\0"):
        raise InvalidAddress("address contains a line break or NUL")
    if len(candidate) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"address longer than {MAX_ADDRESS_LENGTH} characters")
    try:
        result = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
    return result.normalized


def dedupe_key(address: str) -> str:
    """Addresses that differ only in case are the same recipient for de-duplication."""
    return address.casefold()
