"""Suppressions: the public unsubscribe pages (RFC 8058 one-click) and the operators' API.

``GET /u/<token>`` shows what the link will do and a button; ``POST /u/<token>`` unsubscribes
at once. Mail providers POST ``List-Unsubscribe=One-Click`` to the same URL with no cookie and
no CSRF token, as RFC 8058 requires, so these routes need neither: the signed token is the
authority, and a tampered one is refused. Both are idempotent.

Operators list, add and remove suppressions through ``/api/suppressions``.
"""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
import structlog
from aiohttp import web

from shared.db import SUPPRESSION_REASONS
from shared.metrics import UNSUBSCRIBES
from shared.unsubscribe import Unsubscription, read_token
from web.api import InvalidQuery, page_json, page_of
from web.json_body import read_json
from web.keys import DB, SETTINGS
from web.middlewares import api_error
from web.validation import InvalidSubmission, addresses_from_list

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

UNSUBSCRIBE_PREFIX = "/u/"
MAX_ADDRESSES = 10_000


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
        [found.address], reason="unsubscribed", detail=f"link in mail from {found.sender}"
    )
    if added:
        UNSUBSCRIBES.inc()
        log.info("unsubscribed", address=found.address, sender=found.sender)
    return _page(request, "done", found.address)


@routes.get("/api/suppressions")
async def list_suppressions(request: web.Request) -> web.Response:
    try:
        after, limit = page_of(request)
    except InvalidQuery as exc:
        return api_error(422, "invalid_query", str(exc))
    rows = await request.app[DB].list_suppressions(after_id=after, limit=limit)
    for row in rows:
        row["created_at"] = row["created_at"].isoformat()
    return page_json("suppressions", rows, limit)


@routes.post("/api/suppressions")
async def add_suppressions(request: web.Request) -> web.Response:
    """``{"addresses": [...], "reason": "manual"}``: never send to these addresses again."""
    payload = await read_json(request, invalid="invalid_suppression")
    reason = payload.get("reason", "manual") if isinstance(payload, dict) else None
    if reason not in SUPPRESSION_REASONS:
        return api_error(
            422, "invalid_suppression", f"reason must be one of: {', '.join(SUPPRESSION_REASONS)}"
        )
    addresses = _addresses(payload)
    if isinstance(addresses, web.Response):
        return addresses
    added = await request.app[DB].suppress(addresses, reason=reason, detail="added by an operator")
    log.info("suppressions_added", added=added, given=len(addresses), reason=reason)
    distinct = len({a.lower() for a in addresses})  # as the database keys them
    return web.json_response({"added": added, "already_suppressed": distinct - added})


@routes.post("/api/suppressions/remove")
async def remove_suppressions(request: web.Request) -> web.Response:
    """``{"addresses": [...]}``: these addresses may be sent to again."""
    payload = await read_json(request, invalid="invalid_suppression")
    addresses = _addresses(payload)
    if isinstance(addresses, web.Response):
        return addresses
    removed = await request.app[DB].unsuppress(addresses)
    log.info("suppressions_removed", removed=removed)
    return web.json_response({"removed": removed})


def _addresses(payload: Any) -> list[str] | web.Response:
    """Every address normalized, or a 422 listing every bad one by position."""
    given = payload.get("addresses") if isinstance(payload, dict) else None
    unknown = sorted(set(payload) - {"addresses", "reason"}) if isinstance(payload, dict) else []
    if unknown:
        return api_error(422, "invalid_suppression", f"unknown field(s): {', '.join(unknown)}")
    if not isinstance(given, list) or not given or len(given) > MAX_ADDRESSES:
        return api_error(
            422,
            "invalid_suppression",
            f'"addresses" must be a list of 1 to {MAX_ADDRESSES} addresses',
        )
    try:
        return addresses_from_list(given)
    except InvalidSubmission as exc:
        return api_error(
            422,
            "invalid_suppression",
            f"{exc.total} address(es) are not valid",
            {"problems": [p.as_dict() for p in exc.problems]},
        )
