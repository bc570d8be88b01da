"""The worker's tasks: ``send_chunk`` and ``send_email`` send recipients' emails, exactly once.

A batch goes out as one ``send_chunk`` job per chunk of its recipients; the chunk drafts and
sends each of them with bounded concurrency over the worker's reused SMTP connections, and
every recipient keeps its own status, attempts, claim key, draft and dead letter. A recipient
that must try again later (a transient failure, a full sending-rate window) leaves the chunk
for a ``send_email`` job of its own at its backoff time; a permanent failure makes it a dead
letter at once. The chunk itself is never retried for one recipient's sake, so a slow or
failing address never holds the rest back. ``send_email`` is that job of its own, and is also
what every email was before chunks, so jobs queued by an earlier version still run.

A task only loads by id, drafts, sends and records; the pieces live in :mod:`worker.drafting`,
:mod:`worker.smtp` and :class:`shared.db.Database`. The once-only guarantee comes from the
``processed_jobs`` claim (see :meth:`shared.db.Database.claim_delivery`): the SMTP send happens
while the claim is held, and the claim commits together with ``status = 'sent'``. The one
window left: the SMTP server accepted the message and the process died before that commit; the
job then runs again and the recipient receives the message twice (same Message-ID). A chunk
that runs again (its worker died, the sweep requeued it) skips every recipient already sent.

Two maintenance tasks run periodically in every deployment: ``sweep_stalled_jobs`` puts the
jobs of a worker that stopped heartbeating (killed, frozen, cut off) back in the queue, and
``prune_jobs`` drops old failed job rows and webhook event ids once their retention period is
over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

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
from shared.queue import (
    EMAIL_QUEUE,
    MAINTENANCE_PRIORITY,
    MAINTENANCE_QUEUE,
    PRUNE_TASK,
    SEND_CHUNK_TASK,
    SEND_EMAIL_TASK,
    SWEEP_TASK,
)
from shared.ratelimits import limits_for
from shared.settings import Settings
from shared.templating import in_render_thread
from shared.unsubscribe import make_token, unsubscribe_url
from worker.drafting import Draft, Drafter, storable
from worker.failures import (
    DeliveryFailure,
    InfrastructureFailure,
    Interrupted,
    PermanentFailure,
    RateLimited,
    TransientFailure,
)
from worker.retry import BackoffRetry
from worker.smtp import Mailer, OutgoingMessage, build_message, message_id_for, sender_domain

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerDeps:
    """What a task needs, built once per worker process and handed to every job.

    ``sending`` bounds the sends in flight in this process, whatever job they belong to: each
    holds a database connection (its claim) and an SMTP connection. ``chunks`` bounds the
    chunks being worked on: just enough to keep every send slot busy, so the recipients shown
    as ``sending`` are about the ones in flight, and a crash interrupts as few as it can.
    """

    settings: Settings
    db: Database
    drafters: Mapping[str, Drafter]
    mailer: Mailer
    retry: BackoffRetry
    sending: asyncio.Semaphore
    chunks: asyncio.Semaphore
    # Set when the worker is asked to stop: chunks start no new send, so a stop waits for the
    # sends in flight only, not for the rest of every chunk.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @staticmethod
    def chunks_in_flight(settings: Settings) -> int:
        """Chunks one worker works on at once: enough recipients for every send slot, and
        one chunk more so the next is ready while the last recipients of one finish."""
        return -(-settings.worker_concurrency // settings.chunk_size) + 1


DEPS_KEY = "mailroom"


def register_tasks(app: procrastinate.App, settings: Settings, retry: BackoffRetry) -> None:
    """Attach Mailroom's tasks to ``app``: the email tasks and the periodic maintenance."""
    app.task(name=SEND_CHUNK_TASK, queue=EMAIL_QUEUE, pass_context=True, retry=retry)(send_chunk)
    app.task(name=SEND_EMAIL_TASK, queue=EMAIL_QUEUE, pass_context=True, retry=retry)(send_email)
    for periodic_id, name, cron, func in (
        (
            "sweep",
            SWEEP_TASK,
            _every(settings.sweep_interval_seconds),
            sweep_stalled_jobs,
        ),
        ("prune", PRUNE_TASK, "17 * * * *", prune_jobs),
    ):
        task = app.task(
            name=name, queue=MAINTENANCE_QUEUE, priority=MAINTENANCE_PRIORITY, pass_context=True
        )(func)
        app.periodic(cron=cron, periodic_id=periodic_id)(task)


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
        if job.queue == MAINTENANCE_QUEUE:
            await _record_maintenance(context, job.task_name)
        return result
    except DeliveryFailure as failure:
        outcome = "permanent" if failure.permanent else "transient"
        raise
    except RateLimited:
        outcome = "rate_limited"
        raise
    except Interrupted:
        outcome = "interrupted"
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


