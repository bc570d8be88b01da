"""Fault injection with real processes: kills, outages, refusals, hangs, restarts.

Each test starts ``mailroom worker`` as a subprocess against a real PostgreSQL and a real SMTP
server on loopback, breaks something, and checks that nothing was lost and nothing was sent
twice outside the one documented window.
"""

from __future__ import annotations

import asyncio
import functools
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from shared.db import Database, NewBatch, NewRecipient
from shared.settings import Settings
from tests.conftest import NO_RETRY_WITHIN_A_DRAIN, drain, query, retries_due
from tests.processes import wait_until, worker_process
from tests.smtp_server import RecordingSMTPServer, Rule

pytestmark = pytest.mark.slow


def fast_recovery(settings: Settings, **changes: object) -> Settings:
    """Settings that make recovery visible within seconds instead of minutes."""
    return settings.model_copy(
        update={
            "stalled_after_seconds": 3,
            "sweep_interval_seconds": 1,
            "retry_base_seconds": 0.2,
            "retry_cap_seconds": 1.0,
            "retry_max_attempts": 12,
            "worker_concurrency": 8,
            **changes,
        }
    )


async def enqueue(db: Database, count: int, prefix: str = "r") -> list[str]:
    addresses = [f"{prefix}{i}@example.org" for i in range(count)]
    await db.create_batch(
        NewBatch(
            created_by="test",
            subject_template="Hello {{ email }}",
            body_template="Body",
            recipients=[NewRecipient(a) for a in addresses],
        )
    )
    return addresses


