"""Every Prometheus metric Mailroom publishes, defined here and nowhere else.

Names carry the ``mailroom_`` prefix and their base unit; counters end in ``_total`` (the
client adds it); no label holds an address or an id. Counters and histograms live in the
process that does the work (the worker sends, the web tier enqueues). Queue depth, recipients
by status and live workers come from :class:`QueueCollector`, evaluated at scrape time by the
web tier, so they still report when every worker is down.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psycopg
import structlog
from prometheus_client import (
    REGISTRY,
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

from shared.procrastinate_sql import LIVE_WORKERS, QUEUE_DEPTH

log = structlog.get_logger(__name__)

# The *_created series double every counter for no use on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Latency buckets in seconds: from a loopback SMTP reply to a slow LLM completion.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)

try:
    VERSION = version("mailroom")
except PackageNotFoundError:  # running from a source tree without an install
    VERSION = "0+unknown"

BUILD_INFO = Info("mailroom_build", "The running Mailroom version.")
BUILD_INFO.info({"version": VERSION})

# -- worker -----------------------------------------------------------------------------------
EMAILS_SENT = Counter("mailroom_emails_sent", "Emails the SMTP server accepted.")
EMAIL_FAILURES = Counter("mailroom_email_failures", "Failed delivery attempts, by kind.", ["kind"])
DEAD_LETTERS = Counter("mailroom_dead_letters", "Recipients that became dead letters.")
JOB_RETRIES = Counter("mailroom_job_retries", "Email jobs scheduled for another attempt.")
EMAILS_SUPPRESSED = Counter(
    "mailroom_emails_suppressed",
    "Queued emails skipped at send time: their address was suppressed.",
)
RATE_LIMITED = Counter(
    "mailroom_rate_limited",
    "Email jobs held back by a full sending-rate window, by limit.",
    ["limit"],
)
for _limit in ("per second", "per hour", "per day", "per minute"):
    RATE_LIMITED.labels(limit=_limit)  # published at 0 before the first one, for dashboards
LLM_TOKENS = Counter("mailroom_llm_tokens", "LLM tokens used, by kind.", ["kind"])
JOB_DURATION = Histogram(
    "mailroom_job_duration_seconds",
    "Time a job ran, by task and outcome.",
    ["task", "outcome"],
    buckets=_LATENCY_BUCKETS,
)
JOB_QUEUE_WAIT = Histogram(
    "mailroom_job_queue_wait_seconds",
    "Time from an email being ready (enqueued or due for retry) to its attempt starting.",
    buckets=_WAIT_BUCKETS,
)
SMTP_SEND = Histogram(
    "mailroom_smtp_send_seconds",
    "Time to hand one message to the SMTP server.",
    buckets=_LATENCY_BUCKETS,
)
LLM_REQUEST = Histogram(
    "mailroom_llm_request_seconds",
    "Time of one LLM completion request.",
    buckets=_LATENCY_BUCKETS,
)
WORKER_UP = Gauge("mailroom_worker_up", "1 while this worker process is running its worker.")
SMTP_CONCURRENCY_LIMIT = Gauge(
    "mailroom_smtp_concurrency_limit",
    "Messages this worker may hand to the SMTP server at once (lowered when it throttles).",
)
SMTP_THROTTLED = Counter(
    "mailroom_smtp_throttled",
    "SMTP replies about the connection or the sender that ask to slow down (421, 4xx to MAIL).",
)

# -- web --------------------------------------------------------------------------------------
BATCHES_CREATED = Counter("mailroom_batches_created", "Batches created.")
RECIPIENTS_ENQUEUED = Counter("mailroom_recipients_enqueued", "Recipients enqueued.")
UNSUBSCRIBES = Counter("mailroom_unsubscribes", "Addresses unsubscribed through their link.")
HTTP_REQUESTS = Counter(
    "mailroom_http_requests", "HTTP requests answered.", ["route", "method", "status"]
)
HTTP_DURATION = Histogram(
    "mailroom_http_request_duration_seconds",
    "Time to answer an HTTP request.",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)

for _kind in ("transient", "permanent"):
    EMAIL_FAILURES.labels(kind=_kind)
for _kind in ("prompt", "completion"):
    LLM_TOKENS.labels(kind=_kind)

# -- scrape-time gauges -------------------------------------------------------------------------
QUEUE_STATUSES = ("todo_ready", "todo_scheduled", "doing")
OPEN_RECIPIENT_STATUSES = ("queued", "sending", "drafted", "retrying", "dead")

_RECIPIENTS_SQL = (
    "SELECT status, count(*) FROM recipients"
    " WHERE status IN ('queued', 'sending', 'drafted', 'retrying', 'dead')"
    " GROUP BY status"
)


class QueueCollector(Collector):
    """Queue depth, open recipients and live workers, read from PostgreSQL at scrape time.

    ``describe()`` returns the families without touching the database, so registering the
    collector runs no query. Each scrape runs three indexed queries on one connection with a
    statement timeout; if the database cannot answer, ``mailroom_collector_up`` is 0 and
    the other families are absent (an alert on them cannot fire on stale numbers).
    """

    def __init__(self, conninfo: str, *, stalled_after_s: float, timeout_s: float = 2.0) -> None:
        self._conninfo = conninfo
        self._stalled_after_s = stalled_after_s
        self._timeout_ms = int(timeout_s * 1000)
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
            "mailroom_collector_up", "1 when the scrape-time queries succeeded."
        )

    def collect(self) -> Iterable[Metric]:
        queue, age, recipients, workers, up = self._families()
        try:
            with self._lock:
                rows = self._query()
        except psycopg.Error as exc:
            log.warning("metrics_collect_failed", error=f"{type(exc).__name__}: {exc}")
            self._reset()
            up.add_metric([], 0)
            return [up]
        queue_rows, recipient_rows, alive = rows
        seen_queues = {"emails", "maintenance"} | {row[0] for row in queue_rows}
        counts = {(q, s): 0 for q in seen_queues for s in QUEUE_STATUSES}
        oldest = dict.fromkeys(seen_queues, 0.0)
        for queue_name, state, n, oldest_s in queue_rows:
            counts[(queue_name, state)] = n
            if oldest_s is not None:
                oldest[queue_name] = max(oldest[queue_name], float(oldest_s))
        for (queue_name, state), n in sorted(counts.items()):
            queue.add_metric([queue_name, state], n)
        for queue_name, seconds in sorted(oldest.items()):
            age.add_metric([queue_name], seconds)
        by_status = dict.fromkeys(OPEN_RECIPIENT_STATUSES, 0) | dict(recipient_rows)
        for status, n in by_status.items():
            recipients.add_metric([status], n)
        workers.add_metric([], alive)
        up.add_metric([], 1)
        return [queue, age, recipients, workers, up]

    def _query(self) -> tuple[list[Any], list[Any], int]:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                self._conninfo,
                autocommit=True,
                connect_timeout=5,
                application_name="mailroom-metrics",
                options=f"-c statement_timeout={self._timeout_ms}",
            )
        conn = self._conn
        queue_rows = conn.execute(QUEUE_DEPTH).fetchall()
        recipient_rows = conn.execute(_RECIPIENTS_SQL).fetchall()
        alive_row = conn.execute(LIVE_WORKERS, (self._stalled_after_s,)).fetchone()
        return queue_rows, recipient_rows, int(alive_row[0] if alive_row else 0)

    def _reset(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._reset()


def render(*registries: CollectorRegistry) -> bytes:
    """The exposition text of the process's metrics and any extra registries (blocking)."""
    return b"".join(generate_latest(r) for r in (REGISTRY, *registries))