async def _record_maintenance(context: JobContext, task: str) -> None:
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    try:
        await deps.db.record_maintenance_success(task)
    except psycopg.Error as exc:
        # The run itself succeeded; the metric shows it late, after the next run.
        log.warning("maintenance_not_recorded", error=type(exc).__name__)


def _every(seconds: int) -> str:
    # procrastinate's cron takes an optional sixth column for seconds.
    return f"* * * * * */{seconds}" if seconds < 60 else f"*/{seconds // 60} * * * *"


# -- one chunk of a batch ------------------------------------------------------------------------


async def send_chunk(context: JobContext, batch_id: str, recipient_ids: list[int]) -> str:
    """Draft and send the emails of one chunk of a batch; returns the outcomes (for the log).

    Each recipient is attempted concurrently (sends bounded by ``WorkerDeps.sending``) and
    its outcome recorded on its own row. The job fails only when an outcome could not be
    recorded (the database went away): it then runs again later, and whatever was recorded
    is skipped.
    """
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    structlog.contextvars.bind_contextvars(batch_id=batch_id)
    async with deps.chunks:
        if deps.stopping.is_set():  # fetched just before the stop: leave it to the next worker
            raise Interrupted("not started")
        recipients = await _database(deps.db.begin_chunk(uuid.UUID(batch_id), recipient_ids))
        progress = _ChunkProgress.of(recipients, skipped=len(recipient_ids) - len(recipients))
        errors = await _attempt_all(deps, progress, recipients, context.job.scheduled_at)
        return await _finish_chunk(deps, progress, errors)


@dataclass
class _ChunkProgress:
    """What a chunk's recipients came to so far, and which of them have not finished.

    ``lost_database`` is set when an outcome could not be recorded: the chunk then starts no
    further send. Its job fails and runs again, and every send started after the database
    went away would widen the window in which an email is accepted but not recorded (a
    worker that lost its database waits for its jobs only up to the shutdown grace, then
    cancels them mid-send).
    """

    outcomes: Counter[str]
    unfinished: set[int]
    not_started: set[int] = field(default_factory=set)
    lost_database: bool = False

    @classmethod
    def of(cls, recipients: list[RecipientForSend], *, skipped: int) -> _ChunkProgress:
        outcomes: Counter[str] = Counter({"skipped": skipped} if skipped else {})
        return cls(outcomes, {r.id for r in recipients if r.status != "suppressed"})

    def record(self, recipient_id: int, outcome: str) -> None:
        if outcome == "not_started":
            self.not_started.add(recipient_id)
        else:
            self.unfinished.discard(recipient_id)
        self.outcomes[outcome] += 1

    def summary(self) -> str:
        return " ".join(f"{name}={n}" for name, n in sorted(self.outcomes.items()))


