"""VERP: an envelope sender of its own for every recipient, so a bounce names who it is about.

With ``MAILROOM_BOUNCE_ADDRESS=bounces@example.org`` the message to recipient 1234 is sent with
``MAIL FROM:<bounces+r1234-<tag>@example.org>``, which the receiving side writes as its
``Return-Path`` and sends any bounce to. ``<tag>`` is 16 characters of a keyed digest of the
recipient id (``MAILROOM_SECRET_KEY``, its own :class:`~shared.signing.Purpose`), so only
Mailroom can write a valid one: a bounce sent to a made-up or altered address suppresses
nothing. The token is lower case letters, digits and ``-`` (some servers fold the case of a
local part), at most 37 characters: with a bounce local part of at most 26 characters
(checked in the settings) the whole local part stays within RFC 5321's 64.

A bounce that carries no usable DSN (many servers still send plain text) names its recipient
by the address it was delivered to: ``Delivered-To``, ``X-Original-To``, ``Envelope-To`` or
``To``. :mod:`worker.bounces` decides whether such a message is a failure report at all.
"""

from __future__ import annotations

import re
from email.message import Message
from email.utils import getaddresses

from shared.headers import find_unsafe
from shared.settings import Settings
from shared.signing import Purpose, SignedValues

_FOLD = re.compile(r"\r?\n(?=[ \t])")
_TOKEN = re.compile(r"r([1-9][0-9]{0,18})-([a-z2-7]{16})")
# Where the address a message was delivered to is written, most specific first.
DELIVERY_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To")
# Enough for any real bounce; a message with more header values than this is not searched
# further (the work is bounded whatever it holds).
_MAX_HEADER_VALUES = 20


class Verp:
    """Writes and reads the envelope senders of one bounce address."""

    def __init__(self, bounce_address: str, secret_key: str) -> None:
        local, domain = bounce_address.rsplit("@", 1)
        self._local = local.lower()
        self._domain = domain.lower()
        self._signer = SignedValues(secret_key, Purpose.VERP)
        self._address = re.compile(
            re.escape(self._local) + r"\+(" + _TOKEN.pattern + r")@" + re.escape(self._domain)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Verp | None:
        """The VERP of ``MAILROOM_BOUNCE_ADDRESS`` (None when it or the secret key is unset)."""
        if settings.bounce_address is None or settings.secret_key is None:
            return None
        return cls(settings.bounce_address, settings.secret_key.get_secret_value())

    def envelope_sender(self, recipient_id: int) -> str:
        """``<local>+r<id>-<tag>@<domain>`` for recipient ``recipient_id``."""
        return f"{self._local}+r{recipient_id}-{self._signer.tag(str(recipient_id))}@{self._domain}"

    def recipient_id(self, address: str) -> int | None:
        """The recipient an envelope sender of ours names, or None (not ours, or forged)."""
        match = self._address.fullmatch(address.strip().lower())
        if match is None:
            return None
        recipient, tag = match.group(2), match.group(3)
        return int(recipient) if self._signer.has_tag(recipient, tag) else None

    def recipients_in(self, message: Message) -> list[int]:
        """The recipients named by the addresses ``message`` was delivered to, in order."""
        values: list[str] = []
        for name in DELIVERY_HEADERS:
            values += [str(v) for v in message.get_all(name) or []]
        found: list[int] = []
        for value in values[:_MAX_HEADER_VALUES]:
            value = _FOLD.sub(" ", value)  # a long header is folded onto more lines
            if find_unsafe(value, allow_tab=True) is not None:
                continue  # a header a parser split oddly, or garbage: not an address of ours
            for _, address in getaddresses([value]):
                recipient = self.recipient_id(address)
                if recipient is not None and recipient not in found:
                    found.append(recipient)
        return found
