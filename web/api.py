"""The JSON API: create a batch, read its progress and its recipients, and dev-mode mail."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import uuid
from typing import Any

import structlog
from aiohttp import web

from shared.db import MAX_ID, RECIPIENT_STATUSES, BatchSummary, KeyReused
from shared.headers import lone_surrogate_message, unsafe_message
from shared.metrics import BATCHES_CREATED, RECIPIENTS_ENQUEUED
from shared.templating import in_render_thread
from web.json_body import read_json
from web.keys import AUTH_KIND, CAPTURED_MAIL, DB, REQUEST_ID, SETTINGS
from web.middlewares import api_error
from web.validation import InvalidSubmission, Limits, Submission, from_json

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()

MAX_PAGE_SIZE = 500


class InvalidQuery(ValueError):
    """A query parameter the API cannot use; the message says which and why."""


def page_of(request: web.Request) -> tuple[int, int]:
    """The keyset page asked for: (``after`` id, ``limit``), or :class:`InvalidQuery`."""
    try:
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        raise InvalidQuery("after and limit must be integers") from None
    if not 1 <= limit <= MAX_PAGE_SIZE or not 0 <= after <= MAX_ID:
        raise InvalidQuery(f"limit must be 1..{MAX_PAGE_SIZE}, after >= 0")
    return after, limit


def page_json(name: str, items: list[dict[str, Any]], limit: int) -> web.Response:
    """A page of ``items`` under ``name``; ``next_after`` is the cursor of the next page."""
    next_after = items[-1]["id"] if len(items) == limit else None
    return web.json_response({name: items, "next_after": next_after})


def limits(request: web.Request) -> Limits:
    settings = request.app[SETTINGS]
    return Limits(
        max_batch_size=settings.max_batch_size, llm_available=settings.groq_api_key is not None
    )


def batch_json(summary: BatchSummary) -> dict[str, Any]:
    return {
        "id": str(summary.id),
        "status": summary.status,
        "total": summary.total,
        "counts": summary.counts,
        "progress": round(summary.progress, 4),
        "drafter": summary.drafter,
        "review": summary.review,
        "approved": summary.approved,
        "tokens": {"prompt": summary.prompt_tokens, "completion": summary.completion_tokens},
        "send_at": summary.send_at.isoformat() if summary.send_at else None,
        "created_at": summary.created_at.isoformat(),
    }


def invalid_response(exc: InvalidSubmission) -> web.Response:
    return api_error(
        422,
        "invalid_batch",
        f"the batch was not created: {exc.total} problem(s)",
        {"problems": [p.as_dict() for p in exc.problems], "total_problems": exc.total},
    )


async def create_batch(
    request: web.Request, submission: Submission, idempotency: tuple[str, str] | None = None
) -> uuid.UUID:
    """The one path every submission takes into the database (API and form alike)."""
    batch = submission.to_new_batch(
        created_by=request.get(AUTH_KIND, "unknown"), request_id=request.get(REQUEST_ID)
    )
    batch_id = await request.app[DB].create_batch(batch, idempotency=idempotency)
    BATCHES_CREATED.inc()
    RECIPIENTS_ENQUEUED.inc(len(submission.recipients))
    log.info(
        "batch_created",
        batch_id=str(batch_id),
        recipients=len(submission.recipients),
        duplicates_removed=submission.duplicates_removed,
        drafter=submission.drafter,
    )
    return batch_id


@routes.post("/api/batches")
async def post_batch(request: web.Request) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not _IDEMPOTENCY_KEY.match(key):
        return api_error(
            400, "bad_idempotency_key", "Idempotency-Key must be 1-255 printable ASCII characters"
        )
    payload = await read_json(request, invalid="invalid_batch")
    try:
        # Validation dry-runs the templates, which must not hold up the event loop.
        submission = await in_render_thread(from_json, payload, limits=limits(request))
    except InvalidSubmission as exc:
        return invalid_response(exc)
    idempotency = (key, _request_hash(payload)) if key else None
    try:
        batch_id = await create_batch(request, submission, idempotency)
    except KeyReused as reused:
        if not reused.same_request:
            return api_error(
                409, "idempotency_key_reused", "this Idempotency-Key was used with another body"
            )
        summary = await request.app[DB].batch_summary(reused.batch_id)
        assert summary is not None
        return web.json_response(_created(reused.batch_id, summary.total, None), status=200)
    return web.json_response(
        _created(batch_id, len(submission.recipients), submission.duplicates_removed), status=201
    )


_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _request_hash(payload: Any) -> str:
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _created(batch_id: uuid.UUID, total: int, duplicates_removed: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": str(batch_id),
        "total": total,
        "status_url": f"/api/batches/{batch_id}",
    }
    if duplicates_removed is not None:
        body["duplicates_removed"] = duplicates_removed
    return body


@routes.post("/api/batches/{batch_id}/cancel")
async def cancel_batch(request: web.Request) -> web.Response:
    """Cancel what is left of a batch; sends already in flight finish."""
    batch_id = batch_id_of(request)
    cancelled = await request.app[DB].cancel(batch_id)
    if cancelled is None:
        return api_error(404, "not_found", "no such batch")
    log.info("batch_cancelled", batch_id=str(batch_id), cancelled=cancelled)
    return web.json_response({"id": str(batch_id), "cancelled": cancelled})


def batch_id_of(request: web.Request) -> uuid.UUID:
    try:
        return uuid.UUID(request.match_info["batch_id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such batch") from None


@routes.get("/api/batches")
async def get_batches(request: web.Request) -> web.Response:
    summaries = await request.app[DB].recent_batches(limit=50)
    return web.json_response({"batches": [batch_json(s) for s in summaries]})


@routes.get("/api/batches/{batch_id}")
async def get_batch(request: web.Request) -> web.Response:
    summary = await request.app[DB].batch_summary(batch_id_of(request))
    if summary is None:
        return api_error(404, "not_found", "no such batch")
    return web.json_response(batch_json(summary))


@routes.get("/api/batches/{batch_id}/recipients")
async def get_recipients(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    status = request.query.get("status")
    if status is not None and status not in RECIPIENT_STATUSES:
        return api_error(
            422, "invalid_query", f"status must be one of: {', '.join(RECIPIENT_STATUSES)}"
        )
    try:
        after, limit = page_of(request)
    except InvalidQuery as exc:
        return api_error(422, "invalid_query", str(exc))
    db = request.app[DB]
    if not await db.batch_exists(batch_id):
        return api_error(404, "not_found", "no such batch")
    rows = await db.list_recipients(batch_id, status=status, after_id=after, limit=limit)
    items = [
        {
            "id": row["id"],
            "email": row["email"],
            "status": row["status"],
            "attempts": row["attempts"],
            "last_error": row["last_error"],
            "message_id": row["message_id"],
            "sent_at": row["sent_at"].isoformat() if row["sent_at"] else None,
        }
        for row in rows
    ]
    return page_json("recipients", items, limit)


@routes.get("/api/dev/messages")
async def get_dev_messages(request: web.Request) -> web.Response:
    capture = request.app.get(CAPTURED_MAIL)
    if capture is None:
        return api_error(404, "not_found", "the mail capture exists only in `mailroom dev`")
    messages = await asyncio.to_thread(capture.messages)
    return web.json_response({"messages": [m.as_dict() for m in messages]})


@routes.post("/api/batches/{batch_id}/send")
async def send_reviewed(request: web.Request) -> web.Response:
    """Send a batch created with ``"send": false`` once its drafts have been reviewed."""
    batch_id = batch_id_of(request)
    db = request.app[DB]
    summary = await db.batch_summary(batch_id)
    if summary is None:
        return api_error(404, "not_found", "no such batch")
    if not summary.review:
        return api_error(409, "not_a_review_batch", "this batch was sent without review")
    queued = await db.approve(batch_id)
    log.info("batch_approved", batch_id=str(batch_id), queued=queued)
    return web.json_response({"id": str(batch_id), "queued": queued})


MAX_EDITED_SUBJECT_CHARS = 255
MAX_EDITED_BODY_CHARS = 100_000


def checked_edit(payload: Any) -> tuple[str, str]:
    """A reviewed draft's new subject and body, or :class:`ValueError` saying what is wrong."""
    if not isinstance(payload, dict) or set(payload) - {"subject", "body"}:
        raise ValueError('expected {"subject": "...", "body": "..."}')
    subject, body = payload.get("subject"), payload.get("body")
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("subject: required")
    if "\r" in subject or "\n" in subject or len(subject) > MAX_EDITED_SUBJECT_CHARS:
        raise ValueError(f"subject: one line of at most {MAX_EDITED_SUBJECT_CHARS} characters")
    not_allowed = unsafe_message(subject, allow_tab=True)  # NUL included
    if not_allowed is not None:
        raise ValueError(f"subject: {not_allowed}")
    if not isinstance(body, str) or not body.strip() or len(body) > MAX_EDITED_BODY_CHARS:
        raise ValueError(f"body: required, at most {MAX_EDITED_BODY_CHARS} characters")
    if "\0" in body:
        raise ValueError("body: NUL characters are not allowed")
    not_text = lone_surrogate_message(body)
    if not_text is not None:
        raise ValueError(f"body: {not_text}")
    return subject.strip(), body


@routes.patch("/api/batches/{batch_id}/recipients/{recipient_id}")
async def edit_draft(request: web.Request) -> web.Response:
    """Replace the subject and body of a draft that waits for review."""
    batch_id = batch_id_of(request)
    try:
        recipient_id = int(request.match_info["recipient_id"])
    except ValueError:
        return api_error(400, "malformed_request", "recipient id must be a number")
    if not 1 <= recipient_id <= MAX_ID:
        return api_error(404, "not_found", "no such recipient")
    payload = await read_json(request, invalid="invalid_draft")
    try:
        subject, body = checked_edit(payload)
    except ValueError as exc:
        return api_error(422, "invalid_draft", str(exc))
    if not await request.app[DB].edit_draft(batch_id, recipient_id, subject, body):
        return api_error(409, "not_editable", "only a draft waiting for review can be edited")
    return web.json_response({"id": recipient_id, "subject": subject})