async def _attempt_all(
    deps: WorkerDeps,
    progress: _ChunkProgress,
    recipients: list[RecipientForSend],
    ready_at: datetime | None,
) -> list[BaseException]:
    """Attempt every recipient of the chunk at once; returns the outcomes not recorded."""

    def halted() -> bool:
        return deps.stopping.is_set() or progress.lost_database

    async def attempt(recipient: RecipientForSend) -> None:
        if recipient.status == "suppressed":
            progress.record(recipient.id, _suppressed())
            return
        try:
            outcome = await _send_in_chunk(deps, recipient, ready_at, halted)
        except psycopg.Error:
            progress.lost_database = True
            raise
        progress.record(recipient.id, outcome)

    try:
        results = await asyncio.gather(*map(attempt, recipients), return_exceptions=True)
    except asyncio.CancelledError:
        # Cut off by a shutdown past its grace period: what did not finish goes back to the
        # chunk, attempts given back, and the retry policy requeues the chunk at once.
        await _give_back_when_cut_off(deps, list(progress.unfinished))
        raise
    return [r for r in results if isinstance(r, BaseException)]


async def _finish_chunk(
    deps: WorkerDeps, progress: _ChunkProgress, errors: list[BaseException]
) -> str:
    """The chunk's summary, or why it must run again (an outcome unrecorded, a stop)."""
    if errors:
        # An outcome that could not be recorded leaves its recipient to this chunk: run the
        # chunk again later (recipients recorded meanwhile are skipped then).
        # The error's type only: a database error's text can quote the row it failed on.
        log.warning(
            "chunk_incomplete",
            unrecorded=len(errors),
            not_started=len(progress.not_started),
            error=type(errors[0]).__name__,
        )
        # What was not started gets its attempt back if the database answers again by now.
        if progress.not_started:
            with contextlib.suppress(psycopg.Error):
                await deps.db.give_back_attempt(sorted(progress.not_started))
        raise InfrastructureFailure.database_unavailable(errors[0])
    if progress.unfinished:
        # The worker is stopping: what was not started goes back with the chunk.
        await _database(deps.db.give_back_attempt(list(progress.unfinished)))
        raise Interrupted(progress.summary())
    return progress.summary()


async def _send_in_chunk(
    deps: WorkerDeps,
    recipient: RecipientForSend,
    ready_at: datetime | None,
    halted: Callable[[], bool],
) -> str:
    # Runs in a task of its own (asyncio.gather), so these bindings stay with this recipient.
    structlog.contextvars.bind_contextvars(
        recipient_id=recipient.id, request_id=recipient.request_id
    )
    _observe_wait(ready_at or recipient.enqueued_at)
    started = time.perf_counter()
    try:
        outcome = await _attempt(deps, recipient, halted=halted)
    except Interrupted:
        return "not_started"
    except RateLimited as waiting:
        outcome = await _wait_in_own_job(deps, recipient, waiting)
    except DeliveryFailure as failure:
        outcome = await _record_failure(deps, recipient, failure, own_job=True)
    log.info("email_finished", outcome=outcome, duration_s=round(time.perf_counter() - started, 4))
    return outcome


async def _wait_in_own_job(
    deps: WorkerDeps, recipient: RecipientForSend, waiting: RateLimited
) -> str:
    """Not this email's fault: it waits for the window to end in a job of its own, its
    attempt given back; the rest of the chunk goes on."""
    spread = deps.retry.rng.uniform(
        0, deps.retry.rate_limit_spread_seconds(waiting.limit.window_seconds, 0)
    )
    resume_at = waiting.resume_at + timedelta(seconds=spread)
    await deps.db.give_back_attempt(recipient.id, note=waiting.note, own_job_at=resume_at)
    _count_rate_limited(waiting)
    return "rate_limited"


# -- one recipient on its own --------------------------------------------------------------------


