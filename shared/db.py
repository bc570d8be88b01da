"""Database access: the connection pool and every query Mailroom runs on its own tables.

:class:`Database` is the only class that talks SQL (procrastinate runs its own queries through
the same pool in the worker). What it says to procrastinate's tables and functions is in
:mod:`shared.procrastinate_sql`. Pool connections are in autocommit; code that needs a
transaction opens one explicitly, so no statement pays for an implicit BEGIN/COMMIT.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from shared.accounts import (
    BOOTSTRAP_ACTOR,
    BOUNCE_MAILBOX_ACTOR,
    WEBHOOK_ACTOR_PREFIX,
    Principal,
    Role,
)
from shared.batch_names import default_name
from shared.composition import Composition
from shared.procrastinate_sql import (
    CANCEL_WAITING_JOBS,
    DEFER_CHUNKS_OF_ROWS,
    DEFER_OWN_JOB,
    JOBS_PLANNED_COLUMNS,
    JOBS_TABLE,
    PRUNE_FINISHED_JOBS,
    WORKER_HEARTBEAT_AGE,
)
from shared.queue import (
    DEFAULT_CHUNK_SIZE,
    EMAIL_QUEUE,
    RETRY_PRIORITY,
    SEND_CHUNK_TASK,
    SEND_EMAIL_TASK,
)
from shared.ratelimits import Limit

log = structlog.get_logger(__name__)

# Row ids are bigint: anything outside 1..MAX_ID cannot name a row (and PostgreSQL refuses it).
MAX_ID = 2**63 - 1
RECIPIENT_STATUSES = (
    "queued",
    "sending",
    "drafted",
    "sent",
    "retrying",
    "dead",
    "cancelled",
    "suppressed",
)
FINAL_STATUSES = frozenset({"sent", "dead", "cancelled", "suppressed"})
# What a batch as a whole is doing; see :data:`_BATCH_STATE` for how each is decided.
BATCH_STATES = (
    "scheduled",
    "queued",
    "sending",
    "paused",
    "awaiting_review",
    "done",
    "done_with_failures",
    "cancelled",
)
SUPPRESSION_REASONS = ("unsubscribed", "hard_bounce", "complaint", "manual")

# Keep half-open connections from hanging a process forever: the kernel gives up on a peer that
# stops answering (libpq parameters; ignored on Unix sockets).
CONNECTION_KWARGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,
    "connect_timeout": 10,
    "application_name": "mailroom",
}


def make_pool(
    conninfo: str,
    *,
    max_size: int,
    min_size: int = 1,
    name: str,
    durable_commits: bool = True,
    transaction_pooling: bool = False,
) -> AsyncConnectionPool:
    """An unopened pool of autocommit connections (open it with ``await pool.open()``).

    ``durable_commits=False`` is for the worker: its commits return before the WAL is flushed
    (``synchronous_commit = off``), except the delivery claim's, which asks for a flush itself
    (:meth:`DeliveryClaim.mark_sent`). Anything else the worker writes (an attempt begun, a job
    fetched or finished, a retry scheduled) may be forgotten by a PostgreSQL *crash*, and that
    only makes a job run again: it then finds its key in ``processed_jobs`` and sends nothing.

    ``transaction_pooling=True`` (default False) is for a ``conninfo`` that reaches PostgreSQL
    through a transaction-mode pooler (PgBouncer ``pool_mode = transaction``), where each
    transaction of a connection may run on another server connection: psycopg prepares no
    statements (one prepared on one server connection is missing on the next), and the pool
    sets no session state (a ``SET`` stays on its server connection for the next client that
    gets it), so ``durable_commits=False`` has no effect there.
    """
    session_settings = not durable_commits and not transaction_pooling

    async def configure(conn: psycopg.AsyncConnection) -> None:
        await conn.set_autocommit(True)
        if session_settings:
            await conn.execute("SET synchronous_commit = off")

    kwargs: dict[str, Any] = {**CONNECTION_KWARGS, "application_name": name}
    if transaction_pooling:
        kwargs["prepare_threshold"] = None
    return AsyncConnectionPool(
        conninfo,
        min_size=min(min_size, max_size),
        max_size=max_size,
        kwargs=kwargs,
        configure=configure,
        open=False,
        name=name,
    )


@dataclass(frozen=True)
class NewRecipient:
    email: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NewBatch:
    created_by: str
    subject_template: str
    body_template: str
    recipients: Sequence[NewRecipient]
    drafter: str = "template"
    request_id: str | None = None
    context: str | None = None
    review: bool = False
    send_at: datetime | None = None
    composition: Composition = field(default_factory=Composition)
    # None: made from the subject or the context (shared.batch_names.default_name).
    name: str | None = None


@dataclass(frozen=True)
class BatchSummary:
    """A batch with its recipient counts and its state (one of :data:`BATCH_STATES`)."""

    id: uuid.UUID
    name: str
    created_at: datetime
    total: int
    counts: dict[str, int]
    drafter: str
    subject_template: str
    status: str
    review: bool = False
    approved: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    send_at: datetime | None = None
    cancelled_at: datetime | None = None
    # When a full sending-rate window lets a ``paused`` batch go on (None unless paused).
    paused_until: datetime | None = None
    # How its messages are written (shared.composition); None: the settings' value.
    body_format: str = "text"
    from_name: str | None = None
    reply_to: str | None = None

    @property
    def delivered(self) -> float:
        """Share of recipients the SMTP server accepted, 0.0 to 1.0."""
        return self.counts["sent"] / self.total if self.total else 1.0

    @property
    def finished(self) -> float:
        """Share of recipients in a final state (sent, dead, cancelled or suppressed)."""
        finished = sum(self.counts[s] for s in FINAL_STATUSES)
        return finished / self.total if self.total else 1.0


@dataclass(frozen=True)
class BatchFilter:
    """Which batches a list shows: by state, by a piece of the name (case-insensitive), and
    the page after a cursor (the ``created_at`` and ``id`` of the last batch of the previous
    page, newest first)."""

    status: str | None = None
    name_contains: str | None = None
    before: tuple[datetime, uuid.UUID] | None = None


@dataclass(frozen=True)
class RecipientForSend:
    """What the worker needs to draft and send one email, read fresh for every attempt."""

    id: int
    batch_id: uuid.UUID
    email: str
    fields: dict[str, Any]
    status: str
    attempts: int
    subject: str | None
    body: str | None
    drafter: str
    subject_template: str
    body_template: str
    enqueued_at: datetime
    request_id: str | None
    context: str | None = None
    # True while the batch waits for an operator: draft, then stop.
    hold_for_review: bool = False
    # The batch's shared.composition choices (None: the worker's settings).
    body_format: str = "text"
    from_name: str | None = None
    reply_to: str | None = None


# What :class:`RecipientForSend` is made of, from ``recipients r`` and its ``batches b``.
_FOR_SEND = (
    "r.id, r.batch_id, r.email, r.fields, r.status, r.attempts, r.subject, r.body, b.drafter,"
    " b.subject_template, b.body_template, r.enqueued_at, b.request_id, b.context,"
    " (b.review AND b.approved_at IS NULL) AS hold_for_review,"
    " b.body_format, b.from_name, b.reply_to"
)


async def _roll_back(conn: psycopg.AsyncConnection) -> None:
    # Whatever state the pipeline is in (a failed statement aborts it until the next sync),
    # leave the connection outside any transaction; a broken one the pool discards.
    try:
        await conn.execute("ROLLBACK")
    except psycopg.Error:
        pass


class DeliveryClaim:
    """The at-most-once claim on one recipient's email, held for the length of a transaction."""

    def __init__(
        self, conn: psycopg.AsyncConnection, recipient_id: int, claimed: bool, status: str | None
    ) -> None:
        self._conn = conn
        self.recipient_id = recipient_id
        self.claimed = claimed
        # The recipient's status when the claim was made: "sending" unless it was sent or
        # cancelled meanwhile (then ``claimed`` is False).
        self.status = status

    async def mark_sent(
        self, message_id: str, smtp_reply: str, *, draft: tuple[str, str] | None = None
    ) -> None:
        """Record the accepted send; it commits together with the claim, durably.

        One statement: the recipient becomes ``sent`` (with ``draft``, its subject and body,
        unless one is stored already), the key gets its result, and this transaction's commit
        waits for the WAL flush even on a pool that does not (the claim is what keeps a crash
        of PostgreSQL itself from causing a second send).
        """
        subject, body = draft or (None, None)
        await self._conn.execute(
            "WITH sent AS ("
            "  UPDATE recipients SET status = 'sent', sent_at = now(), updated_at = now(),"
            "   subject = coalesce(subject, %(subject)s), body = coalesce(body, %(body)s),"
            "   message_id = %(message_id)s, last_error = NULL WHERE id = %(id)s),"
            " result AS ("
            "  UPDATE processed_jobs SET result = %(result)s WHERE idempotency_key = %(key)s)"
            " SELECT set_config('synchronous_commit', 'on', true)",
            {
                "message_id": message_id,
                "subject": subject,
                "body": body,
                "id": self.recipient_id,
                "result": Jsonb({"message_id": message_id, "smtp": smtp_reply}),
                "key": email_key(self.recipient_id),
            },
        )