def all_sent(settings: Settings, total: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        rows = await query(
            settings.database_url or "", "SELECT count(*) FROM recipients WHERE status = 'sent'"
        )
        return bool(rows[0][0] == total)

    return check


async def test_chaos_sigkill_the_worker_repeatedly_loses_nothing(
    db: Database, settings: Settings, smtp: RecordingSMTPServer, tmp_path: Path
) -> None:
    settings = fast_recovery(settings)
    addresses = await enqueue(db, 1000)
    rng = random.Random()
    kills = 0
    log = tmp_path / "worker.log"
    while kills < 6:
        async with worker_process(settings, log) as proc:
            # The random moment of the kill is what this test is about: no condition to wait on.
            await asyncio.sleep(rng.uniform(0.4, 1.5))
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
    async with worker_process(settings, log) as proc:
        await wait_until(all_sent(settings, len(addresses)), 120, "every recipient to be sent")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

    received = smtp.to_addresses()
    assert set(received) == set(addresses), "every recipient received at least one message"
    duplicates = sum(received.values()) - len(addresses)
    print(
        f"\nchaos: {kills} SIGKILLs, {len(addresses)} recipients, {duplicates} duplicate deliveries"
    )
    assert duplicates <= kills * settings.worker_concurrency
    ids = await query(settings.database_url or "", "SELECT message_id FROM recipients")
    assert {row[0] for row in ids} == set(smtp.message_ids())
    leftovers = await query(
        settings.database_url or "",
        "SELECT status::text, count(*) FROM procrastinate_jobs"
        " WHERE queue_name = 'emails' GROUP BY 1",
    )
    assert leftovers == []


async def test_an_smtp_outage_is_ridden_out_with_backoff_not_a_hot_loop(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = fast_recovery(
        settings, retry_base_seconds=0.25, retry_cap_seconds=1.0, worker_concurrency=4
    )
    await smtp.stop()  # connection refused from now on
    addresses = await enqueue(db, 20)
    async with worker_process(settings) as proc:
        # Attempts per unit of time are what this test measures, so after every recipient has
        # been retried it watches one more second: backoff (waits of up to 0.25, 0.5, then 1 s)
        # allows about five attempts each so far; a hot loop would make hundreds.
        await wait_until(
            lambda: _count(settings, "attempts >= 2", at_least=len(addresses)),
            30,
            "every recipient to be retried",
        )
        await asyncio.sleep(1)
        during = await query(
            settings.database_url or "",
            "SELECT status, max(attempts), sum(attempts) FROM recipients GROUP BY status",
        )
        assert {row[0] for row in during} <= {"retrying", "sending", "queued"}, during
        total_attempts = sum(row[2] for row in during)
        assert total_attempts <= len(addresses) * 8, during
        errors = await query(
            settings.database_url or "", "SELECT DISTINCT last_error FROM recipients"
        )
        assert any("connection failed" in (e or "") for (e,) in errors), errors
        await smtp.start()  # back, on the same port
        await wait_until(all_sent(settings, len(addresses)), 60, "delivery after the outage")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert smtp.to_addresses() == {a: 1 for a in addresses}
    attempts = await query(
        settings.database_url or "", "SELECT min(attempts), max(attempts) FROM recipients"
    )
    assert attempts[0][1] >= 2, "the outage shows in the attempt counts"


async def test_421_and_451_replies_are_retried_and_then_sent(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["a@example.org"] = Rule("421 4.7.0 too many connections, slow down", times=2)
    smtp.rules["b@example.org"] = Rule("451 4.3.0 local problem", times=1, at_data=True)
    await db.create_batch(
        NewBatch(
            created_by="t",
            subject_template="S",
            body_template="B",
            recipients=[NewRecipient("a@example.org"), NewRecipient("b@example.org")],
        )
    )
    # Not about the backoff: each retry is due almost at once.
    settings = fast_recovery(settings, retry_base_seconds=0.001, retry_cap_seconds=0.001)
    for _ in range(10):
        await drain(settings)
        if await all_sent(settings, 2)():
            break
    rows = await query(
        settings.database_url or "", "SELECT email, status, attempts FROM recipients ORDER BY email"
    )
    assert rows == [("a@example.org", "sent", 3), ("b@example.org", "sent", 2)]
    assert smtp.to_addresses() == {"a@example.org": 1, "b@example.org": 1}


async def test_sigterm_mid_batch_exits_0_within_the_grace_and_loses_nothing(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = fast_recovery(settings, shutdown_grace_seconds=5.0, worker_concurrency=4)
    smtp.data_delay_seconds = 0.15  # slow enough that work is in flight when the signal lands
    addresses = await enqueue(db, 40)
    async with worker_process(settings) as proc:
        await wait_until(
            lambda: _count(settings, "status = 'sent'", at_least=4), 30, "some messages to be sent"
        )
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # The same request again a moment later, as a process-group kill through `uv run`
        # delivers it: still one graceful stop, not the "second signal" exit. (Two signals
        # sent back to back would merge in the kernel before the worker saw them.)
        await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        assert time.monotonic() - started < settings.shutdown_grace_seconds + 3
    sent_before = len(smtp.received)
    assert sent_before < len(addresses), "the signal landed mid-batch"
    in_flight = await query(
        settings.database_url or "", "SELECT count(*) FROM recipients WHERE status = 'sending'"
    )
    assert in_flight == [(0,)], "sends in flight finished or went back to the queue"
    async with worker_process(settings) as proc:
        await wait_until(all_sent(settings, len(addresses)), 60, "the rest after a restart")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert smtp.to_addresses() == {a: 1 for a in addresses}


async def test_a_shutdown_past_the_grace_requeues_without_spending_an_attempt(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = fast_recovery(
        settings, shutdown_grace_seconds=0.5, worker_concurrency=2, job_timeout_seconds=30
    )
    smtp.data_delay_seconds = 5  # every send outlasts the grace period
    await enqueue(db, 2)
    async with worker_process(settings) as proc:
        await wait_until(
            lambda: _count(settings, "status = 'sending'", at_least=2), 30, "sends in flight"
        )
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        took = time.monotonic() - signalled
    # The grace, then the cut-off sends' connections closed at once: a polite QUIT would wait
    # for the DATA reply still owed (5 s here) up to its own 2 s timeout.
    assert took < settings.shutdown_grace_seconds + 1.8, f"exit {took:.2f} s after SIGTERM"
    rows = await query(settings.database_url or "", "SELECT status, attempts FROM recipients")
    assert rows == [("queued", 0), ("queued", 0)]
    jobs = await query(
        settings.database_url or "",
        "SELECT status::text, scheduled_at <= now() FROM procrastinate_jobs"
        " WHERE queue_name = 'emails'",
    )
    assert jobs == [("todo", True)]  # their chunk, back in the queue and ready at once


async def test_a_second_signal_exits_at_once_and_the_sweep_recovers_the_jobs(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = fast_recovery(
        settings, shutdown_grace_seconds=30, worker_concurrency=2, stalled_after_seconds=2
    )
    smtp.data_delay_seconds = 3
    addresses = await enqueue(db, 2)

    async def both_in_flight() -> bool:
        # At the server, not just marked "sending": a chunk whose sends have not started yet
        # stops at the first signal without waiting, and there is no second signal to test.
        return smtp.data_in_progress >= 2

    async with worker_process(settings) as proc:
        await wait_until(both_in_flight, 30, "both sends in flight at the server")
        proc.send_signal(signal.SIGTERM)
        # Further apart than the 250 ms within which a repeat counts as the same request:
        # this gap is what makes it a second signal.
        await asyncio.sleep(0.3)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) != 0
        assert time.monotonic() - started < 2
    smtp.data_delay_seconds = 0
    async with worker_process(settings) as proc:
        await wait_until(all_sent(settings, len(addresses)), 60, "recovery by the sweep")
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    assert set(smtp.to_addresses()) == set(addresses)


async def test_a_hung_smtp_server_times_out_and_the_job_is_retried(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept the connection, never send a greeting

    silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        hung = fast_recovery(
            settings, smtp_port=port, smtp_timeout_seconds=1.0, **NO_RETRY_WITHIN_A_DRAIN
        )
        await enqueue(db, 1)
        started = time.monotonic()
        await drain(hung)
        assert time.monotonic() - started < 10
        row = await query(
            settings.database_url or "", "SELECT status, attempts, last_error FROM recipients"
        )
        assert row[0][:2] == ("retrying", 1)
        assert "timeout" in row[0][2].lower() or "timed out" in row[0][2].lower()
    finally:
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()
    # The server that answers gets it on the retry, once its backoff has passed.
    await retries_due(settings.database_url or "")
    await drain(fast_recovery(settings))
    assert await query(settings.database_url or "", "SELECT status, attempts FROM recipients") == [
        ("sent", 2)
    ]


async def test_an_attempt_longer_than_the_job_time_limit_is_cut_off_as_transient(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.data_delay_seconds = 1.5  # answers, but too slowly for the job's time limit
    await enqueue(db, 1)
    cut_off = fast_recovery(
        settings, job_timeout_seconds=0.5, smtp_timeout_seconds=10, **NO_RETRY_WITHIN_A_DRAIN
    )
    await drain(cut_off)
    row = await query(settings.database_url or "", "SELECT status, last_error FROM recipients")
    assert row == [("retrying", "attempt took longer than 0.5 s")]


async def _count(settings: Settings, where: str, at_least: int) -> bool:
    rows = await query(
        settings.database_url or "", f"SELECT count(*) FROM recipients WHERE {where}"
    )
    return bool(rows[0][0] >= at_least)


async def test_a_postgresql_restart_mid_run_loses_nothing(
    smtp: RecordingSMTPServer, tmp_path: Path, pg_data_parent: Path
) -> None:
    # A server of the test's own, so it can be taken down without disturbing other tests.
    from mailroom.embedded import EmbeddedPostgres, ensure_database
    from shared.db import make_pool
    from shared.schema import migrate
    from tests.conftest import make_settings

    with EmbeddedPostgres(pg_data_parent / "pgdata", durable=False) as server:
        admin = await asyncio.to_thread(server.start)
        url = await asyncio.to_thread(ensure_database, admin, "mailroom")
        await migrate(url)
        settings = fast_recovery(make_settings(url, smtp.port), worker_concurrency=4)
        smtp.data_delay_seconds = 0.02
        async with make_pool(url, max_size=2, name="test") as pool:
            addresses = await enqueue(Database(pool), 300)
        log = tmp_path / "worker.log"
        async with worker_process(settings, log) as proc:
            await wait_until(
                lambda: _count(settings, "status = 'sent'", at_least=30), 60, "sending to start"
            )
            await asyncio.to_thread(server.pause)
            # The outage itself, not a wait for work: PostgreSQL stays down this long, so the
            # worker's connections break and its reconnects are refused again and again.
            await asyncio.sleep(2)
            assert proc.returncode is None, "the worker rides out the outage"
            await asyncio.to_thread(server.resume)
            await wait_until(all_sent(settings, len(addresses)), 120, "delivery after the restart")
            assert proc.returncode is None
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        events = log.read_text()
        assert "worker_crashed" in events or "worker_stopped_unexpectedly" in events
        received = smtp.to_addresses()
        assert set(received) == set(addresses)
        duplicates = sum(received.values()) - len(addresses)
        print(f"\npostgres restart: {duplicates} duplicate deliveries")
        assert duplicates <= settings.worker_concurrency
    assert not (pg_data_parent / "pgdata" / "postmaster.pid").exists(), (
        "the restarted server is stopped"
    )


async def test_the_sweep_requeues_orphaned_jobs_on_time_behind_a_large_email_backlog(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    """A worker killed mid-job behind 5,000 ready emails: a surviving worker's sweep requeues
    its job within MAILROOM_STALLED_AFTER_SECONDS + one sweep interval of the kill (the dead
    worker's last heartbeat was at most at the kill), not after the backlog."""
    settings = fast_recovery(settings, stalled_after_seconds=2, worker_concurrency=1)
    url = settings.database_url or ""
    await enqueue(Database(db.pool, chunk_size=1), 5000)  # one job per email
    smtp.data_delay_seconds = 0.05  # 5,000 jobs take far longer than the sweep's deadline

    async def _has(items: Awaitable[list[int]], count: int) -> bool:
        return len(await items) >= count

    async def _has_job(running_on: Callable[[int], Awaitable[list[int]]], worker_id: int) -> bool:
        return bool(await running_on(worker_id))

    async def worker_ids() -> list[int]:
        return [row[0] for row in await query(url, "SELECT id FROM procrastinate_workers")]

    async def running_on(worker_id: int) -> list[int]:
        rows = await query(
            url,
            "SELECT id FROM procrastinate_jobs WHERE status = 'doing' AND worker_id = %s",
            worker_id,
        )
        return [row[0] for row in rows]

    async with worker_process(settings) as rescuer:
        await wait_until(lambda: _has(worker_ids(), 1), 30, "the rescuer to register")
        [rescuer_id] = await worker_ids()
        await wait_until(lambda: _has(running_on(rescuer_id), 1), 30, "the rescuer to be sending")
        # A kill can land between two of the victim's jobs (each lasts DATA's delay, the gap
        # between them a few milliseconds): then it held nothing, the scenario did not happen,
        # and another victim is started. Three tries make that chance negligible.
        for _ in range(3):
            async with worker_process(settings) as victim:
                await wait_until(lambda: _has(worker_ids(), 2), 30, "the victim to register")
                [victim_id] = set(await worker_ids()) - {rescuer_id}
                mid_send = functools.partial(_has_job, running_on, victim_id)
                await wait_until(mid_send, 30, "a job mid-send")
                victim.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                await victim.wait()
            orphans = await running_on(victim_id)
            if orphans:
                break
            await query(url, "DELETE FROM procrastinate_workers WHERE id = %s", victim_id)
        assert orphans, "no victim was killed holding a job in three tries"

        async def requeued() -> bool:
            rows = await query(
                url,
                "SELECT count(*) FROM procrastinate_jobs WHERE id = ANY(%s)"
                " AND status = 'doing' AND (worker_id IS NULL OR worker_id = %s)",
                orphans,
                victim_id,
            )
            return bool(rows[0][0] == 0)

        # The deadline; the assertion below is the bound. 1 s of slack covers fetching and
        # running the sweep job and this test's own polling (every 0.1 s).
        bound_seconds = settings.stalled_after_seconds + settings.sweep_interval_seconds + 1.0
        await wait_until(requeued, bound_seconds + 10, "the orphaned job to be requeued")
        requeued_after = time.monotonic() - killed_at
        backlog = await query(url, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'todo'")
        rescuer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(rescuer.wait(), 30) == 0
    print(f"\norphaned job requeued {requeued_after:.1f} s after its worker was killed")
    assert requeued_after <= bound_seconds, f"requeued {requeued_after:.1f} s after the kill"
    assert backlog[0][0] > 1000, "the backlog was still there when the sweep ran"
