"""``POST /webhooks/sendgrid``: SendGrid's signed event webhook.

SendGrid signs each request with ECDSA P-256 over SHA-256 of the
``X-Twilio-Email-Event-Webhook-Timestamp`` header followed by the raw body; the signature is
base64 DER in ``X-Twilio-Email-Event-Webhook-Signature``. It is checked with the verification
key SendGrid shows (``MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY``; unset, the route answers 404)
before the body is parsed; a missing or wrong signature is a 403, and so is a timestamp older
than ``MAILROOM_WEBHOOK_MAX_AGE_SECONDS`` or ahead of our clock.

The body is a list of events. What each becomes:

- ``bounce`` of ``type`` ``bounce``: a hard bounce. ``type`` ``blocked`` is the receiving
  server refusing the sender for now (reputation, content), not the address: ignored.
- ``spamreport``: a complaint.
- ``dropped`` with reason ``Bounced Address`` (SendGrid did not send because the address
  bounced before) is a hard bounce, and ``Spam Reporting Address`` a complaint: SendGrid
  knows the address is bad, and suppressing it here stops Mailroom queueing it. Other drop
  reasons (unsubscribed, invalid, over quota) are ignored.
- everything else (``processed``, ``delivered``, ``deferred``, ``open``, ``click`` …): ignored.

Events acted on are recorded by ``sg_event_id``: one seen before is a duplicate (counted, no
effect), and a request whose every such event was seen before is a replay (409). One without
an ``sg_event_id`` cannot be told from a replay, so it is counted as malformed and skipped.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from shared.settings import p256_public_key
from web.keys import SETTINGS
from web.webhooks.common import (
    EVENT_ID,
    Event,
    Finding,
    Refused,
    Tally,
    check_signed_time,
    detail,
    disabled,
    malformed,
    read_body,
    read_json,
)
from web.webhooks.endpoint import record, webhook

PROVIDER = "sendgrid"
SIGNATURE_HEADER = "X-Twilio-Email-Event-Webhook-Signature"
TIMESTAMP_HEADER = "X-Twilio-Email-Event-Webhook-Timestamp"
# Up to 10 digits: the year 2286, well inside what datetime can hold.
_TIMESTAMP = re.compile(r"[0-9]{1,10}")
DROPPED_REASONS = {"Bounced Address": "hard_bounce", "Spam Reporting Address": "complaint"}
routes = web.RouteTableDef()


@routes.post("/webhooks/sendgrid")
@webhook(PROVIDER)
async def sendgrid_events(request: web.Request) -> Tally:
    """A batch of SendGrid events, signed with the configured key."""
    settings = request.app[SETTINGS]
    if settings.sendgrid_webhook_public_key is None:
        raise disabled("SendGrid", "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY")
    signature = request.headers.get(SIGNATURE_HEADER, "")
    timestamp = request.headers.get(TIMESTAMP_HEADER, "")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise _bad_signature(f"{TIMESTAMP_HEADER} must be a Unix time in seconds")
    check_signed_time(
        datetime.fromtimestamp(int(timestamp), UTC),
        max_age_seconds=settings.webhook_max_age_seconds,
        name=TIMESTAMP_HEADER,
    )
    raw = await read_body(request)
    key = _key(settings.sendgrid_webhook_public_key)
    if not signature_ok(key, signature, timestamp.encode() + raw):
        raise _bad_signature("the SendGrid signature does not verify")
    payload = read_json(raw)
    if not isinstance(payload, list):
        raise malformed("the body must be a JSON list of SendGrid events")
    tally = Tally()
    events = [event for item in payload if (event := _event(item, tally)) is not None]
    return await record(request, PROVIDER, events, tally)


def signature_ok(key: ec.EllipticCurvePublicKey, signature: str, signed: bytes) -> bool:
    """Whether ``signature`` (base64 DER, as sent) is ``key``'s ECDSA-SHA256 of ``signed``."""
    try:
        key.verify(base64.b64decode(signature, validate=True), signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


@functools.lru_cache(maxsize=4)
def _key(text: str) -> ec.EllipticCurvePublicKey:
    return p256_public_key(text)


def _bad_signature(message: str) -> Refused:
    return Refused(403, "bad_signature", message, forged=True)


def _event(item: Any, tally: Tally) -> Event | None:
    """The event to record for one item, or None for one that is ignored or unreadable."""
    if not isinstance(item, dict):
        tally.malformed += 1
        return None
    verdict = _verdict(item)
    if verdict is None:
        tally.ignored += 1
        return None
    given = item.get("sg_event_id")
    if not isinstance(given, str) or not EVENT_ID.fullmatch(given):
        tally.malformed += 1
        return None
    reason, why = verdict
    return Event(given, [Finding(item.get("email"), reason, why)])


def _verdict(item: dict[str, Any]) -> tuple[str, str] | None:
    kind = item.get("event")
    if kind == "bounce" and item.get("type") == "bounce":
        return "hard_bounce", detail("SendGrid bounce", _text(item.get("status")))
    if kind == "spamreport":
        return "complaint", "SendGrid spamreport"
    if kind == "dropped":
        reason = DROPPED_REASONS.get(_text(item.get("reason")))
        if reason is not None:
            return reason, detail("SendGrid dropped:", item.get("reason"))
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
