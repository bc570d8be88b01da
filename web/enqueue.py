"""The one path a validated submission takes into the database, from the API and the form."""

from __future__ import annotations

import uuid

import structlog
from aiohttp import web

from shared.metrics import BATCHES_CREATED, RECIPIENTS_ENQUEUED
from web.keys import DB, PRINCIPAL, REQUEST_ID, SETTINGS
from web.validation import Limits, Submission

log = structlog.get_logger(__name__)


def limits(request: web.Request) -> Limits:
    """What this server accepts: its batch size and whether it can draft with an LLM."""
    settings = request.app[SETTINGS]
    return Limits(
        max_batch_size=settings.max_batch_size, llm_available=settings.groq_api_key is not None
    )


async def create_batch(
    request: web.Request, submission: Submission, idempotency: tuple[str, str] | None = None
) -> uuid.UUID:
    """Write the batch, its recipients and their jobs in one transaction; the new batch's id.

    ``idempotency`` is ``(key, request hash)``: :class:`shared.db.KeyReused` if the key was
    used before.
    """
    batch = submission.to_new_batch(
        created_by=request[PRINCIPAL].name, request_id=request.get(REQUEST_ID)
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
