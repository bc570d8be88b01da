"""Database access: the connection pool and every query Mailroom runs on its own tables.

:class:`Database` is the only class that talks SQL (procrastinate runs its own queries through
the same pool in the worker). Pool connections are in autocommit; code that needs a
transaction opens one explicitly, so no statement pays for an implicit BEGIN/COMMIT.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from shared.queue import EMAIL_QUEUE, SEND_EMAIL_TASK

RECIPIENT_STATUSES = ("queued", "sending", "sent", "retrying", "dead", "cancelled")
FINAL_STATUSES = frozenset({"sent", "dead", "cancelled"})

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


async def _configure(conn: psycopg.AsyncConnection) -> None:
    await conn.set_autocommit(True)


def make_pool(conninfo: str, *, max_size: int, min_size: int = 1, name: str) -> AsyncConnectionPool:
    """An unopened pool of autocommit connections (open it with ``await pool.open()``)."""
    return AsyncConnectionPool(
        conninfo,
        min_size=min(min_size, max_size),
        max_size=max_size,
        kwargs={**CONNECTION_KWARGS, "application_name": name},
        configure=_configure,
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


@dataclass(frozen=True)
class BatchSummary:
    id: uuid.UUID
    created_at: datetime
    total: int
    counts: dict[str, int]
    drafter: str
    subject_template: str

    @property
    def status(self) -> str:
        """``queued`` until a recipient is picked up, ``done`` once every one is final."""
        finished = sum(self.counts[s] for s in FINAL_STATUSES)
        if finished >= self.total:
            return "done"
        if self.counts["queued"] == self.total:
            return "queued"
        return "sending"

    @property
    def progress(self) -> float:
        """Share of recipients in a final state, 0.0 to 1.0."""
        finished = sum(self.counts[s] for s in FINAL_STATUSES)
        return finished / self.total if self.total else 1.0


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


class DeliveryClaim:
    """The at-most-once claim on one recipient's email, held for the length of a transaction."""

    def __init__(self, conn: psycopg.AsyncConnection, recipient_id: int, claimed: bool) -> None:
        self._conn = conn
        self.recipient_id = recipient_id
        self.claimed = claimed

    async def mark_sent(self, message_id: str, smtp_reply: str) -> None:
        """Record the accepted send; it commits together with the claim."""
        await self._conn.execute(
            "UPDATE recipients SET status = 'sent', sent_at = now(), updated_at = now(),"
            " message_id = %s, last_error = NULL WHERE id = %s",
            (message_id, self.recipient_id),
        )
        await self._conn.execute(
            "UPDATE processed_jobs SET result = %s WHERE idempotency_key = %s",
            (Jsonb({"message_id": message_id, "smtp": smtp_reply}), email_key(self.recipient_id)),
        )


def email_key(recipient_id: int) -> str:
    """The idempotency key of the one email a recipient row stands for."""
    return f"email:{recipient_id}"


