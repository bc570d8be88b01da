"""The worker process: one procrastinate worker with Mailroom's tasks, pool and SMTP pool.

procrastinate handles SIGTERM/SIGINT: it stops fetching, lets running jobs finish within
``MAILROOM_WORKER_SHUTDOWN_GRACE_S`` and then aborts the rest (they are retried later).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import procrastinate
import structlog

from shared.db import Database, make_pool
from shared.queue import EMAIL_QUEUE, build_app
from shared.settings import Settings
from worker.drafting import Drafter, TemplateDrafter
from worker.retry import BackoffRetry
from worker.smtp import Mailer, SmtpMailer
from worker.tasks import DEPS_KEY, WorkerDeps, register_tasks

log = structlog.get_logger(__name__)

# Connections beyond one per concurrent job: procrastinate's fetch/finish queries, the
# heartbeat and abort polling share the pool (LISTEN uses its own connection).
POOL_HEADROOM = 3


@asynccontextmanager
async def worker_runtime(
    settings: Settings,
    *,
    mailer: Mailer | None = None,
    drafter: Drafter | None = None,
) -> AsyncIterator[tuple[procrastinate.App, WorkerDeps]]:
    """Open the pool, the procrastinate app and the SMTP pool; close them all on exit."""
    settings.require("database_url", "from_address")
    assert settings.database_url is not None
    pool = make_pool(
        settings.database_url,
        max_size=settings.worker_concurrency + POOL_HEADROOM,
        min_size=2,
        name="mailroom-worker",
    )
    await pool.open(wait=True, timeout=30)
    retry = BackoffRetry.from_settings(settings)
    app = build_app()
    register_tasks(app, retry)
    deps = WorkerDeps(
        settings=settings,
        db=Database(pool),
        drafter=drafter or TemplateDrafter(),
        mailer=mailer or SmtpMailer(settings, size=settings.worker_concurrency),
        retry=retry,
    )
    try:
        await app.open_async(pool)
        yield app, deps
    finally:
        await deps.mailer.close()
        await app.close_async()
        await pool.close()


def worker_options(settings: Settings, deps: WorkerDeps, **overrides: Any) -> dict[str, Any]:
    """The options every Mailroom worker runs with (overridable for tests and dev)."""
    options: dict[str, Any] = {
        "name": "mailroom-worker",
        "queues": [EMAIL_QUEUE],
        "concurrency": settings.worker_concurrency,
        "shutdown_graceful_timeout": settings.worker_shutdown_grace_s,
        "additional_context": {DEPS_KEY: deps},
        "listen_notify": True,
        # LISTEN/NOTIFY wakes the worker at once; polling only covers a lost notification
        # and jobs whose retry time has come.
        "fetch_job_polling_interval": 1.0,
    }
    options.update(overrides)
    return options


async def run_worker(settings: Settings, **overrides: Any) -> None:
    """Run the worker until it is stopped by a signal (or drains, with ``wait=False``)."""
    async with worker_runtime(settings) as (app, deps):
        log.info(
            "worker_starting",
            concurrency=settings.worker_concurrency,
            smtp_host=settings.smtp_host,
            smtp_port=settings.smtp_port,
        )
        await app.run_worker_async(**worker_options(settings, deps, **overrides))
        log.info("worker_stopped")
