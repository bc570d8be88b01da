"""Amazon SNS messages over HTTPS: reading one, the certificate its signature is made with,
checking the signature, and confirming a subscription.

SNS signs each message with the private key of a certificate it serves at ``SigningCertURL``:
``SignatureVersion`` 1 is SHA1withRSA, 2 is SHA256withRSA (PKCS #1 v1.5), over the canonical
string of the message's fields as ``Name\\nvalue\\n`` in the order AWS documents
(:data:`NOTIFICATION_FIELDS`, :data:`CONFIRMATION_FIELDS`). Anyone can write a message naming
a certificate URL, so the URL is checked *before* anything is fetched: ``https`` on port 443,
no user or password, and a host ``sns.<region>.amazonaws.com`` (``.amazonaws.com.cn`` in
China); the certificate then comes from AWS over TLS, which is what makes its key AWS's.
``SubscribeURL`` must pass the same host check, and is visited only once the message that
carries it has verified.

Certificates are fetched with a time limit and a size limit, one fetch at a time, and kept
(at most :data:`MAX_CACHED_CERTIFICATES`) until they expire.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from yarl import URL

from web.webhooks.common import Refused, event_id, malformed

NOTIFICATION = "Notification"
SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"
# The fields signed, in the order AWS signs them; Subject only when the message has one.
NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_FIELDS = (
    "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
)  # fmt: skip
_SIGNED_FIELDS = {
    NOTIFICATION: NOTIFICATION_FIELDS,
    SUBSCRIPTION_CONFIRMATION: CONFIRMATION_FIELDS,
    UNSUBSCRIBE_CONFIRMATION: CONFIRMATION_FIELDS,
}
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"1": hashes.SHA1, "2": hashes.SHA256}

FETCH_TIMEOUT_SECONDS = 10.0
MAX_CERTIFICATE_BYTES = 64 * 1024
MAX_CONFIRMATION_BYTES = 64 * 1024
MAX_CACHED_CERTIFICATES = 32
MIN_RSA_KEY_BITS = 2048
# The whole URL, so nothing a parser might read differently (a user, a port, a backslash)
# can slip past: scheme, an SNS host, then a path (and for SubscribeURL, a query).
_SNS_URL = re.compile(
    r"https://(sns\.[a-z0-9-]{1,30}\.amazonaws\.com(?:\.cn)?)(/[A-Za-z0-9._~/%=&:+,-]*"
    r"(?:\?[A-Za-z0-9._~/%=&:+,-]*)?)"
)


@dataclass(frozen=True)
class SnsMessage:
    """An SNS message's fields as received (not yet verified)."""

    fields: dict[str, str]
    signature: bytes

    @property
    def type(self) -> str:
        return self.fields["Type"]

    @property
    def message_id(self) -> str:
        return self.fields["MessageId"]

    @property
    def topic_arn(self) -> str:
        return self.fields["TopicArn"]

    @property
    def message(self) -> str:
        return self.fields["Message"]

    @property
    def signing_cert_url(self) -> str:
        return self.fields["SigningCertURL"]

    @property
    def subscribe_url(self) -> str:
        return self.fields["SubscribeURL"]

    @property
    def timestamp(self) -> datetime:
        return _timestamp(self.fields["Timestamp"])

    def string_to_sign(self) -> bytes:
        """The canonical string SNS signs for this message's type."""
        out = []
        for name in _SIGNED_FIELDS[self.type]:
            if name in self.fields:
                out.append(f"{name}\n{self.fields[name]}\n")
        return "".join(out).encode()


def parse_message(payload: Any) -> SnsMessage:
    """The SNS message in a parsed body, or a 400 (403 for a URL that is not SNS's) naming
    what is missing or wrong; its URLs are checked here, before anything is fetched."""
    if not isinstance(payload, dict):
        raise malformed("the body must be an SNS message (a JSON object)")
    kind = payload.get("Type")
    if kind not in _SIGNED_FIELDS:
        raise malformed(
            "Type must be Notification, SubscriptionConfirmation or UnsubscribeConfirmation"
        )
    required = [n for n in _SIGNED_FIELDS[kind] if n != "Subject"]
    required += ["SignatureVersion", "Signature", "SigningCertURL"]
    fields: dict[str, str] = {}
    for name in [*required, "Subject"]:
        value = payload.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str) or not value:
            raise malformed(f"{name} must be a non-empty string")
        fields[name] = value
    event_id(fields["MessageId"], "MessageId")
    _timestamp(fields["Timestamp"])
    if fields["SignatureVersion"] not in _HASHES:
        raise Refused(403, "bad_signature", "SignatureVersion must be 1 or 2", forged=True)
    try:
        signature = base64.b64decode(fields["Signature"], validate=True)
    except (binascii.Error, ValueError):
        raise Refused(403, "bad_signature", "Signature is not base64", forged=True) from None
    check_sns_url(fields["SigningCertURL"], "SigningCertURL")
    if not URL(fields["SigningCertURL"]).path.endswith(".pem") or "?" in fields["SigningCertURL"]:
        raise Refused(403, "bad_url", "SigningCertURL must name a .pem file", forged=True)
    if "SubscribeURL" in fields:
        check_sns_url(fields["SubscribeURL"], "SubscribeURL")
    return SnsMessage(fields, signature)