class Database:
    """All of Mailroom's SQL, over one pool of autocommit connections."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    # -- enqueue ---------------------------------------------------------------------------

    async def create_batch(self, batch: NewBatch) -> uuid.UUID:
        """Insert the batch, its recipients and one job per recipient in one transaction.

        The recipients and their jobs go in a single statement: procrastinate's own
        ``procrastinate_defer_jobs_v1`` is called on the ids the insert returns, so a batch of
        any size costs two round trips. Either everything is committed or nothing is.
        """
        batch_id = uuid.uuid4()
        emails = [r.email for r in batch.recipients]
        fields = [Jsonb(r.fields) for r in batch.recipients]
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO batches (id, created_by, request_id, drafter, subject_template,"
                " body_template, total) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    batch_id,
                    batch.created_by,
                    batch.request_id,
                    batch.drafter,
                    batch.subject_template,
                    batch.body_template,
                    len(emails),
                ),
            )
            cursor = await conn.execute(
                """
                WITH inserted AS (
                    INSERT INTO recipients (batch_id, email, fields)
                    SELECT %(batch_id)s, t.email, t.fields
                      FROM unnest(%(emails)s::text[], %(fields)s::jsonb[])
                           WITH ORDINALITY AS t(email, fields, n)
                     ORDER BY t.n
                    RETURNING id
                )
                SELECT cardinality(procrastinate_defer_jobs_v1(ARRAY(
                    SELECT ROW(%(queue)s, %(task)s, 0, NULL, NULL,
                               jsonb_build_object('recipient_id', id), NULL
                           )::procrastinate_job_to_defer_v1
                      FROM inserted ORDER BY id
                )))
                """,
                {
                    "batch_id": batch_id,
                    "emails": emails,
                    "fields": fields,
                    "queue": EMAIL_QUEUE,
                    "task": SEND_EMAIL_TASK,
                },
            )
            row = await cursor.fetchone()
            if row is None or row[0] != len(emails):
                raise RuntimeError("deferred job count does not match the recipients inserted")
        return batch_id

    # -- reading ---------------------------------------------------------------------------

    async def batch_summary(self, batch_id: uuid.UUID) -> BatchSummary | None:
        """The batch with its recipient counts by status, or ``None`` if there is no such batch."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id, created_at, total, drafter, subject_template FROM batches WHERE id = %s",
                (batch_id,),
            )
            batch = await cursor.fetchone()
            if batch is None:
                return None
            await cursor.execute(
                "SELECT status, count(*) AS n FROM recipients WHERE batch_id = %s GROUP BY status",
                (batch_id,),
            )
            counts = dict.fromkeys(RECIPIENT_STATUSES, 0)
            for row in await cursor.fetchall():
                counts[row["status"]] = row["n"]
        return BatchSummary(counts=counts, **batch)

    async def recent_batches(self, limit: int = 50) -> list[BatchSummary]:
        """The newest batches first, with their counts."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT id FROM batches ORDER BY created_at DESC LIMIT %s", (limit,)
            )
            ids = [row["id"] for row in await cursor.fetchall()]
        summaries = [await self.batch_summary(batch_id) for batch_id in ids]
        return [s for s in summaries if s is not None]

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
                "SELECT id, email, status, attempts, last_error, message_id, subject,"
                " enqueued_at, sent_at FROM recipients"
                " WHERE batch_id = %s AND (%s::text IS NULL OR status = %s) AND id > %s"
                " ORDER BY id LIMIT %s",
                (batch_id, status, status, after_id, limit),
            )
            return await cursor.fetchall()

    # -- delivery (worker) -----------------------------------------------------------------

    async def recipient_for_send(self, recipient_id: int) -> RecipientForSend | None:
        """The recipient and its batch's templates, or ``None`` if the row is gone."""
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT r.id, r.batch_id, r.email, r.fields, r.status, r.attempts, r.subject,"
                " r.body, b.drafter, b.subject_template, b.body_template"
                " FROM recipients r JOIN batches b ON b.id = r.batch_id WHERE r.id = %s",
                (recipient_id,),
            )
            row = await cursor.fetchone()
        return RecipientForSend(**row) if row else None

    async def save_draft(self, recipient_id: int, subject: str, body: str) -> None:
        """Store the drafted email; a draft already stored wins (a recipient is drafted once)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE recipients SET subject = %s, body = %s, updated_at = now()"
                " WHERE id = %s AND subject IS NULL",
                (subject, body, recipient_id),
            )

    async def mark_sending(self, recipient_id: int) -> int | None:
        """Count an attempt and show it as ``sending``; ``None`` if the recipient is final."""
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE recipients SET status = 'sending', attempts = attempts + 1,"
                " updated_at = now() WHERE id = %s AND status IN ('queued', 'retrying', 'sending')"
                " RETURNING attempts",
                (recipient_id,),
            )
            row = await cursor.fetchone()
        return row[0] if row else None

    @asynccontextmanager
    async def claim_delivery(self, recipient_id: int) -> AsyncIterator[DeliveryClaim]:
        """Hold the recipient's idempotency key for the duration of the block.

        The key is inserted in an open transaction: a concurrent duplicate blocks on it until
        this transaction ends, then sees it committed (and skips) or rolled back (and sends).
        If the key is already committed, ``claimed`` is False and nothing must be sent. An
        exception inside the block rolls the claim back.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "INSERT INTO processed_jobs (idempotency_key) VALUES (%s)"
                " ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1",
                (email_key(recipient_id),),
            )
            claimed = await cursor.fetchone() is not None
            yield DeliveryClaim(conn, recipient_id, claimed)

    async def mark_failed(self, recipient_id: int, *, status: str, error: str) -> None:
        """Record a failed attempt as ``retrying`` or ``dead`` (never over a final state)."""
        async with self.pool.connection() as conn:
            await conn.execute(
                "UPDATE recipients SET status = %s, last_error = %s, updated_at = now()"
                " WHERE id = %s AND status IN ('queued', 'sending', 'retrying')",
                (status, error[:2000], recipient_id),
            )

    async def is_ready(self) -> bool:
        """True when the database answers."""
        async with self.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return True