# The recipients of ``rows`` and the chunk jobs deferred for them.
_COUNT_AND_DEFER_CHUNKS = "SELECT (SELECT count(*) FROM rows), " + DEFER_CHUNKS_OF_ROWS
_DEFER_PARAMS = {"queue": EMAIL_QUEUE, "chunk_task": SEND_CHUNK_TASK, "scheduled_at": None}


@dataclass(frozen=True)
class Selection:
    """Which dead letters an operator means: some ids, one batch's, or all of them."""

    ids: Sequence[int] = ()
    batch_id: uuid.UUID | None = None
    everything: bool = False

    def params(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "batch_id": self.batch_id, "everything": self.everything}


_SELECTED = "(%(everything)s OR id = ANY(%(ids)s::bigint[]) OR batch_id = %(batch_id)s::uuid)"


def _some(statuses: str) -> str:
    # One probe of recipients_batch_status per batch: no read of the batch's recipients.
    return (
        f"EXISTS (SELECT 1 FROM recipients r WHERE r.batch_id = b.id AND r.status IN ({statuses}))"
    )


# A batch's state, from its own columns and a few index probes (never its recipients' counts),
# so the batch list can filter on it page by page. In this order:
# - cancelled: cancelled by an operator, with recipients it stopped (sends in flight finish);
# - done / done_with_failures: every recipient final; "with failures" when some are dead (or
#   were dead and discarded, which leaves them cancelled);
# - awaiting_review: every open recipient is drafted and waits for an operator;
# - scheduled: nothing started (only queued or suppressed recipients) and send_at ahead;
# - paused: a sending-rate window of the sender is full (``held``), so nothing goes out until
#   it ends;
# - queued: nothing started yet, waiting for a worker; sending: under way.
_BATCH_STATE = (
    "CASE"
    " WHEN b.cancelled_at IS NOT NULL AND " + _some("'cancelled'") + " THEN 'cancelled'"
    " WHEN NOT " + _some("'queued', 'sending', 'drafted', 'retrying'") + " THEN"
    "  CASE WHEN " + _some("'dead', 'cancelled'") + " THEN 'done_with_failures' ELSE 'done' END"
    " WHEN b.review AND b.approved_at IS NULL"
    "  AND NOT " + _some("'queued', 'sending', 'retrying'") + " THEN 'awaiting_review'"
    " WHEN b.send_at > now()"
    "  AND NOT " + _some("'sending', 'drafted', 'sent', 'retrying', 'dead', 'cancelled'") + ""
    "  THEN 'scheduled'"
    " WHEN held.until IS NOT NULL THEN 'paused'"
    " WHEN NOT " + _some("'sending', 'drafted', 'sent', 'retrying', 'dead', 'cancelled'") + ""
    "  THEN 'queued'"
    " ELSE 'sending' END"
)
# When the last full window of the sender's limits ends (NULL when none is full): one row.
_HELD = (
    "SELECT max(to_timestamp((floor(extract(epoch FROM now()) / l.w) + 1) * l.w)) AS until"
    " FROM unnest(%(scopes)s::text[], %(windows)s::int[], %(maxes)s::int[])"
    "  AS l(scope, w, max_sent)"
    " JOIN send_windows s ON s.scope = l.scope"
    "  AND s.window_start = to_timestamp(floor(extract(epoch FROM now()) / l.w) * l.w)"
    " WHERE s.sent >= l.max_sent"
)


def batch_list_query(
    where: BatchFilter | uuid.UUID, *, limit: int, limits: Sequence[Limit] = ()
) -> tuple[str, dict[str, Any]]:
    """The statement behind :meth:`Database.list_batches` and :meth:`Database.batch_summary`
    (public so a test can EXPLAIN it), with its parameters.

    The inner query walks ``batches_newest`` in order and stops once ``limit`` batches match,
    deciding each one's state with index probes; only the batches of the page then have their
    recipients counted (one pass per batch, for counts and tokens).
    """
    conditions = []
    params: dict[str, Any] = {
        "limit": limit,
        "scopes": [x.scope for x in limits],
        "windows": [x.window_seconds for x in limits],
        "maxes": [x.max_sent for x in limits],
        "status": None,
    }
    if isinstance(where, uuid.UUID):
        conditions.append("b.id = %(id)s")
        params["id"] = where
    else:
        params["status"] = where.status
        if where.name_contains is not None:
            escaped = re.sub(r"([\\%_])", r"\\\1", where.name_contains)
            conditions.append("b.name ILIKE %(pattern)s")
            params["pattern"] = f"%{escaped}%"
        if where.before is not None:
            conditions.append("(b.created_at, b.id) < (%(before_at)s, %(before_id)s)")
            params["before_at"], params["before_id"] = where.before
    text = (
        "SELECT p.id, p.name, p.created_at, p.total, p.drafter, p.subject_template, p.review,"
        " p.send_at, p.cancelled_at, p.approved, p.status,"
        " p.body_format, p.from_name, p.reply_to,"
        " CASE WHEN p.status = 'paused' THEN p.held_until END AS paused_until,"
        " s.counts, s.prompt_tokens, s.completion_tokens"
        " FROM (SELECT * FROM ("
        "   SELECT b.id, b.name, b.created_at, b.total, b.drafter, b.subject_template,"
        "    b.review, b.send_at, b.cancelled_at, b.approved_at IS NOT NULL AS approved,"
        "    b.body_format, b.from_name, b.reply_to,"
        "    held.until AS held_until, " + _BATCH_STATE + " AS status"
        "   FROM batches b CROSS JOIN ("
        + _HELD
        + ") held"
        + (" WHERE " + " AND ".join(conditions) if conditions else "")
        + "   ORDER BY b.created_at DESC, b.id DESC) candidates"
        "  WHERE %(status)s::text IS NULL OR candidates.status = %(status)s::text"
        "  ORDER BY created_at DESC, id DESC LIMIT %(limit)s) p"
        " CROSS JOIN LATERAL ("
        "   SELECT coalesce(jsonb_object_agg(status, n), '{}') AS counts,"
        "          coalesce(sum(pt), 0)::int AS prompt_tokens,"
        "          coalesce(sum(ct), 0)::int AS completion_tokens"
        "     FROM (SELECT status, count(*) AS n, sum(prompt_tokens) AS pt,"
        "                  sum(completion_tokens) AS ct"
        "             FROM recipients r WHERE r.batch_id = p.id GROUP BY status) g"
        " ) s"
        " ORDER BY p.created_at DESC, p.id DESC"
    )
    return text, params


class _WindowFull(Exception):
    def __init__(self, limit: Limit) -> None:
        self.limit = limit


class KeyReused(Exception):
    """An Idempotency-Key was used before; ``same_request`` says whether with the same body."""

    def __init__(self, batch_id: uuid.UUID, same_request: bool) -> None:
        super().__init__(f"idempotency key already used for batch {batch_id}")
        self.batch_id = batch_id
        self.same_request = same_request


class NameTaken(Exception):
    """A user of this name (in any case) exists already."""


async def _audit(
    conn: psycopg.AsyncConnection,
    actor: str,
    action: str,
    *,
    batch_id: uuid.UUID | None = None,
    recipient_ids: Sequence[int] | None = None,
    count: int | None = None,
    subject: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    """One ``audit_log`` entry, on ``conn``: in the transaction of the change it records."""
    await conn.execute(
        "INSERT INTO audit_log (actor, action, batch_id, recipient_ids, count, subject, detail)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (
            actor,
            action,
            batch_id,
            list(recipient_ids) if recipient_ids else None,
            count,
            subject,
            Jsonb(dict(detail or {})),
        ),
    )


