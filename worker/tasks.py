"""The worker's tasks: ``send_email`` drafts and sends one recipient's email, exactly once.

A task only loads by id, drafts, sends and records; the pieces live in :mod:`worker.drafting`,
:mod:`worker.smtp` and :class:`shared.db.Database`. The once-only guarantee comes from the
``processed_jobs`` claim (see :meth:`shared.db.Database.claim_delivery`): the SMTP send happens
while the claim is held, and the claim commits together with ``status = 'sent'``. The one
window left: the SMTP server accepted the message and the process died before that commit; the
job then runs again and the recipient receives the message twice (same Message-ID).

Two maintenance tasks run periodically in every deployment: ``sweep_stalled_jobs`` puts the
jobs of a worker that stopped heartbeating (killed, frozen, cut off) back in the queue, and
``prune_jobs`` drops old failed job rows once their retention period is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import procrastinate
import psycopg
import structlog
from procrastinate import JobContext

from shared.db import Database, RecipientForSend
from shared.metrics import (
    DEAD_LETTERS,
    EMAIL_FAILURES,
    EMAILS_SENT,
    EMAILS_SUPPRESSED,
    JOB_DURATION,
    JOB_QUEUE_WAIT,
    JOB_RETRIES,
    RATE_LIMITED,
)
from shared.queue import EMAIL_QUEUE, MAINTENANCE_QUEUE, SEND_EMAIL_TASK
from shared.ratelimits import limits_for
from shared.settings import Settings
from shared.unsubscribe import make_token, unsubscribe_url
from worker.drafting import Draft, Drafter, storable
from worker.failures import (
    DeliveryFailure,
    InfrastructureFailure,
    PermanentFailure,
    RateLimited,
    TransientFailure,
)
from worker.retry import BackoffRetry
from worker.smtp import Mailer, build_message, message_id_for, sender_domain

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WorkerDeps:
    """What a task needs, built once per worker process and handed to every job."""

    settings: Settings
    db: Database
    drafters: Mapping[str, Drafter]
    mailer: Mailer
    retry: BackoffRetry


DEPS_KEY = "mailroom"


def register_tasks(app: procrastinate.App, settings: Settings, retry: BackoffRetry) -> None:
    """Attach Mailroom's tasks to ``app``: the email task and the periodic maintenance."""
    app.task(name=SEND_EMAIL_TASK, queue=EMAIL_QUEUE, pass_context=True, retry=retry)(send_email)
    app.periodic(cron=_every(settings.sweep_interval_seconds), periodic_id="sweep")(
        app.task(name="sweep_stalled_jobs", queue=MAINTENANCE_QUEUE, pass_context=True)(
            sweep_stalled_jobs
        )
    )
    app.periodic(cron="17 * * * *", periodic_id="prune")(
        app.task(name="prune_jobs", queue=MAINTENANCE_QUEUE, pass_context=True)(prune_jobs)
    )


async def job_summary_middleware(
    call_next: Callable[[], Awaitable[Any]], context: JobContext, worker: object
) -> Any:
    """One log line and one histogram observation per job, with its ids bound as context.

    Ids bound here (and by the task: batch, recipient, request) appear on every line the job
    logs; each job runs in its own asyncio task, so the bindings never leak between jobs.
    """
    job = context.job
    structlog.contextvars.bind_contextvars(
        job_id=job.id, task=job.task_name, attempt=job.attempts + 1
    )
    started = time.perf_counter()
    outcome, result = "error", None
    try:
        result = await call_next()
        outcome = "succeeded"
        return result
    except DeliveryFailure as failure:
        outcome = "permanent" if failure.permanent else "transient"
        raise
    except RateLimited:
        outcome = "rate_limited"
        raise
    except asyncio.CancelledError:
        outcome = "aborted"
        raise
    finally:
        duration = time.perf_counter() - started
        JOB_DURATION.labels(task=job.task_name, outcome=outcome).observe(duration)
        level = {"permanent": "warning", "error": "error"}.get(outcome, "info")
        getattr(log, level)(
            "job_finished", outcome=outcome, result=result, duration_s=round(duration, 4)
        )


def _every(seconds: int) -> str:
    # procrastinate's cron takes an optional sixth column for seconds.
    return f"* * * * * */{seconds}" if seconds < 60 else f"*/{seconds // 60} * * * *"


