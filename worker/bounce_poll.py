"""One poll of the bounce mailbox: read what arrived, suppress what it names, count it once.

The worker runs :func:`poll_bounce_mailbox` every ``MAILROOM_IMAP_POLL_INTERVAL_SECONDS`` when
``MAILROOM_IMAP_HOST`` is set, and ``mailroom bounces poll`` runs it once. One poll at a time:
a poll that finds another one running (another worker, the command) skips its turn.

Each message is counted once, whatever fails when. The poll reads the messages above the
highest UID it has recorded for the mailbox (and its UIDVALIDITY), oldest first and at most
``MAILROOM_IMAP_MAX_MESSAGES`` of them, each at most ``MAILROOM_IMAP_MAX_MESSAGE_BYTES`` long,
without marking them read. For each one, a single statement records (mailbox, UIDVALIDITY,
UID) and adds the suppressions it leads to (:meth:`shared.db.Database.record_bounce_message`):
a message recorded already adds nothing. Only then are the reports marked on the server
(flagged ``\\Seen``, or moved to ``MAILROOM_IMAP_PROCESSED_MAILBOX``), and that noted. A poll
that dies in between leaves them recorded but unmarked, and the next poll marks them first,
counting nothing again. Messages that are not reports are recorded and left as they are: the
next poll starts above them. One too large, or that the parser cannot read, is recorded as
such and skipped, and the poll goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
import structlog

from shared.db import Database
from shared.metrics import BOUNCE_FINDINGS, BOUNCE_MESSAGES, BOUNCE_POLL_FAILURES
from worker.bounces import Examined, UnreadableMessage, examine_bytes
from worker.imap import ImapError, ImapServer, ImapSession
from worker.verp import Verp

log = structlog.get_logger(__name__)

POLL_LOCK = "bounce-mailbox-poll"
# What needs marking on the server once recorded: the reports. Anything else stays as it was.
_MARKED_OUTCOMES = frozenset({"report", "verp_bounce"})


@dataclass
class PollSummary:
    """What one poll did."""

    outcomes: Counter[str] = field(default_factory=Counter)
    findings: Counter[str] = field(default_factory=Counter)
    newly_suppressed: int = 0
    counted_before: int = 0  # read again, recorded by an earlier poll: nothing done twice
    marked: int = 0
    left: int = 0  # beyond this poll's budget: the next poll reads them

    @property
    def read(self) -> int:
        return sum(self.outcomes.values())

    def line(self) -> str:
        """The summary as one line for the operator."""
        parts = ", ".join(
            f"{self.outcomes[o]} {o.replace('_', ' ')}" for o in sorted(self.outcomes)
        )
        found = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in sorted(self.findings.items()))
        return (
            f"{self.read} message(s) read"
            + (f" ({parts})" if parts else "")
            + f"; {sum(self.findings.values())} address(es) found"
            + (f" ({found})" if found else "")
            + f", {self.newly_suppressed} newly suppressed; {self.marked} marked on the server"
            + (f"; {self.left} left for the next poll" if self.left else "")
        )


class PollFailed(Exception):
    """The poll stopped; ``kind`` labels the failure metric, the message says what to fix."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def poll_bounce_mailbox(
    server: ImapServer,
    db: Database,
    *,
    verp: Verp | None,
    max_messages: int,
    max_message_bytes: int,
) -> PollSummary | None:
    """Poll the mailbox once; None if another poll is running. Raises :class:`PollFailed`
    (logged and counted) when the server or the database fails; what was recorded before
    stays recorded."""
    started = time.perf_counter()
    try:
        async with db.exclusively(POLL_LOCK) as alone:
            if not alone:
                log.info("bounce_poll_skipped", reason="another poll is running")
                return None
            session = ImapSession(server, max_message_bytes=max_message_bytes)
            try:
                summary = await _poll(session, db, verp, max_messages)
            finally:
                await asyncio.to_thread(session.close)
    except ImapError as exc:
        raise _failed(exc.kind, str(exc), server) from None
    except psycopg.Error as exc:
        raise _failed("database", f"database error: {type(exc).__name__}", server) from None
    log.info(
        "bounce_poll_finished",
        mailbox=server.mailbox,
        read=summary.read,
        outcomes=dict(summary.outcomes),
        findings=dict(summary.findings),
        newly_suppressed=summary.newly_suppressed,
        counted_before=summary.counted_before,
        marked=summary.marked,
        left=summary.left,
        duration_s=round(time.perf_counter() - started, 3),
    )
    return summary


