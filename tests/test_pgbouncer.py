"""Scaling out through PgBouncer (Debian's 1.18): what works in which pool mode, proven.

The web tier goes through transaction pooling; workers through session pooling (LISTEN/NOTIFY
works) or transaction pooling (it does not: pickup falls back to polling). Behind transaction
pooling psycopg must prepare no statements and the pools must set no session state, which
``MAILROOM_DATABASE_TRANSACTION_POOLING`` sees to.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from shared.db import make_pool
from shared.metrics import QueueCollector
from shared.settings import Settings
from tests.conftest import AUTH, make_settings, query
from tests.pgbouncer import PgBouncer, pgbouncer_binary
from tests.processes import free_port, start, wait_until
from tests.smtp_server import RecordingSMTPServer

POOLS = {"transaction": "transaction", "session": "session"}
BIG_BATCH = 300  # six chunks of MAILROOM_CHUNK_SIZE (50)
PICKUP_SAMPLES = 4  # one-recipient batches after the big one, each timed alone


@pytest.fixture
def pgbouncer_installed() -> None:
    if pgbouncer_binary() is None:
        message = "pgbouncer is not installed: apt-get install pgbouncer"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
async def pgbouncer(
    pgbouncer_installed: None, database_url: str, tmp_path: Path
) -> AsyncIterator[PgBouncer]:
    """PgBouncer in front of this test's database: one database per pool mode."""
    async with PgBouncer(database_url, POOLS, tmp_path / "pgbouncer.log") as bouncer:
        yield bouncer


def test_the_setting_comes_from_the_environment_and_turns_off_prepared_statements(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgresql://mailroom@pgbouncer.internal:6432/mailroom"
    assert Settings(_env_file=None).database_transaction_pooling is False  # type: ignore[call-arg]
    monkeypatch.setenv("MAILROOM_DATABASE_TRANSACTION_POOLING", "true")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.database_transaction_pooling is True
    pooled = make_pool(url, max_size=2, name="t", transaction_pooling=True)
    assert pooled.kwargs["prepare_threshold"] is None
    # Anywhere else psycopg keeps its default: prepare a statement run five times.
    assert "prepare_threshold" not in make_pool(url, max_size=2, name="t").kwargs


@pytest.mark.slow
@pytest.mark.parametrize("transaction_pooling", [False, True], ids=["default", "setting"])
async def test_through_transaction_pooling_a_prepared_statement_works_only_with_the_setting(
    pgbouncer: PgBouncer, transaction_pooling: bool
) -> None:
    pool = make_pool(
        pgbouncer.url("transaction"),
        max_size=2,
        min_size=2,
        name="t",
        transaction_pooling=transaction_pooling,
    )
    async with pool:
        async with pool.connection() as first, pool.connection() as second:
            for _ in range(6):  # psycopg prepares it on the fifth run
                await first.execute("SELECT count(*) FROM recipients WHERE id = %s", (1,))
            # Hold the server connection it was prepared on, so the next run gets another.
            async with second.transaction():
                await second.execute("SELECT 1")
                run = first.execute("SELECT count(*) FROM recipients WHERE id = %s", (1,))
                if transaction_pooling:
                    await run
                else:
                    with pytest.raises(psycopg.errors.InvalidSqlStatementName):
                        await run


@pytest.mark.slow
@pytest.mark.parametrize("transaction_pooling", [False, True], ids=["default", "setting"])
async def test_through_transaction_pooling_the_workers_session_setting_leaks_without_the_setting(
    pgbouncer: PgBouncer, transaction_pooling: bool
) -> None:
    # The worker's pool sets synchronous_commit per session. One server connection only, so
    # the next client (a web tier's enqueue, say) gets the very one the worker had.
    worker_pool = make_pool(
        pgbouncer.url("transaction"),
        max_size=1,
        name="mailroom-worker",
        durable_commits=False,
        transaction_pooling=transaction_pooling,
    )
    async with worker_pool, worker_pool.connection() as conn:
        await conn.execute("SELECT 1")
    rows = await query(
        pgbouncer.url("transaction"),
        "SELECT source FROM pg_settings WHERE name = 'synchronous_commit'",
    )
    leaked = rows == [("session",)]
    assert leaked is not transaction_pooling, rows


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", POOLS)
async def test_the_web_tiers_queue_metrics_are_read_through_pgbouncer(
    pgbouncer: PgBouncer, mode: str
) -> None:
    collector = QueueCollector(pgbouncer.url(mode), stalled_after_seconds=30)
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        for _ in range(7):  # past the five runs after which psycopg would prepare a statement
            up = await asyncio.to_thread(registry.get_sample_value, "mailroom_collector_up")
            assert up == 1
    finally:
        await asyncio.to_thread(collector.close)


async def _batch(http: aiohttp.ClientSession, recipients: list[str]) -> uuid.UUID:
    created = await http.post(
        "/api/batches",
        json={"recipients": recipients, "subject": "Hi", "body": "Through PgBouncer"},
        headers=AUTH,
    )
    assert created.status == 201, await created.text()
    return uuid.UUID((await created.json())["id"])


async def _ok(http: aiohttp.ClientSession, path: str) -> bool:
    try:
        async with http.get(path) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _pickup_seconds(
    database_url: str, smtp: RecordingSMTPServer, batch_id: uuid.UUID, recipients: list[str]
) -> float:
    """From the batch's creation to its first email's arrival (both on this machine's clock)."""
    [(created,)] = await query(
        database_url, "SELECT extract(epoch FROM created_at) FROM batches WHERE id = %s", batch_id
    )
    wanted = set(recipients)
    first = min(r.received_at for r in smtp.received if wanted & set(r.rcpt_tos))
    return first - float(created)


async def _run(
    mode: str,
    *,
    web: aiohttp.ClientSession,
    pgbouncer: PgBouncer,
    database_url: str,
    smtp: RecordingSMTPServer,
    log: Path,
) -> list[float]:
    """Two workers through PgBouncer database ``mode``; a big batch, then single ones timed."""
    workers = []
    for _ in range(2):
        settings = make_settings(
            pgbouncer.url(mode),
            smtp.port,
            metrics_port=free_port(),
            database_transaction_pooling=mode == "transaction",
        )
        workers.append((settings, await start(settings, "worker", log_path=log)))
    try:
        for settings, _ in workers:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{settings.metrics_port}") as w:
                await wait_until(lambda w=w: _ok(w, "/healthz"), 30, "a worker to be up")
        samples = []
        batches = [[f"{mode}{i}@example.org" for i in range(BIG_BATCH)]]
        batches += [[f"{mode}-alone{i}@example.org"] for i in range(PICKUP_SAMPLES)]
        for recipients in batches:
            batch_id = await _batch(web, recipients)

            async def sent(batch_id: uuid.UUID = batch_id, total: int = len(recipients)) -> bool:
                rows = await query(
                    database_url,
                    "SELECT count(*) FROM recipients WHERE batch_id = %s AND status = 'sent'",
                    batch_id,
                )
                return bool(rows[0][0] == total)

            await wait_until(sent, 60, f"{len(recipients)} recipients sent ({mode} pooling)")
            samples.append(await _pickup_seconds(database_url, smtp, batch_id, recipients))
            expected = dict.fromkeys(recipients, 1)
            assert {a: n for a, n in smtp.to_addresses().items() if a in expected} == expected
    finally:
        for _, proc in workers:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(proc.wait(), 40) for _, proc in workers]
    assert codes == [0, 0], _tail(log)
    return samples


