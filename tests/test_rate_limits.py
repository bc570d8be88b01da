"""Sending-rate limits hold across worker processes, through PostgreSQL; a full window puts
jobs back for when it ends, without spending attempts; a server's "slow down" lowers how many
messages go out at once, and only a reply about the connection or the sender does."""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections import Counter
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from procrastinate.jobs import Job

from shared.db import Database
from shared.metrics import WORKER_REGISTRY
from shared.ratelimits import Limit, limits_for
from shared.settings import Settings
from tests.conftest import AUTH, drain, make_settings, query
from tests.processes import start, wait_until
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_faults import all_sent, enqueue
from worker.failures import RateLimited, TransientFailure
from worker.retry import RETRY_PRIORITY, BackoffRetry
from worker.smtp import PACE_MIN_SECONDS, OutgoingMessage, SmtpMailer, SmtpServer, build_message

# The longest a test allows between a message's slot in a window and its acceptance by the
# SMTP server; see test_a_per_second_limit_holds_across_two_worker_processes.
SLOT_TO_ACCEPTANCE_SECONDS = 1.0


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
    # Exactly, where the design guarantees it: both processes took their slots in the same
    # windows, and no window ever counted more than the limit.
    windows = await query(
        settings.database_url or "",
        "SELECT extract(epoch FROM window_start)::bigint, sent FROM send_windows"
        " WHERE scope LIKE 'sender:%' ORDER BY 1",
    )
    assert max(n for _, n in windows) <= per_second and sum(n for _, n in windows) == total
    assert len(windows) >= total // per_second, windows
    first_window, last_window = windows[0][0], windows[-1][0]
    # And, within a tolerance, as the SMTP server's clock saw it. A message is accepted a
    # moment after its slot was taken: the claim's transaction, then MAIL, RCPT and DATA on
    # loopback, some milliseconds. Allow up to SLOT_TO_ACCEPTANCE_SECONDS of that lag (a hundred
    # times what it takes on an idle machine, room for a loaded one). Then a clock second's
    # messages took their slots in that second's window or the one before it (two windows'
    # worth), and the last message, whose slot is in the last window, arrived at least
    # (last - first - 1 - lag) seconds after the first, whose slot ended with the first
    # window. Unlimited, all 60 arrive within a fraction of one second.
    times = sorted(r.received_at for r in smtp.received)
    per_clock_second = Counter(int(t) for t in times)
    windows_per_clock_second = 1 + math.ceil(SLOT_TO_ACCEPTANCE_SECONDS)
    assert max(per_clock_second.values()) <= windows_per_clock_second * per_second, per_clock_second
    least_span = (last_window - first_window) - 1 - SLOT_TO_ACCEPTANCE_SECONDS
    assert least_span >= 1, "four windows at least, so the bound above says something"
    assert times[-1] - times[0] >= least_span, (times[-1] - times[0], windows)
    attempts = await query(settings.database_url or "", "SELECT max(attempts) FROM recipients")
    assert attempts == [(1,)], "waiting for a window spends no attempt"


async def test_each_limit_counts_in_a_window_of_its_own(db: Database, settings: Settings) -> None:
    # The second, the hour and the day that start at the same instant (each hour's first
    # second, each day's first hour) must not share a row, or one message counts twice.
    settings = settings.model_copy(
        update={
            "rate_per_second": 5,
            "rate_per_hour": 100,
            "rate_per_day": 1000,
            "rate_per_domain_per_minute": 50,
        }
    )
    limits = limits_for(settings, "a@example.org")
    assert len({limit.scope for limit in limits}) == len(limits) == 4
    assert await db.take_send_slot(limits) is None
    rows = await query(settings.database_url or "", "SELECT scope, sent FROM send_windows")
    assert sorted(n for _, n in rows) == [1, 1, 1, 1]


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
    spread = BackoffRetry.rate_limit_spread_seconds
    assert [spread(1, n) for n in range(4)] == [1, 2, 4, 8]
    assert spread(1, 30) == 900, "never more than fifteen minutes"
    assert spread(86_400, 0) == 60, "a day's window does not spread the next day over a day"


def _message(to: str) -> OutgoingMessage:
    return build_message(
        sender="sender@example.com", to=to, subject="S", body="B", message_id=f"<{to}>"
    )


def _throttled_total() -> float:
    return WORKER_REGISTRY.get_sample_value("mailroom_smtp_throttled_total") or 0.0


def _limit_gauge() -> float | None:
    return WORKER_REGISTRY.get_sample_value("mailroom_smtp_concurrency_limit")


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    # structlog hands the stdlib its event dict; the handler's formatter renders it as JSON.
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]


