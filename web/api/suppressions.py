"""Suppressions in the API: list, add and remove the addresses that are never sent to."""

from __future__ import annotations

import structlog
from aiohttp import web

from shared.accounts import Role
from web.auth import requires
from web.contract import (
    NewSuppressions,
    PageQuery,
    RemovedSuppressions,
    SuppressionPage,
    SuppressionsAdded,
    SuppressionsRemoved,
    respond,
)
from web.inputs import actor, invalid, read_body, read_query
from web.keys import DB
from web.validation import InvalidSubmission, addresses_from_list

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


@routes.get("/api/suppressions")
@requires(Role.VIEWER)
async def list_suppressions(request: web.Request) -> web.Response:
    query = read_query(request, PageQuery)
    rows = await request.app[DB].list_suppressions(after_id=query.after, limit=query.limit)
    return respond(SuppressionPage.of(rows, query.limit))


@routes.post("/api/suppressions")
@requires(Role.SENDER)
async def add_suppressions(request: web.Request) -> web.Response:
    """``{"addresses": [...], "reason": "manual"}``: never send to these addresses again."""
    given = await read_body(request, NewSuppressions, invalid_code="invalid_suppression")
    addresses = _normalized(given.addresses)
    added = await request.app[DB].suppress(
        addresses, reason=given.reason, detail="added by an operator", actor=actor(request)
    )
    log.info("suppressions_added", added=added, given=len(addresses), reason=given.reason)
    distinct = len({a.lower() for a in addresses})  # as the database keys them
    return respond(SuppressionsAdded(added=added, already_suppressed=distinct - added))


@routes.post("/api/suppressions/remove")
@requires(Role.SENDER)
async def remove_suppressions(request: web.Request) -> web.Response:
    """``{"addresses": [...]}``: these addresses may be sent to again."""
    given = await read_body(request, RemovedSuppressions, invalid_code="invalid_suppression")
    removed = await request.app[DB].unsuppress(_normalized(given.addresses), actor=actor(request))
    log.info("suppressions_removed", removed=removed)
    return respond(SuppressionsRemoved(removed=removed))


def _normalized(addresses: list[str]) -> list[str]:
    """Every address normalized, or a 422 listing every bad one by position."""
    try:
        return addresses_from_list(addresses)
    except InvalidSubmission as exc:
        message = f"{exc.total} address(es) are not valid"
        raise invalid("invalid_suppression", exc.problems, message=message) from None
