"""Several SMTP relays: spread by weight, failed over when one is down, probed back, with
fallbacks only while no primary is up, and each recipient still delivered exactly once.

Two real SMTP servers on loopback and the real worker code; a relay goes down as a real server
does (it stops listening and closes each connection once its message is answered), or keeps
answering 421.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from procrastinate.worker import Worker

from shared.db import Database
from shared.metrics import WORKER_REGISTRY
from shared.ratelimits import Limit, LocalWindow
from shared.settings import ConfigError, Settings, SmtpRelay, load_settings
from tests.conftest import NO_RETRY_WITHIN_A_DRAIN, drain, make_batch, query, retries_due
from tests.processes import wait_until
from tests.smtp_server import RecordingSMTPServer, Rule
from worker.failures import (
    DeliveryFailure,
    PermanentFailure,
    TransientFailure,
    relay_failing,
    relay_unavailable,
)
from worker.main import worker_options, worker_runtime
from worker.relays import RelayMailer, build_mailer


async def _own_server() -> AsyncIterator[RecordingSMTPServer]:
    server = RecordingSMTPServer()
    await server.start()
    yield server
    await server.stop(close_sessions=True)


# Two SMTP servers on loopback for this test alone (tests here stop and restart them, which
# the session's server must not be).
first_smtp = pytest.fixture(_own_server)
other_smtp = pytest.fixture(_own_server)


def with_relays(settings: Settings, *relays: dict[str, Any], **changes: Any) -> Settings:
    """``settings`` sending through ``relays`` (as MAILROOM_SMTP_RELAYS would give them)."""
    configs = [SmtpRelay(host="127.0.0.1", timeout_seconds=5, **r) for r in relays]
    return settings.model_copy(update={"smtp_relays": configs, **changes})


def sample(name: str, relay: str) -> float:
    return WORKER_REGISTRY.get_sample_value(name, {"relay": relay}) or 0.0


def relay_counts(*relays: str) -> dict[str, tuple[float, float, float]]:
    """Sends, failures and failovers so far, by relay (the counters are the process's)."""
    return {
        r: (
            sample("mailroom_smtp_relay_sends_total", r),
            sample("mailroom_smtp_relay_failures_total", r),
            sample("mailroom_smtp_failovers_total", r),
        )
        for r in relays
    }


def since(before: dict[str, tuple[float, ...]]) -> dict[str, tuple[float, ...]]:
    after = relay_counts(*before)
    return {r: tuple(a - b for a, b in zip(after[r], before[r], strict=True)) for r in before}


async def statuses(settings: Settings) -> Counter[tuple[str, int]]:
    rows = await query(settings.database_url or "", "SELECT status, attempts FROM recipients")
    return Counter((status, attempts) for status, attempts in rows)


def all_sent(settings: Settings, total: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        rows = await query(
            settings.database_url or "", "SELECT count(*) FROM recipients WHERE status = 'sent'"
        )
        return bool(rows[0][0] == total)

    return check


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == name]


def received_once_in_all(addresses: list[str], *servers: RecordingSMTPServer) -> None:
    """Every address got exactly one message across the servers, and nothing else arrived."""
    together: Counter[str] = Counter()
    for server in servers:
        together.update(server.to_addresses())
    assert together == Counter(addresses), "each recipient exactly once, across every relay"


@asynccontextmanager
async def running_worker(settings: Settings, mailer: RelayMailer) -> AsyncIterator[None]:
    """A real worker with ``mailer``, running until the block ends."""
    async with worker_runtime(settings, mailer=mailer) as (app, deps):
        worker = Worker(app=app, **worker_options(settings, deps, install_signal_handlers=False))
        running = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            worker.stop()  # type: ignore[no-untyped-call]
            await running


def relay_is_up(mailer: RelayMailer, name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return mailer.relays[name].is_up

    return check


# -- spreading by weight ---------------------------------------------------------------------------


async def test_a_batch_is_spread_across_the_primaries_exactly_by_weight(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
) -> None:
    settings = with_relays(
        settings,
        {"name": "w-heavy", "port": first_smtp.port, "weight": 3},
        {"name": "w-light", "port": other_smtp.port, "weight": 1},
    )
    addresses = [f"r{i}@example.org" for i in range(40)]
    before = relay_counts("w-heavy", "w-light")
    await make_batch(db, addresses)
    await drain(settings)
    assert await statuses(settings) == {("sent", 1): 40}
    received_once_in_all(addresses, first_smtp, other_smtp)
    # A smooth weighted round-robin: 3 of every 4 sends to the relay of weight 3.
    assert (len(first_smtp.received), len(other_smtp.received)) == (30, 10)
    assert since(before) == {"w-heavy": (30, 0, 0), "w-light": (10, 0, 0)}
    assert sample("mailroom_smtp_relay_up", "w-heavy") == 1
    assert sample("mailroom_smtp_relay_up", "w-light") == 1


# -- a relay that goes down ------------------------------------------------------------------------


async def test_a_relay_that_goes_down_mid_batch_fails_over_then_comes_back_when_it_restarts(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = with_relays(
        settings,
        {"name": "m-first", "port": first_smtp.port},
        {"name": "m-second", "port": other_smtp.port},
    )
    mailer = build_mailer(settings, probe_min_seconds=0.05, probe_max_seconds=0.2)

    def go_down_after_five(server: RecordingSMTPServer) -> None:
        if len(server.received) == 5:
            asyncio.get_running_loop().create_task(server.stop(close_sessions=True))

    first_smtp.on_message = go_down_after_five
    addresses = [f"r{i}@example.org" for i in range(60)]
    before = relay_counts("m-first", "m-second")
    async with running_worker(settings, mailer):
        await make_batch(db, addresses)
        await wait_until(all_sent(settings, 60), 30, "the batch to be sent")
        # Nothing lost, nothing doubled, and no recipient spent an attempt on the failover.
        assert await statuses(settings) == {("sent", 1): 60}
        received_once_in_all(addresses, first_smtp, other_smtp)
        # Five, and at most the sends that were in flight on it when it stopped.
        assert 5 <= len(first_smtp.received) <= 5 + settings.worker_concurrency
        assert not mailer.relays["m-first"].is_up
        assert sample("mailroom_smtp_relay_up", "m-first") == 0
        counts = since(before)
        assert counts["m-first"][0] == len(first_smtp.received)
        assert counts["m-second"][0] == len(other_smtp.received)
        assert counts["m-first"][1] >= 1 and counts["m-first"][2] >= 1, "failed, and failed over"
        assert counts["m-second"][1:] == (0, 0)

        first_smtp.on_message = None
        await first_smtp.start()  # back, on the same port
        await wait_until(relay_is_up(mailer, "m-first"), 10, "the probe to bring it back")
        assert sample("mailroom_smtp_relay_up", "m-first") == 1
        first_before = len(first_smtp.received)
        more = [f"s{i}@example.org" for i in range(20)]
        await make_batch(db, more)
        await wait_until(all_sent(settings, 80), 30, "the second batch to be sent")
    # An equal share again once it is back, give or take the one send the round-robin owed it.
    assert 9 <= len(first_smtp.received) - first_before <= 11
    received_once_in_all(addresses + more, first_smtp, other_smtp)
    down = events(caplog, "smtp_relay_down")
    assert [e["relay"] for e in down] == ["m-first"]
    assert "connection" in down[0]["reason"] or "421" in down[0]["reason"], down[0]
    failovers = events(caplog, "smtp_failover")
    assert failovers and {(e["from_relay"], e["relay"]) for e in failovers} == {
        ("m-first", "m-second")
    }
    up = events(caplog, "smtp_relay_up")
    assert [(e["relay"], e["via"]) for e in up] == [("m-first", "probe")]


@pytest.mark.parametrize("where", ["greeting", "mail"])
async def test_a_relay_answering_421_is_failed_over_without_spending_an_attempt(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
    where: str,
) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.3.2 service not available\r\n")
        await writer.drain()
        writer.close()

    refusing = await asyncio.start_server(refuse, "127.0.0.1", 0)
    if where == "greeting":
        port = refusing.sockets[0].getsockname()[1]
    else:
        port = other_smtp.port
        other_smtp.rules[settings.from_address or ""] = Rule("421 4.7.0 try later", at_mail=True)
    name = f"r421-{where}"
    try:
        settings = with_relays(
            settings, {"name": name, "port": port}, {"name": "r421-good", "port": first_smtp.port}
        )
        addresses = [f"r{i}@example.org" for i in range(20)]
        before = relay_counts(name, "r421-good")
        await make_batch(db, addresses)
        await drain(settings)
    finally:
        refusing.close()
        await refusing.wait_closed()
    assert await statuses(settings) == {("sent", 1): 20}
    assert first_smtp.to_addresses() == Counter(addresses)
    assert other_smtp.received == []
    counts = since(before)
    assert counts[name][0] == 0 and counts[name][1] >= 1 and counts[name][2] >= 1
    assert counts["r421-good"] == (20, 0, 0)
    assert sample("mailroom_smtp_relay_up", name) == 0


async def test_when_every_relay_is_down_recipients_retry_and_go_out_once_one_is_back(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
) -> None:
    settings = with_relays(
        settings,
        {"name": "all-a", "port": first_smtp.port},
        {"name": "all-b", "port": other_smtp.port},
        **NO_RETRY_WITHIN_A_DRAIN,
        retry_max_attempts=5,
    )
    await first_smtp.stop(close_sessions=True)
    await other_smtp.stop(close_sessions=True)
    mailer = build_mailer(settings, probe_min_seconds=0.05, probe_max_seconds=0.2)
    addresses = [f"r{i}@example.org" for i in range(10)]
    async with running_worker(settings, mailer):
        await make_batch(db, addresses)

        async def all_retrying() -> bool:
            return await statuses(settings) == {("retrying", 1): 10}

        await wait_until(all_retrying, 30, "every recipient to wait for its retry")
        errors = await query(
            settings.database_url or "", "SELECT DISTINCT last_error FROM recipients"
        )
        assert all("connection failed during connect" in e for (e,) in errors), errors
        assert sample("mailroom_smtp_relay_up", "all-a") == 0
        assert sample("mailroom_smtp_relay_up", "all-b") == 0

        await other_smtp.start()
        await wait_until(relay_is_up(mailer, "all-b"), 10, "the probe to find all-b back")
        await retries_due(settings.database_url or "")  # instead of waiting out the backoff
        await wait_until(all_sent(settings, 10), 30, "the retries to be sent")
    assert await statuses(settings) == {("sent", 2): 10}
    assert other_smtp.to_addresses() == Counter(addresses)
    assert first_smtp.received == []


async def test_a_fallback_carries_mail_only_while_no_primary_is_up(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
) -> None:
    settings = with_relays(
        settings,
        {"name": "f-primary", "port": first_smtp.port},
        {"name": "f-fallback", "port": other_smtp.port, "role": "fallback", "weight": 5},
    )
    mailer = build_mailer(settings, probe_min_seconds=0.05, probe_max_seconds=0.2)
    first, second, third = ([f"{b}{i}@example.org" for i in range(10)] for b in "abc")
    before = relay_counts("f-primary", "f-fallback")
    async with running_worker(settings, mailer):
        await make_batch(db, first)
        await wait_until(all_sent(settings, 10), 30, "the first batch")
        assert (len(first_smtp.received), len(other_smtp.received)) == (10, 0)

        await first_smtp.stop(close_sessions=True)
        await make_batch(db, second)
        await wait_until(all_sent(settings, 20), 30, "the second batch, through the fallback")
        assert (len(first_smtp.received), len(other_smtp.received)) == (10, 10)

        await first_smtp.start()
        await wait_until(relay_is_up(mailer, "f-primary"), 10, "the primary to be back")
        await make_batch(db, third)
        await wait_until(all_sent(settings, 30), 30, "the third batch")
    assert (len(first_smtp.received), len(other_smtp.received)) == (20, 10)
    assert other_smtp.to_addresses() == Counter(second)
    assert await statuses(settings) == {("sent", 1): 30}
    counts = since(before)
    assert counts["f-primary"][0] == 20 and counts["f-primary"][2] >= 1
    assert counts["f-fallback"] == (10, 0, 0)


async def test_a_relay_whose_own_window_is_full_is_skipped_for_the_others(
    db: Database,
    settings: Settings,
    first_smtp: RecordingSMTPServer,
    other_smtp: RecordingSMTPServer,
) -> None:
    settings = with_relays(
        settings,
        {"name": "rl-capped", "port": first_smtp.port, "rate_per_minute": 5},
        {"name": "rl-open", "port": other_smtp.port},
    )
    # Its share would be 10 of 20; its window of a minute allows 5. A drain that straddles
    # the turn of a minute gets two windows: then the test runs once more (it takes well under
    # a second, so the second run cannot straddle one too).
    for run in range(2):
        first_smtp.reset()
        other_smtp.reset()
        started = time.time()
        addresses = [f"run{run}-{i}@example.org" for i in range(20)]
        await make_batch(db, addresses)
        await drain(settings)
        if started // 60 == time.time() // 60:
            break
    assert await all_sent(settings, 20 * (run + 1))()
    received_once_in_all(addresses, first_smtp, other_smtp)
    assert (len(first_smtp.received), len(other_smtp.received)) == (5, 15)


def test_a_local_window_counts_within_its_clock_aligned_window() -> None:
    now = [120.5]
    window = LocalWindow(Limit("relay x per minute", "relay:x:60s", 60, 2), lambda: now[0])
    assert [window.take(), window.take()] == [None, None]
    full = window.take()
    assert full is not None and full.timestamp() == 180
    now[0] = 180.0
    assert window.take() is None


# -- settings -------------------------------------------------------------------------------------


def _relays_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str) -> None:
    monkeypatch.chdir(tmp_path)  # no .env file
    monkeypatch.setenv("MAILROOM_SMTP_RELAYS", value)


def test_relays_are_read_from_json_and_unset_is_the_one_smtp_relay(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAILROOM_SMTP_HOST", "mx.example.org")
    monkeypatch.setenv("MAILROOM_SMTP_PASSWORD", "hunter2")
    (only,) = load_settings().relays()
    assert (only.name, only.host, only.port, only.role, only.weight) == (
        "default",
        "mx.example.org",
        25,
        "primary",
        1,
    )
    assert only.password is not None and only.password.get_secret_value() == "hunter2"
    relays = [
        {"name": "eu", "host": "smtp-eu.example.org", "port": 587, "security": "starttls",
         "username": "u", "password": "hunter2", "weight": 3, "max_connections": 4,
         "rate_per_second": 10},
        {"name": "backup", "host": "first_smtp.backup.example", "role": "fallback",
         "timeout_seconds": 10, "rate_per_minute": 600},
    ]  # fmt: skip
    monkeypatch.setenv("MAILROOM_SMTP_RELAYS", json.dumps(relays))
    read = load_settings().relays()
    assert [(r.name, r.port, r.weight, r.role) for r in read] == [
        ("eu", 587, 3, "primary"),
        ("backup", 25, 1, "fallback"),
    ]
    assert "hunter2" not in repr(read)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{not json, hunter2", "MAILROOM_SMTP_RELAYS: must be a JSON list of relay objects"),
        ('{"name": "a", "host": "h", "password": "hunter2"}', "MAILROOM_SMTP_RELAYS: "),
        ("[]", "MAILROOM_SMTP_RELAYS: needs at least one relay"),
        (
            '[{"name": "a", "host": "h", "pasword": "hunter2"}]',
            "MAILROOM_SMTP_RELAYS[0].pasword: Extra inputs are not permitted",
        ),
        ('[{"name": "a", "password": "hunter2"}]', "MAILROOM_SMTP_RELAYS[0].host: Field required"),
        (
            '[{"name": "a", "host": "h", "password": "hunter2"},'
            ' {"name": "a", "host": "g", "password": "hunter2"}]',
            "relay names must be unique: a repeated",
        ),
        (
            '[{"name": "a", "host": "h", "role": "fallback", "password": "hunter2"}]',
            'needs at least one relay with "role": "primary"',
        ),
        ('[{"name": "Bad Name", "host": "h", "password": "hunter2"}]', "[0].name: String should"),
        ('[{"name": "a", "host": "h\\r\\nBcc: x", "password": "hunter2"}]', "[0].host: must not"),
        ('[{"name": "a", "host": "h", "username": "u\\u0000", "password": "hunter2"}]', "U+0000"),
        ('[{"name": "a", "host": "h", "port": 0, "password": "hunter2"}]', "[0].port: Input"),
        ('[{"name": "a", "host": "h", "weight": 0, "password": "hunter2"}]', "[0].weight: Input"),
        ('[{"name": "a", "host": "h", "role": "second", "password": "hunter2"}]', "[0].role"),
        ('[{"name": "a", "host": "h", "security": "ssl", "password": "hunter2"}]', "[0].security"),
        ('[{"name": "a", "host": "h", "timeout_seconds": 0, "password": "hunter2"}]', "timeout"),
        ('[{"name": "a", "host": "h", "max_connections": 0, "password": "x"}]', "max_connections"),
        ('[{"name": "a", "host": "h", "rate_per_second": -1, "password": "x"}]', "rate_per_second"),
        ('[{"name": "a", "host": "h", "password": ["hunter2"]}]', "[0].password"),
    ],
)
def test_garbage_relays_are_a_config_error_naming_the_variable_and_never_a_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str, fragment: str
) -> None:
    _relays_env(monkeypatch, tmp_path, value)
    with pytest.raises(ConfigError) as refused:
        load_settings()
    message = str(refused.value)
    assert message.startswith("MAILROOM_SMTP_RELAYS"), message
    assert fragment in message, message
    assert "hunter2" not in message


# -- which failures move a send to another relay ---------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "fails_over", "marks_down"),
    [
        (TransientFailure("refused", stage="connect"), True, True),
        (TransientFailure("SMTP 421 during connect", smtp_code=421, stage="connect"), True, True),
        (TransientFailure("SMTP 535 during connect", smtp_code=535, stage="connect"), True, True),
        (TransientFailure("SMTP 421 during mail", smtp_code=421, stage="mail"), True, True),
        (TransientFailure("SMTP 421 during rcpt", smtp_code=421, stage="rcpt"), True, True),
        (TransientFailure("SMTP 421 during data", smtp_code=421, stage="data"), True, True),
        (TransientFailure("dropped during mail", stage="mail"), True, True),
        (TransientFailure("timeout during rcpt", stage="rcpt"), True, True),
        # The text was sent and no reply came: the relay may have it.
        (TransientFailure("SMTP timeout during data", stage="data"), False, True),
        (TransientFailure("SMTP connection failed during data", stage="data"), False, True),
        # Replies about this message or recipient: the same on any relay.
        (TransientFailure("SMTP 451 during rcpt", smtp_code=451, stage="rcpt"), False, False),
        (TransientFailure("SMTP 451 during data", smtp_code=451, stage="data"), False, False),
        (TransientFailure("SMTP 452 during mail", smtp_code=452, stage="mail"), False, False),
        (PermanentFailure("SMTP 550 during rcpt", smtp_code=550, stage="rcpt"), False, False),
        (PermanentFailure("SMTP 554 during data", smtp_code=554, stage="data"), False, False),
        (PermanentFailure("address needs SMTPUTF8"), False, False),
    ],
)
def test_only_a_failure_that_cannot_have_delivered_moves_the_send_to_another_relay(
    failure: DeliveryFailure, fails_over: bool, marks_down: bool
) -> None:
    assert relay_unavailable(failure) is fails_over
    assert relay_failing(failure) is marks_down
