"""Every Prometheus metric Mailroom publishes, defined here and nowhere else.

Names carry the ``mailroom_`` prefix and their base unit; counters end in ``_total`` (the
client adds it); no label holds an address, and the only id in a label is a worker's (one
series per row of ``procrastinate_workers``, which procrastinate prunes). Each tier has its
own registry, so a process publishes only what it does: :data:`WORKER_REGISTRY` (sends,
failures, the SMTP slow-down, busy slots) is served by the worker's health server,
:data:`WEB_REGISTRY` (batches, HTTP) by the web tier's ``/metrics``. Queue depth, recipients by
status, workers' heartbeats, orphaned jobs and maintenance runs come from
:class:`QueueCollector`, evaluated at scrape time by the web tier, so they still report when
every worker is down. :class:`PoolCollector` reports a process's own database pool.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg
import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from shared.procrastinate_sql import ORPHANED_JOBS, QUEUE_DEPTH, WORKER_HEARTBEATS
from shared.queue import EMAIL_QUEUE, MAINTENANCE_QUEUE, MAINTENANCE_TASKS

log = structlog.get_logger(__name__)

# The *_created series double every counter for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Duration buckets in seconds, from a loopback SMTP reply to an email that waited an hour.
# No step is wider than about 2x: histogram_quantile interpolates linearly inside a bucket, so
# a 60 -> 300 step made a p95 of waits that never passed 99 s read as 260-300 s.
_WAIT_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900,
    1200, 1800, 2700, 3600,
)  # fmt: skip
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, *_WAIT_BUCKETS)

try:
    VERSION = version("mailroom")
except PackageNotFoundError:  # running from a source tree without an install
    VERSION = "0+unknown"


def _registry() -> CollectorRegistry:
    # What the default registry held: the process's CPU, memory and file descriptors, the
    # Python version and the garbage collector. They describe whichever process serves them.
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    Info("mailroom_build", "The running Mailroom version.", registry=registry).info(
        {"version": VERSION}
    )
    return registry


WORKER_REGISTRY = _registry()
WEB_REGISTRY = _registry()

# -- worker -----------------------------------------------------------------------------------
_W = WORKER_REGISTRY
EMAILS_SENT = Counter("mailroom_emails_sent", "Emails the SMTP server accepted.", registry=_W)
EMAIL_FAILURES = Counter(
    "mailroom_email_failures", "Failed delivery attempts, by kind.", ["kind"], registry=_W
)
DEAD_LETTER_REASONS = ("permanent", "attempts_exhausted")
DEAD_LETTERS = Counter(
    "mailroom_dead_letters",
    "Recipients that became dead letters: a permanent failure, or every attempt used up.",
    ["reason"],
    registry=_W,
)
JOB_RETRIES = Counter(
    "mailroom_job_retries", "Email jobs scheduled for another attempt.", registry=_W
)
EMAILS_SUPPRESSED = Counter(
    "mailroom_emails_suppressed",
    "Queued emails skipped at send time: their address was suppressed.",
    registry=_W,
)
RATE_LIMITED = Counter(
    "mailroom_rate_limited",
    "Email jobs held back by a full sending-rate window, by limit.",
    ["limit"],
    registry=_W,
)
LLM_TOKENS = Counter("mailroom_llm_tokens", "LLM tokens used, by kind.", ["kind"], registry=_W)
JOB_DURATION = Histogram(
    "mailroom_job_duration_seconds",
    "Time a job ran, by task and outcome.",
    ["task", "outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=_W,
)
JOB_QUEUE_WAIT = Histogram(
    "mailroom_job_queue_wait_seconds",
    "Time from an email being ready (enqueued or due for retry) to its attempt starting.",
    buckets=_WAIT_BUCKETS,
    registry=_W,
)
SMTP_SEND = Histogram(
    "mailroom_smtp_send_seconds",
    "Time to hand one message to the SMTP server.",
    buckets=_LATENCY_BUCKETS,
    registry=_W,
)
LLM_REQUEST = Histogram(
    "mailroom_llm_request_seconds",
    "Time of one LLM completion request.",
    buckets=_LATENCY_BUCKETS,
    registry=_W,
)
WORKER_UP = Gauge(
    "mailroom_worker_up", "1 while this worker process is running its worker.", registry=_W
)
WORKER_CONCURRENCY = Gauge(
    "mailroom_worker_concurrency",
    "Sends this worker may run at once (MAILROOM_WORKER_CONCURRENCY).",
    registry=_W,
)
WORKER_BUSY_SLOTS = Gauge(
    "mailroom_worker_busy_slots", "Sends this worker is running now.", registry=_W
)
SMTP_CONCURRENCY_LIMIT = Gauge(
    "mailroom_smtp_concurrency_limit",
    "Messages this worker may hand to the SMTP server at once (lowered when it throttles).",
    registry=_W,
)
SMTP_THROTTLED = Counter(
    "mailroom_smtp_throttled",
    "SMTP replies about the connection or the sender that ask to slow down (421, 4xx to MAIL).",
    registry=_W,
)
SMTP_SLOWED_DOWN = Gauge(
    "mailroom_smtp_slowed_down",
    "1 while this worker sends slower because the SMTP server asked it to (421/451), else 0.",
    registry=_W,
)
SMTP_SLOWDOWN_UNTIL = Gauge(
    "mailroom_smtp_slowdown_until_timestamp_seconds",
    "Unix time this worker's slow-down ends at the latest (0 when it is not slowed down).",
    registry=_W,
)
# Failed SMTP attempts by the server's reply: the codes that mean something different to an
# operator, the rest by class, and "no_reply" when there was no reply to read (connection
# refused or dropped, timeout, TLS).
SMTP_REPLY_CLASSES = (
    "421", "450", "451", "452", "4xx_other",
    "550", "551", "552", "553", "554", "5xx_other",
    "no_reply",
)  # fmt: skip
SMTP_FAILURES = Counter(
    "mailroom_smtp_failures",
    "Failed SMTP attempts, by the server's reply code (no_reply: no reply came).",
    ["reply"],
    registry=_W,
)


def smtp_reply_class(code: int | None) -> str:
    """The ``reply`` label of an SMTP failure with reply ``code`` (None: no reply)."""
    if code is not None and str(code) in SMTP_REPLY_CLASSES:
        return str(code)
    if code is not None and 400 <= code < 500:
        return "4xx_other"
    if code is not None and 500 <= code < 600:
        return "5xx_other"
    return "no_reply"


# -- web --------------------------------------------------------------------------------------
_WEB = WEB_REGISTRY
BATCHES_CREATED = Counter("mailroom_batches_created", "Batches created.", registry=_WEB)
RECIPIENTS_ENQUEUED = Counter("mailroom_recipients_enqueued", "Recipients enqueued.", registry=_WEB)
UNSUBSCRIBES = Counter(
    "mailroom_unsubscribes", "Addresses unsubscribed through their link.", registry=_WEB
)
# Provider webhooks: each request by outcome ("accepted", or the code it was refused with),
# and each event in an accepted request by what became of it.
WEBHOOK_PROVIDERS = ("ses", "postmark", "sendgrid")
WEBHOOK_EVENT_OUTCOMES = (
    "hard_bounce", "complaint", "ignored", "invalid_address", "malformed", "duplicate",
)  # fmt: skip
WEBHOOK_REQUESTS = Counter(
    "mailroom_webhook_requests",
    "Provider webhook requests, by provider and outcome (accepted, or why it was refused).",
    ["provider", "outcome"],
    registry=_WEB,
)
WEBHOOK_EVENTS = Counter(
    "mailroom_webhook_events",
    "Events in accepted webhook requests, by provider and what became of them.",
    ["provider", "outcome"],
    registry=_WEB,
)
HTTP_REQUESTS = Counter(
    "mailroom_http_requests",
    "HTTP requests answered.",
    ["route", "method", "status"],
    registry=_WEB,
)
HTTP_DURATION = Histogram(
    "mailroom_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
    registry=_WEB,
)

# Published at 0 before the first event, so dashboards and rate() see every series.
for _limit in ("per second", "per hour", "per day", "per minute"):
    RATE_LIMITED.labels(limit=_limit)
for _kind in ("transient", "permanent"):
    EMAIL_FAILURES.labels(kind=_kind)
for _kind in ("prompt", "completion"):
    LLM_TOKENS.labels(kind=_kind)
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERS.labels(reason=_reason)
for _reply in SMTP_REPLY_CLASSES:
    SMTP_FAILURES.labels(reply=_reply)
for _provider in WEBHOOK_PROVIDERS:
    WEBHOOK_REQUESTS.labels(provider=_provider, outcome="accepted")
    for _outcome in WEBHOOK_EVENT_OUTCOMES:
        WEBHOOK_EVENTS.labels(provider=_provider, outcome=_outcome)


# -- a process's own database pool ------------------------------------------------------------


class PoolCollector(Collector):
    """This process's psycopg pool, read at scrape time from ``pool.get_stats()``.

    ``pool`` returns the pool in use now, or None while there is none (a worker reconnecting):
    the families are then absent rather than 0, so a ratio of them is absent too.
    """

    def __init__(self, pool: Callable[[], AsyncConnectionPool | None]) -> None:
        self._pool = pool

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "mailroom_db_pool_connections",
            "Connections of this process's database pool: in use (or opening), or idle.",
            labels=["state"],
        )
        yield GaugeMetricFamily(
            "mailroom_db_pool_max_connections",
            "The most connections this process's database pool opens.",
        )

    def collect(self) -> Iterable[Metric]:
        pool = self._pool()
        if pool is None or pool.closed:
            return []
        connections, most = self._families()
        stats = pool.get_stats()  # plain reads of counters: safe from the scrape's thread
        idle = stats.get("pool_available", 0)
        connections.add_metric(["in_use"], max(0, stats.get("pool_size", 0) - idle))
        connections.add_metric(["idle"], idle)
        most.add_metric([], stats.get("pool_max", 0))
        return [connections, most]


# -- scrape-time gauges -------------------------------------------------------------------------
QUEUE_STATUSES = ("todo_ready", "todo_scheduled", "doing")
OPEN_RECIPIENT_STATUSES = ("queued", "sending", "drafted", "retrying", "dead")
QUEUES = (EMAIL_QUEUE, MAINTENANCE_QUEUE)

_RECIPIENTS_SQL = (
    "SELECT status, count(*) FROM recipients"
    " WHERE status IN ('queued', 'sending', 'drafted', 'retrying', 'dead')"
    " GROUP BY status"
)
_MAINTENANCE_SQL = (
    "SELECT task, extract(epoch FROM succeeded_at)::float8 FROM mailroom_maintenance_runs"
)


class QueueCollector(Collector):
    """Queue depth, open recipients, workers, orphaned jobs and maintenance runs, read from
    PostgreSQL at scrape time.

    ``describe()`` returns the families without touching the database, so registering the
    collector runs no query. Each scrape runs five small indexed queries on one connection with
    a statement timeout; if the database cannot answer, ``mailroom_collector_up`` is 0 and
    the other families are absent (an alert on them cannot fire on stale numbers).
    """

    def __init__(
        self, conninfo: str, *, stalled_after_seconds: float, timeout_seconds: float = 2.0
    ) -> None:
        self._conninfo = conninfo
        self._stalled_after_seconds = stalled_after_seconds
        self._timeout_ms = int(timeout_seconds * 1000)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "mailroom_queue_jobs",
            "procrastinate jobs by queue and state.",
            labels=["queue", "status"],
        )
        yield GaugeMetricFamily(
            "mailroom_oldest_ready_job_age_seconds",
            "Age of the oldest job that is ready to run, by queue (0 when none).",
            labels=["queue"],
        )
        yield GaugeMetricFamily(
            "mailroom_recipients",
            "Recipients not yet final, and dead letters, by status.",
            labels=["status"],
        )
        yield GaugeMetricFamily("mailroom_workers_alive", "Workers whose heartbeat is recent.")
        yield GaugeMetricFamily(
            "mailroom_worker_heartbeat_age_seconds",
            "Time since each registered worker's last heartbeat, by worker id.",
            labels=["worker"],
        )
        yield GaugeMetricFamily(
            "mailroom_jobs_orphaned",
            "Running jobs whose worker has no heartbeat within MAILROOM_STALLED_AFTER_SECONDS"
            " (the sweep requeues them), by queue.",
            labels=["queue"],
        )
        yield GaugeMetricFamily(
            "mailroom_maintenance_last_success_timestamp_seconds",
            "Unix time the last run of each maintenance task succeeded (0: never).",
            labels=["task"],
        )
        yield GaugeMetricFamily(
            "mailroom_collector_up", "1 when the scrape-time queries succeeded."
        )

    def collect(self) -> Iterable[Metric]:
        queue, age, recipients, alive, heartbeat, orphaned, maintenance, up = self._families()
        try:
            with self._lock:
                rows = self._query()
        except psycopg.Error as exc:
            log.warning("metrics_collect_failed", error=f"{type(exc).__name__}: {exc}")
            self._reset()
            up.add_metric([], 0)
            return [up]
        queue_rows, recipient_rows, worker_rows, orphan_rows, maintenance_rows = rows
        seen_queues = set(QUEUES) | {row[0] for row in queue_rows}
        counts = {(q, s): 0 for q in seen_queues for s in QUEUE_STATUSES}
        oldest = dict.fromkeys(seen_queues, 0.0)
        for queue_name, state, n, oldest_seconds in queue_rows:
            counts[(queue_name, state)] = n
            if oldest_seconds is not None:
                oldest[queue_name] = max(oldest[queue_name], float(oldest_seconds))
        for (queue_name, state), n in sorted(counts.items()):
            queue.add_metric([queue_name, state], n)
        for queue_name, seconds in sorted(oldest.items()):
            age.add_metric([queue_name], seconds)
        by_status = dict.fromkeys(OPEN_RECIPIENT_STATUSES, 0) | dict(recipient_rows)
        for status, n in by_status.items():
            recipients.add_metric([status], n)
        alive.add_metric([], sum(1 for _, s in worker_rows if s < self._stalled_after_seconds))
        for worker_id, seconds in sorted(worker_rows):
            heartbeat.add_metric([str(worker_id)], max(0.0, seconds))
        for queue_name, n in sorted((dict.fromkeys(QUEUES, 0) | dict(orphan_rows)).items()):
            orphaned.add_metric([queue_name], n)
        last = dict.fromkeys(MAINTENANCE_TASKS, 0.0) | dict(maintenance_rows)
        for task, at in sorted(last.items()):
            maintenance.add_metric([task], at)
        up.add_metric([], 1)
        return [queue, age, recipients, alive, heartbeat, orphaned, maintenance, up]

    def _query(self) -> tuple[list[Any], ...]:
        if self._conn is None or self._conn.closed:
            # No prepared statements and no startup options: behind PgBouncer, which refuses
            # an ``options`` startup parameter and, in transaction pooling, may run the next
            # statement on a server connection that lacks the one prepared. Each runs once per
            # scrape anyway.
            self._conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=5,
                application_name="mailroom-metrics",
                prepare_threshold=None,
            )
        conn = self._conn
        with conn.transaction():
            # Transaction-local, so no setting outlives the scrape on a pooled connection.
            conn.execute(
                "SELECT set_config('statement_timeout', %s, true)", (str(self._timeout_ms),)
            )
            return (
                conn.execute(QUEUE_DEPTH).fetchall(),
                conn.execute(_RECIPIENTS_SQL).fetchall(),
                conn.execute(WORKER_HEARTBEATS).fetchall(),
                conn.execute(ORPHANED_JOBS, (self._stalled_after_seconds,)).fetchall(),
                conn.execute(_MAINTENANCE_SQL).fetchall(),
            )

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._reset()


def render(*registries: CollectorRegistry) -> bytes:
    """The exposition text of ``registries``, one after the other (blocking: run it in a thread).

    A registry's families must not repeat another's: pass the tier's own registry and any of
    its scrape-time collectors, never both tiers' registries.
    """
    return b"".join(generate_latest(r) for r in registries)
