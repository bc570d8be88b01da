"""Email address syntax: the one place that decides what Mailroom accepts as an address."""

from __future__ import annotations

import functools
import re

from email_validator import EmailNotValidError, validate_email

MAX_ADDRESS_LENGTH = 254  # RFC 5321's limit on a forward path
MAX_LOCAL_PART_LENGTH = 64
# RFC 5322's dot-atom in ASCII: the local part of nearly every real address. email-validator
# accepts such a local part as it is, so only its domain needs the library's full check.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_LOCAL_PART = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*")


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
    local, at, domain = candidate.rpartition("@")
    if at and len(local) <= MAX_LOCAL_PART_LENGTH and _PLAIN_LOCAL_PART.fullmatch(local):
        try:
            normalized = f"{local}@{_normalized_domain(domain)}"
        except EmailNotValidError:
            pass  # the full check below says what is wrong, in its own words
        else:
            if len(normalized) <= MAX_ADDRESS_LENGTH:
                return normalized
    try:
        result = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise InvalidAddress(str(exc)) from None
    return result.normalized


@functools.lru_cache(maxsize=4096)
def _normalized_domain(domain: str) -> str:
    # Checking a domain is two thirds of email-validator's work per address, and a batch of
    # thousands names a handful of domains: each is checked once. The local part given here
    # is a plain one that passes, so only the domain can fail.
    return validate_email(f"postmaster@{domain}", check_deliverability=False).domain


def dedupe_key(address: str) -> str:
    """Addresses that differ only in case are the same recipient for de-duplication."""
    return address.casefold()
