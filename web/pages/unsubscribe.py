"""The public unsubscribe pages behind the link in every message (RFC 8058 one-click).

``GET /u/<token>`` shows what the link will do and a button; ``POST /u/<token>`` unsubscribes
at once. Mail providers POST ``List-Unsubscribe=One-Click`` to the same URL with no cookie and
no CSRF token, as RFC 8058 requires, so these routes need neither: the signed token is the
authority, and a tampered one is refused. Both are idempotent.
"""

from __future__ import annotations

import aiohttp_jinja2
import structlog
from aiohttp import web

from shared.accounts import UNSUBSCRIBE_ACTOR
from shared.metrics import UNSUBSCRIBES
from shared.unsubscribe import Unsubscription, read_token
from web.keys import DB, SETTINGS

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

UNSUBSCRIBE_PREFIX = "/u/"


def _unsubscription(request: web.Request) -> Unsubscription | None:
    secret = request.app[SETTINGS].secret_key
    if secret is None:
        return None
    return read_token(request.match_info["token"], secret=secret.get_secret_value())


def _page(request: web.Request, state: str, address: str | None, status: int = 200) -> web.Response:
    # A public page: no session, so no navigation and no CSRF token.
    context = {"state": state, "address": address, "csrf_token": "", "dev_mode": False}
    return aiohttp_jinja2.render_template("unsubscribe.html", request, context, status=status)


@routes.get(UNSUBSCRIBE_PREFIX + "{token}")
async def unsubscribe_page(request: web.Request) -> web.Response:
    """What the link will do, with a button; nothing changes on a GET (link scanners follow
    links in mail)."""
    found = _unsubscription(request)
    if found is None:
        return _page(request, "invalid", None, status=404)
    return _page(request, "confirm", found.address)


@routes.post(UNSUBSCRIBE_PREFIX + "{token}")
async def unsubscribe(request: web.Request) -> web.Response:
    """Unsubscribe at once: the page's button, or a mail provider's one-click POST."""
    found = _unsubscription(request)
    if found is None:
        return _page(request, "invalid", None, status=404)
    added = await request.app[DB].suppress(
        [found.address],
        reason="unsubscribed",
        detail=f"link in mail from {found.sender}",
        actor=UNSUBSCRIBE_ACTOR,
        audit_unchanged=False,
    )
    if added:
        UNSUBSCRIBES.inc()
        log.info("unsubscribed", address=found.address, sender=found.sender)
    return _page(request, "done", found.address)
