"""Fixtures: a real PostgreSQL, a database per test, a real SMTP server, the web app, a worker.

PostgreSQL is ``MAILROOM_TEST_DATABASE_URL`` when set (a server you run), otherwise an
embedded server started once per session in a temporary directory. The schema is migrated once
into a template database; each test gets ``CREATE DATABASE … TEMPLATE`` (fast, and unlike a
rolled-back transaction it works with workers that open their own connections).

A test that starts a process (a worker, ``mailroom dev``, promtool, Prometheus, a browser) must
be marked ``slow``, so ``-m "not slow"`` runs only in-process tests: an audit hook sees every
process start, and such a test fails at teardown without the marker.
"""

from __future__ import annotations

import os
import platform
import secrets
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from psycopg import sql

from mailroom.embedded import EmbeddedPostgres, database_uri
from shared.db import Database, NewBatch, NewRecipient, make_pool
from shared.logging import configure_logging
from shared.schema import migrate
from shared.settings import LogFormat, Settings
from tests.smtp_server import RecordingSMTPServer
from web.app import create_app
from worker.main import worker_options, worker_runtime

API_TOKEN = "test-token-" + "x" * 20
TEST_DB_ENV = "MAILROOM_TEST_DATABASE_URL"


# The audit events (PEP 578) that start another program; asyncio's subprocesses go through
# subprocess.Popen, multiprocessing through os.fork or os.posix_spawn.
_PROCESS_STARTS = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.exec"}
    | {"os.system", "pty.spawn"}
)
# What the running test started (None outside a test); written by the audit hook, from any
# thread the test started.
process_starts: list[str] | None = None


def _see_process_starts(event: str, args: tuple[Any, ...]) -> None:
    if event in _PROCESS_STARTS and process_starts is not None:
        process_starts.append(f"{event}: {args[0] if args else ''}")


def pytest_configure(config: pytest.Config) -> None:
    # The platform module runs `uname -p` once per process, the first time anything (the Groq
    # client's headers) asks what it runs on: ask now, so no test is charged for it.
    platform.processor()
    sys.addaudithook(_see_process_starts)


