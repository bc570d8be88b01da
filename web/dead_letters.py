"""Dead letters in the API: list them across batches, redrive or discard a selection."""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from aiohttp import web

from shared.db import MAX_ID, Selection
from web.api import InvalidQuery, page_json, page_of
from web.json_body import read_json
from web.keys import DB
from web.middlewares import api_error

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_IDS = 10_000


class BadSelection(ValueError):
    """The body does not say which dead letters: ids, a batch_id, or all."""


def parse_selection(payload: Any) -> Selection:
    """``{"ids": [1, 2]}``, ``{"batch_id": "…"}`` or ``{"all": true}`` — exactly one of them."""
    if not isinstance(payload, dict):
        raise BadSelection("expected a JSON object")
    given = [key for key in ("ids", "batch_id", "all") if key in payload]
    unknown = sorted(set(payload) - {"ids", "batch_id", "all"})
    if unknown:
        raise BadSelection(f"unknown field(s): {', '.join(unknown)}")
    if len(given) != 1:
        raise BadSelection('give exactly one of "ids", "batch_id" or "all"')
    if "all" in payload:
        if payload["all"] is not True:
            raise BadSelection('"all" must be true')
        return Selection(everything=True)
    if "batch_id" in payload:
        try:
            return Selection(batch_id=uuid.UUID(str(payload["batch_id"])))
        except ValueError:
            raise BadSelection('"batch_id" must be a batch id (a UUID)') from None
    ids = payload["ids"]
    if (
        not isinstance(ids, list)
        or not ids
        or len(ids) > MAX_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in ids)
    ):
        raise BadSelection(f'"ids" must be a list of 1..{MAX_IDS} positive recipient ids')
    return Selection(ids=ids)


@routes.get("/api/dead-letters")
async def list_dead_letters(request: web.Request) -> web.Response:
    try:
        after, limit = page_of(request)
        batch = request.query.get("batch_id")
        batch_id = uuid.UUID(batch) if batch else None
    except InvalidQuery as exc:
        return api_error(422, "invalid_query", str(exc))
    except ValueError:
        return api_error(422, "invalid_query", "batch_id must be a UUID")
    rows = await request.app[DB].list_dead_letters(batch_id=batch_id, after_id=after, limit=limit)
    items = [
        {
            "id": row["id"],
            "batch_id": str(row["batch_id"]),
            "email": row["email"],
            "attempts": row["attempts"],
            "last_error": row["last_error"],
            "died_at": row["died_at"].isoformat(),
        }
        for row in rows
    ]
    return page_json("dead_letters", items, limit)


async def _selection(request: web.Request) -> Selection | web.Response:
    payload = await read_json(request, invalid="invalid_selection")
    try:
        return parse_selection(payload)
    except BadSelection as exc:
        return api_error(422, "invalid_selection", str(exc))


@routes.post("/api/dead-letters/redrive")
async def redrive(request: web.Request) -> web.Response:
    selection = await _selection(request)
    if isinstance(selection, web.Response):
        return selection
    count = await request.app[DB].redrive(selection)
    log.info("dead_letters_redriven", count=count)
    return web.json_response({"redriven": count})


@routes.post("/api/dead-letters/discard")
async def discard(request: web.Request) -> web.Response:
    selection = await _selection(request)
    if isinstance(selection, web.Response):
        return selection
    count = await request.app[DB].discard(selection)
    log.info("dead_letters_discarded", count=count)
    return web.json_response({"discarded": count})