async def test_a_greylisted_recipient_does_not_slow_the_rest_of_its_batch(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    settings = settings.model_copy(update={"worker_concurrency": 8, "rate_per_day": None})

    async def batch_seconds(prefix: str) -> float:
        await enqueue(db, 200, prefix)
        started = time.monotonic()
        await drain(settings)
        return time.monotonic() - started

    baseline = await batch_seconds("plain")
    # The first recipient of the second batch is greylisted: 451 to RCPT, every time.
    smtp.rules["grey0@example.org"] = Rule("451 4.7.1 greylisted, try again later")
    throttled_before = _throttled_total()
    greylisted = await batch_seconds("grey")
    sent = smtp.to_addresses()
    assert sum(1 for a in sent if a.startswith("plain")) == 200
    assert sum(1 for a in sent if a.startswith("grey")) == 199 and "grey0@example.org" not in sent
    # A reply about one recipient is not a request to slow down: nothing was counted, and the
    # batch took about as long as one without it. The bound is loose on purpose (one noisy
    # machine shared with other work, a worker started for each batch), and still far from
    # what any slow-down would cost: the one-at-a-time, one-a-second pacing this replaced
    # would have taken more than 199 s, and a halved concurrency that recovers costs little.
    print(f"\ngreylisting: 200 recipients in {baseline:.2f} s without, {greylisted:.2f} s with")
    assert _throttled_total() == throttled_before
    assert greylisted < 2 * baseline + 1.0, (baseline, greylisted)


async def test_refusals_at_mail_halve_the_concurrency_once_per_burst_and_successes_restore_it(
    settings: Settings, smtp: RecordingSMTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    mailer = SmtpMailer(SmtpServer.from_settings(settings), size=8)
    try:
        await asyncio.gather(*(mailer.send(_message(f"warm{i}@example.org")) for i in range(8)))
        assert mailer.concurrency_limit == 8 and _limit_gauge() == 8
        before = _throttled_total()

        # Eight sends in flight at once, all refused: counted eight times, halved once.
        smtp.rules["sender@example.com"] = Rule("421 4.7.0 too many messages", at_mail=True)
        burst = await asyncio.gather(
            *(mailer.send(_message(f"burst{i}@example.org")) for i in range(8)),
            return_exceptions=True,
        )
        assert all(isinstance(r, TransientFailure) and r.smtp_code == 421 for r in burst), burst
        assert _throttled_total() - before == 8
        assert mailer.concurrency_limit == 4 and _limit_gauge() == 4

        # Each later refusal came from a send at the lowered limit: halved again, down to one.
        smtp.rules["sender@example.com"] = Rule("451 4.7.1 rate limited", at_mail=True)
        for expected in (2, 1):
            with pytest.raises(TransientFailure, match="451"):
                await mailer.send(_message("again@example.org"))
            assert mailer.concurrency_limit == expected and _limit_gauge() == expected
        assert mailer.pace_seconds == 0

        # The server takes mail again: one step up per `limit` successes, so 1 + 2 + ... + 7.
        del smtp.rules["sender@example.com"]
        await asyncio.gather(*(mailer.send(_message(f"ok{i}@example.org")) for i in range(27)))
        assert mailer.concurrency_limit == 7
        await mailer.send(_message("last@example.org"))
        assert mailer.concurrency_limit == 8 and _limit_gauge() == 8
    finally:
        await mailer.close()
    throttled = _events(caplog, "smtp_throttled")
    assert [(e["old_limit"], e["new_limit"]) for e in throttled] == [(8, 4), (4, 2), (2, 1)]
    assert [e["smtp_code"] for e in throttled] == [421, 451, 451]
    assert {e["stage"] for e in throttled} == {"mail"}
    recovered = _events(caplog, "smtp_recovered")
    steps = [(e["old_limit"], e["new_limit"]) for e in recovered]
    assert steps == [(n, n + 1) for n in range(1, 8)]
    assert len(smtp.received) == 8 + 27 + 1


async def test_a_server_that_throttles_a_single_connection_gets_paced_sends(
    settings: Settings, smtp: RecordingSMTPServer
) -> None:
    mailer = SmtpMailer(SmtpServer.from_settings(settings), size=2)
    try:
        started = time.monotonic()
        await asyncio.gather(*(mailer.send(_message(f"fast{i}@example.org")) for i in range(4)))
        assert time.monotonic() - started < 1.0 and mailer.pace_seconds == 0

        # 451 at DATA: about the message stream, not the recipient (RCPT was accepted).
        smtp.rules["first@example.org"] = Rule("451 4.7.1 slow down, please", at_data=True)
        for limit, pace in ((1, 0.0), (1, PACE_MIN_SECONDS), (1, 2 * PACE_MIN_SECONDS)):
            with pytest.raises(TransientFailure, match="451"):
                await mailer.send(_message("first@example.org"))
            assert (mailer.concurrency_limit, mailer.pace_seconds) == (limit, pace)

        # Each success halves the pace: the first send waits out 0.5 s after the last refusal,
        # the second 0.5 s after the first (the pace it started under), the third not at all;
        # its success is the one a limit of one needs to grow back to two.
        smtp.received.clear()
        started = time.monotonic()
        await asyncio.gather(*(mailer.send(_message(f"slow{i}@example.org")) for i in range(3)))
        elapsed = time.monotonic() - started
        assert mailer.pace_seconds == 0 and mailer.concurrency_limit == 2
    finally:
        await mailer.close()
    # The pace spaces the starts of the sends; the server's clock sees their acceptance, each a
    # few milliseconds (MAIL, RCPT, DATA on loopback, in this process) after its start. Allow
    # the first to have taken up to 0.1 s longer than the second: still well above PACE_MIN_SECONDS,
    # the spacing a pace halved once too often would give.
    times = [r.received_at for r in smtp.received]
    assert times[1] - times[0] >= 2 * PACE_MIN_SECONDS - 0.1, times
    assert elapsed >= 3 * PACE_MIN_SECONDS, elapsed
