"""The metric contract: each metric moves when its real event happens, in the tier that owns it.

Failures come from a real SMTP server that refuses, drops or is not there; orphaned jobs from a
worker process killed with SIGKILL; pools from connections really held. The worker's series are
read from what its health server serves (``WORKER_REGISTRY``), the web tier's from its
``/metrics``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import Histogram

from shared.db import Database
from shared.settings import Settings
from tests.conftest import AUTH, drain, make_batch, query
from tests.processes import free_port, start, wait_until, worker_process
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_observability import samples, scrape, value, worker_scrape
from web.app import create_app
from worker.failures import DeliveryFailure, TransientFailure
from worker.health import bound_port, serve_health
from worker.main import worker_options, worker_runtime
from worker.smtp import OutgoingMessage, SmtpMailer, SmtpServer, build_message


def _message(to: str) -> OutgoingMessage:
    return build_message(
        sender="sender@example.com", to=to, subject="S", body="B", message_id=f"<{to}>"
    )


def _worker(name: str, **labels: str) -> float:
    return value(worker_scrape(), name, **labels)


# -- buckets ---------------------------------------------------------------------------------


def test_every_duration_histogram_resolves_seconds_to_an_hour_without_big_jumps() -> None:
    from shared import metrics

    histograms = [m for m in vars(metrics).values() if isinstance(m, Histogram)]
    assert {h._name for h in histograms} == {
        "mailroom_job_queue_wait_seconds",
        "mailroom_job_duration_seconds",
        "mailroom_smtp_send_seconds",
        "mailroom_llm_request_seconds",
        "mailroom_http_request_duration_seconds",
    }
    for histogram in histograms:
        # A labelled histogram publishes its buckets only once observed: read its bounds.
        name, edges = histogram._name, [b for b in histogram._upper_bounds if b != float("inf")]
        assert edges[0] <= 0.05 and edges[-1] >= 3600, name
        # Above a second no bucket is more than 2.5 times the one below it: a quantile
        # interpolated inside a bucket is off by less than that bucket's width.
        steps = [b / a for a, b in itertools.pairwise(edges) if a >= 1]
        assert max(steps) <= 2.5, (name, edges)


# -- SMTP failures and the slow-down ----------------------------------------------------------


@asynccontextmanager
async def dropping_server() -> AsyncIterator[int]:
    """A TCP server that accepts each connection and closes it before any greeting."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