def _selection_audit(selection: Selection) -> dict[str, Any]:
    """What an audit entry says about a selection of dead letters."""
    return {
        "batch_id": selection.batch_id,
        "recipient_ids": selection.ids,
        "detail": {"all": True} if selection.everything else None,
    }


class WebhookDelivery:
    """One webhook delivery's transaction (:meth:`Database.webhook_events`)."""

    def __init__(self, conn: psycopg.AsyncConnection, provider: str, new: frozenset[str]) -> None:
        self._conn = conn
        self._provider = provider
        self.new = new

    async def suppress(
        self, addresses: Sequence[str], *, reason: str, detail: str | None = None
    ) -> int:
        """:meth:`Database.suppress`, in this delivery's transaction, audited as the provider's
        when it added (or changed) a suppression."""
        added = await _suppress(self._conn, addresses, reason=reason, detail=detail)
        if added:
            await _audit(
                self._conn,
                f"{WEBHOOK_ACTOR_PREFIX}{self._provider}",
                "addresses_suppressed",
                count=added,
                detail={"reason": reason, "given": len(addresses)},
            )
        return added


async def _suppress(
    conn: psycopg.AsyncConnection, addresses: Sequence[str], *, reason: str, detail: str | None
) -> int:
    cursor = await conn.execute(
        "INSERT INTO suppressions (address_key, address, reason, detail)"
        " SELECT DISTINCT ON (lower(a)) lower(a), a, %s, %s FROM unnest(%s::text[]) a"
        " ON CONFLICT (address_key) DO UPDATE"
        " SET reason = excluded.reason, detail = excluded.detail, created_at = now()"
        " WHERE suppressions.reason = 'hard_bounce' AND excluded.reason <> 'hard_bounce'",
        (reason, detail, list(addresses)),
    )
    return cursor.rowcount


# The first key of Mailroom's two-key advisory locks (:meth:`Database.exclusively`): "mail".
_LOCK_SPACE = 0x6D61696C


def email_key(recipient_id: int) -> str:
    """The idempotency key of the one email a recipient row stands for."""
    return f"email:{recipient_id}"


# -- planner statistics after a large enqueue -------------------------------------------------

# An enqueue that adds this many rows to a table ANALYZEs it, at most once per interval.
ANALYZE_AFTER_ROWS = 1000
ANALYZE_INTERVAL_SECONDS = 10.0
# The columns the queue's and the worker's plans depend on; sampling only these costs a
# fraction of a whole row's statistics (recipients carry their fields and drafts): 30 instead
# of 160 ms for 100,000 recipients. Any other table is analyzed whole.
PLANNED_COLUMNS = {
    JOBS_TABLE: JOBS_PLANNED_COLUMNS,
    "recipients": ("id", "batch_id", "status"),
}
_last_analyzed: dict[tuple[str, ...], float] = {}


async def analyze_grown_tables(
    conn: psycopg.AsyncConnection[Any],
    added: Mapping[str, int],
    *,
    min_rows: int = ANALYZE_AFTER_ROWS,
    interval_seconds: float = ANALYZE_INTERVAL_SECONDS,
) -> list[str]:
    """ANALYZE each table of ``added`` (name -> rows just committed) that grew by ``min_rows``
    or more; return the names analyzed. Call it after the commit: ANALYZE samples what is
    committed.

    Why: the planner estimates ``status = 'todo'`` from the statistics of the last ANALYZE. On
    a fresh database there are none (0.5% of the rows is assumed); on a queue analyzed while
    it was drained they say no job waits. Either way procrastinate's fetch expects one job and
    plans to read every waiting one (a bitmap scan and a sort of all of them, or its lock check
    as a scan of the whole lock index) instead of the first entry of its priority index: each
    fetch costs time in proportion to the backlog until autovacuum analyzes the table, which
    takes up to a minute (autovacuum_naptime), or never for a large table whose 10%
    (autovacuum_analyze_scale_factor) the batch does not reach. Reads of recipients by id
    with a status condition go wrong the same way (a scan of every open recipient). ANALYZE
    also invalidates the plans each worker session has cached for these tables.

    A table analyzed by this process less than ``interval_seconds`` ago is not analyzed again (its
    statistics already show a large backlog); one another session is analyzing is skipped
    (SKIP_LOCKED), and a role that does not own it gets PostgreSQL's warning and nothing else.
    A failure is logged, never raised: the enqueue it follows has committed.
    """
    now = time.monotonic()
    where = (str(conn.info.host), str(conn.info.port), conn.info.dbname)
    tables = [
        name
        for name, rows in added.items()
        if rows >= min_rows
        and now - _last_analyzed.get((*where, name), float("-inf")) >= interval_seconds
    ]
    if not tables:
        return []
    try:
        await conn.execute(
            sql.SQL("ANALYZE (SKIP_LOCKED) {}").format(
                sql.SQL(", ").join(
                    sql.SQL("{} ({})").format(
                        sql.Identifier(name),
                        sql.SQL(", ").join(map(sql.Identifier, PLANNED_COLUMNS[name])),
                    )
                    if name in PLANNED_COLUMNS
                    else sql.Identifier(name)
                    for name in tables
                )
            )
        )
    except psycopg.Error as exc:
        log.warning("analyze_failed", tables=tables, error=f"{type(exc).__name__}: {exc}")
        return []
    for name in tables:
        _last_analyzed[(*where, name)] = now
    return tables


