"""Sending-rate limits hold across worker processes, through PostgreSQL; a full window puts
jobs back for when it ends, without spending attempts; a server's "slow down" slows us down."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections import Counter

import pytest
from aiohttp.test_utils import TestClient
from procrastinate.jobs import Job

from shared.db import Database
from shared.ratelimits import Limit
from shared.settings import Settings
from tests.conftest import AUTH, drain, make_settings, query
from tests.processes import start, wait_until
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_faults import all_sent, enqueue
from worker.failures import RateLimited, TransientFailure
from worker.retry import RETRY_PRIORITY, BackoffRetry
from worker.smtp import SmtpMailer, build_message


@pytest.fixture
def settings(database_url: str, smtp: RecordingSMTPServer) -> Settings:
    """The web tier and the worker read the same limits, as they do from one env file."""
    return make_settings(database_url, smtp.port, rate_per_day=3)


async def test_a_full_daily_window_holds_the_rest_until_midnight_without_spending_attempts(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    limited = settings
    recipients = [f"r{i}@example.org" for i in range(5)]
    response = await client.post(
        "/api/batches",
        json={"recipients": recipients, "subject": "S", "body": "B"},
        headers=AUTH,
    )
    batch_id = (await response.json())["id"]
    await drain(limited)
    assert len(smtp.received) == 3
    waiting = await query(
        settings.database_url or "",
        "SELECT status, attempts, last_error FROM recipients WHERE status <> 'sent'",
    )
    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).date()
    assert [(s, a) for s, a, _ in waiting] == [("queued", 0), ("queued", 0)]
    for _, _, note in waiting:
        assert f"per day sending limit (3); resumes at {tomorrow} 00:00:00 UTC" in note
    jobs = await query(
        settings.database_url or "",
        "SELECT scheduled_at, priority FROM procrastinate_jobs WHERE status = 'todo'"
        " AND queue_name = 'emails'",
    )
    assert len(jobs) == 2
    midnight = datetime.datetime.combine(tomorrow, datetime.time(), tzinfo=datetime.UTC)
    for scheduled_at, priority in jobs:
        assert midnight <= scheduled_at <= midnight + datetime.timedelta(seconds=60)
        assert priority == RETRY_PRIORITY

    # The operator sees why, and until when, on the batch page.
    page = await client.get(f"/batches/{batch_id}", headers=AUTH)
    text = await page.text()
    assert (
        f"The per day sending limit (3) is reached: sending resumes at <strong>{tomorrow}" in text
    )


@pytest.mark.slow
async def test_a_per_second_limit_holds_across_two_worker_processes(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    per_second, total = 15, 60
    addresses = await enqueue(db, total)
    limited = settings.model_copy(
        update={"worker_concurrency": 8, "rate_per_second": per_second, "rate_per_day": None}
    )
    workers = [await start(limited, "worker") for _ in range(2)]
    try:
        await wait_until(all_sent(settings, total), 60, "every recipient to be sent")
    finally:
        for proc in workers:
            proc.terminate()
        await asyncio.gather(*(proc.wait() for proc in workers))
    assert sorted(smtp.to_addresses()) == sorted(addresses)
    # Exactly: no window counted more than the limit (both processes took slots in them).
    windows = await query(settings.database_url or "", "SELECT sent FROM send_windows")
    assert max(n for (n,) in windows) <= per_second and sum(n for (n,) in windows) == total
    # And as the SMTP server saw it: 60 messages at 15 a window need four windows, so the first
    # and the last are more than two seconds apart (unlimited, they take a fraction of one).
    # The exact guarantee is the window table above; the server's clock sees it later. A slot
    # is taken in the database's window and the message is accepted a moment after, so a
    # message can land in the next clock second. Bounded by that lag (under a second, even on
    # a loaded machine), what arrives in two consecutive clock seconds took its slots in at
    # most three windows; unlimited, all 60 would arrive within one.
    times = sorted(r.received_at for r in smtp.received)
    assert times[-1] - times[0] >= (total / per_second) - 2 - 0.1
    per_clock_second = Counter(int(t) for t in times)
    for second, n in per_clock_second.items():
        assert n + per_clock_second.get(second + 1, 0) <= 3 * per_second, per_clock_second
    attempts = await query(settings.database_url or "", "SELECT max(attempts) FROM recipients")
    assert attempts == [(1,)], "waiting for a window spends no attempt"


def test_a_rate_limited_job_comes_back_when_its_window_ends() -> None:
    resume_at = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    limit = Limit("per day", "sender:x", 86_400, 100)
    job = Job(
        id=1, queue="emails", lock=None, queueing_lock=None, task_name="send_email", attempts=5
    )
    decision = BackoffRetry(max_attempts=1).get_retry_decision(
        exception=RateLimited(limit, resume_at), job=job
    )
    assert decision is not None and decision.priority == RETRY_PRIORITY
    # Held back five times before: spread over 60 s x 2**5, up to the 15-minute ceiling.
    assert resume_at <= decision.retry_at <= resume_at + datetime.timedelta(seconds=900)


def test_a_backlog_held_back_again_and_again_spreads_wider_each_time() -> None:
    spread = BackoffRetry.rate_limit_spread_s
    assert [spread(1, n) for n in range(4)] == [1, 2, 4, 8]
    assert spread(1, 30) == 900, "never more than fifteen minutes"
    assert spread(86_400, 0) == 60, "a day's window does not spread the next day over a day"


async def test_a_servers_slow_down_reply_paces_the_sends_that_follow(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["first@example.org"] = Rule("451 4.7.1 slow down, please", times=1)
    mailer = SmtpMailer(settings, size=4, slow_down_s=30, slow_down_interval_s=0.5)

    def message(to: str) -> object:
        return build_message(
            sender="sender@example.com", to=to, subject="S", body="B", message_id=f"<{to}>"
        )

    try:
        started = time.monotonic()
        await asyncio.gather(*(mailer.send(message(f"fast{i}@example.org")) for i in range(4)))  # type: ignore[arg-type]
        assert time.monotonic() - started < 1.0 and not mailer.slowed_down
        with pytest.raises(TransientFailure, match="451"):
            await mailer.send(message("first@example.org"))  # type: ignore[arg-type]
        assert mailer.slowed_down
        started = time.monotonic()
        await asyncio.gather(*(mailer.send(message(f"slow{i}@example.org")) for i in range(4)))  # type: ignore[arg-type]
        assert time.monotonic() - started >= 3 * 0.5
    finally:
        await mailer.close()
    assert len(smtp.received) == 8
