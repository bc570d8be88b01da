"""Dead letters in the API: list them across batches, redrive or discard a selection."""

from __future__ import annotations

import structlog
from aiohttp import web

from shared.accounts import Role
from web.auth import requires
from web.contract import DeadLetterPage, DeadLettersQuery, Discarded, Redriven, respond
from web.inputs import actor, read_query, read_selection
from web.keys import DB

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


@routes.get("/api/dead-letters")
@requires(Role.VIEWER)
async def list_dead_letters(request: web.Request) -> web.Response:
    query = read_query(request, DeadLettersQuery)
    rows = await request.app[DB].list_dead_letters(
        batch_id=query.batch_id, after_id=query.after, limit=query.limit
    )
    return respond(DeadLetterPage.of(rows, query.limit))


@routes.post("/api/dead-letters/redrive")
@requires(Role.SENDER)
async def redrive(request: web.Request) -> web.Response:
    """Requeue the selected dead letters with a fresh attempt budget."""
    count = await request.app[DB].redrive(await read_selection(request), actor=actor(request))
    log.info("dead_letters_redriven", count=count)
    return respond(Redriven(redriven=count))


@routes.post("/api/dead-letters/discard")
@requires(Role.SENDER)
async def discard(request: web.Request) -> web.Response:
    """Give up on the selected dead letters: they become cancelled."""
    count = await request.app[DB].discard(await read_selection(request), actor=actor(request))
    log.info("dead_letters_discarded", count=count)
    return respond(Discarded(discarded=count))
