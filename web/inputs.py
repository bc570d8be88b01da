"""What a handler reads from a request: its JSON body, query and headers as contract models,
and the ids in its path. Each helper returns the value or raises (an :class:`ApiError`, or
aiohttp's 404 for an id that names nothing), so a handler reads top to bottom.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.db import MAX_ID, BatchSummary
from shared.db import Selection as DbSelection
from shared.ratelimits import sender_limits
from web.contract import SELECTIONS, IdempotencyHeaders, Problem, SelectAll, SelectIds, problems_of
from web.errors import ApiError
from web.json_body import read_json
from web.keys import DB, PRINCIPAL, SETTINGS

Model = TypeVar("Model", bound=BaseModel)


def invalid(
    code: str, problems: list[Problem], *, message: str | None = None, total: int | None = None
) -> ApiError:
    """The 422 that lists every problem (with ``total_problems`` when the list is cut short)."""
    details: dict[str, Any] = {"problems": [p.as_dict() for p in problems]}
    if total is not None:
        details["total_problems"] = total
    return ApiError(422, code, message or "; ".join(p.sentence() for p in problems), details)


def validated(model: type[Model], payload: Any, *, invalid_code: str) -> Model:
    """``payload`` as ``model``, or the 422 naming each field at fault."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise invalid(invalid_code, problems_of(exc, model)) from None


async def read_body(request: web.Request, model: type[Model], *, invalid_code: str) -> Model:
    """The request's JSON body (read by :func:`web.json_body.read_json`) as ``model``."""
    return validated(
        model, await read_json(request, invalid=invalid_code), invalid_code=invalid_code
    )


def read_query(request: web.Request, model: type[Model]) -> Model:
    """The query string as ``model`` (the first of a repeated name), or a 422 ``invalid_query``.

    Names the model does not know are ignored, as a browser's extra parameters should be.
    """
    given = {name: request.query.getone(name) for name in request.query}
    return validated(model, given, invalid_code="invalid_query")


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header, if any, or a 400 ``bad_idempotency_key``."""
    given = request.headers.get("Idempotency-Key")
    try:
        return IdempotencyHeaders.model_validate({"Idempotency-Key": given}).key
    except ValidationError:
        raise ApiError(
            400, "bad_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters"
        ) from None


async def read_selection(request: web.Request) -> DbSelection:
    """Which dead letters a body names: ``{"ids": [...]}``, ``{"batch_id": "…"}`` or
    ``{"all": true}``, exactly one of them; or a 422 ``invalid_selection``."""
    payload = await read_json(request, invalid="invalid_selection")
    given = [key for key in SELECTIONS if key in payload]
    if len(given) != 1:
        unknown = [Problem(key, "unknown field") for key in sorted(set(payload) - set(SELECTIONS))]
        choose = Problem(None, 'give exactly one of "ids", "batch_id" or "all"')
        raise invalid("invalid_selection", [*unknown, choose])
    chosen = validated(SELECTIONS[given[0]], payload, invalid_code="invalid_selection")
    if isinstance(chosen, SelectAll):
        return DbSelection(everything=True)
    if isinstance(chosen, SelectIds):
        return DbSelection(ids=chosen.ids)
    return DbSelection(batch_id=chosen.batch_id)


def no_such_batch() -> web.HTTPNotFound:
    """The 404 of a batch id that names nothing (the API's error middleware gives it the API's
    shape, code ``not_found``)."""
    return web.HTTPNotFound(text="no such batch")


def batch_id_of(request: web.Request) -> uuid.UUID:
    """The path's ``{batch_id}``; one that is not a UUID names no batch (404)."""
    try:
        return uuid.UUID(request.match_info["batch_id"])
    except ValueError:
        raise no_such_batch() from None


async def batch_of(request: web.Request) -> BatchSummary:
    """The batch the path's ``{batch_id}`` names, with its counts and state, or a 404."""
    limits = sender_limits(request.app[SETTINGS])
    summary = await request.app[DB].batch_summary(batch_id_of(request), limits=limits)
    if summary is None:
        raise no_such_batch()
    return summary


def recipient_id_of(request: web.Request) -> int:
    """The path's ``{recipient_id}``; one that is not a row id names no recipient (404)."""
    try:
        recipient_id = int(request.match_info["recipient_id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such recipient") from None
    if not 1 <= recipient_id <= MAX_ID:
        raise web.HTTPNotFound(text="no such recipient")
    return recipient_id


def actor(request: web.Request) -> str:
    """Who the audit log names for what this request changes: the user's name, or
    ``api-token`` for ``MAILROOM_API_TOKEN``."""
    return request[PRINCIPAL].name
