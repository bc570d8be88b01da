"""``POST /webhooks/ses``: Amazon SES bounce and complaint notifications, through SNS.

Subscribe this URL (HTTPS) to the SNS topics SES publishes to, and list them in
``MAILROOM_SES_TOPIC_ARNS``; unset, the route answers 404. A request is acted on only if, in
this order: its body is an SNS message (at most 1 MiB), its topic is listed (403), it was
signed within ``MAILROOM_WEBHOOK_MAX_AGE_SECONDS`` (403), its certificate URL is SNS's (403,
never fetched otherwise), its signature verifies with that certificate (403), and its
``MessageId`` was never acted on before (409). A ``SubscriptionConfirmation`` then visits its
``SubscribeURL``; a ``Notification`` is read as SES writes it, for identity notifications
(``notificationType``) and configuration-set events (``eventType``) alike:

- ``Bounce`` with ``bounceType`` ``Permanent``: each ``bouncedRecipients[].emailAddress`` is a
  hard bounce. ``Transient`` and ``Undetermined`` bounces are not about the address: ignored.
- ``Complaint``: each ``complainedRecipients[].emailAddress`` is a complaint, unless the
  feedback type is ``not-spam`` (a recipient taking a spam report back).
- anything else (``Delivery``, ``Send``, ``DeliveryDelay``, ``Open`` …): ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from web.keys import DB, SETTINGS, SNS
from web.webhooks.common import (
    Event,
    Finding,
    Refused,
    Tally,
    check_signed_time,
    detail,
    disabled,
    read_body,
    read_json,
)
from web.webhooks.endpoint import record, webhook
from web.webhooks.sns import (
    SUBSCRIPTION_CONFIRMATION,
    UNSUBSCRIBE_CONFIRMATION,
    SnsMessage,
    parse_message,
    signature_ok,
)

PROVIDER = "ses"
routes = web.RouteTableDef()


@routes.post("/webhooks/ses")
@webhook(PROVIDER)
async def ses_notification(request: web.Request) -> Tally:
    """An SNS message from a listed topic: a subscription to confirm or an SES notification."""
    settings = request.app[SETTINGS]
    if not settings.ses_topic_arns:
        raise disabled("SES", "MAILROOM_SES_TOPIC_ARNS")
    message = parse_message(read_json(await read_body(request)))
    if message.topic_arn not in settings.ses_topic_arns:
        raise Refused(403, "unknown_topic", "TopicArn is not in MAILROOM_SES_TOPIC_ARNS")
    check_signed_time(
        message.timestamp, max_age_seconds=settings.webhook_max_age_seconds, name="Timestamp"
    )
    sns = request.app[SNS]
    if not signature_ok(message, await sns.public_key(message.signing_cert_url)):
        raise Refused(403, "bad_signature", "the SNS signature does not verify", forged=True)
    if message.type == SUBSCRIPTION_CONFIRMATION:
        return await _confirm(request, message)
    if message.type == UNSUBSCRIBE_CONFIRMATION:
        return await record(request, PROVIDER, [Event(message.message_id)], Tally(ignored=1))
    tally = Tally()
    event = Event(message.message_id, ses_findings(message.message, tally))
    return await record(request, PROVIDER, [event], tally)


async def _confirm(request: web.Request, message: SnsMessage) -> Tally:
    # The id is recorded in the transaction that waits for the GET: a second delivery of the
    # same confirmation waits, then finds it seen; a failed GET leaves it unseen for a retry.
    async with request.app[DB].webhook_events(PROVIDER, [message.message_id]) as delivery:
        if not delivery.new:
            raise Refused(409, "replayed", "this MessageId was received before")
        await request.app[SNS].confirm(message.subscribe_url)
    return Tally(subscription_confirmed=True)


def ses_findings(text: str, tally: Tally) -> list[Finding]:
    """What an SES notification (the SNS ``Message``) asks us to suppress; counts in ``tally``
    what it ignores and what it cannot read."""
    try:
        payload = read_json(text.encode("utf-8"))
    except Refused:
        payload = None
    if not isinstance(payload, dict):
        tally.malformed += 1
        return []
    kind = payload.get("notificationType") or payload.get("eventType")
    if kind == "Bounce":
        return _recipients(payload.get("bounce"), "bouncedRecipients", tally, _bounce)
    if kind == "Complaint":
        return _recipients(payload.get("complaint"), "complainedRecipients", tally, _complaint)
    tally.ignored += 1
    return []


def _bounce(report: dict[str, Any]) -> tuple[str, str] | None:
    if report.get("bounceType") != "Permanent":
        return None
    return "hard_bounce", detail("SES bounce", "Permanent", report.get("bounceSubType"))


def _complaint(report: dict[str, Any]) -> tuple[str, str] | None:
    feedback = report.get("complaintFeedbackType")
    if feedback == "not-spam":
        return None
    return "complaint", detail("SES complaint", feedback if isinstance(feedback, str) else "")


# What a report's own fields say: (reason, detail) to suppress its recipients, or None.
Verdict = Callable[[dict[str, Any]], tuple[str, str] | None]


def _recipients(report: Any, key: str, tally: Tally, judge: Verdict) -> list[Finding]:
    if not isinstance(report, dict) or not isinstance(report.get(key), list):
        tally.malformed += 1
        return []
    verdict = judge(report)
    if verdict is None:
        tally.ignored += 1
        return []
    reason, why = verdict
    found = []
    for recipient in report[key]:
        address = recipient.get("emailAddress") if isinstance(recipient, dict) else None
        found.append(Finding(address, reason, why))
    return found