@pytest.fixture(autouse=True)
def slow_if_it_starts_a_process(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that starts a process (in its body or function-scoped fixtures) unmarked.

    Session fixtures (the embedded PostgreSQL) are set up before this one and do not count.
    """
    global process_starts
    process_starts = []
    try:
        yield
    finally:
        started, process_starts = process_starts, None
    if started and request.node.get_closest_marker("slow") is None:
        pytest.fail(
            "this test starts a process, so it must be marked @pytest.mark.slow: "
            + "; ".join(started[:3]),
            pytrace=False,
        )


@pytest.fixture(scope="session", autouse=True)
def production_logging() -> None:
    """Log as the processes do (structlog through stdlib), so caplog sees every line."""
    configure_logging("INFO", LogFormat.JSON)


@pytest.fixture(scope="session")
def pg_admin_uri() -> Iterator[str]:
    """Where test databases are created: a given server, or an embedded one."""
    given = os.environ.get(TEST_DB_ENV)
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="mailroom-test-pg-") as tmp:
        with EmbeddedPostgres(Path(tmp) / "pgdata", durable=False) as server:
            yield server.start()


@pytest.fixture
def pg_data_parent() -> Iterator[Path]:
    """Where a test puts the data directory of a PostgreSQL server of its own.

    Not under ``tmp_path``: as root, the server runs as another user that must traverse every
    parent directory, and pytest makes its shared base directory private (0700) again whenever
    another pytest session on the machine starts, which cuts a running server off its files.
    """
    with tempfile.TemporaryDirectory(prefix="mailroom-test-pg-") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="session")
async def template_db(pg_admin_uri: str) -> AsyncIterator[str]:
    """A migrated database that every test database is cloned from."""
    name = f"mailroom_tpl_{secrets.token_hex(4)}"
    _create_database(pg_admin_uri, name)
    await migrate(database_uri(pg_admin_uri, name))
    yield name
    _drop_database(pg_admin_uri, name)


@pytest.fixture
def database_url(pg_admin_uri: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for one test."""
    name = f"mailroom_test_{secrets.token_hex(6)}"
    _create_database(pg_admin_uri, name, template=template_db)
    yield database_uri(pg_admin_uri, name)
    _drop_database(pg_admin_uri, name)


def _create_database(admin_uri: str, name: str, template: str | None = None) -> None:
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        conn.execute(query)


def _drop_database(admin_uri: str, name: str) -> None:
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
async def smtp_server() -> AsyncIterator[RecordingSMTPServer]:
    server = RecordingSMTPServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def smtp(smtp_server: RecordingSMTPServer) -> Iterator[RecordingSMTPServer]:
    """The session's SMTP server, emptied and well-behaved at the start of each test."""
    smtp_server.reset()
    yield smtp_server
    smtp_server.reset()


def make_settings(database_url: str, smtp_port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "smtp_host": "127.0.0.1",
        "smtp_port": smtp_port,
        "smtp_timeout_seconds": 5,
        "from_address": "sender@example.com",
        "api_token": API_TOKEN,
        "secret_key": "test-secret-key",
        "worker_concurrency": 4,
        "retry_base_seconds": 0.05,
        "retry_cap_seconds": 0.2,
        "retry_max_attempts": 3,
        "shutdown_grace_seconds": 5,
        "metrics_port": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings(database_url: str, smtp: RecordingSMTPServer) -> Settings:
    return make_settings(database_url, smtp.port)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Database]:
    assert settings.database_url is not None
    pool = make_pool(settings.database_url, max_size=5, name="mailroom-test")
    await pool.open(wait=True)
    yield Database(pool)
    await pool.close()


@pytest.fixture
async def client(settings: Settings, db: Database) -> AsyncIterator[TestClient]:
    app = create_app(settings, db=db)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def drain(settings: Settings, *, drafters: Any = None, **overrides: Any) -> None:
    """Run a worker until no job is ready, then return (no sleeps, no timing guesses).

    As every worker does, it defers the periodic maintenance jobs when it starts (the sweep's
    latest tick, and pruning's in the ten minutes after its hourly one) in a side task that
    races the worker's own fetches: a drain may return with one of them still ``todo`` on the
    maintenance queue. What a test asserts about the queue is about the email queue
    (``EMAIL_JOB_STATUSES``).

    procrastinate's worker with ``wait=False`` stops fetching at the first fetch that finds
    nothing, which is as soon as it holds every ready job, and then shuts down: it waits for
    the jobs it runs only up to its shutdown grace (5 s here) and cuts off the rest. A batch
    that takes longer on a busy machine would be cut off mid-send, so a drain waits for its
    jobs however long they take (a test about the grace passes its own
    ``shutdown_graceful_timeout``).
    """
    options = {"shutdown_graceful_timeout": None, **overrides}
    async with worker_runtime(settings, drafters=drafters) as (app, deps):
        await app.run_worker_async(
            **worker_options(settings, deps, wait=False, install_signal_handlers=False, **options)
        )


# The jobs left on the email queue, after a worker ran: the maintenance queue is not the
# test's (see ``drain``).
EMAIL_JOB_STATUSES = (
    "SELECT status::text FROM procrastinate_jobs WHERE queue_name = 'emails' ORDER BY id"
)


# For a test that checks what one attempt left behind: a drain fetches until a fetch finds no
# job ready, so it runs a retry it has just scheduled when that retry is ready before the last
# fetch: when the wait full jitter picked is almost nothing,
# which the usual waits of up to 50 ms here sometimes are. One drawn from an hour practically
# never is, and waits for ``retries_due``.
NO_RETRY_WITHIN_A_DRAIN: dict[str, Any] = {
    "retry_base_seconds": 3600.0,
    "retry_cap_seconds": 3600.0,
}


async def retries_due(database_url: str) -> None:
    """Make every job waiting out a backoff due now, as if the backoff had passed.

    For tests that drive a retry but are not about how long its backoff is: no sleep, and no
    guess at the wait the worker picked.
    """
    await query(
        database_url,
        "UPDATE procrastinate_jobs SET scheduled_at = now()"
        " WHERE status = 'todo' AND scheduled_at > now()",
    )


async def make_batch(db: Database, addresses: Sequence[str], **options: Any) -> uuid.UUID:
    """A template batch to ``addresses``, created as the web tier does (one transaction)."""
    fields: dict[str, Any] = {"subject_template": "S", "body_template": "B", **options}
    return await db.create_batch(
        NewBatch(created_by="test", recipients=[NewRecipient(a) for a in addresses], **fields)
    )


async def query(database_url: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cursor = await conn.execute(text, params or None)  # type: ignore[arg-type]
        return await cursor.fetchall() if cursor.description else []