async def test_smtp_failures_are_counted_by_reply_class(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    replies = {
        "450": "450 4.2.1 mailbox busy",
        "451": "451 4.3.0 greylisted",
        "452": "452 4.2.2 mailbox full",
        "4xx_other": "441 4.4.1 no answer from host",
        "550": "550 5.1.1 no such user",
        "551": "551 5.1.6 user not local",
        "552": "552 5.2.2 over quota",
        "553": "553 5.1.3 bad address",
        "5xx_other": "557 5.7.1 refused",
    }
    for label, reply in replies.items():
        smtp.rules[f"{label}@example.org"] = Rule(reply)
    smtp.rules["content@example.org"] = Rule("554 5.7.1 message refused", at_data=True)
    before = worker_scrape()
    mailer = SmtpMailer(SmtpServer.from_settings(settings), size=4)
    try:
        for label in replies:
            with pytest.raises(DeliveryFailure):
                await mailer.send(_message(f"{label}@example.org"))
        with pytest.raises(DeliveryFailure, match="554"):
            await mailer.send(_message("content@example.org"))
        smtp.rules["sender@example.com"] = Rule("421 4.7.0 too busy", times=1, at_mail=True)
        with pytest.raises(TransientFailure, match="421"):
            await mailer.send(_message("ok@example.org"))
        await mailer.send(_message("ok@example.org"))  # a success counts nowhere here
    finally:
        await mailer.close()
    # No reply at all: a server that drops the connection, and a port nobody listens on.
    async with dropping_server() as port:
        for unreachable in (port, free_port()):
            gone = SmtpMailer(
                SmtpServer.from_settings(settings.model_copy(update={"smtp_port": unreachable})),
                size=1,
            )
            with pytest.raises(TransientFailure):
                await gone.send(_message("ok@example.org"))
            await gone.close()
    after = worker_scrape()
    expected = dict.fromkeys(replies, 1) | {"554": 1, "421": 1, "no_reply": 2}
    counted = {
        label: value(after, "mailroom_smtp_failures_total", reply=label)
        - value(before, "mailroom_smtp_failures_total", reply=label)
        for label in expected
    }
    assert counted == expected
    published = {
        dict(labels)["reply"] for (n, labels) in after if n == "mailroom_smtp_failures_total"
    }
    assert published == set(expected)  # the whole label set, and nothing else


async def test_a_451_to_mail_shows_the_slow_down_and_when_it_ends(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    mailer = SmtpMailer(SmtpServer.from_settings(settings), size=4, slowdown_hold_seconds=1.5)
    try:
        assert _worker("mailroom_smtp_slowed_down") == 0
        assert _worker("mailroom_smtp_slowdown_until_timestamp_seconds") == 0
        smtp.rules["sender@example.com"] = Rule("451 4.7.1 rate limited", times=1, at_mail=True)
        asked_at = time.time()
        with pytest.raises(TransientFailure, match="451"):
            await mailer.send(_message("a@example.org"))
        assert _worker("mailroom_smtp_slowed_down") == 1
        until = _worker("mailroom_smtp_slowdown_until_timestamp_seconds")
        assert asked_at + 1.0 < until < time.time() + 1.5 + 0.1
        assert _worker("mailroom_smtp_concurrency_limit") == 2

        # No send since: the slow-down still ends on time, and the gauges say so.
        async def over() -> bool:
            return _worker("mailroom_smtp_slowed_down") == 0

        await wait_until(over, 10, "the slow-down to end")
        assert time.time() >= until - 0.05
        assert _worker("mailroom_smtp_slowdown_until_timestamp_seconds") == 0
        await mailer.send(_message("b@example.org"))
        assert mailer.concurrency_limit == 4 and _worker("mailroom_smtp_concurrency_limit") == 4
    finally:
        await mailer.close()


async def test_a_slow_down_undone_by_successes_is_over_before_its_time(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    mailer = SmtpMailer(
        SmtpServer.from_settings(settings), size=2
    )  # the default hold: five minutes
    try:
        smtp.rules["sender@example.com"] = Rule("421 4.7.0 slow down", times=1, at_mail=True)
        with pytest.raises(TransientFailure):
            await mailer.send(_message("a@example.org"))
        assert _worker("mailroom_smtp_slowed_down") == 1
        assert _worker("mailroom_smtp_slowdown_until_timestamp_seconds") > time.time() + 250
        await mailer.send(_message("b@example.org"))  # one success at a limit of one: back to 2
        assert mailer.concurrency_limit == 2
        assert _worker("mailroom_smtp_slowed_down") == 0
        assert _worker("mailroom_smtp_slowdown_until_timestamp_seconds") == 0
    finally:
        await mailer.close()


# -- dead letters, busy slots, pools --------------------------------------------------------------


async def test_dead_letters_are_counted_by_reason(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["bounce@example.org"] = Rule("550 5.1.1 no such user")
    smtp.rules["busy@example.org"] = Rule("451 4.3.0 try later")
    before = worker_scrape()
    response = await client.post(
        "/api/batches",
        json={
            "recipients": ["bounce@example.org", "busy@example.org"],
            "subject": "S",
            "body": "B",
        },
        headers=AUTH,
    )
    assert response.status == 201

    async def settled() -> bool:
        await drain(settings)
        rows = await query(
            settings.database_url or "", "SELECT count(*) FROM recipients WHERE status <> 'dead'"
        )
        return bool(rows[0][0] == 0)

    await wait_until(settled, 30, "both recipients to become dead letters")
    after = worker_scrape()

    def delta(reason: str) -> float:
        name = "mailroom_dead_letters_total"
        return value(after, name, reason=reason) - value(before, name, reason=reason)

    assert delta("permanent") == 1
    assert delta("attempts_exhausted") == 1
    assert smtp.rules["busy@example.org"].seen == settings.retry_max_attempts


async def test_busy_slots_follow_the_sends_in_flight(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.data_delay_seconds = 1.0
    await make_batch(db, [f"slot{i}@example.org" for i in range(10)])
    async with worker_runtime(settings) as (app, deps):
        worker = asyncio.create_task(
            app.run_worker_async(**worker_options(settings, deps, install_signal_handlers=False))
        )
        try:

            async def all_slots_busy() -> bool:
                return _worker("mailroom_worker_busy_slots") == settings.worker_concurrency

            await wait_until(all_slots_busy, 20, "every send slot to be busy")
            assert _worker("mailroom_worker_concurrency") == settings.worker_concurrency
            smtp.data_delay_seconds = 0.0

            async def all_sent_and_idle() -> bool:
                rows = await query(
                    settings.database_url or "",
                    "SELECT count(*) FROM recipients WHERE status = 'sent'",
                )
                return rows[0][0] == 10 and _worker("mailroom_worker_busy_slots") == 0

            await wait_until(all_sent_and_idle, 30, "the sends to finish and free their slots")
        finally:
            worker.cancel()
            with pytest.raises(asyncio.CancelledError):
                await worker


async def test_each_process_reports_its_own_pool(
    client: TestClient, db: Database, settings: Settings
) -> None:
    async with db.pool.connection(), db.pool.connection():
        held = await scrape(client)
    assert value(held, "mailroom_db_pool_max_connections") == db.pool.max_size
    assert value(held, "mailroom_db_pool_connections", state="in_use") == 2
    released = await scrape(client)
    assert value(released, "mailroom_db_pool_connections", state="in_use") == 0
    assert value(released, "mailroom_db_pool_connections", state="idle") >= 2

    # The worker's endpoint reports the worker's pool, and nothing while it has none.
    pool: list[object] = [None]
    health = await serve_health(
        settings,
        lambda: None,
        host="127.0.0.1",
        port=0,
        pool=lambda: pool[0],  # type: ignore[arg-type,return-value]
    )
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{bound_port(health)}") as http:
            assert "mailroom_db_pool" not in await (await http.get("/metrics")).text()
            pool[0] = db.pool
            async with db.pool.connection():
                text = await (await http.get("/metrics")).text()
    finally:
        await health.cleanup()
    assert value(samples(text), "mailroom_db_pool_connections", state="in_use") == 1
    assert value(samples(text), "mailroom_db_pool_max_connections") == db.pool.max_size


# -- scrape-time series: queues, orphans, heartbeats, maintenance -------------------------------


async def test_both_queues_and_every_maintenance_task_are_published_when_empty(
    client: TestClient, settings: Settings
) -> None:
    empty = await scrape(client)
    for queue in ("emails", "maintenance"):
        for status in ("todo_ready", "todo_scheduled", "doing"):
            assert (
                "mailroom_queue_jobs",
                frozenset({("queue", queue), ("status", status)}),
            ) in empty
        for name in ("mailroom_oldest_ready_job_age_seconds", "mailroom_jobs_orphaned"):
            assert empty[(name, frozenset({("queue", queue)}))] == 0
    for task in ("sweep_stalled_jobs", "prune_jobs"):
        key = ("mailroom_maintenance_last_success_timestamp_seconds", frozenset({("task", task)}))
        assert empty[key] == 0

    # A sweep that has waited 40 s, and a maintenance job that no worker holds.
    url = settings.database_url or ""
    rows = await query(
        url,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args, status)"
        " VALUES ('maintenance', 'sweep_stalled_jobs', 100, '{}', 'todo') RETURNING id",
    )
    await query(
        url,
        "UPDATE procrastinate_events SET at = now() - interval '40 s' WHERE job_id = %s",
        rows[0][0],
    )
    await query(
        url,
        "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args, status)"
        " VALUES ('maintenance', 'prune_jobs', 100, '{}', 'doing')",
    )
    waiting = await scrape(client)
    assert value(waiting, "mailroom_queue_jobs", queue="maintenance", status="todo_ready") == 1
    assert value(waiting, "mailroom_oldest_ready_job_age_seconds", queue="maintenance") >= 40
    assert value(waiting, "mailroom_jobs_orphaned", queue="maintenance") == 1
    assert value(waiting, "mailroom_jobs_orphaned", queue="emails") == 0


@pytest.mark.slow
async def test_a_killed_worker_s_jobs_are_orphaned_until_the_sweep_requeues_them(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # The web tier and the workers share MAILROOM_STALLED_AFTER_SECONDS, as from one env file.
    settings = settings.model_copy(update={"stalled_after_seconds": 2, "sweep_interval_seconds": 1})
    async with TestClient(TestServer(create_app(settings, db=db))) as client:
        await _orphaned_then_swept(client, db, settings, smtp)


async def _orphaned_then_swept(
    client: TestClient, db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    smtp.data_delay_seconds = 10.0  # the first worker's sends hang until it is killed
    await make_batch(db, ["orphan1@example.org", "orphan2@example.org"])
    async with worker_process(settings) as doomed:

        async def running() -> bool:
            rows = await query(
                url,
                "SELECT worker_id FROM procrastinate_jobs"
                " WHERE status = 'doing' AND queue_name = 'emails'",
            )
            return bool(rows) and rows[0][0] is not None

        await wait_until(running, 30, "the chunk to be running")
        [(dead_worker,)] = await query(
            url,
            "SELECT worker_id FROM procrastinate_jobs"
            " WHERE status = 'doing' AND queue_name = 'emails'",
        )
        doomed.send_signal(signal.SIGKILL)
        await doomed.wait()

    async def orphaned() -> bool:
        return value(await scrape(client), "mailroom_jobs_orphaned", queue="emails") == 1

    await wait_until(orphaned, 15, "the killed worker's chunk to count as orphaned")
    stale = await scrape(client)
    age = value(stale, "mailroom_worker_heartbeat_age_seconds", worker=str(dead_worker))
    assert age > settings.stalled_after_seconds
    assert value(stale, "mailroom_workers_alive") == 0
    # The killed worker swept too while it lived; only a sweep after this can requeue the orphan.
    orphan_seen_at = time.time()
    assert (
        value(
            stale, "mailroom_maintenance_last_success_timestamp_seconds", task="sweep_stalled_jobs"
        )
        < orphan_seen_at
    )

    smtp.data_delay_seconds = 0.0
    async with worker_process(settings) as rescuer:

        async def recovered() -> bool:
            now = await scrape(client)
            sent = await query(url, "SELECT count(*) FROM recipients WHERE status = 'sent'")
            last_sweep = value(
                now,
                "mailroom_maintenance_last_success_timestamp_seconds",
                task="sweep_stalled_jobs",
            )
            return (
                value(now, "mailroom_jobs_orphaned", queue="emails") == 0
                and last_sweep > orphan_seen_at
                and sent[0][0] == 2
            )

        await wait_until(recovered, 30, "the sweep to requeue the orphan and record its run")
        rescuer.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(rescuer.wait(), 30) == 0


# -- each tier its own series ------------------------------------------------------------------


@pytest.mark.slow
async def test_the_web_and_worker_processes_publish_only_their_own_series(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = settings.model_copy(update={"web_port": free_port(), "metrics_port": free_port()})
    web = await start(settings, "web")
    try:
        async with worker_process(settings), aiohttp.ClientSession() as http:
            texts: dict[str, str] = {}

            async def both_answer() -> bool:
                for tier, port in (("web", settings.web_port), ("worker", settings.metrics_port)):
                    try:
                        response = await http.get(f"http://127.0.0.1:{port}/metrics")
                        texts[tier] = await response.text()
                    except aiohttp.ClientError:
                        return False
                return "mailroom_worker_up 1.0" in texts["worker"]

            await wait_until(both_answer, 30, "both processes to serve /metrics")
    finally:
        web.send_signal(signal.SIGTERM)
        await asyncio.wait_for(web.wait(), 30)

    def names(text: str) -> set[str]:
        return set(re.findall(r"^(mailroom_[a-z_]+)", text, re.MULTILINE))

    web_names, worker_names = names(texts["web"]), names(texts["worker"])
    shared_names = {
        "mailroom_build_info",
        "mailroom_db_pool_connections",
        "mailroom_db_pool_max_connections",
    }
    assert web_names & worker_names == shared_names
    assert {
        "mailroom_worker_up",
        "mailroom_emails_sent_total",
        "mailroom_smtp_failures_total",
    } <= worker_names
    assert {
        "mailroom_batches_created_total",
        "mailroom_queue_jobs",
        "mailroom_jobs_orphaned",
    } <= web_names
