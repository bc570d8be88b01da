"""The procrastinate side of Mailroom: queue and task names, and the App factory.

The web tier defers jobs with SQL on its own transaction, so it only needs the names here; the
worker builds an :class:`procrastinate.App` on the same pool it uses for its own queries.
"""

from __future__ import annotations

import procrastinate

EMAIL_QUEUE = "emails"
# A batch goes out as one ``send_chunk`` job per chunk of its recipients
# (``{"batch_id": …, "recipient_ids": [...]}``); a recipient that must try again later gets a
# ``send_email`` job of its own (``{"recipient_id": …}``), the task that sent every email before
# chunks, so jobs queued by an earlier version run unchanged.
SEND_CHUNK_TASK = "send_chunk"
SEND_EMAIL_TASK = "send_email"
DEFAULT_CHUNK_SIZE = 50
# Retried jobs go back with a lower priority than fresh ones. procrastinate's fetch walks its
# (priority DESC, id ASC) index and filters out rows scheduled in the future; with retries at
# -1, a fresh job is found at the head of the index however many retries wait in backoff
# (20,000 waiting retries: 4.9 ms per fetch at priority 0, 0.85 ms at -1; see bench/pickup.py).
# The price: a retry that is due waits until no fresh job is ready.
RETRY_PRIORITY = -1
# Periodic housekeeping (the stalled-job sweep, pruning). A worker fetches from both queues by
# priority, then id: at a priority above every email job, a sweep deferred now is the next job
# any worker takes, however large the email backlog it would otherwise queue behind.
MAINTENANCE_QUEUE = "maintenance"
MAINTENANCE_PRIORITY = 100
SWEEP_TASK = "sweep_stalled_jobs"
PRUNE_TASK = "prune_jobs"
# Only where a bounce mailbox is configured (MAILROOM_IMAP_HOST).
BOUNCE_POLL_TASK = "poll_bounce_mailbox"
# Each one's last success is recorded (shared.db.Database.record_maintenance_success) and
# published by the web tier, so an alert sees a sweep that stopped running.
MAINTENANCE_TASKS = (SWEEP_TASK, PRUNE_TASK)


def build_app() -> procrastinate.App:
    """A procrastinate App; open it with ``await app.open_async(pool)`` to share a pool.

    Jobs carry identifiers only; every attempt reads fresh state.
    """
    return procrastinate.App(connector=procrastinate.PsycopgConnector())