def check_sns_url(url: str, name: str) -> URL:
    """``url`` if it is https on an SNS host (``sns.<region>.amazonaws.com[.cn]``), else a 403."""
    match = _SNS_URL.fullmatch(url)
    # encoded=True: sent exactly as AWS wrote it (the pattern admits only URL-safe characters).
    parsed = URL(url, encoded=True) if match else None
    if match is None or parsed is None or parsed.host != match.group(1):
        raise Refused(
            403,
            "bad_url",
            f"{name} must be an https URL on sns.<region>.amazonaws.com; it was not fetched",
            forged=True,
        )
    return parsed


def signature_ok(message: SnsMessage, key: rsa.RSAPublicKey) -> bool:
    """Whether ``message``'s signature is ``key``'s, over its canonical string."""
    algorithm = _HASHES[message.fields["SignatureVersion"]]()
    try:
        key.verify(message.signature, message.string_to_sign(), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        return False
    return True


class SnsClient:
    """Fetches (and keeps) SNS signing certificates, and confirms subscriptions.

    ``http`` is the session every request goes through: the web tier's own, or in tests one
    whose resolver and TLS trust lead to a local server. ``timeout_seconds`` (10) bounds each
    request; certificates over ``max_certificate_bytes`` (64 KiB) are refused.
    """

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        timeout_seconds: float = FETCH_TIMEOUT_SECONDS,
        max_certificate_bytes: int = MAX_CERTIFICATE_BYTES,
        max_cached: int = MAX_CACHED_CERTIFICATES,
    ) -> None:
        self.http = http
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_certificate_bytes = max_certificate_bytes
        self._max_cached = max_cached
        self._keys: OrderedDict[str, tuple[rsa.RSAPublicKey, datetime]] = OrderedDict()
        self._fetching = asyncio.Lock()

    async def public_key(self, url: str) -> rsa.RSAPublicKey:
        """The RSA key of the certificate at ``url`` (checked first; fetched once, then kept).

        A 403 when AWS has no such certificate or it is not one; a 503 (``Retry-After``) when
        it could not be fetched now, so SNS delivers the message again later.
        """
        checked = check_sns_url(url, "SigningCertURL")
        key = self._cached(url)
        if key is not None:
            return key
        async with self._fetching:  # one fetch at a time; a second wait finds the first's key
            key = self._cached(url)
            if key is not None:
                return key
            status, body = await self._get(checked, self._max_certificate_bytes)
            if status >= 500 or status == 429:
                raise _unavailable(
                    "certificate_unavailable", f"the signing certificate: HTTP {status}"
                )
            if status != 200:
                raise Refused(
                    403, "bad_certificate", f"the signing certificate: HTTP {status}", forged=True
                )
            if body is None:
                raise Refused(403, "bad_certificate", "the signing certificate is too large")
            key, expires = _certificate_key(body)
            self._keys[url] = (key, expires)
            while len(self._keys) > self._max_cached:
                self._keys.popitem(last=False)
            return key

    async def confirm(self, subscribe_url: str) -> None:
        """Visit ``SubscribeURL`` (checked again first), or a 502 saying it failed."""
        status, _ = await self._get(
            check_sns_url(subscribe_url, "SubscribeURL"), MAX_CONFIRMATION_BYTES
        )
        if status != 200:
            raise Refused(
                502, "subscription_not_confirmed", f"SNS answered the SubscribeURL with {status}"
            )

    def _cached(self, url: str) -> rsa.RSAPublicKey | None:
        found = self._keys.get(url)
        if found is None:
            return None
        key, expires = found
        if expires <= datetime.now(UTC):
            del self._keys[url]
            return None
        return key

    async def _get(self, url: URL, max_bytes: int) -> tuple[int, bytes | None]:
        """The status and body of a GET (no redirects; body None past ``max_bytes``), or a
        503 when no answer came in time."""
        try:
            async with self.http.get(url, timeout=self._timeout, allow_redirects=False) as answer:
                if answer.content_length is not None and answer.content_length > max_bytes:
                    return answer.status, None
                body = bytearray()
                async for chunk in answer.content.iter_chunked(16 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        return answer.status, None
                return answer.status, bytes(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unavailable("sns_unreachable", f"{url.host}: {type(exc).__name__}") from None


def _unavailable(code: str, message: str) -> Refused:
    return Refused(503, code, message, headers={"Retry-After": "60"})


def _certificate_key(body: bytes) -> tuple[rsa.RSAPublicKey, datetime]:
    try:
        certificate = x509.load_pem_x509_certificate(body)
    except ValueError:
        raise Refused(403, "bad_certificate", "SigningCertURL is not a certificate") from None
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_RSA_KEY_BITS:
        raise Refused(403, "bad_certificate", "the signing certificate has no RSA-2048 key")
    now = datetime.now(UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise Refused(403, "bad_certificate", "the signing certificate is not valid now")
    return key, certificate.not_valid_after_utc


def _timestamp(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise malformed("Timestamp must be an ISO 8601 time") from None
    if when.tzinfo is None:
        raise malformed("Timestamp must have a time zone")
    return when
