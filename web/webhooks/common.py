"""What every provider webhook shares: reading the body within a limit, refusing a request with
a status and a stable code, checking a signed time, and what a delivery found.

Nothing here knows a provider's format; ``endpoint.py`` turns what a provider module found into
suppressions, in one transaction with the record that makes a replay recognisable.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from web.errors import ApiError
from web.json_body import lone_surrogate_at, parse_json

# Far above any one delivery: an SNS message is at most 256 KB, a Postmark bounce without its
# content a few KB, a SendGrid batch well under a megabyte.
MAX_BODY_BYTES = 1024 * 1024
# How far ahead of this server's clock a signed time may be (the sender's clock is not ours).
CLOCK_SKEW_SECONDS = 300.0
MAX_DETAIL_LENGTH = 200
# What an event id may look like before it is stored: provider ids are short, printable ASCII.
EVENT_ID = re.compile(r"[\x21-\x7e]{1,200}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")


class Refused(ApiError):
    """A webhook request refused: nothing it carried was acted on.

    ``forged`` marks a request that failed authentication (a bad signature or credentials):
    it counts toward the client's lock-out. ``headers`` go on the answer (``Retry-After``,
    ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        forged: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message)
        self.forged = forged
        self.headers = headers or {}

    def response(self) -> web.Response:
        answer = super().response()
        answer.headers.update(self.headers)
        return answer


def malformed(message: str) -> Refused:
    return Refused(400, "malformed_message", message)


def disabled(provider: str, variable: str) -> Refused:
    return Refused(404, "webhook_disabled", f"the {provider} webhook is off: {variable} is not set")


@dataclass(frozen=True)
class Finding:
    """An address an event asks us to stop sending to, as the provider wrote it, and why."""

    address: Any  # not yet checked: endpoint.record normalizes it or counts it invalid
    reason: str  # "hard_bounce" or "complaint"
    detail: str


@dataclass
class Event:
    """One provider event that is recorded (its id) whatever it finds."""

    id: str
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Tally:
    """What one accepted request did; the answer's body and the log line's fields."""

    hard_bounces: int = 0
    complaints: int = 0
    suppressed: int = 0
    ignored: int = 0
    invalid_addresses: int = 0
    malformed: int = 0
    duplicates: int = 0
    subscription_confirmed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def read_body(request: web.Request, *, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The raw body, or a 413 as soon as it passes ``max_bytes`` (chunked bodies too)."""
    too_large = Refused(413, "payload_too_large", f"the body is larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


def read_json(raw: bytes) -> Any:
    """``raw`` as JSON (web/json_body.py's rules: strict UTF-8, finite numbers, nesting), with
    no lone surrogate anywhere; else a 400."""
    try:
        payload = parse_json(raw)
    except ApiError as exc:
        raise Refused(exc.status, exc.code, exc.message) from None
    where = lone_surrogate_at(payload)
    if where is not None:
        raise Refused(400, "malformed_json", f"{where}: contains a lone surrogate")
    return payload


def event_id(value: Any, name: str) -> str:
    """A provider's event id as stored (an integer or printable ASCII), or a 400 naming it."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not EVENT_ID.fullmatch(value):
        raise malformed(f"{name} must be an id of 1-200 printable ASCII characters")
    return value


def check_signed_time(when: datetime, *, max_age_seconds: float, name: str) -> None:
    """Refuse a signed time older than ``max_age_seconds`` or ahead of our clock by more than
    :data:`CLOCK_SKEW_SECONDS`: a replay of a captured request, or a broken clock."""
    age_seconds = (datetime.now(UTC) - when).total_seconds()
    if age_seconds > max_age_seconds:
        raise Refused(
            403,
            "stale_message",
            f"{name} is {age_seconds:.0f} s old, more than {max_age_seconds:g} s "
            "(MAILROOM_WEBHOOK_MAX_AGE_SECONDS)",
        )
    if age_seconds < -CLOCK_SKEW_SECONDS:
        raise Refused(403, "stale_message", f"{name} is {-age_seconds:.0f} s in the future")


def detail(*parts: Any) -> str:
    """A suppression's detail from a provider's words: printable ASCII, at most 200 characters."""
    text = " ".join(_UNPRINTABLE.sub(" ", str(p)).strip() for p in parts if p not in (None, ""))
    return " ".join(text.split())[:MAX_DETAIL_LENGTH]