class Database:
    """All of Mailroom's SQL, over one pool of autocommit connections.

    ``chunk_size`` is how many recipients of a batch one queue job sends
    (``MAILROOM_CHUNK_SIZE``).
    """

    def __init__(self, pool: AsyncConnectionPool, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self.pool = pool
        self.chunk_size = chunk_size

    def _defer_params(self, **overrides: Any) -> dict[str, Any]:
        return {**_DEFER_PARAMS, "chunk_size": self.chunk_size, **overrides}

    @asynccontextmanager
    async def _changing(self, actor: str | None) -> AsyncIterator[psycopg.AsyncConnection]:
        """A connection for a change: in a transaction when ``actor`` is given, so the change
        and its audit entry commit together (without one, autocommit as before)."""
        async with self.pool.connection() as conn:
            if actor is None:
                yield conn
            else:
                async with conn.transaction():
                    yield conn

    # -- enqueue ---------------------------------------------------------------------------

    async def create_batch(
        self, batch: NewBatch, *, idempotency: tuple[str, str] | None = None
    ) -> uuid.UUID:
        """Insert the batch, its recipients and their chunk jobs in one transaction.

        The recipients and their jobs go in a single statement: procrastinate's own
        ``procrastinate_defer_jobs_v1`` is called on the ids the insert returns, one job per
        ``chunk_size`` of them, so a batch of any size costs two round trips. Either everything
        is committed or nothing is.

        ``idempotency`` is (key, hash of the request): a key seen before raises
        :class:`KeyReused` instead of creating a second batch. Two requests racing with one
        key serialize on it: the second waits for the first to commit, then sees its batch.
        """
        batch_id = uuid.uuid4()
        emails = [r.email for r in batch.recipients]
        fields = [Jsonb(r.fields) for r in batch.recipients]
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO batches (id, created_by, request_id, drafter, subject_template,"
                " body_template, total, context, review, send_at,"
                " body_format, from_name, reply_to, name)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    batch_id,
                    batch.created_by,
                    batch.request_id,
                    batch.drafter,
                    batch.subject_template,
                    batch.body_template,
                    len(emails),
                    batch.context,
                    batch.review,
                    batch.send_at,
                    batch.composition.body_format,
                    batch.composition.from_name,
                    batch.composition.reply_to,
                    batch.name or default_name(batch.subject_template, batch.context),
                ),
            )
            if idempotency is not None:
                await self._claim_key(conn, batch_id, *idempotency)
            # A suppressed address is written as such, and gets no job.
            cursor = await conn.execute(
                """
                WITH inserted AS (
                    INSERT INTO recipients (batch_id, email, fields, status)
                    SELECT %(batch_id)s, t.email, t.fields,
                           CASE WHEN s.address_key IS NULL THEN 'queued' ELSE 'suppressed' END
                      FROM unnest(%(emails)s::text[], %(fields)s::jsonb[])
                           WITH ORDINALITY AS t(email, fields, n)
                      LEFT JOIN suppressions s ON s.address_key = lower(t.email)
                     ORDER BY t.n
                    RETURNING id, batch_id, status
                ), rows AS (SELECT id, batch_id FROM inserted WHERE status = 'queued')
                """
                + _COUNT_AND_DEFER_CHUNKS,
                {
                    "batch_id": batch_id,
                    "emails": emails,
                    "fields": fields,
                    **self._defer_params(scheduled_at=batch.send_at),
                },
            )
            row = await cursor.fetchone()
            expected = -(-row[0] // self.chunk_size) if row else None
            if row is None or (row[1] or 0) != expected:
                raise RuntimeError("deferred job count does not match the recipients queued")
            await _audit(
                conn,
                batch.created_by,
                "batch_created",
                batch_id=batch_id,
                count=len(emails),
                detail={"review": batch.review},
            )
        await self._analyze_after(len(emails))
        return batch_id

    async def _analyze_after(self, queued: int) -> None:
        # The jobs table grows by a chunk's worth fewer rows than recipients, but its fetch
        # plan goes wrong the same way, and analyzing a small table costs little.
        async with self.pool.connection() as conn:
            await analyze_grown_tables(conn, {JOBS_TABLE: queued, "recipients": queued})

    @staticmethod
    async def _claim_key(
        conn: psycopg.AsyncConnection, batch_id: uuid.UUID, key: str, request_hash: str
    ) -> None:
        cursor = await conn.execute(
            "INSERT INTO api_idempotency_keys (key, request_hash, batch_id) VALUES (%s, %s, %s)"
            " ON CONFLICT (key) DO NOTHING RETURNING 1",
            (key, request_hash, batch_id),
        )
        if await cursor.fetchone() is None:
            cursor = await conn.execute(
                "SELECT batch_id, request_hash FROM api_idempotency_keys WHERE key = %s", (key,)
            )
            row = await cursor.fetchone()
            assert row is not None
            raise KeyReused(row[0], same_request=row[1] == request_hash)

    async def cancel(self, batch_id: uuid.UUID, *, actor: str | None = None) -> int | None:
        """Cancel what is left of a batch; ``None`` if there is no such batch.

        Queued, retrying, drafted and sending recipients become ``cancelled`` and their
        waiting jobs are cancelled in the same transaction: a recipient's own job, and a chunk
        job once none of its recipients is still open. Sends already in flight finish; a chunk
        that is running skips its cancelled recipients, and a send in flight that fails
        transiently is cancelled rather than retried (the batch records when it was cancelled).
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE batches SET cancelled_at = coalesce(cancelled_at, now())"
                " WHERE id = %s RETURNING 1",
                (batch_id,),
            )
            if await cursor.fetchone() is None:
                return None
            # One snapshot: ``recipients`` below still shows the rows ``cancelled`` changes, so
            # a chunk stays only for a recipient that is open and not being cancelled (one
            # whose send is in flight).
            # A recipient "sending" in a chunk is cancelled too, unless its send is in flight:
            # its row is locked by the delivery claim, and skipped.
            cursor = await conn.execute(
                "WITH targets AS (SELECT id FROM recipients"
                "  WHERE batch_id = %(batch_id)s"
                "  AND status IN ('queued', 'retrying', 'drafted', 'sending')"
                "  FOR UPDATE SKIP LOCKED),"
                " cancelled AS ("
                "  UPDATE recipients r SET status = 'cancelled', updated_at = now()"
                "   FROM targets t WHERE r.id = t.id RETURNING r.id),"
                " jobs AS (" + CANCEL_WAITING_JOBS + ")"
                " SELECT (SELECT count(*) FROM cancelled), (SELECT count(*) FROM jobs)",
                {"batch_id": batch_id, "queue": EMAIL_QUEUE, "chunk_task": SEND_CHUNK_TASK},
            )
            row = await cursor.fetchone()
            cancelled = int(row[0]) if row else 0
            if actor is not None:
                await _audit(conn, actor, "batch_cancelled", batch_id=batch_id, count=cancelled)
        return cancelled

    # -- reading ---------------------------------------------------------------------------

    async def batch_summary(
        self, batch_id: uuid.UUID, *, limits: Sequence[Limit] = ()
    ) -> BatchSummary | None:
        """The batch with its recipient counts by status, or ``None`` if there is no such batch.

        ``limits`` are the sender's sending-rate limits: one with a full window makes an open
        batch ``paused`` (:data:`_BATCH_STATE`).
        """
        found = await self._summaries(*batch_list_query(batch_id, limit=1, limits=limits))
        return found[0] if found else None

    async def list_batches(
        self, where: BatchFilter = BatchFilter(), *, limit: int = 50, limits: Sequence[Limit] = ()
    ) -> list[BatchSummary]:
        """One page of batches, newest first (keyset on ``created_at`` and ``id``), with their
        counts; ``where`` filters by state and name and says where the page starts."""
        return await self._summaries(*batch_list_query(where, limit=limit, limits=limits))

    async def batch_exists(self, batch_id: uuid.UUID) -> bool:
        """Whether a batch with this id exists (cheaper than its summary)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute("SELECT 1 FROM batches WHERE id = %s", (batch_id,))
            return await cursor.fetchone() is not None

    async def _summaries(self, text: str, params: dict[str, Any]) -> list[BatchSummary]:
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(text, params)
            rows = await cursor.fetchall()
        return [
            BatchSummary(
                counts={**dict.fromkeys(RECIPIENT_STATUSES, 0), **row.pop("counts")}, **row
            )
            for row in rows
        ]

    async def list_recipients(
        self,
        batch_id: uuid.UUID,
        *,
        status: str | None = None,
        after_id: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """One page of a batch's recipients in submission order (keyset pagination on id)."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, email, status, attempts, last_error, message_id, subject, body,"
                " prompt_tokens, completion_tokens, enqueued_at, sent_at FROM recipients"
                " WHERE batch_id = %s AND (%s::text IS NULL OR status = %s) AND id > %s"
                " ORDER BY id LIMIT %s",
                (batch_id, status, status, after_id, limit),
            )
            return await cursor.fetchall()

    # -- delivery (worker) -----------------------------------------------------------------

    async def begin_chunk(
        self, batch_id: uuid.UUID, recipient_ids: Sequence[int]
    ) -> list[RecipientForSend]:
        """:meth:`begin_attempt` for the recipients of one chunk job, in one statement.

        Takes the chunk's recipients that are still its own: ``queued``, or ``sending`` when the
        chunk runs again after its worker died; never one that left the chunk for a job of its
        own (``own_job``), nor a final one. In id order.
        """
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "WITH t AS (SELECT x.id, EXISTS (SELECT 1 FROM suppressions"
                "   WHERE address_key = lower(x.email)) AS suppressed"
                "   FROM recipients x WHERE x.id = ANY(%(ids)s::bigint[])"
                "   AND x.batch_id = %(batch_id)s"
                "   AND x.status IN ('queued', 'sending') AND NOT x.own_job)"
                " UPDATE recipients r"
                " SET status = CASE WHEN t.suppressed THEN 'suppressed' ELSE 'sending' END,"
                " attempts = r.attempts + CASE WHEN t.suppressed THEN 0 ELSE 1 END,"
                " updated_at = now() FROM batches b, t"
                " WHERE r.id = t.id AND b.id = r.batch_id"
                f" RETURNING {_FOR_SEND}",
                {"ids": list(recipient_ids), "batch_id": batch_id},
            )
            rows = await cursor.fetchall()
        return sorted((RecipientForSend(**row) for row in rows), key=lambda r: r.id)

    async def begin_attempt(self, recipient_id: int) -> RecipientForSend | None:
        """Count an attempt, show the recipient as ``sending`` and return it with its templates.

        ``None`` when there is nothing to do: the row is gone or already final (sent, dead or
        cancelled), as it is for a duplicate job of a recipient that was sent. A recipient whose
        address was suppressed meanwhile comes back with ``status == "suppressed"``.
        """
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            # An address suppressed since it was queued is not sent: it becomes "suppressed"
            # here, without spending an attempt.
            await cursor.execute(
                "WITH s AS (SELECT EXISTS (SELECT 1 FROM suppressions, recipients x"
                "   WHERE x.id = %(id)s AND address_key = lower(x.email)) AS suppressed)"
                " UPDATE recipients r"
                " SET status = CASE WHEN s.suppressed THEN 'suppressed' ELSE 'sending' END,"
                " attempts = r.attempts + CASE WHEN s.suppressed THEN 0 ELSE 1 END,"
                " updated_at = now() FROM batches b, s"
                " WHERE r.id = %(id)s AND b.id = r.batch_id"
                " AND r.status IN ('queued', 'retrying', 'sending')"
                f" RETURNING {_FOR_SEND}",
                {"id": recipient_id},
            )
            row = await cursor.fetchone()
        return RecipientForSend(**row) if row else None

    async def give_back_attempt(
        self,
        recipient_ids: int | Sequence[int],
        *,
        note: str | None = None,
        own_job_at: datetime | None = None,
    ) -> None:
        """Undo :meth:`begin_attempt` for attempts that were not the email's fault (cut off by
        a shutdown, or held back by a rate limit); ``note`` says why it waits.

        ``own_job_at``: the recipient leaves its chunk and waits for a job of its own at that
        time, deferred in the same statement (a chunk's recipient held back by a rate limit).
        """
        ids = [recipient_ids] if isinstance(recipient_ids, int) else list(recipient_ids)
        async with self.pool.connection() as conn:
            await conn.execute(
                "WITH failed AS (UPDATE recipients SET status = 'queued',"
                " attempts = greatest(attempts - 1, 0),"
                " last_error = coalesce(%(note)s, last_error),"
                " own_job = own_job OR %(retry_at)s::timestamptz IS NOT NULL, updated_at = now()"
                " WHERE id = ANY(%(ids)s::bigint[]) AND status = 'sending' RETURNING id, status)"
                " SELECT " + DEFER_OWN_JOB,
                {
                    "note": note,
                    "ids": ids,
                    **self._own_job_params(own_job_at, priority=RETRY_PRIORITY),
                },
            )

    @staticmethod
    def _own_job_params(retry_at: datetime | None, *, priority: int) -> dict[str, Any]:
        return {
            "queue": EMAIL_QUEUE,
            "email_task": SEND_EMAIL_TASK,
            "priority": priority,
            "retry_at": retry_at,
        }

    async def save_draft(
        self,
        recipient_id: int,
        subject: str,
        body: str,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """Store the drafted email and what it cost; a stored draft wins (drafted once)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE recipients SET subject = %s, body = %s, prompt_tokens = %s,"
                " completion_tokens = %s, updated_at = now() WHERE id = %s AND subject IS NULL",
                (subject, body, prompt_tokens, completion_tokens, recipient_id),
            )

    async def park_for_review(self, recipient_id: int, batch_id: uuid.UUID) -> bool:
        """Park a drafted recipient until its batch is approved; False if it already was.

        The batch row is locked (FOR SHARE) so an approval cannot slip between reading the
        batch and parking the recipient: either the approval waits and then queues this
        recipient, or this sees the approval and the caller sends at once.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT approved_at IS NULL FROM batches WHERE id = %s FOR SHARE", (batch_id,)
            )
            row = await cursor.fetchone()
            if not row or not row[0]:
                return False
            await conn.execute(
                "UPDATE recipients SET status = 'drafted', attempts = greatest(attempts - 1, 0),"
                " last_error = NULL, updated_at = now() WHERE id = %s AND status = 'sending'",
                (recipient_id,),
            )
        return True

    async def approve(self, batch_id: uuid.UUID, *, actor: str | None = None) -> int | None:
        """Send a reviewed batch: its drafted recipients are queued in new chunk jobs, at once.

        Returns how many were queued, or ``None`` if the batch does not exist. Recipients still
        being drafted when the batch is approved are sent as soon as their draft is stored.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE batches SET approved_at = coalesce(approved_at, now())"
                " WHERE id = %s RETURNING id",
                (batch_id,),
            )
            if await cursor.fetchone() is None:
                return None
            cursor = await conn.execute(
                "WITH rows AS (UPDATE recipients SET status = 'queued', own_job = false,"
                " enqueued_at = now(), updated_at = now()"
                " WHERE batch_id = %(batch_id)s AND status = 'drafted'"
                " RETURNING id, batch_id)" + _COUNT_AND_DEFER_CHUNKS,
                {"batch_id": batch_id, **self._defer_params()},
            )
            row = await cursor.fetchone()
            queued = int(row[0] or 0) if row else 0
            if actor is not None:
                await _audit(conn, actor, "batch_sent", batch_id=batch_id, count=queued)
        await self._analyze_after(queued)
        return queued

    async def edit_draft(
        self,
        batch_id: uuid.UUID,
        recipient_id: int,
        subject: str,
        body: str,
        *,
        actor: str | None = None,
    ) -> bool:
        """Replace a draft that is waiting for review; False if it is not (or no longer) one."""
        async with self._changing(actor) as conn:
            cursor = await conn.execute(
                "UPDATE recipients SET subject = %s, body = %s, updated_at = now()"
                " WHERE id = %s AND batch_id = %s AND status = 'drafted'",
                (subject, body, recipient_id, batch_id),
            )
            edited = cursor.rowcount == 1
            if actor is not None and edited:
                await _audit(
                    conn,
                    actor,
                    "draft_edited",
                    batch_id=batch_id,
                    recipient_ids=[recipient_id],
                    count=1,
                )
        return edited

    @asynccontextmanager
    async def claim_delivery(self, recipient_id: int) -> AsyncIterator[DeliveryClaim]:
        """Hold the recipient's idempotency key for the duration of the block.

        The recipient's row is locked and the key inserted in an open transaction: a
        concurrent duplicate blocks on the row until this transaction ends, then sees it sent
        (and skips) or rolled back (and sends). If the key is already committed, or the
        recipient is no longer ``sending`` (its batch was cancelled while it waited in its
        chunk), ``claimed`` is False and nothing must be sent. :meth:`cancel` skips a locked
        row, so a send in flight finishes. An exception inside the block rolls the claim back.

        Two round trips around the send, in pipeline mode: BEGIN with the claim, then
        :meth:`DeliveryClaim.mark_sent` with the COMMIT. The commit's outcome is known when
        the block exits: a failure there raises, as an unrecorded send must.
        """
        async with self.pool.connection() as conn, conn.pipeline():
            await conn.execute("BEGIN")
            cursor = await conn.execute(
                "WITH mine AS (SELECT status FROM recipients WHERE id = %(id)s FOR UPDATE),"
                " claim AS (INSERT INTO processed_jobs (idempotency_key)"
                "  SELECT %(key)s FROM mine WHERE status = 'sending'"
                "  ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1)"
                " SELECT (SELECT status FROM mine), EXISTS (SELECT 1 FROM claim)",
                {"id": recipient_id, "key": email_key(recipient_id)},
            )
            row = await cursor.fetchone()
            status, claimed = row if row else (None, False)
            try:
                yield DeliveryClaim(conn, recipient_id, claimed, status)
            except BaseException:
                await asyncio.shield(_roll_back(conn))
                raise
            await conn.execute("COMMIT")

    async def mark_failed(
        self,
        recipient_id: int,
        *,
        status: str,
        error: str,
        suppress: bool = False,
        retry_at: datetime | None = None,
        draft: tuple[str, str] | None = None,
    ) -> str | None:
        """Record a failed attempt as ``retrying`` or ``dead`` (never over a final state);
        return the status recorded (``None`` if the recipient was final already).

        ``suppress`` also adds the address to the suppressions as a hard bounce, in the same
        statement (the server said the mailbox does not exist). ``retry_at``: the recipient
        leaves its chunk for a job of its own at that time, deferred in the same statement.
        ``draft`` (subject, body) is stored unless one already is. A recipient of a batch
        cancelled while its send was in flight becomes ``cancelled`` instead of ``retrying``.
        """
        subject, body = draft or (None, None)
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "WITH failed AS ("
                "  UPDATE recipients r SET status = CASE"
                "    WHEN %(status)s = 'retrying' AND b.cancelled_at IS NOT NULL THEN 'cancelled'"
                "    ELSE %(status)s END,"
                "   last_error = %(error)s,"
                "   own_job = r.own_job OR %(retry_at)s::timestamptz IS NOT NULL,"
                "   subject = coalesce(r.subject, %(subject)s), body = coalesce(r.body, %(body)s),"
                "   updated_at = now()"
                "  FROM batches b"
                "  WHERE r.id = %(id)s AND b.id = r.batch_id"
                "  AND r.status IN ('queued', 'sending', 'retrying')"
                "  RETURNING r.id, r.email, r.status),"
                " suppressed AS ("
                "  INSERT INTO suppressions (address_key, address, reason, detail)"
                "  SELECT lower(email), email, 'hard_bounce', %(error)s FROM failed"
                "  WHERE %(suppress)s ON CONFLICT (address_key) DO NOTHING)"
                " SELECT (SELECT status FROM failed), " + DEFER_OWN_JOB,
                {
                    "status": status,
                    "error": error[:2000],
                    "id": recipient_id,
                    "suppress": suppress,
                    "subject": subject,
                    "body": body,
                    **self._own_job_params(retry_at, priority=RETRY_PRIORITY),
                },
            )
            row = await cursor.fetchone()
        return str(row[0]) if row and row[0] is not None else None

    # -- sending-rate limits -----------------------------------------------------------------

    async def take_send_slot(self, limits: Sequence[Limit]) -> tuple[Limit, datetime] | None:
        """Count one message in every window of ``limits``, or none if one of them is full.

        Returns ``None`` when the message may go, else the full limit and when its window
        ends. One transaction: a full window rolls back the slots already taken in the others.
        Concurrent workers serialize on each window's row, briefly.
        """
        async with self.pool.connection() as conn:
            try:
                async with conn.transaction():
                    for limit in limits:
                        cursor = await conn.execute(
                            "INSERT INTO send_windows (scope, window_start, sent)"
                            " VALUES (%(scope)s, to_timestamp("
                            "  floor(extract(epoch FROM now()) / %(w)s) * %(w)s), 1)"
                            " ON CONFLICT (scope, window_start) DO UPDATE"
                            " SET sent = send_windows.sent + 1"
                            " WHERE send_windows.sent < %(max)s RETURNING 1",
                            {
                                "scope": limit.scope,
                                "w": limit.window_seconds,
                                "max": limit.max_sent,
                            },
                        )
                        if await cursor.fetchone() is None:
                            raise _WindowFull(limit)
            except _WindowFull as full:
                cursor = await conn.execute(
                    "SELECT to_timestamp((floor(extract(epoch FROM now()) / %(w)s) + 1) * %(w)s)",
                    {"w": full.limit.window_seconds},
                )
                row = await cursor.fetchone()
                assert row is not None
                return full.limit, row[0]
        return None

    async def full_windows(self, limits: Sequence[Limit]) -> list[tuple[Limit, datetime]]:
        """The limits whose current window is full, with when each window ends."""
        if not limits:
            return []
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT l.n, to_timestamp((floor(extract(epoch FROM now()) / l.w) + 1) * l.w)"
                " FROM unnest(%s::text[], %s::int[], %s::int[]) WITH ORDINALITY"
                "  AS l(scope, w, max_sent, n)"
                " JOIN send_windows s ON s.scope = l.scope AND s.window_start ="
                "  to_timestamp(floor(extract(epoch FROM now()) / l.w) * l.w)"
                " WHERE s.sent >= l.max_sent ORDER BY l.n",
                (
                    [x.scope for x in limits],
                    [x.window_seconds for x in limits],
                    [x.max_sent for x in limits],
                ),
            )
            rows = await cursor.fetchall()
        return [(limits[n - 1], ends) for n, ends in rows]

    async def prune_send_windows(self) -> int:
        """Forget windows that ended more than a day ago."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM send_windows WHERE window_start < now() - interval '2 days'"
            )
        return cursor.rowcount

    # -- maintenance -------------------------------------------------------------------------

    async def record_maintenance_success(self, task: str) -> None:
        """Note that maintenance task ``task`` just succeeded (published as a metric)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO mailroom_maintenance_runs (task, succeeded_at) VALUES (%s, now())"
                " ON CONFLICT (task) DO UPDATE SET succeeded_at = excluded.succeeded_at",
                (task,),
            )

    # -- web sessions ------------------------------------------------------------------------

    async def start_session(
        self, id_hash: bytes, expires_at: datetime, *, user_id: int | None = None
    ) -> None:
        """Record a login (by the hash of its session id) of a user, or (``user_id`` None) of
        the bootstrap token; forget sessions that have expired."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "WITH expired AS (DELETE FROM web_sessions WHERE expires_at < now())"
                " INSERT INTO web_sessions (id_hash, expires_at, user_id) VALUES (%s, %s, %s)",
                (id_hash, expires_at, user_id),
            )

    async def session_owner(self, id_hash: bytes) -> Principal | None:
        """Who a logged-in session belongs to; None if it is logged out, expired, or its user
        is disabled. A session of the bootstrap token is :data:`shared.accounts.BOOTSTRAP`
        with the role it has (admin)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT s.user_id, u.name, u.role FROM web_sessions s"
                " LEFT JOIN users u ON u.id = s.user_id"
                " WHERE s.id_hash = %s AND s.expires_at > now()"
                " AND (s.user_id IS NULL OR u.disabled_at IS NULL)",
                (id_hash,),
            )
            row = await cursor.fetchone()
        if row is None:
            return None
        if row[0] is None:
            return Principal(BOOTSTRAP_ACTOR, Role.ADMIN)
        return Principal(row[1], Role(row[2]), user_id=row[0])

    async def end_session(self, id_hash: bytes) -> None:
        """Log the session out: its cookie is refused from now on, by every web process."""
        async with self.pool.connection() as conn:
            await conn.execute("DELETE FROM web_sessions WHERE id_hash = %s", (id_hash,))

    # -- users and their API tokens ----------------------------------------------------------

    async def add_user(self, name: str, password_hash: str, role: Role, *, actor: str) -> int:
        """A new user (its name checked by :func:`shared.accounts.check_name`); raises
        :class:`NameTaken` if one of that name, in any case, exists."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                cursor = await conn.execute(
                    "INSERT INTO users (name, password_hash, role) VALUES (%s, %s, %s)"
                    " RETURNING id",
                    (name, password_hash, role.value),
                )
                row = await cursor.fetchone()
                assert row is not None
                await _audit(conn, actor, "user_added", subject=name, detail={"role": role})
        except psycopg.errors.UniqueViolation:
            raise NameTaken(name) from None
        return int(row[0])

    async def list_users(self) -> list[dict[str, Any]]:
        """Every user, by name (any case), with how many live tokens each has."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT u.id, u.name, u.role, u.disabled_at, u.created_at,"
                " (SELECT count(*) FROM api_tokens t"
                "   WHERE t.user_id = u.id AND t.revoked_at IS NULL) AS tokens"
                " FROM users u ORDER BY lower(u.name)"
            )
            return await cursor.fetchall()

    async def user_by_name(self, name: str) -> dict[str, Any] | None:
        """The user of this name in any case (id, name, role, password_hash, disabled_at)."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, name, role, password_hash, disabled_at FROM users"
                " WHERE lower(name) = lower(%s)",
                (name,),
            )
            return await cursor.fetchone()

    async def disable_user(self, name: str, *, actor: str) -> dict[str, int] | None:
        """Disable a user: their sessions end and their tokens are revoked, in one transaction.

        Returns how many sessions and tokens were ended, or None if there is no such user.
        Disabling a user again changes nothing more (and is audited again).
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE users SET disabled_at = coalesce(disabled_at, now())"
                " WHERE lower(name) = lower(%s) RETURNING id, name",
                (name,),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            ended = await self._end_sessions_of(conn, row[0])
            cursor = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now()"
                " WHERE user_id = %s AND revoked_at IS NULL",
                (row[0],),
            )
            revoked = cursor.rowcount
            await _audit(
                conn,
                actor,
                "user_disabled",
                subject=row[1],
                detail={"sessions_ended": ended, "tokens_revoked": revoked},
            )
        return {"sessions": ended, "tokens": revoked}

    async def set_role(self, name: str, role: Role, *, actor: str) -> bool:
        """Give a user another role (their sessions and tokens carry it from the next request);
        False if there is no such user."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE users SET role = %s WHERE lower(name) = lower(%s) RETURNING name",
                (role.value, name),
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            await _audit(conn, actor, "role_changed", subject=row[0], detail={"role": role})
        return True

    async def set_password(self, user_id: int, password_hash: str, *, actor: str) -> None:
        """A user's new password: every session of theirs ends in the same transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "UPDATE users SET password_hash = %s WHERE id = %s RETURNING name",
                (password_hash, user_id),
            )
            row = await cursor.fetchone()
            if row is None:
                return
            ended = await self._end_sessions_of(conn, user_id)
            await _audit(
                conn, actor, "password_changed", subject=row[0], detail={"sessions_ended": ended}
            )

    @staticmethod
    async def _end_sessions_of(conn: psycopg.AsyncConnection, user_id: int) -> int:
        cursor = await conn.execute("DELETE FROM web_sessions WHERE user_id = %s", (user_id,))
        return cursor.rowcount

    async def create_token(
        self, user_id: int, name: str, token_hash: bytes, *, actor: str
    ) -> dict[str, Any]:
        """Record a personal API token (only its hash) for a user: its id, name and time."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "INSERT INTO api_tokens (user_id, name, token_hash) VALUES (%s, %s, %s)"
                " RETURNING id, name, created_at, revoked_at",
                (user_id, name, token_hash),
            )
            row = await cursor.fetchone()
            assert row is not None
            await _audit(conn, actor, "token_created", subject=name, detail={"token_id": row["id"]})
        return row

    async def list_tokens(self, user_id: int | None = None) -> list[dict[str, Any]]:
        """A user's tokens (or everyone's, with their user's name), newest first."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT t.id, t.name, t.created_at, t.revoked_at, u.name AS user_name"
                " FROM api_tokens t JOIN users u ON u.id = t.user_id"
                " WHERE %(user_id)s::bigint IS NULL OR t.user_id = %(user_id)s::bigint"
                " ORDER BY t.id DESC",
                {"user_id": user_id},
            )
            return await cursor.fetchall()

    async def revoke_token(self, token_id: int, *, owner_id: int | None, actor: str) -> bool | None:
        """Revoke a token: refused from the next request on. ``owner_id`` restricts it to that
        user's tokens (None: anyone's, for an admin). None if there is no such token (for this
        owner); False if it was revoked already."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT t.revoked_at IS NOT NULL, t.name, u.name FROM api_tokens t"
                " JOIN users u ON u.id = t.user_id"
                " WHERE t.id = %(id)s AND (%(owner)s::bigint IS NULL OR t.user_id = %(owner)s)"
                " FOR UPDATE OF t",
                {"id": token_id, "owner": owner_id},
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            if row[0]:
                return False
            await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = %s", (token_id,)
            )
            await _audit(
                conn,
                actor,
                "token_revoked",
                subject=row[1],
                detail={"token_id": token_id, "user": row[2]},
            )
        return True

    async def token_owner(self, token_hash: bytes) -> Principal | None:
        """Who a personal API token acts for; None if unknown, revoked, or its user disabled."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT u.id, u.name, u.role FROM api_tokens t JOIN users u ON u.id = t.user_id"
                " WHERE t.token_hash = %s AND t.revoked_at IS NULL AND u.disabled_at IS NULL",
                (token_hash,),
            )
            row = await cursor.fetchone()
        return Principal(row[1], Role(row[2]), user_id=row[0]) if row else None

    # -- the audit log -----------------------------------------------------------------------

    async def audit(self, actor: str, action: str, **entry: Any) -> None:
        """Record an action that has no change of its own to share a transaction with."""
        async with self.pool.connection() as conn:
            await _audit(conn, actor, action, **entry)

    async def list_audit(
        self, *, before_id: int | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """A page of the audit log, newest first, keyset-paginated on ``id``."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, at, actor, action, batch_id, recipient_ids, count, subject, detail"
                " FROM audit_log WHERE %(before)s::bigint IS NULL OR id < %(before)s::bigint"
                " ORDER BY id DESC LIMIT %(limit)s",
                {"before": before_id, "limit": limit},
            )
            return await cursor.fetchall()

    # -- suppressions ------------------------------------------------------------------------

    async def suppress(
        self,
        addresses: Sequence[str],
        *,
        reason: str,
        detail: str | None = None,
        actor: str | None = None,
        audit_unchanged: bool = True,
    ) -> int:
        """Add addresses to the suppressions; return how many were added (or changed).

        Queued recipients of these addresses are skipped when their turn comes. An address
        already suppressed keeps its reason, except a hard bounce, which a person's or an
        operator's own request replaces: a redrive lifts hard bounces, and must never lift an
        unsubscription with them. With ``audit_unchanged`` false, a call that changed nothing
        writes no audit entry (a public link followed again must not fill the log).
        """
        async with self._changing(actor) as conn:
            added = await _suppress(conn, addresses, reason=reason, detail=detail)
            if actor is not None and (added or audit_unchanged):
                await _audit(
                    conn,
                    actor,
                    "addresses_suppressed",
                    count=added,
                    detail={"reason": reason, "given": len(addresses)},
                )
        return added

    @asynccontextmanager
    async def webhook_events(
        self, provider: str, event_ids: Sequence[str]
    ) -> AsyncIterator[WebhookDelivery]:
        """A transaction that records a provider's webhook events and what they suppress.

        ``event_ids`` are inserted into ``webhook_events`` first; :attr:`WebhookDelivery.new`
        holds those never seen before (a concurrent delivery of the same id waits for this one
        and then finds it seen). Suppressions made through the delivery commit with the ids,
        and an exception rolls both back, so a delivery is acted on exactly once.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "INSERT INTO webhook_events (provider, event_id)"
                " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING RETURNING event_id",
                (provider, list(event_ids)),
            )
            new = frozenset(row[0] for row in await cursor.fetchall())
            yield WebhookDelivery(conn, provider, new)

    async def prune_webhook_events(self, *, retention_days: int) -> int:
        """Forget webhook event ids older than the retention period; return how many."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM webhook_events WHERE received_at < now() - make_interval(days => %s)",
                (retention_days,),
            )
        return cursor.rowcount

    async def unsuppress(self, addresses: Sequence[str], *, actor: str | None = None) -> int:
        """Remove addresses from the suppressions; return how many were there."""
        async with self._changing(actor) as conn:
            cursor = await conn.execute(
                "DELETE FROM suppressions WHERE address_key = ANY("
                " SELECT lower(a) FROM unnest(%s::text[]) a)",
                (list(addresses),),
            )
            removed = cursor.rowcount
            if actor is not None:
                await _audit(
                    conn,
                    actor,
                    "addresses_unsuppressed",
                    count=removed,
                    detail={"given": len(addresses)},
                )
        return removed

    async def list_suppressions(
        self, *, after_id: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Suppressed addresses, oldest first, keyset-paginated on ``id``."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, address, reason, detail, created_at FROM suppressions"
                " WHERE id > %s ORDER BY id LIMIT %s",
                (after_id, limit),
            )
            return await cursor.fetchall()

    # -- the bounce mailbox ------------------------------------------------------------------

    @asynccontextmanager
    async def exclusively(self, name: str) -> AsyncIterator[bool]:
        """Whether this process alone holds lock ``name`` for the block (False: another does).

        A transaction-level advisory lock on a connection held for the block, so it also works
        behind a transaction-mode pooler, and it ends with the transaction if the process dies.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_SPACE, name)
            )
            row = await cursor.fetchone()
            yield bool(row and row[0])

    async def bounce_mailbox_position(
        self, mailbox: str, uidvalidity: int
    ) -> tuple[int, list[int]]:
        """The highest UID of ``mailbox`` read so far (0: none), and the UIDs read whose marking
        on the server is not done yet (the poll that read them stopped first)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT coalesce(max(uid), 0),"
                " coalesce(array_agg(uid ORDER BY uid) FILTER (WHERE NOT marked), '{}')"
                " FROM bounce_mailbox_messages WHERE mailbox = %s AND uidvalidity = %s",
                (mailbox, uidvalidity),
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0]), [int(uid) for uid in row[1]]

    async def record_bounce_message(
        self,
        mailbox: str,
        uidvalidity: int,
        uid: int,
        *,
        outcome: str,
        suppressions: Sequence[tuple[str, str, str]] = (),
        recipient_ids: Sequence[int] = (),
        recipient_detail: str = "",
        marked: bool,
    ) -> int | None:
        """Record one message read from the bounce mailbox and suppress what it names, in one
        statement; return how many addresses were newly suppressed, or ``None`` if the message
        was recorded before (then nothing is suppressed again).

        ``suppressions`` are (address, reason, detail); ``recipient_ids`` are recipients whose
        own address is suppressed as a hard bounce with ``recipient_detail`` (a bounce that
        names its recipient only by the envelope sender it came back to). A complaint wins over
        a hard bounce of the same address, as in :meth:`suppress`.
        """
        addresses = [s[0] for s in suppressions]
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "WITH recorded AS ("
                "  INSERT INTO bounce_mailbox_messages (mailbox, uidvalidity, uid, outcome, marked)"
                "  VALUES (%(mailbox)s, %(uidvalidity)s, %(uid)s, %(outcome)s, %(marked)s)"
                "  ON CONFLICT DO NOTHING RETURNING 1),"
                " named AS ("
                "  SELECT a, r, d"
                "  FROM unnest(%(a)s::text[], %(r)s::text[], %(d)s::text[]) t(a, r, d)"
                "  UNION ALL SELECT email, 'hard_bounce', %(rd)s FROM recipients"
                "  WHERE id = ANY(%(ids)s::bigint[])),"
                " added AS ("
                "  INSERT INTO suppressions (address_key, address, reason, detail)"
                "  SELECT DISTINCT ON (lower(a)) lower(a), a, r, d FROM named"
                "  WHERE EXISTS (SELECT 1 FROM recorded) ORDER BY lower(a), r = 'hard_bounce'"
                "  ON CONFLICT (address_key) DO UPDATE"
                "  SET reason = excluded.reason, detail = excluded.detail, created_at = now()"
                "  WHERE suppressions.reason = 'hard_bounce' AND excluded.reason <> 'hard_bounce'"
                "  RETURNING 1),"
                " audited AS ("
                "  INSERT INTO audit_log (actor, action, count, detail)"
                "  SELECT %(actor)s, 'addresses_suppressed', count(*),"
                "   jsonb_build_object('outcome', %(outcome)s::text, 'uid', %(uid)s::bigint)"
                "  FROM added HAVING count(*) > 0)"
                " SELECT EXISTS (SELECT 1 FROM recorded), (SELECT count(*) FROM added)",
                {
                    "mailbox": mailbox,
                    "uidvalidity": uidvalidity,
                    "uid": uid,
                    "outcome": outcome,
                    "marked": marked,
                    "a": addresses,
                    "r": [s[1] for s in suppressions],
                    "d": [s[2] for s in suppressions],
                    "ids": list(recipient_ids),
                    "rd": recipient_detail,
                    "actor": BOUNCE_MAILBOX_ACTOR,
                },
            )
            row = await cursor.fetchone()
        assert row is not None
        return int(row[1]) if row[0] else None

    async def mark_bounce_messages(
        self, mailbox: str, uidvalidity: int, uids: Sequence[int]
    ) -> None:
        """Note that these messages are marked on the server (flagged or moved)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE bounce_mailbox_messages SET marked = true"
                " WHERE mailbox = %s AND uidvalidity = %s AND uid = ANY(%s::bigint[])",
                (mailbox, uidvalidity, list(uids)),
            )

    async def prune_bounce_mailbox_messages(self, *, retention_days: int) -> int:
        """Forget messages read more than ``retention_days`` ago and marked on the server,
        except each mailbox's highest UID: the next poll starts above it."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM bounce_mailbox_messages m"
                " WHERE marked AND read_at < now() - make_interval(days => %s)"
                " AND uid < (SELECT max(uid) FROM bounce_mailbox_messages x"
                "  WHERE x.mailbox = m.mailbox AND x.uidvalidity = m.uidvalidity)",
                (retention_days,),
            )
        return cursor.rowcount

    async def recipient_addresses(self, ids: Sequence[int]) -> dict[int, str]:
        """The address of each of these recipients that exists."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, email FROM recipients WHERE id = ANY(%s::bigint[])", (list(ids),)
            )
            return {int(i): str(e) for i, e in await cursor.fetchall()}

    async def heartbeat_age_seconds(self, worker_id: int) -> float | None:
        """Seconds since procrastinate last saw worker ``worker_id`` (None: not registered)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(WORKER_HEARTBEAT_AGE, (worker_id,))
            row = await cursor.fetchone()
        return float(row[0]) if row else None

    # -- dead letters ------------------------------------------------------------------------

    async def list_dead_letters(
        self, *, batch_id: uuid.UUID | None = None, after_id: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Dead recipients across batches (or one batch), oldest id first, keyset-paginated."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, batch_id, email, attempts, last_error, updated_at AS died_at"
                " FROM recipients WHERE status = 'dead'"
                " AND (%s::uuid IS NULL OR batch_id = %s::uuid) AND id > %s ORDER BY id LIMIT %s",
                (batch_id, batch_id, after_id, limit),
            )
            return await cursor.fetchall()

    async def count_dead_letters(self, selection: Selection) -> int:
        """How many dead letters ``selection`` names (what a redrive or discard would touch)."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT count(*) FROM recipients WHERE status = 'dead' AND {_SELECTED}",
                selection.params(),
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def recipients_by_ids(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The recipients with these ids as they are now (id, batch, address, status), by id."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, batch_id, email, status FROM recipients"
                " WHERE id = ANY(%s::bigint[]) ORDER BY id",
                (list(ids),),
            )
            return await cursor.fetchall()

    async def redrive(self, selection: Selection, *, actor: str | None = None) -> int:
        """Requeue the selected dead letters with a fresh attempt budget; return how many.

        One statement: the recipients go back to ``queued`` in *new* chunk jobs, per batch
        (procrastinate's ``retry_job`` would keep the old job's attempt count), and their
        addresses' hard-bounce suppressions are lifted. Only ``dead`` rows are touched, so a
        recipient that was sent is never sent again.
        """
        async with self._changing(actor) as conn:
            # A redrive says the cause was fixed: a hard bounce recorded for these addresses is
            # lifted with it (an unsubscription or a complaint never is).
            cursor = await conn.execute(
                "WITH rows AS (UPDATE recipients SET status = 'queued', attempts = 0,"
                " own_job = false, last_error = NULL, enqueued_at = now(), updated_at = now()"
                f" WHERE status = 'dead' AND {_SELECTED} RETURNING id, batch_id, email),"
                " lifted AS (DELETE FROM suppressions s USING rows"
                "  WHERE s.address_key = lower(rows.email) AND s.reason = 'hard_bounce')"
                + _COUNT_AND_DEFER_CHUNKS,
                {**selection.params(), **self._defer_params()},
            )
            row = await cursor.fetchone()
            queued = int(row[0] or 0) if row else 0
            if actor is not None:
                await _audit(
                    conn,
                    actor,
                    "dead_letters_redriven",
                    count=queued,
                    **_selection_audit(selection),
                )
        await self._analyze_after(queued)
        return queued

    async def discard(self, selection: Selection, *, actor: str | None = None) -> int:
        """Give up on the selected dead letters (they become ``cancelled``, evidence kept)."""
        async with self._changing(actor) as conn:
            cursor = await conn.execute(
                "UPDATE recipients SET status = 'cancelled', updated_at = now()"
                f" WHERE status = 'dead' AND {_SELECTED}",
                selection.params(),
            )
            discarded = cursor.rowcount
            if actor is not None:
                await _audit(
                    conn,
                    actor,
                    "dead_letters_discarded",
                    count=discarded,
                    **_selection_audit(selection),
                )
        return discarded

    # -- housekeeping ------------------------------------------------------------------------

    async def prune_finished_jobs(self, *, retention_days: int, limit: int = 10_000) -> int:
        """Delete failed, cancelled and aborted email jobs older than the retention period.

        Succeeded jobs are deleted by the worker as they finish (the recipient row keeps the
        evidence). The evidence of a failure is kept for ``retention_days``.
        """
        async with self.pool.connection() as conn:
            cursor = await conn.execute(PRUNE_FINISHED_JOBS, (EMAIL_QUEUE, retention_days, limit))
        return cursor.rowcount