@pytest.mark.slow
async def test_web_in_transaction_pooling_and_two_workers_in_each_mode_deliver_every_email_once(
    pgbouncer: PgBouncer, database_url: str, smtp: RecordingSMTPServer, tmp_path: Path
) -> None:
    log = tmp_path / "services.log"
    web_settings = make_settings(
        pgbouncer.url("transaction"),
        smtp.port,
        web_port=free_port(),
        database_transaction_pooling=True,
    )
    web = await start(web_settings, "web", log_path=log)
    pickups: dict[str, list[float]] = {}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{web_settings.web_port}") as http:
            await wait_until(lambda: _ok(http, "/readyz"), 30, "the web tier to be ready")
            for mode in ("session", "transaction"):
                started = time.monotonic()
                pickups[mode] = await _run(
                    mode,
                    web=http,
                    pgbouncer=pgbouncer,
                    database_url=database_url,
                    smtp=smtp,
                    log=log,
                )
                print(f"{mode} pooling: run took {time.monotonic() - started:.1f} s")
            async with http.get("/metrics") as response:
                assert "mailroom_collector_up 1.0" in await response.text()
    finally:
        if web.returncode is None:
            web.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(web.wait(), 40)
    assert code == 0, _tail(log)
    # Every email arrived exactly once, in both runs, and nothing else did.
    total = 2 * (BIG_BATCH + PICKUP_SAMPLES)
    assert len(smtp.received) == total and set(smtp.to_addresses().values()) == {1}
    for mode, samples in pickups.items():
        print(
            f"pickup latency, workers in {mode} pooling: median"
            f" {statistics.median(samples) * 1000:.0f} ms, max {max(samples) * 1000:.0f} ms"
            f" ({', '.join(f'{s * 1000:.0f}' for s in samples)} ms)"
        )
    difference = statistics.median(pickups["transaction"]) - statistics.median(pickups["session"])
    print(f"pickup latency difference (median, transaction - session): {difference * 1000:.0f} ms")