async def send_email(context: JobContext, recipient_id: int) -> str:
    """Draft and send the email of one recipient; returns what happened (for the job log).

    A failure is raised after it is recorded, so the retry policy decides when this job runs
    again (or that it does not).
    """
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    recipient = await _database(deps.db.begin_attempt(recipient_id))
    if recipient is None:
        return "skipped"
    if recipient.status == "suppressed":
        return _suppressed()
    structlog.contextvars.bind_contextvars(
        batch_id=str(recipient.batch_id), recipient_id=recipient.id, request_id=recipient.request_id
    )
    _observe_wait(context.job.scheduled_at or recipient.enqueued_at)
    try:
        return await _attempt(deps, recipient)
    except RateLimited as waiting:
        await _wait_in_this_job(deps, recipient.id, waiting)
        raise
    except asyncio.CancelledError:
        # Cut off by a shutdown past its grace period: the retry policy requeues the job at
        # once, and the attempt does not count against the recipient's budget.
        await _give_back_when_cut_off(deps, recipient.id)
        raise
    except DeliveryFailure as failure:
        raise await _recorded(deps, recipient, failure) from failure


async def _wait_in_this_job(deps: WorkerDeps, recipient_id: int, waiting: RateLimited) -> None:
    """Not this email's fault: the job waits for the window to end, its attempt given back."""
    with contextlib.suppress(psycopg.Error):
        await deps.db.give_back_attempt(recipient_id, note=waiting.note)
    _count_rate_limited(waiting)


async def _recorded(
    deps: WorkerDeps, recipient: RecipientForSend, failure: DeliveryFailure
) -> DeliveryFailure:
    """``failure`` as this attempt of the recipient (the retry policy counts the recipient's
    attempts), recorded unless the database is gone; the job raises it."""
    failed = failure.at_attempt(recipient.attempts)
    with contextlib.suppress(psycopg.Error):
        await _record_failure(deps, recipient, failed, own_job=False)
    return failed


# -- what both do for one recipient --------------------------------------------------------------


async def _attempt(
    deps: WorkerDeps,
    recipient: RecipientForSend,
    *,
    halted: Callable[[], bool] | None = None,
) -> str:
    """Draft (once) and send one email; every problem comes out as a DeliveryFailure.

    The draft and the send each get ``job_timeout_seconds``; waiting for a free send slot in a
    busy worker is not counted against either. In a chunk, a send that has not started when
    ``halted()`` is true (the worker is stopping, or the chunk lost its database) raises
    :class:`Interrupted` instead.
    """
    limit = deps.settings.job_timeout_seconds
    try:
        async with asyncio.timeout(limit):
            draft, stored = await _draft_once(deps, recipient)
            if recipient.hold_for_review:
                if await _park_for_review(deps, recipient, draft, stored=stored):
                    return "drafted"
                stored = True
        async with deps.sending, asyncio.timeout(limit):
            if halted is not None and halted():
                raise Interrupted()
            return await _send_drafted(deps, recipient, draft, stored=stored, halted=halted)
    except TimeoutError:
        raise TransientFailure(f"attempt took longer than {limit:g} s") from None
    except psycopg.Error as exc:
        raise InfrastructureFailure.database_unavailable(exc) from exc
    except (DeliveryFailure, RateLimited, Interrupted):
        raise
    except Exception as exc:
        # The traceback is logged without messages above DEBUG (shared.logging).
        log.exception("send_email_crashed", recipient_id=recipient.id)
        raise PermanentFailure.internal_error(exc) from exc


async def _park_for_review(
    deps: WorkerDeps, recipient: RecipientForSend, draft: Draft, *, stored: bool
) -> bool:
    """Store the draft and park the recipient for review; False if its batch was approved
    meanwhile (the draft is stored either way, and the caller sends at once)."""
    if not stored:
        await _save(deps, recipient, draft)
    return await deps.db.park_for_review(recipient.id, recipient.batch_id)


