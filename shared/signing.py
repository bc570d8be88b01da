"""Signed values: what Mailroom hands out and later believes (session cookies, unsubscribe links).

One helper for every use, each with its own salt (:class:`Purpose`): a value signed for one
use never verifies as another, even though all of them are signed with
``MAILROOM_SECRET_KEY``. A session cookie is not an unsubscribe link, and an unsubscribe link
is not a session. Values are JSON, signed by itsdangerous with HMAC-SHA256.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from typing import Any

from itsdangerous import BadData, URLSafeSerializer
from itsdangerous.encoding import base64_decode

# HMAC-SHA256 throughout; the key for each purpose is an HMAC of the secret and its salt.
_SIGNER_OPTIONS: dict[str, Any] = {"digest_method": hashlib.sha256, "key_derivation": "hmac"}


class Purpose(enum.StrEnum):
    """What a signed value is for; the salt of its signature. Every use has its own."""

    SESSION = "mailroom.session"
    UNSUBSCRIBE = "mailroom.unsubscribe"
    # The API token's fingerprint in a session cookie: nothing to test guesses of it against.
    API_TOKEN_FINGERPRINT = "mailroom.api-token-fingerprint"
    # What a page says a form did, carried by the redirect to it (web/pages/feedback.py).
    NOTICE = "mailroom.notice"
    # The recipient's token in a VERP envelope sender (worker/verp.py).
    VERP = "mailroom.verp"


class SignedValues:
    """Signs JSON values for one :class:`Purpose` and reads back the ones it signed."""

    def __init__(self, secret_key: str, purpose: Purpose) -> None:
        self._serializer = URLSafeSerializer(
            secret_key, salt=purpose.value, signer_kwargs=_SIGNER_OPTIONS
        )

    def sign(self, value: Any) -> str:
        """``value`` as URL-safe text with its signature (ASCII, no ``/`` or ``+``)."""
        return self._serializer.dumps(value)

    def read(self, signed: str) -> Any | None:
        """The value ``signed`` carries, or ``None`` unless :meth:`sign` wrote exactly this.

        Only the spelling ``sign`` writes: base64 decoding skips characters outside its
        alphabet and ignores spare low bits, so ``ab!!cd``, added padding or another last
        character of the signature would otherwise pass. One signed text per value, so
        nothing else can be probed, logged or cached as a second valid one.
        """
        if not signed.isascii():  # sign() writes only ASCII
            return None
        try:
            value = self._serializer.loads(signed)
        except BadData:
            return None
        if not hmac.compare_digest(self.sign(value).encode(), signed.encode()):
            return None
        return value

    def fingerprint(self, secret: str) -> str:
        """A keyed digest of ``secret``: the same for the same secret, useless without the key."""
        signature = self._serializer.make_signer().get_signature(secret.encode())
        return signature.decode("ascii")

    def tag(self, text: str, *, length_bytes: int = 10) -> str:
        """A short keyed digest of ``text``: lower-case base32 of the first ``length_bytes`` of
        its HMAC (10 bytes: 16 characters, 80 bits), for places too small for :meth:`sign`
        (an address's local part) and that may not keep letter case."""
        digest = base64_decode(self.fingerprint(text))[:length_bytes]
        return base64.b32encode(digest).decode("ascii").rstrip("=").lower()

    def has_tag(self, text: str, tag: str, *, length_bytes: int = 10) -> bool:
        """Whether ``tag`` is :meth:`tag` of ``text`` (compared in constant time)."""
        expected = self.tag(text, length_bytes=length_bytes)
        return hmac.compare_digest(expected.encode(), tag.encode("ascii", "replace"))
