"""``POST /webhooks/postmark``: Postmark's bounce and spam complaint webhooks.

Postmark signs nothing; it sends the HTTP Basic credentials written into the webhook URL
(``https://user:password@mailroom.example.org/webhooks/postmark``), which must be
``MAILROOM_POSTMARK_WEBHOOK_CREDENTIALS`` (compared in constant time; wrong or missing: 401,
and the client's budget of failed attempts shrinks). Unset, the route answers 404.

A ``Bounce`` record of ``Type`` ``HardBounce`` (the mailbox does not exist) or
``BadEmailAddress`` (the address is not valid) is a hard bounce of its ``Email``; a
``SpamComplaint`` record is a complaint. Other bounce types (soft bounces, DNS errors,
auto-responders, blocks, ``ManuallyDeactivated`` …) and other record types (deliveries, opens,
clicks, subscription changes) are ignored. The record's ``ID`` is kept, so a repeat changes
nothing (409).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from aiohttp import web

from web.keys import SETTINGS
from web.webhooks.common import (
    Event,
    Finding,
    Refused,
    Tally,
    detail,
    disabled,
    event_id,
    malformed,
    read_body,
    read_json,
)
from web.webhooks.endpoint import record, webhook

PROVIDER = "postmark"
HARD_BOUNCE_TYPES = frozenset({"HardBounce", "BadEmailAddress"})
COMPLAINT_TYPE = "SpamComplaint"
BOUNCE_RECORDS = frozenset({"Bounce", COMPLAINT_TYPE})
routes = web.RouteTableDef()


@routes.post("/webhooks/postmark")
@webhook(PROVIDER)
async def postmark_record(request: web.Request) -> Tally:
    """One Postmark webhook record, from a client with the configured Basic credentials."""
    credentials = request.app[SETTINGS].postmark_webhook_credentials
    if credentials is None:
        raise disabled("Postmark", "MAILROOM_POSTMARK_WEBHOOK_CREDENTIALS")
    if not basic_credentials_match(request, credentials.get_secret_value().encode()):
        raise Refused(
            401,
            "unauthorized",
            "send the Basic credentials of MAILROOM_POSTMARK_WEBHOOK_CREDENTIALS",
            forged=True,
            headers={"WWW-Authenticate": 'Basic realm="mailroom webhooks"'},
        )
    payload = read_json(await read_body(request))
    tally = Tally()
    events = postmark_events(payload, tally)
    return await record(request, PROVIDER, events, tally)


def basic_credentials_match(request: web.Request, expected: bytes) -> bool:
    """Whether ``Authorization: Basic`` carries ``expected`` (``user:password``), compared in
    constant time; any header a client can send is just a mismatch."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    try:
        given = base64.b64decode(value.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        given = b""
    return scheme.lower() == "basic" and hmac.compare_digest(given, expected)


def postmark_events(payload: Any, tally: Tally) -> list[Event]:
    """The event in one Postmark record (none for a record that is not a bounce)."""
    if not isinstance(payload, dict):
        raise malformed("the body must be a Postmark webhook record (a JSON object)")
    kind = payload.get("RecordType")
    if kind not in BOUNCE_RECORDS:
        tally.ignored += 1
        return []
    event = Event(event_id(payload.get("ID"), "ID"))
    bounce_type = payload.get("Type")
    if kind == COMPLAINT_TYPE or bounce_type == COMPLAINT_TYPE:
        event.findings.append(Finding(payload.get("Email"), "complaint", "Postmark SpamComplaint"))
    elif bounce_type in HARD_BOUNCE_TYPES:
        why = detail("Postmark", bounce_type)
        event.findings.append(Finding(payload.get("Email"), "hard_bounce", why))
    else:
        tally.ignored += 1
    return [event]