def _failed(kind: str, message: str, server: ImapServer) -> PollFailed:
    BOUNCE_POLL_FAILURES.labels(error=kind).inc()
    log.error("bounce_poll_failed", error=kind, reason=message, server=server.where)
    return PollFailed(kind, message)


async def _poll(
    session: ImapSession, db: Database, verp: Verp | None, max_messages: int
) -> PollSummary:
    summary = PollSummary()
    key = session.server.key
    uidvalidity = await asyncio.to_thread(session.open)
    last_uid, unmarked = await db.bounce_mailbox_position(key, uidvalidity)
    if unmarked:  # recorded by a poll that stopped before it marked them
        await _mark(session, db, uidvalidity, unmarked, summary)
    uids = await asyncio.to_thread(session.uids_after, last_uid)
    batch, summary.left = uids[:max_messages], max(0, len(uids) - max_messages)
    sizes = await asyncio.to_thread(session.sizes, batch)
    to_mark: list[int] = []
    for uid in batch:
        if uid not in sizes:  # gone since the search (expunged by someone else)
            continue
        examined = await _read(session, uid, sizes[uid], verp)
        if await _record(db, key, uidvalidity, uid, examined, summary):
            to_mark.append(uid)
    await _mark(session, db, uidvalidity, to_mark, summary)
    return summary


async def _read(session: ImapSession, uid: int, size: int, verp: Verp | None) -> Examined:
    """What message ``uid`` is; too large or unreadable ones are outcomes of their own."""
    limit = session.max_message_bytes
    if size > limit:
        log.warning("bounce_message_skipped", uid=uid, reason="too_large", size_bytes=size)
        return Examined("too_large")
    raw = await asyncio.to_thread(session.fetch, uid)
    if raw is None:
        return Examined("unreadable")
    if len(raw) > limit:  # the size it announced was wrong
        log.warning("bounce_message_skipped", uid=uid, reason="too_large", size_bytes=len(raw))
        return Examined("too_large")
    try:
        # Parsing costs time linear in the (bounded) size: off the event loop.
        return await asyncio.to_thread(examine_bytes, raw, verp)
    except UnreadableMessage as exc:
        log.warning("bounce_message_skipped", uid=uid, reason="unreadable", error=str(exc))
        return Examined("unreadable")


async def _record(
    db: Database,
    key: str,
    uidvalidity: int,
    uid: int,
    examined: Examined,
    summary: PollSummary,
) -> bool:
    """Record the message and its suppressions; whether it needs marking on the server."""
    needs_mark = examined.outcome in _MARKED_OUTCOMES
    added = await db.record_bounce_message(
        key,
        uidvalidity,
        uid,
        outcome=examined.outcome,
        suppressions=[(f.address, f.reason, f.detail) for f in examined.findings],
        recipient_ids=examined.recipient_ids,
        recipient_detail="bounce to the VERP address",
        marked=not needs_mark,
    )
    if added is None:
        summary.counted_before += 1
        return False
    summary.outcomes[examined.outcome] += 1
    summary.newly_suppressed += added
    BOUNCE_MESSAGES.labels(outcome=examined.outcome).inc()
    reasons = [f.reason for f in examined.findings] + ["hard_bounce"] * len(examined.recipient_ids)
    for reason in reasons:
        summary.findings[reason] += 1
        BOUNCE_FINDINGS.labels(reason=reason).inc()
    log.info(
        "bounce_message_read", uid=uid, outcome=examined.outcome, found=len(reasons), added=added
    )
    return needs_mark


async def _mark(
    session: ImapSession, db: Database, uidvalidity: int, uids: list[int], summary: PollSummary
) -> None:
    if not uids:
        return
    await asyncio.to_thread(session.mark, uids)
    await db.mark_bounce_messages(session.server.key, uidvalidity, uids)
    summary.marked += len(uids)