async def _send_drafted(
    deps: WorkerDeps,
    recipient: RecipientForSend,
    draft: Draft,
    *,
    stored: bool,
    halted: Callable[[], bool] | None,
) -> str:
    """Send the draft; a draft not stored yet is stored with the outcome, sent or failed."""
    try:
        return await _deliver(deps, recipient, draft, store=not stored, halted=halted)
    except DeliveryFailure:
        if not stored:  # the dead letter or retry shows what was attempted
            with contextlib.suppress(psycopg.Error):
                await _save(deps, recipient, draft)
        raise


async def _record_failure(
    deps: WorkerDeps, recipient: RecipientForSend, failure: DeliveryFailure, *, own_job: bool
) -> str:
    """Record a failed attempt: a dead letter, or a retry (in a job of its own if ``own_job``).

    Returns ``dead``, ``retrying``, or ``cancelled`` (its batch was cancelled while the send
    was in flight). Raises psycopg.Error if it cannot be recorded.
    """
    final = deps.retry.gives_up(failure, recipient.attempts)
    EMAIL_FAILURES.labels(kind="permanent" if failure.permanent else "transient").inc()
    outcome = "dead" if final else "retrying"
    recorded = await deps.db.mark_failed(
        recipient.id,
        status=outcome,
        error=failure.message,
        suppress=failure.mailbox_unknown,
        retry_at=_own_retry_at(deps, recipient, failure) if own_job and not final else None,
    )
    outcome = recorded or outcome
    if outcome != "cancelled" and final:
        DEAD_LETTERS.labels(reason="permanent" if failure.permanent else "attempts_exhausted").inc()
    elif outcome != "cancelled":
        JOB_RETRIES.inc()
    log.info(
        "email_attempt_failed",
        attempt=recipient.attempts,
        error=failure.message,
        smtp_code=failure.smtp_code,
        outcome=outcome,
    )
    return outcome


def _own_retry_at(
    deps: WorkerDeps, recipient: RecipientForSend, failure: DeliveryFailure
) -> datetime:
    """When the job of its own of a recipient that leaves its chunk runs: the retry's backoff."""
    delay = deps.retry.delay_seconds(recipient.attempts, failure.retry_after_seconds)
    return datetime.now(UTC) + timedelta(seconds=delay)


def _suppressed() -> str:
    EMAILS_SUPPRESSED.inc()
    return "suppressed"


def _observe_wait(ready_at: datetime) -> None:
    JOB_QUEUE_WAIT.observe(max(0.0, (datetime.now(UTC) - ready_at).total_seconds()))


def _count_rate_limited(waiting: RateLimited) -> None:
    RATE_LIMITED.labels(limit=waiting.limit.kind).inc()
    log.info("email_rate_limited", limit=waiting.limit.name, resume_at=waiting.resume_at)


async def _database(query: Awaitable[T]) -> T:
    """The result of ``query``; the database going away makes an InfrastructureFailure.

    If even that failure's retry cannot be recorded, the job stays "doing" and the stalled-job
    sweep requeues it once this worker's heartbeat goes stale.
    """
    try:
        return await query
    except psycopg.Error as exc:
        raise InfrastructureFailure.database_unavailable(exc) from exc


async def _give_back_when_cut_off(deps: WorkerDeps, recipient_ids: int | list[int]) -> None:
    """Give back the attempts of sends a shutdown cut off (shielded: the task is cancelled)."""
    with contextlib.suppress(psycopg.Error):
        await asyncio.shield(deps.db.give_back_attempt(recipient_ids))


async def _draft_once(deps: WorkerDeps, recipient: RecipientForSend) -> tuple[Draft, bool]:
    """The recipient's draft, and whether it is stored on its row already.

    A stored draft is reused by every later attempt: drafting may cost money (an LLM), so such
    a draft is stored before the send. A drafter whose drafts cost nothing and come out the
    same every time (templates) is stored with the attempt's outcome instead, which saves a
    round trip per email.
    """
    if recipient.subject is not None and recipient.body is not None:
        return Draft(subject=recipient.subject, body=recipient.body), True
    drafter = deps.drafters.get(recipient.drafter)
    if drafter is None:
        raise PermanentFailure(
            f"this worker has no {recipient.drafter!r} drafter (set MAILROOM_GROQ_API_KEY)"
        )
    draft = storable(await drafter.draft(recipient))
    if not getattr(drafter, "store_before_send", True):
        return draft, False
    await _save(deps, recipient, draft)
    return draft, True


