"""Unsubscribe links: a signed token naming one recipient address and the sender it came from.

The worker puts the link in every message (``List-Unsubscribe``, RFC 2369, with RFC 8058's
one-click ``List-Unsubscribe-Post``, and a footer); the web tier's public ``/u/<token>`` route
reads it back. The token carries the address and the sender's address, signed under
``MAILROOM_SECRET_KEY`` for this use alone (:mod:`shared.signing`; a session cookie is never a
token): nothing in it is a database id, and it cannot be forged or altered without the key. It
never expires (an old message's link must keep working), so tokens of the format before
:mod:`shared.signing` are still read (:func:`_read_legacy_token`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from shared.signing import Purpose, SignedValues

_PURPOSE = b"mailroom-unsubscribe-v1"
MAX_TOKEN_LENGTH = 2048


@dataclass(frozen=True)
class Unsubscription:
    """Who asked to stop receiving mail, and from which sender."""

    address: str
    sender: str


def make_token(address: str, *, sender: str, secret: str) -> str:
    """The token for ``address``'s link in mail from ``sender``."""
    return SignedValues(secret, Purpose.UNSUBSCRIBE).sign({"a": address, "s": sender})


def read_token(token: str, *, secret: str) -> Unsubscription | None:
    """The address and sender a token names, or ``None`` if it was not made with ``secret``."""
    if len(token) > MAX_TOKEN_LENGTH:
        return None
    value = SignedValues(secret, Purpose.UNSUBSCRIBE).read(token)
    if value is None:
        return _read_legacy_token(token, secret=secret)
    if not isinstance(value, dict):
        return None
    address, sender = value.get("a"), value.get("s")
    if not isinstance(address, str) or not isinstance(sender, str) or not address:
        return None
    return Unsubscription(address=address, sender=sender)


def _read_legacy_token(token: str, *, secret: str) -> Unsubscription | None:
    """A token of the earlier format (``base64(address \\n sender).base64(mac)``): links in mail
    already sent keep working. Nothing makes these any more."""
    if token.count(".") != 1:
        return None
    encoded_payload, encoded_mac = token.split(".")
    try:
        payload, mac = _unb64(encoded_payload), _unb64(encoded_mac)
    except (binascii.Error, ValueError):
        return None
    # Only the spelling the earlier make_token() wrote: the decoder skips characters outside
    # the alphabet and ignores spare low bits, so "ab!!!!cd", "abcd==" or a changed last
    # character would otherwise name the same address. Links already sent are canonical.
    canonical = f"{_b64(payload)}.{_b64(mac)}"
    if not hmac.compare_digest(canonical.encode("ascii"), token.encode("ascii")):
        return None
    if not hmac.compare_digest(mac, _mac(payload, secret)):
        return None
    address, _, sender = payload.decode("utf-8", "replace").partition("\n")
    return Unsubscription(address=address, sender=sender) if address else None


def unsubscribe_url(public_url: str, token: str) -> str:
    """The public page of a token, under the web tier's external address."""
    return f"{public_url.rstrip('/')}/u/{token}"


def _mac(payload: bytes, secret: str) -> bytes:  # the earlier format's signature
    return hmac.new(secret.encode(), _PURPOSE + b"\0" + payload, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    if not text.isascii():
        raise ValueError("not base64")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
