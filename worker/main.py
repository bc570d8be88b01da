"""The worker process: a procrastinate worker with Mailroom's tasks, kept alive.

On SIGTERM or SIGINT the worker stops fetching, lets sends in flight finish within
``MAILROOM_SHUTDOWN_GRACE_SECONDS``, requeues whatever is still running after that (without
spending an attempt) and exits 0. A second signal exits at once: the database rolls back any
claim held, and the stalled-job sweep requeues those jobs.

procrastinate stops its worker when the database goes away (its listener dies, or a query
fails). Rather than exit and rely on the service manager, :func:`run_worker` logs it, waits
with backoff and starts a fresh worker on a fresh pool, until it is asked to stop.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import procrastinate
import structlog
from procrastinate.worker import Worker
from psycopg_pool import AsyncConnectionPool

from shared.db import Database, make_pool
from shared.metrics import WORKER_CONCURRENCY, WORKER_UP
from shared.queue import EMAIL_QUEUE, MAINTENANCE_QUEUE, build_app
from shared.settings import Settings
from shared.stopping import StopRequests
from worker.dkim import DkimSigner
from worker.drafting import Drafter, TemplateDrafter
from worker.health import start_health_server
from worker.llm import LlmDrafter, LlmOptions
from worker.relays import build_mailer
from worker.retry import BackoffRetry
from worker.slots import SendSlots
from worker.smtp import Mailer
from worker.tasks import DEPS_KEY, WorkerDeps, job_summary_middleware, register_tasks
from worker.verp import Verp

log = structlog.get_logger(__name__)

# Connections beyond one per concurrent job: procrastinate's fetch/finish queries, the
# heartbeat and abort polling share the pool (LISTEN uses its own connection).
POOL_HEADROOM = 3
RESTART_BACKOFF_MAX_SECONDS = 30.0
EXIT_FORCED = 1


@asynccontextmanager
async def worker_runtime(
    settings: Settings,
    *,
    mailer: Mailer | None = None,
    drafters: Mapping[str, Drafter] | None = None,
) -> AsyncIterator[tuple[procrastinate.App, WorkerDeps]]:
    """Open the pool, the procrastinate app and the SMTP pool; close them all on exit."""
    settings.require("database_url", "from_address")
    assert settings.database_url is not None
    pool = make_pool(
        settings.database_url,
        max_size=settings.worker_concurrency + POOL_HEADROOM,
        min_size=2,
        name="mailroom-worker",
        durable_commits=False,
        transaction_pooling=settings.database_transaction_pooling,
    )
    await pool.open(wait=True, timeout=30)
    retry = BackoffRetry.from_settings(settings)
    app = build_app()
    register_tasks(app, settings, retry)
    # Only the default drafters need a Groq client; a caller's own drafters never use one.
    llm_options = LlmOptions.from_settings(settings) if drafters is None else None
    llm = LlmDrafter(llm_options) if llm_options is not None else None
    template = TemplateDrafter(job_timeout_seconds=settings.job_timeout_seconds)
    deps = WorkerDeps(
        settings=settings,
        db=Database(pool, chunk_size=settings.chunk_size),
        drafters=drafters or {"template": template, **({"llm": llm} if llm else {})},
        mailer=mailer or build_mailer(settings, signer=DkimSigner.from_settings(settings)),
        retry=retry,
        sending=SendSlots(settings.worker_concurrency),
        chunks=asyncio.Semaphore(WorkerDeps.chunks_in_flight(settings)),
        verp=Verp.from_settings(settings),
    )
    WORKER_CONCURRENCY.set(settings.worker_concurrency)
    try:
        await app.open_async(pool)
        yield app, deps
    finally:
        if llm is not None:
            await llm.close()
        await deps.mailer.close()
        await app.close_async()
        await pool.close()


class MailroomWorker(Worker):
    """procrastinate's worker, which tells Mailroom's chunks when it starts to shut down.

    However the run loop ends (a signal, or the database lost under the listener or a fetch),
    procrastinate waits for the running jobs up to the shutdown grace, then cancels them. A
    chunk that went on starting sends meanwhile would have them cut off mid-send at the end of
    the grace: accepted by the server, not recorded, sent again later. Setting
    ``WorkerDeps.stopping`` first makes every way out a stop that waits for the sends in flight
    only. ``_shutdown`` is procrastinate's own step for this (checked against procrastinate
    3.10, the version pyproject.toml allows; see shared.procrastinate_sql.CHECKED_AGAINST).
    """

    async def _shutdown(self, side_tasks: list[asyncio.Task[Any]]) -> None:
        deps = (self.additional_context or {}).get(DEPS_KEY)
        if isinstance(deps, WorkerDeps):
            deps.stopping.set()
        await super()._shutdown(side_tasks)  # type: ignore[no-untyped-call]


def worker_options(settings: Settings, deps: WorkerDeps, **overrides: Any) -> dict[str, Any]:
    """The options every Mailroom worker runs with (overridable for tests and dev)."""
    options: dict[str, Any] = {
        "name": "mailroom-worker",
        "queues": [EMAIL_QUEUE, MAINTENANCE_QUEUE],
        "concurrency": settings.worker_concurrency,
        "shutdown_graceful_timeout": settings.shutdown_grace_seconds,
        "additional_context": {DEPS_KEY: deps},
        "listen_notify": True,
        # LISTEN/NOTIFY wakes the worker at once; polling only covers a lost notification
        # and jobs whose retry time has come.
        "fetch_job_polling_interval": 1.0,
        "update_heartbeat_interval": settings.heartbeat_interval_seconds,
        "stalled_worker_timeout": settings.stalled_after_seconds,
        # A sent email's evidence is its recipient row; failed jobs stay for the retention
        # period. Deleting succeeded jobs keeps the queue table small and fetches fast.
        "delete_jobs": "successful",
        "worker_middleware": [job_summary_middleware],
    }
    options.update(overrides)
    return options


async def run_worker(settings: Settings, **overrides: Any) -> None:
    """Run workers until a signal asks to stop; restart one that loses the database.

    A worker that returns without being asked to (procrastinate stops it when its listener
    loses the database) is restarted too.
    """
    stopping = asyncio.Event()
    # The running worker and its dependencies, while there is one (for signals and /healthz).
    current: list[tuple[Worker, WorkerDeps]] = []
    _install_signal_handlers(stopping, current)

    def running() -> tuple[int, Database] | None:
        if current and current[0][0].worker_id is not None:
            return current[0][0].worker_id, current[0][1].db
        return None

    def pool() -> AsyncConnectionPool | None:
        return current[0][1].db.pool if current else None

    health = await start_health_server(settings, running, pool=pool)
    try:
        await _supervise(settings, stopping, current, overrides)
    finally:
        if health is not None:
            await health.cleanup()
    log.info("worker_stopped")


async def _supervise(
    settings: Settings,
    stopping: asyncio.Event,
    current: list[tuple[Worker, WorkerDeps]],
    overrides: dict[str, Any],
) -> None:
    backoff_seconds = 1.0
    while not stopping.is_set():
        try:
            async with worker_runtime(settings) as (app, deps):
                worker = MailroomWorker(
                    app=app,
                    **worker_options(settings, deps, install_signal_handlers=False, **overrides),
                )
                current[:] = [(worker, deps)]
                if stopping.is_set():  # a signal arrived while we were connecting
                    break
                log.info(
                    "worker_starting",
                    concurrency=settings.worker_concurrency,
                    smtp_relays=[
                        f"{r.name}={r.host}:{r.port} ({r.role}, weight {r.weight})"
                        for r in settings.relays()
                    ],
                    unsubscribe_links=settings.public_url is not None,
                    bounce_mailbox=settings.imap_host is not None,
                    verp=deps.verp is not None,
                )
                if settings.public_url is None:
                    log.warning(
                        "unsubscribe_links_off",
                        reason="MAILROOM_PUBLIC_URL is not set; bulk senders need one-click"
                        " unsubscribe (RFC 8058) to reach Gmail and Yahoo inboxes",
                    )
                backoff_seconds = 1.0
                await run_reporting_up(worker)
        except Exception as exc:
            log.error(
                "worker_crashed", error=f"{type(exc).__name__}: {exc}", restart_in_s=backoff_seconds
            )
        else:
            if not stopping.is_set():
                log.error("worker_stopped_unexpectedly", restart_in_s=backoff_seconds)
        finally:
            current.clear()
        if not stopping.is_set():
            await _sleep_unless(stopping, backoff_seconds)
            backoff_seconds = min(backoff_seconds * 2, RESTART_BACKOFF_MAX_SECONDS)


async def run_reporting_up(worker: Worker) -> None:
    """Run ``worker`` until it returns, with ``mailroom_worker_up`` 1 meanwhile."""
    WORKER_UP.set(1)
    try:
        await worker.run()  # type: ignore[no-untyped-call]
    finally:
        WORKER_UP.set(0)


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
    except TimeoutError:
        pass


def _install_signal_handlers(
    stopping: asyncio.Event, current: list[tuple[Worker, WorkerDeps]]
) -> None:
    loop = asyncio.get_running_loop()
    requests = StopRequests()

    def on_signal(signum: int) -> None:
        which = requests.received()
        if which == "duplicate":
            return
        if which == "again":
            log.warning("worker_forced_exit", signal=signal.Signals(signum).name)
            os._exit(EXIT_FORCED)
        log.info("worker_stop_requested", signal=signal.Signals(signum).name)
        stopping.set()
        for worker, deps in current:
            deps.stopping.set()
            worker.stop()  # type: ignore[no-untyped-call]

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