async def send_email(context: JobContext, recipient_id: int) -> str:
    """Draft and send the email of one recipient; returns what happened (for the job log)."""
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    try:
        recipient = await deps.db.begin_attempt(recipient_id)
    except psycopg.Error as exc:
        raise _database_failure(exc) from exc
    if recipient is None:
        return "skipped"
    if recipient.status == "suppressed":
        EMAILS_SUPPRESSED.inc()
        return "suppressed"
    structlog.contextvars.bind_contextvars(
        batch_id=str(recipient.batch_id), recipient_id=recipient.id, request_id=recipient.request_id
    )
    ready_at = context.job.scheduled_at or recipient.enqueued_at
    JOB_QUEUE_WAIT.observe(max(0.0, (datetime.now(UTC) - ready_at).total_seconds()))
    try:
        async with asyncio.timeout(deps.settings.job_timeout_seconds):
            draft = await _draft_once(deps, recipient)
            if recipient.hold_for_review and await deps.db.park_for_review(
                recipient.id, recipient.batch_id
            ):
                return "drafted"
            return await _deliver(deps, recipient, draft)
    except TimeoutError:
        failure: DeliveryFailure = TransientFailure(
            f"attempt took longer than {deps.settings.job_timeout_seconds:g} s"
        )
    except DeliveryFailure as exc:
        failure = exc
    except psycopg.Error as exc:
        failure = _database_failure(exc)
    except RateLimited as waiting:
        # Not this email's fault: it waits for the window to end, with its attempt given back.
        with contextlib.suppress(psycopg.Error):
            await deps.db.give_back_attempt(recipient_id, note=waiting.note)
        RATE_LIMITED.labels(limit=waiting.limit.kind).inc()
        log.info("email_rate_limited", limit=waiting.limit.name, resume_at=waiting.resume_at)
        raise
    except asyncio.CancelledError:
        # Cut off by a shutdown past its grace period: the retry policy requeues the job at
        # once, and the attempt does not count against the recipient's budget.
        with contextlib.suppress(psycopg.Error):
            await asyncio.shield(deps.db.give_back_attempt(recipient_id))
        raise
    except Exception as exc:
        # A bug, not the far side: make it a dead letter an operator can see and redrive,
        # rather than a recipient stuck in "sending" forever.
        log.exception("send_email_crashed", recipient_id=recipient_id)
        failure = PermanentFailure(f"internal error: {type(exc).__name__}: {exc}"[:500])
    failure.attempt = recipient.attempts
    final = deps.retry.gives_up(failure)
    EMAIL_FAILURES.labels(kind="permanent" if failure.permanent else "transient").inc()
    (DEAD_LETTERS if final else JOB_RETRIES).inc()
    log.info(
        "email_attempt_failed",
        attempt=recipient.attempts,
        error=failure.message,
        smtp_code=failure.smtp_code,
        outcome="dead" if final else "retrying",
    )
    with contextlib.suppress(psycopg.Error):
        await deps.db.mark_failed(
            recipient_id,
            status="dead" if final else "retrying",
            error=failure.message,
            suppress=failure.mailbox_unknown,
        )
    raise failure


def _database_failure(exc: psycopg.Error) -> InfrastructureFailure:
    # The database went away mid-attempt: nothing was recorded as sent, so trying again later
    # is safe. If even the retry cannot be recorded, the job stays "doing" and the stalled-job
    # sweep requeues it once this worker's heartbeat goes stale.
    return InfrastructureFailure(f"database unavailable: {type(exc).__name__}")


async def _draft_once(deps: WorkerDeps, recipient: RecipientForSend) -> Draft:
    # A stored draft is reused by every later attempt: drafting may cost money (an LLM).
    if recipient.subject is not None and recipient.body is not None:
        return Draft(subject=recipient.subject, body=recipient.body)
    drafter = deps.drafters.get(recipient.drafter)
    if drafter is None:
        raise PermanentFailure(
            f"this worker has no {recipient.drafter!r} drafter (set MAILROOM_GROQ_API_KEY)"
        )
    draft = storable(await drafter.draft(recipient))
    await deps.db.save_draft(
        recipient.id,
        draft.subject,
        draft.body,
        prompt_tokens=draft.prompt_tokens,
        completion_tokens=draft.completion_tokens,
    )
    return draft


async def _deliver(deps: WorkerDeps, recipient: RecipientForSend, draft: Draft) -> str:
    sender = deps.settings.from_address
    assert sender is not None  # required by the worker's startup checks
    message_id = message_id_for(recipient.id, recipient.batch_id, sender_domain(sender))
    message = build_message(
        sender=sender,
        to=recipient.email,
        subject=draft.subject,
        body=draft.body,
        message_id=message_id,
        unsubscribe_url=_unsubscribe_url(deps.settings, recipient.email, sender),
        unsubscribe_mailto=deps.settings.unsubscribe_mailto,
    )
    limits = limits_for(deps.settings, recipient.email)
    if limits:
        full = await deps.db.take_send_slot(limits)
        if full is not None:
            raise RateLimited(*full)
    async with deps.db.claim_delivery(recipient.id) as claim:
        if not claim.claimed:
            return "duplicate"
        reply = await deps.mailer.send(message)
        await claim.mark_sent(message_id, reply)
    EMAILS_SENT.inc()
    return "sent"


def _unsubscribe_url(settings: Settings, address: str, sender: str) -> str | None:
    if settings.public_url is None or settings.secret_key is None:
        return None
    token = make_token(address, sender=sender, secret=settings.secret_key.get_secret_value())
    return unsubscribe_url(settings.public_url, token)


async def sweep_stalled_jobs(context: JobContext, timestamp: int) -> int:
    """Requeue jobs whose worker has not sent a heartbeat for ``stalled_after_seconds``.

    procrastinate leaves the jobs of a killed worker in ``doing`` forever; this is how they
    come back. Each counts as an attempt (it did start).
    """
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    manager = context.app.job_manager
    stalled = list(
        await manager.get_stalled_jobs(seconds_since_heartbeat=deps.settings.stalled_after_seconds)
    )
    for job in stalled:
        await manager.retry_job(job)
        log.warning(
            "stalled_job_requeued", job_id=job.id, task=job.task_name, worker_id=job.worker_id
        )
    return len(stalled)


async def prune_jobs(context: JobContext, timestamp: int) -> int:
    """Delete failed job rows older than ``MAILROOM_RETENTION_DAYS``."""
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    deleted = await deps.db.prune_finished_jobs(retention_days=deps.settings.retention_days)
    await deps.db.prune_send_windows()
    if deleted:
        log.info("old_jobs_pruned", deleted=deleted)
    return deleted
