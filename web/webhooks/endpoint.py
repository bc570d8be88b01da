"""The wrapper every webhook route runs in, and the one transaction that records a delivery.

:func:`webhook` answers a locked-out client 429 before the handler runs, turns a refusal into
its status and error body, counts every request in ``mailroom_webhook_requests_total`` by
provider and outcome, and logs one line per request (never the payload or a credential).
Clients whose requests fail authentication lose their budget as wrong API tokens do: at most
``MAILROOM_LOGIN_ATTEMPTS_PER_MINUTE`` a minute, counted apart from logins.

:func:`record` writes a delivery's event ids and the suppressions they make in one
transaction: a replay changes nothing, and a failure leaves nothing behind.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web

from shared.addresses import InvalidAddress, normalize_address
from shared.metrics import WEBHOOK_EVENTS, WEBHOOK_REQUESTS
from web.errors import ApiError
from web.keys import DB, WEBHOOK_LIMITER
from web.webhooks.common import Event, Refused, Tally

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[Tally]]


def webhook(provider: str) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.Response]]]:
    """Make ``handler`` (which returns a :class:`Tally` or raises) a route for ``provider``."""

    def wrap(handler: Handler) -> Callable[[web.Request], Awaitable[web.Response]]:
        @functools.wraps(handler)
        async def run(request: web.Request) -> web.Response:
            limiter = request.app[WEBHOOK_LIMITER]
            client = limiter.client_of(request)
            try:
                if limiter.blocked(client):
                    raise Refused(
                        429,
                        "too_many_attempts",
                        "too many unauthenticated requests from this address; wait a minute",
                        headers={"Retry-After": "60"},
                    )
                tally = await handler(request)
            except ApiError as exc:
                if isinstance(exc, Refused) and exc.forged:
                    limiter.failed(client)
                WEBHOOK_REQUESTS.labels(provider=provider, outcome=exc.code).inc()
                log.warning(
                    "webhook_refused",
                    provider=provider,
                    status=exc.status,
                    reason=exc.code,
                    message=exc.message,
                )
                return exc.response()
            WEBHOOK_REQUESTS.labels(provider=provider, outcome="accepted").inc()
            log.info("webhook_accepted", provider=provider, **tally.as_dict())
            return web.json_response({"status": "accepted", **tally.as_dict()})

        return run

    return wrap


async def record(
    request: web.Request, provider: str, events: Sequence[Event], tally: Tally
) -> Tally:
    """Record ``events`` and suppress what they find, in one transaction; return ``tally``.

    An event whose id was recorded before is a duplicate and finds nothing. A request whose
    every event is a duplicate is a replay: a 409, and nothing changes. An address that is not
    one (shared/addresses.py) is skipped and counted; the rest of the event still counts.
    """
    ids = list(dict.fromkeys(event.id for event in events))
    async with request.app[DB].webhook_events(provider, ids) as delivery:
        if ids and not delivery.new:
            raise Refused(409, "replayed", "every event in this request was received before")
        taken: set[str] = set()
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for event in events:
            if event.id not in delivery.new or event.id in taken:
                tally.duplicates += 1
                continue
            taken.add(event.id)
            for finding in event.findings:
                try:
                    if not isinstance(finding.address, str):
                        raise InvalidAddress("not a string")
                    address = normalize_address(finding.address)
                except InvalidAddress:
                    tally.invalid_addresses += 1
                    continue
                if finding.reason == "hard_bounce":
                    tally.hard_bounces += 1
                else:
                    tally.complaints += 1
                groups[(finding.reason, finding.detail)].append(address)
        for (reason, why), addresses in groups.items():
            tally.suppressed += await delivery.suppress(addresses, reason=reason, detail=why)
    _count(provider, tally)
    return tally


def _count(provider: str, tally: Tally) -> None:
    for outcome, number in (
        ("hard_bounce", tally.hard_bounces),
        ("complaint", tally.complaints),
        ("ignored", tally.ignored),
        ("invalid_address", tally.invalid_addresses),
        ("malformed", tally.malformed),
        ("duplicate", tally.duplicates),
    ):
        if number:
            WEBHOOK_EVENTS.labels(provider=provider, outcome=outcome).inc(number)
