"""Batches in the API: create one, follow it and its recipients, review, send or cancel it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import structlog
from aiohttp import web

from shared.accounts import Role
from shared.db import KeyReused
from shared.ratelimits import sender_limits
from shared.templating import in_render_thread
from web.auth import requires
from web.contract import (
    Approved,
    Batch,
    BatchesQuery,
    BatchList,
    Cancelled,
    Created,
    DraftEdit,
    DraftSaved,
    RecipientPage,
    RecipientsQuery,
    respond,
)
from web.enqueue import create_batch, limits
from web.errors import ApiError
from web.inputs import (
    actor,
    batch_id_of,
    batch_of,
    idempotency_key,
    invalid,
    no_such_batch,
    read_body,
    read_query,
    recipient_id_of,
)
from web.json_body import read_json
from web.keys import DB, SETTINGS
from web.validation import InvalidSubmission, from_json

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


@routes.post("/api/batches")
@requires(Role.SENDER)
async def post_batch(request: web.Request) -> web.Response:
    """Create a batch; with an ``Idempotency-Key``, a retry of the same body gets the same one."""
    key = idempotency_key(request)
    payload = await read_json(request, invalid="invalid_batch")
    try:
        # Validation dry-runs the templates, which must not hold up the event loop.
        submission = await in_render_thread(from_json, payload, limits=limits(request))
    except InvalidSubmission as exc:
        message = f"the batch was not created: {exc.total} problem(s)"
        raise invalid("invalid_batch", exc.problems, message=message, total=exc.total) from None
    idempotency = (key, _request_hash(payload)) if key else None
    try:
        batch_id = await create_batch(request, submission, idempotency)
    except KeyReused as reused:
        if not reused.same_request:
            raise ApiError(
                409, "idempotency_key_reused", "this Idempotency-Key was used with another body"
            ) from None
        # The same body validates to the same submission: the first answer, recomputed.
        replayed = Created.of(
            reused.batch_id, len(submission.recipients), submission.duplicates_removed
        )
        return respond(replayed)
    created = Created.of(batch_id, len(submission.recipients), submission.duplicates_removed)
    return respond(created, status=201)


def _request_hash(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@routes.get("/api/batches")
@requires(Role.VIEWER)
async def get_batches(request: web.Request) -> web.Response:
    """A page of batches, newest first, by state and a piece of the name."""
    query = read_query(request, BatchesQuery)
    summaries = await request.app[DB].list_batches(
        query.filter(), limit=query.limit, limits=sender_limits(request.app[SETTINGS])
    )
    return respond(BatchList.of(summaries, query.limit))


@routes.get("/api/batches/{batch_id}")
@requires(Role.VIEWER)
async def get_batch(request: web.Request) -> web.Response:
    return respond(Batch.of(await batch_of(request)))


@routes.get("/api/batches/{batch_id}/recipients")
@requires(Role.VIEWER)
async def get_recipients(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    query = read_query(request, RecipientsQuery)
    db = request.app[DB]
    if not await db.batch_exists(batch_id):
        raise no_such_batch()
    rows = await db.list_recipients(
        batch_id, status=query.status, after_id=query.after, limit=query.limit
    )
    return respond(RecipientPage.of(rows, query.limit))


@routes.post("/api/batches/{batch_id}/cancel")
@requires(Role.SENDER)
async def cancel_batch(request: web.Request) -> web.Response:
    """Cancel what is left of a batch; sends already in flight finish."""
    batch_id = batch_id_of(request)
    cancelled = await request.app[DB].cancel(batch_id, actor=actor(request))
    if cancelled is None:
        raise no_such_batch()
    log.info("batch_cancelled", batch_id=str(batch_id), cancelled=cancelled)
    return respond(Cancelled(id=batch_id, cancelled=cancelled))


@routes.post("/api/batches/{batch_id}/send")
@requires(Role.SENDER)
async def send_reviewed(request: web.Request) -> web.Response:
    """Send a batch created with ``"send": false`` once its drafts have been reviewed."""
    summary = await batch_of(request)
    if not summary.review:
        raise ApiError(409, "not_a_review_batch", "this batch was sent without review")
    batch_id = summary.id
    queued = await request.app[DB].approve(batch_id, actor=actor(request))
    if queued is None:  # deleted since
        raise no_such_batch()
    log.info("batch_approved", batch_id=str(batch_id), queued=queued)
    return respond(Approved(id=batch_id, queued=queued))


@routes.patch("/api/batches/{batch_id}/recipients/{recipient_id}")
@requires(Role.SENDER)
async def edit_draft(request: web.Request) -> web.Response:
    """Replace the subject and body of a draft that waits for review."""
    batch_id = batch_id_of(request)
    recipient_id = recipient_id_of(request)
    edit = await read_body(request, DraftEdit, invalid_code="invalid_draft")
    if not await request.app[DB].edit_draft(
        batch_id, recipient_id, edit.subject, edit.body, actor=actor(request)
    ):
        raise ApiError(409, "not_editable", "only a draft waiting for review can be edited")
    return respond(DraftSaved(id=recipient_id, subject=edit.subject))
