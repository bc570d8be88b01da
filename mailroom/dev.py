"""``mailroom dev``: the whole system in one process on an embedded default.

This module composes the web tier and the worker, so unlike the rest of ``shared`` it imports
both; only the command line imports it.

An embedded PostgreSQL (data under ``--data-dir``, so batches survive a restart), the
migrations, a local SMTP capture on loopback, the web tier and one worker, all on one event
loop. Each tier is observable as in production: the web tier's ``/metrics`` on ``--port``, the
worker's ``/metrics`` and ``/healthz`` on ``--metrics-port``, each with only its own series.
SIGTERM or Ctrl-C stops the worker gracefully, then the web tier, the capture and the
database server; a second signal skips the wait for in-flight jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog
from aiohttp import web
from pydantic import SecretStr

from mailroom.capture import MailCapture
from mailroom.embedded import EmbeddedPostgres, ensure_database
from mailroom.instance import DevInstance, remove_instance, write_instance
from shared.db import Database, make_pool
from shared.schema import migrate
from shared.settings import Settings, SmtpSecurity
from shared.stopping import StopRequests
from web.app import create_app
from web.captured_mail import CapturedMail
from worker.health import bound_port, serve_health
from worker.main import MailroomWorker, run_reporting_up, worker_options, worker_runtime

log = structlog.get_logger(__name__)

DEV_FROM_ADDRESS = "mailroom@example.com"


@dataclass(frozen=True)
class DevOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    smtp_port: int = 1025
    metrics_port: int = 9100  # the worker's /metrics and /healthz; 0 picks a free port
    data_dir: Path = Path(".mailroom")


def dev_secrets(data_dir: Path, settings: Settings) -> tuple[str, str]:
    """The login token and session key: from settings, else kept in the data dir (mode 0600).

    Keeping them means a restart does not log the browser out or change the token.
    """
    path = data_dir / "dev-secrets.json"
    stored: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    token = settings.api_token.get_secret_value() if settings.api_token else stored.get("api_token")
    key = (
        settings.secret_key.get_secret_value() if settings.secret_key else stored.get("secret_key")
    )
    token = token or secrets.token_urlsafe(18)
    key = key or secrets.token_urlsafe(32)
    if not settings.api_token or not settings.secret_key:
        path.write_text(json.dumps({"api_token": token, "secret_key": key}))
        os.chmod(path, 0o600)
    return token, key


async def run_dev(base: Settings, options: DevOptions) -> int:
    """Run until signalled; return the process exit status."""
    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    forced = asyncio.Event()
    _install_signal_handlers(stop, forced)

    postgres = EmbeddedPostgres(data_dir / "pgdata")
    print(f"Starting PostgreSQL in {postgres.pgdata} …", flush=True)
    try:
        admin_uri = await asyncio.to_thread(postgres.start)
        database_url = await asyncio.to_thread(ensure_database, admin_uri, "mailroom")
        await migrate(database_url)
        capture = MailCapture(data_dir / "mail", slow_reply_seconds=base.smtp_timeout_seconds + 5)
        try:
            smtp_port = await capture.start("127.0.0.1", options.smtp_port)
        except OSError as exc:
            print(
                f"mailroom dev: cannot listen for SMTP on port {options.smtp_port}: "
                f"{exc.strerror}; "
                "pass --smtp-port",
                file=sys.stderr,
            )
            return 1
        token, key = dev_secrets(data_dir, base)
        settings = base.model_copy(
            update={
                "database_url": database_url,
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp_port,
                "smtp_security": SmtpSecurity.NONE,
                "smtp_username": None,
                "smtp_password": None,
                # Nothing leaves the machine: relays set for production are not used here.
                "smtp_relays": None,
                # Nor is a production bounce mailbox polled: dev would mark its reports read
                # (or move them) before the production workers saw them.
                "imap_host": None,
                "from_address": base.from_address or DEV_FROM_ADDRESS,
                "public_url": base.public_url or f"http://{options.host}:{options.port}",
                "api_token": SecretStr(token),
                "secret_key": SecretStr(key),
            }
        )
        try:
            return await _serve(settings, options, capture, stop, forced)
        finally:
            await capture.close()
    finally:
        print("Stopping PostgreSQL …", flush=True)
        await asyncio.to_thread(postgres.stop)


async def _serve(
    settings: Settings,
    options: DevOptions,
    capture: MailCapture,
    stop: asyncio.Event,
    forced: asyncio.Event,
) -> int:
    assert settings.database_url is not None
    pool = make_pool(
        settings.database_url, max_size=settings.database_pool_size, name="mailroom-web"
    )
    await pool.open(wait=True, timeout=30)
    db = Database(pool, chunk_size=settings.chunk_size)
    runner = web.AppRunner(
        create_app(settings, db=db, captured_mail=CapturedMail(capture.directory)), access_log=None
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.port)
        try:
            await site.start()
        except OSError as exc:
            print(
                f"mailroom dev: cannot listen on {options.host}:{options.port}: {exc.strerror}; "
                "pass --port",
                file=sys.stderr,
            )
            return 1
        async with worker_runtime(settings) as (app, deps):
            worker = MailroomWorker(
                app=app, **worker_options(settings, deps, install_signal_handlers=False)
            )

            def running() -> tuple[int, Database] | None:
                return None if worker.worker_id is None else (worker.worker_id, deps.db)

            try:
                health = await serve_health(
                    settings,
                    running,
                    host=options.host,
                    port=options.metrics_port,
                    pool=lambda: deps.db.pool,
                )
            except OSError as exc:
                print(
                    f"mailroom dev: cannot listen on {options.host}:{options.metrics_port}: "
                    f"{exc.strerror}; pass --metrics-port",
                    file=sys.stderr,
                )
                return 1
            try:
                task = asyncio.create_task(run_reporting_up(worker), name="worker")
                _banner(settings, options, capture, metrics_port=bound_port(health))
                write_instance(
                    options.data_dir.resolve(),
                    DevInstance(
                        pid=os.getpid(),
                        database_url=settings.database_url,
                        from_address=settings.from_address or DEV_FROM_ADDRESS,
                        web_url=f"http://{options.host}:{options.port}/",
                    ),
                )
                try:
                    await _wait_for(stop, task)
                finally:
                    remove_instance(options.data_dir.resolve())
                deps.stopping.set()  # chunks start no new send
                task.cancel()  # procrastinate stops gracefully; a second cancel would abort
                done, _ = await asyncio.wait(
                    {task, asyncio.create_task(forced.wait())}, return_when=asyncio.FIRST_COMPLETED
                )
                if task not in done:
                    print("Second signal: not waiting for jobs in flight.", flush=True)
            finally:
                await health.cleanup()
    finally:
        await runner.cleanup()
        await pool.close()
    return 0


async def _wait_for(stop: asyncio.Event, worker: asyncio.Task[None]) -> None:
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({stopper, worker}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if worker.done() and not worker.cancelled() and worker.exception() is not None:
        log.error("worker_failed", error=repr(worker.exception()))


def _banner(
    settings: Settings, options: DevOptions, capture: MailCapture, *, metrics_port: int
) -> None:
    assert settings.api_token is not None
    url = f"http://{options.host}:{options.port}/"
    worker_url = f"http://{options.host}:{metrics_port}/"
    print(
        "\n"
        f"  Mailroom is running at   {url}\n"
        f"  Log in with the token    {settings.api_token.get_secret_value()}\n"
        f"  Mail is captured by      SMTP on 127.0.0.1:{settings.smtp_port}; see {url}dev/mail\n"
        f"                           (Maildir: {capture.directory})\n"
        f"  Metrics                  web {url}metrics, worker {worker_url}metrics\n"
        f"                           (worker health: {worker_url}healthz)\n"
        f"  Data lives in            {options.data_dir.resolve()}\n"
        f"  Database                 {settings.database_url}\n"
        "                           (mailroom dead-letters, bounces, users and check run in\n"
        "                           this directory use it while dev runs: `mailroom users add\n"
        "                           NAME --role sender` makes an account to log in with)\n"
        "  Press Ctrl-C to stop.\n",
        flush=True,
    )


def _install_signal_handlers(stop: asyncio.Event, forced: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    requests = StopRequests()

    def on_signal() -> None:
        which = requests.received()
        if which == "again":
            forced.set()
        elif which == "first":
            print("\nStopping: finishing jobs in flight (signal again to skip) …", flush=True)
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