async def _save(deps: WorkerDeps, recipient: RecipientForSend, draft: Draft) -> None:
    await deps.db.save_draft(
        recipient.id,
        draft.subject,
        draft.body,
        prompt_tokens=draft.prompt_tokens,
        completion_tokens=draft.completion_tokens,
    )


async def _deliver(
    deps: WorkerDeps,
    recipient: RecipientForSend,
    draft: Draft,
    *,
    store: bool,
    halted: Callable[[], bool] | None,
) -> str:
    """Build the message, take a sending-rate slot and send it once: ``sent``, or why not."""
    if recipient.body_format == "markdown":
        # Rendering Markdown costs time linear in the body: off the event loop, as templates.
        message = await in_render_thread(_message_for, deps, recipient, draft)
    else:
        message = _message_for(deps, recipient, draft)
    await _take_send_slot(deps, recipient.email)
    return await _send_once(deps, recipient.id, message, draft if store else None, halted)


def _message_for(deps: WorkerDeps, recipient: RecipientForSend, draft: Draft) -> OutgoingMessage:
    sender = deps.settings.from_address
    assert sender is not None  # required by the worker's startup checks
    return build_message(
        sender=sender,
        to=recipient.email,
        subject=draft.subject,
        body=draft.body,
        message_id=message_id_for(recipient.id, recipient.batch_id, sender_domain(sender)),
        unsubscribe_url=_unsubscribe_url(deps.settings, recipient.email, sender),
        unsubscribe_mailto=deps.settings.unsubscribe_mailto,
        # The batch's own sender name and Reply-To win over the settings'.
        from_name=recipient.from_name or deps.settings.from_name,
        reply_to=recipient.reply_to or deps.settings.reply_to,
        body_format=recipient.body_format,
    )


async def _take_send_slot(deps: WorkerDeps, address: str) -> None:
    """Count the message in the sending-rate windows, or raise RateLimited if one is full."""
    limits = limits_for(deps.settings, address)
    if limits:
        full = await deps.db.take_send_slot(limits)
        if full is not None:
            raise RateLimited(*full)


async def _send_once(
    deps: WorkerDeps,
    recipient_id: int,
    message: OutgoingMessage,
    draft: Draft | None,
    halted: Callable[[], bool] | None,
) -> str:
    """Send while holding the recipient's claim; ``draft`` is stored with ``sent`` if given.

    The claim can wait for a connection while the database is away; a chunk halted meanwhile
    (the worker stopping) rolls the claim back rather than start a send the stop may cut off.
    """
    async with deps.db.claim_delivery(recipient_id) as claim:
        if not claim.claimed:
            # Sent already (a duplicate job, a chunk run again), or cancelled while it waited.
            return "cancelled" if claim.status == "cancelled" else "duplicate"
        if halted is not None and halted():
            raise Interrupted()
        reply = await deps.mailer.send(message)
        await claim.mark_sent(
            message.message_id, reply, draft=(draft.subject, draft.body) if draft else None
        )
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
    """Delete failed job rows and webhook event ids older than ``MAILROOM_RETENTION_DAYS``."""
    deps: WorkerDeps = context.additional_context[DEPS_KEY]
    deleted = await deps.db.prune_finished_jobs(retention_days=deps.settings.retention_days)
    await deps.db.prune_send_windows()
    await deps.db.prune_webhook_events(retention_days=deps.settings.retention_days)
    if deleted:
        log.info("old_jobs_pruned", deleted=deleted)
    return deleted
