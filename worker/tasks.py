"""The worker's tasks: ``send_email`` drafts and sends one recipient's email, exactly once.

A task only loads by id, drafts, sends and records; the pieces live in :mod:`worker.drafting`,
:mod:`worker.smtp` and :class:`shared.db.Database`. The once-only guarantee comes from the
``processed_jobs`` claim (see :meth:`shared.db.Database.claim_delivery`): the SMTP send happens
while the claim is held, and the claim commits together with ``status = 'sent'``. The one
window left: the SMTP server accepted the message and the process died before that commit; the
job then runs again and the recipient receives the message twice (same Message-ID).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import procrastinate
import psycopg
import structlog
from procrastinate import JobContext

from shared.db import Database, RecipientForSend
from shared.queue import EMAIL_QUEUE, SEND_EMAIL_TASK
from shared.settings import Settings
from worker.drafting import Draft, Drafter
from worker.failures import DeliveryFailure, TransientFailure
from worker.retry import BackoffRetry
from worker.smtp import Mailer, build_message, message_id_for, sender_domain

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkerDeps:
    """What a task needs, built once per worker process and handed to every job."""

    settings: Settings
    db: Database
    drafter: Drafter
    mailer: Mailer
    retry: BackoffRetry


DEPS_KEY = "mailroom"


def register_tasks(app: procrastinate.App, retry: BackoffRetry) -> None:
    """Attach Mailroom's tasks to ``app`` with the process's retry policy."""
    app.task(name=SEND_EMAIL_TASK, queue=EMAIL_QUEUE, pass_context=True, retry=retry)(send_email)


async def send_email(context: JobContext, recipient_id: int) -> str:
    """Draft and send the email of one recipient; returns what happened (for the job log)."""
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    attempt = context.job.attempts + 1
    recipient = await deps.db.recipient_for_send(recipient_id)
    if recipient is None or recipient.status in {"sent", "dead", "cancelled"}:
        return "skipped"
    try:
        draft = await _draft_once(deps, recipient)
        return await _deliver(deps, recipient, draft)
    except DeliveryFailure as failure:
        await _record_failure(deps, recipient_id, failure, attempt)
        raise
    except psycopg.Error as exc:
        # The database went away mid-attempt: nothing was recorded as sent, so trying again
        # later is safe. Recording the failure may fail too; the job's retry still stands.
        failure = TransientFailure(f"database unavailable: {type(exc).__name__}")
        with contextlib.suppress(psycopg.Error):
            await _record_failure(deps, recipient_id, failure, attempt)
        raise failure from exc


async def _record_failure(
    deps: WorkerDeps, recipient_id: int, failure: DeliveryFailure, attempt: int
) -> None:
    final = failure.permanent or deps.retry.is_last(attempt)
    await deps.db.mark_failed(
        recipient_id, status="dead" if final else "retrying", error=failure.message
    )


async def _draft_once(deps: WorkerDeps, recipient: RecipientForSend) -> Draft:
    # A stored draft is reused by every later attempt: drafting may cost money (an LLM).
    if recipient.subject is not None and recipient.body is not None:
        return Draft(subject=recipient.subject, body=recipient.body)
    draft = await deps.drafter.draft(recipient)
    await deps.db.save_draft(recipient.id, draft.subject, draft.body)
    return draft


async def _deliver(deps: WorkerDeps, recipient: RecipientForSend, draft: Draft) -> str:
    if await deps.db.mark_sending(recipient.id) is None:
        return "skipped"
    sender = deps.settings.from_address
    assert sender is not None  # required by the worker's startup checks
    message_id = message_id_for(recipient.id, recipient.batch_id, sender_domain(sender))
    message = build_message(
        sender=sender, to=recipient.email, subject=draft.subject, body=draft.body,
        message_id=message_id,
    )
    async with deps.db.claim_delivery(recipient.id) as claim:
        if not claim.claimed:
            return "duplicate"
        reply = await deps.mailer.send(message)
        await claim.mark_sent(message_id, reply)
    return "sent"
