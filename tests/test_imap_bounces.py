"""The worker's poll of a bounce mailbox, against a real Dovecot over TLS and STARTTLS.

One Dovecot serves the module (``tests/dovecot.py``); each test gets a mailbox folder of its
own, delivers messages into it with APPEND as any mail server would, and polls it with the
worker's code (or ``mailroom bounces poll``), on a database of its own.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from shared.db import Database
from shared.metrics import WORKER_REGISTRY
from shared.queue import BOUNCE_POLL_TASK
from shared.settings import Settings
from tests.conftest import drain, make_batch, make_settings, query
from tests.dovecot import PASSWORD, USERNAME, Dovecot, dovecot_binary
from tests.processes import ROOT, environment, free_port
from tests.smtp_server import RecordingSMTPServer
from tests.test_bounces import arf, dsn
from worker import imap
from worker.bounce_poll import POLL_LOCK, PollFailed, PollSummary, poll_bounce_mailbox
from worker.imap import ImapServer
from worker.verp import Verp

pytestmark = pytest.mark.slow  # every test talks to the module's Dovecot process


@pytest.fixture(scope="module")
async def dovecot(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Dovecot]:
    if dovecot_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("dovecot is missing: .ci/run installs Debian's dovecot-imapd")
        pytest.skip("dovecot not installed (apt-get install dovecot-imapd)")
    log = tmp_path_factory.mktemp("dovecot") / "dovecot.log"
    async with Dovecot(log) as server:
        yield server


@pytest.fixture
def folder(dovecot: Dovecot) -> str:
    """A mailbox of this test's own."""
    name = f"bounces-{secrets.token_hex(4)}"
    dovecot.create(name)
    return name


def imap_settings(
    database_url: str, smtp_port: int, dovecot: Dovecot, folder: str, **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "imap_host": "127.0.0.1",
        "imap_port": dovecot.imaps_port,
        "imap_security": "tls",
        "imap_username": USERNAME,
        "imap_password": PASSWORD,
        "imap_mailbox": folder,
        "imap_ca_file": dovecot.ca_file,
        "imap_timeout_seconds": 5,
    }
    values.update(overrides)
    return make_settings(database_url, smtp_port, **values)


@pytest.fixture
def settings(
    database_url: str, smtp: RecordingSMTPServer, dovecot: Dovecot, folder: str
) -> Settings:
    return imap_settings(database_url, smtp.port, dovecot, folder)


async def poll(settings: Settings, db: Database) -> PollSummary:
    server = ImapServer.from_settings(settings)
    assert server is not None
    summary = await poll_bounce_mailbox(
        server,
        db,
        verp=Verp.from_settings(settings),
        max_messages=settings.imap_max_messages,
        max_message_bytes=settings.imap_max_message_bytes,
    )
    assert summary is not None
    return summary


async def suppressions(database_url: str) -> list[tuple[str, str]]:
    rows = await query(database_url, "SELECT address, reason FROM suppressions ORDER BY address")
    return [(str(a), str(r)) for a, r in rows]


def metric(name: str, **labels: str) -> float:
    return WORKER_REGISTRY.get_sample_value(name, labels) or 0.0


def out_of_office(to: str = "sender@example.com") -> bytes:
    return (
        f"From: Ada <ada@example.org>\nTo: {to}\nSubject: Automatic reply: Hello\n"
        "Auto-Submitted: auto-replied\n\nI am away until Monday.\n"
    ).encode()


def plain_bounce(
    delivered_to: str, *, subject: str = "Undelivered Mail Returned to Sender"
) -> bytes:
    """A bounce without a DSN (as many servers still send them), to a VERP address."""
    return (
        f"Delivered-To: {delivered_to}\nReturn-Path: <>\n"
        f"From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\nTo: {delivered_to}\n"
        f"Subject: {subject}\n\nThis is the mail system at host mx.example.net.\n\n"
        "I'm sorry to have to inform you that your message could not\n"
        "be delivered to one or more recipients.\n"
    ).encode()


def deeply_nested(depth: int) -> bytes:
    """A MIME structure nested deeper than any parser's recursion allows."""
    opening = "".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\n\n--b{i}\n' for i in range(depth)
    )
    closing = "".join(f"--b{i}--\n" for i in reversed(range(depth)))
    return (
        "From: x@example.net\nSubject: nested\nMIME-Version: 1.0\n"
        + opening
        + "Content-Type: text/plain\n\nhi\n"
        + closing
    ).encode()


# -- reading reports -------------------------------------------------------------------------------


async def test_a_dsn_and_an_arf_report_suppress_their_addresses_and_nothing_is_counted_twice(
    settings: Settings, db: Database, dovecot: Dovecot, folder: str, database_url: str
) -> None:
    dovecot.append(folder, dsn("gone@example.org"), out_of_office(), arf("grace@example.org"))
    before = metric("mailroom_bounce_messages_total", outcome="report")
    complaints = metric("mailroom_bounce_findings_total", reason="complaint")

    first = await poll(settings, db)

    assert first.outcomes == {"report": 2, "not_report": 1}
    assert first.findings == {"hard_bounce": 1, "complaint": 1}
    assert (first.newly_suppressed, first.marked) == (2, 2)
    assert await suppressions(database_url) == [
        ("gone@example.org", "hard_bounce"),
        ("grace@example.org", "complaint"),
    ]
    # The reports are flagged \Seen; the out-of-office reply is left as it was, unread.
    assert dovecot.flags(folder) == [{"\\Seen"}, set(), {"\\Seen"}]
    assert metric("mailroom_bounce_messages_total", outcome="report") == before + 2
    assert metric("mailroom_bounce_findings_total", reason="complaint") == complaints + 1

    again = await poll(settings, db)
    assert (again.read, again.newly_suppressed, again.marked) == (0, 0, 0)
    assert metric("mailroom_bounce_messages_total", outcome="report") == before + 2
    # Each report that suppressed something is in the audit log as the bounce mailbox's.
    audit = [e for e in await db.list_audit() if e["action"] == "addresses_suppressed"]
    assert [(e["actor"], e["count"], e["detail"]["outcome"]) for e in audit] == [
        ("imap:bounce-mailbox", 1, "report"),
        ("imap:bounce-mailbox", 1, "report"),
    ]

    # Only what arrived since is read next time.
    dovecot.append(folder, dsn("later@example.org"))
    third = await poll(settings, db)
    assert (third.outcomes, third.newly_suppressed) == ({"report": 1}, 1)
    assert "3 report" not in third.line() and "1 report" in third.line()


async def test_over_starttls_reports_are_moved_to_the_processed_folder(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    processed = f"{folder}-done"
    dovecot.create(processed)
    settings = imap_settings(
        database_url,
        smtp.port,
        dovecot,
        folder,
        imap_security="starttls",
        imap_port=dovecot.imap_port,
        imap_processed_mailbox=processed,
    )
    dovecot.append(folder, out_of_office(), dsn("gone@example.org"))

    summary = await poll(settings, db)

    assert (summary.outcomes, summary.marked) == ({"report": 1, "not_report": 1}, 1)
    assert dovecot.flags(folder) == [set()]  # the reply stays, unread
    assert len(dovecot.flags(processed)) == 1
    assert await suppressions(database_url) == [("gone@example.org", "hard_bounce")]


async def test_plain_imap_works_only_when_asked_for(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    dovecot.append(folder, dsn("gone@example.org"))
    plain = imap_settings(
        database_url, smtp.port, dovecot, folder, imap_security="none", imap_port=dovecot.imap_port
    )
    assert (await poll(plain, db)).newly_suppressed == 1
    # Not asked for, the same port is spoken to with TLS from the first byte, which fails.
    wrong = imap_settings(database_url, smtp.port, dovecot, folder, imap_port=dovecot.imap_port)
    with pytest.raises(PollFailed) as failed:
        await poll(wrong, db)
    assert failed.value.kind == "tls"


async def test_a_poll_that_stops_between_suppressing_and_marking_counts_nothing_twice(
    database_url: str,
    smtp: RecordingSMTPServer,
    db: Database,
    dovecot: Dovecot,
    folder: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(imap, "UIDS_PER_COMMAND", 2)  # the three moves take two commands
    processed = f"{folder}-done"  # not created yet: the move to it fails
    settings = imap_settings(
        database_url, smtp.port, dovecot, folder, imap_processed_mailbox=processed
    )
    dovecot.append(folder, dsn("gone@example.org"), arf("grace@example.org"))
    failures = metric("mailroom_bounce_poll_failures_total", error="protocol")

    with pytest.raises(PollFailed) as failed:
        await poll(settings, db)
    assert failed.value.kind == "protocol"
    assert processed in str(failed.value)
    assert metric("mailroom_bounce_poll_failures_total", error="protocol") == failures + 1
    # Suppressed and recorded, not marked: the server still has them, unread.
    assert len(await suppressions(database_url)) == 2
    assert await query(database_url, "SELECT uid, marked FROM bounce_mailbox_messages") == [
        (1, False),
        (2, False),
    ]
    assert dovecot.flags(folder) == [set(), set()]

    dovecot.create(processed)
    dovecot.append(folder, dsn("later@example.org"))
    summary = await poll(settings, db)

    # The two are marked (moved) now, and not read or counted again; the new one is.
    assert summary.outcomes == {"report": 1}
    assert (summary.newly_suppressed, summary.marked) == (1, 3)
    assert dovecot.flags(folder) == []
    assert len(dovecot.flags(processed)) == 3
    assert len(await suppressions(database_url)) == 3
    assert (await poll(settings, db)).read == 0


async def test_a_huge_or_garbage_message_is_skipped_and_the_poll_goes_on(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    settings = imap_settings(
        database_url, smtp.port, dovecot, folder, imap_max_message_bytes=200_000
    )
    huge = b"From: x@example.net\nSubject: big\n\n" + b"x" * 76 + b"\n"
    dovecot.append(
        folder,
        huge * 4000,  # about 300 KB
        deeply_nested(2000),  # about 140 KB, deeper than the parser can go
        b"\xff\xfe\x00 garbage that is not a message at all \x00\x01",
        dsn("gone@example.org"),
    )

    summary = await poll(settings, db)

    assert summary.outcomes == {"too_large": 1, "unreadable": 1, "not_report": 1, "report": 1}
    assert await suppressions(database_url) == [("gone@example.org", "hard_bounce")]
    assert dovecot.flags(folder) == [set(), set(), set(), {"\\Seen"}]
    assert (await poll(settings, db)).read == 0  # none of them is read again


async def test_the_budget_leaves_the_rest_for_the_next_poll(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    settings = imap_settings(database_url, smtp.port, dovecot, folder, imap_max_messages=2)
    dovecot.append(folder, *(dsn(f"gone{i}@example.org") for i in range(5)))
    polls = [await poll(settings, db) for _ in range(3)]
    assert [(p.read, p.left) for p in polls] == [(2, 3), (2, 1), (1, 0)]
    assert len(await suppressions(database_url)) == 5


async def test_only_one_poll_runs_at_a_time(
    settings: Settings, db: Database, dovecot: Dovecot, folder: str, database_url: str
) -> None:
    dovecot.append(folder, dsn("gone@example.org"))
    server = ImapServer.from_settings(settings)
    assert server is not None
    async with db.exclusively(POLL_LOCK) as mine:  # another poll is running
        assert mine
        skipped = await poll_bounce_mailbox(
            server, db, verp=None, max_messages=10, max_message_bytes=100_000
        )
    assert skipped is None
    assert await suppressions(database_url) == []
    assert (await poll(settings, db)).newly_suppressed == 1


async def test_old_records_are_pruned_but_the_mailbox_keeps_its_place(
    settings: Settings, db: Database, dovecot: Dovecot, folder: str, database_url: str
) -> None:
    dovecot.append(folder, dsn("a@example.org"), out_of_office(), dsn("b@example.org"))
    await poll(settings, db)
    await query(
        database_url, "UPDATE bounce_mailbox_messages SET read_at = now() - interval '40 days'"
    )
    assert await db.prune_bounce_mailbox_messages(retention_days=30) == 2
    assert await query(database_url, "SELECT uid FROM bounce_mailbox_messages") == [(3,)]
    assert (await poll(settings, db)).read == 0  # nothing is read again
    dovecot.append(folder, dsn("c@example.org"))
    assert (await poll(settings, db)).outcomes == {"report": 1}


# -- what goes wrong -------------------------------------------------------------------------------


async def test_a_wrong_password_and_an_unreachable_server_are_clear_errors(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    wrong = imap_settings(
        database_url, smtp.port, dovecot, folder, imap_password="not-the-password"
    )
    auth_failures = metric("mailroom_bounce_poll_failures_total", error="auth")
    with pytest.raises(PollFailed) as failed:
        await poll(wrong, db)
    assert failed.value.kind == "auth"
    assert f"refused the login of {USERNAME!r}" in str(failed.value)
    assert "not-the-password" not in str(failed.value)
    assert metric("mailroom_bounce_poll_failures_total", error="auth") == auth_failures + 1

    nobody = imap_settings(database_url, smtp.port, dovecot, folder, imap_port=free_port())
    with pytest.raises(PollFailed) as failed:
        await poll(nobody, db)
    assert failed.value.kind == "connect"
    assert f"cannot connect to 127.0.0.1:{nobody.imap_port}" in str(failed.value)

    missing = imap_settings(database_url, smtp.port, dovecot, "no-such-folder")
    with pytest.raises(PollFailed) as failed:
        await poll(missing, db)
    assert failed.value.kind == "protocol"
    assert "cannot open mailbox 'no-such-folder'" in str(failed.value)


async def test_a_certificate_not_signed_by_the_configured_ca_is_refused(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    dovecot.append(folder, dsn("gone@example.org"))
    for security, port in (("tls", dovecot.imaps_port), ("starttls", dovecot.imap_port)):
        untrusting = imap_settings(
            database_url,
            smtp.port,
            dovecot,
            folder,
            imap_security=security,
            imap_port=port,
            imap_ca_file=dovecot.other_ca_file,
        )
        with pytest.raises(PollFailed) as failed:
            await poll(untrusting, db)
        assert failed.value.kind == "tls"
        assert "is not trusted" in str(failed.value)
    assert await suppressions(database_url) == []  # nothing was read


async def _poll_a_fake_server(settings: Settings, db: Database, answer: Any) -> PollFailed:
    """Poll a server on loopback that answers with ``answer(reader, writer)``."""
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        fake = settings.model_copy(update={"imap_security": "none", "imap_port": port})
        with pytest.raises(PollFailed) as failed:
            await poll(fake, db)
    finally:
        server.close()
        await server.wait_closed()
    return failed.value


async def test_a_server_that_speaks_garbage_is_a_clear_error(
    settings: Settings, db: Database
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\x00\xff HELLO this is not IMAP\r\n" * 3)
        await writer.drain()
        writer.close()

    failed = await _poll_a_fake_server(settings, db, garbage)
    assert failed.kind == "protocol"
    assert "127.0.0.1:" in str(failed) and "HELLO this is not IMAP" in str(failed)


async def test_a_server_announcing_a_huge_literal_is_refused_before_it_is_read(
    settings: Settings, db: Database
) -> None:
    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK ready\r\n")
        await writer.drain()
        await reader.readline()  # imaplib asks for CAPABILITY first
        writer.write(b"* CAPABILITY {50000000000}\r\n")
        await writer.drain()
        await reader.read()  # until the client hangs up
        writer.close()

    failed = await _poll_a_fake_server(settings, db, huge)
    assert failed.kind == "protocol"
    assert "literal of 50000000000 bytes" in str(failed)


# -- VERP ------------------------------------------------------------------------------------------


async def test_a_bounce_without_a_dsn_to_the_verp_address_suppresses_its_recipient(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    settings = imap_settings(
        database_url, smtp.port, dovecot, folder, bounce_address="bounces@example.com"
    )
    await make_batch(db, ["ada@example.org", "bob@example.org"])
    await drain(settings)
    senders = {r.rcpt_tos[0]: r.mail_from for r in smtp.received}
    verp = Verp.from_settings(settings)
    assert verp is not None
    ada, bob = senders["ada@example.org"], senders["bob@example.org"]
    assert verp.recipient_id(ada) is not None and ada != bob
    local, domain = ada.split("@")
    tampered = local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain
    bob_id = verp.recipient_id(bob)
    # Bob's id with the tag of Ada's: a forged address for another recipient.
    forged = f"bounces+r{bob_id}-{local.rsplit('-', 1)[1]}@{domain}"
    dovecot.append(
        folder,
        plain_bounce(ada),
        plain_bounce(tampered),
        plain_bounce(forged),
        out_of_office(to=bob),  # an auto-reply to the envelope sender is no bounce
        plain_bounce(bob, subject="Delayed Mail (still being retried)"),
    )

    summary = await poll(settings, db)

    assert summary.outcomes == {"verp_bounce": 1, "not_report": 4}
    assert await suppressions(database_url) == [("ada@example.org", "hard_bounce")]
    assert dovecot.flags(folder) == [{"\\Seen"}, set(), set(), set(), set()]


async def test_the_worker_polls_as_a_maintenance_task(
    settings: Settings, db: Database, dovecot: Dovecot, folder: str, database_url: str
) -> None:
    dovecot.append(folder, dsn("gone@example.org"))
    from worker.main import worker_runtime

    async with worker_runtime(settings) as (app, _):
        await app.configure_task(BOUNCE_POLL_TASK).defer_async(timestamp=0)
    await drain(settings)
    assert await suppressions(database_url) == [("gone@example.org", "hard_bounce")]
    runs = await query(database_url, "SELECT task FROM mailroom_maintenance_runs")
    assert (BOUNCE_POLL_TASK,) in runs


async def test_a_failing_poll_fails_its_job_and_the_worker_goes_on(
    database_url: str, smtp: RecordingSMTPServer, db: Database, dovecot: Dovecot, folder: str
) -> None:
    settings = imap_settings(database_url, smtp.port, dovecot, folder, imap_password="wrong")
    await make_batch(db, ["ada@example.org"])
    failures = metric("mailroom_bounce_poll_failures_total", error="auth")
    from worker.main import worker_runtime

    async with worker_runtime(settings) as (app, _):
        await app.configure_task(BOUNCE_POLL_TASK).defer_async(timestamp=0)
    # The worker's own schedule may add a poll of its own: each one fails, or skips while the
    # other runs, and neither counts as a success.
    await drain(settings)
    assert [r.rcpt_tos for r in smtp.received] == [["ada@example.org"]]  # mail still went out
    jobs = await query(
        database_url, "SELECT status FROM procrastinate_jobs WHERE task_name = %s", BOUNCE_POLL_TASK
    )
    assert ("failed",) in jobs and all(status == "failed" for (status,) in jobs)
    assert metric("mailroom_bounce_poll_failures_total", error="auth") >= failures + 1
    runs = await query(database_url, "SELECT task FROM mailroom_maintenance_runs")
    assert (BOUNCE_POLL_TASK,) not in runs


async def test_a_skipped_poll_is_no_success_of_the_task(
    settings: Settings, db: Database, database_url: str
) -> None:
    from worker.main import worker_runtime

    async with worker_runtime(settings) as (app, _):
        await app.configure_task(BOUNCE_POLL_TASK).defer_async(timestamp=0)
    async with db.exclusively(POLL_LOCK):  # another poll is running throughout
        await drain(settings)
    runs = await query(database_url, "SELECT task FROM mailroom_maintenance_runs")
    assert (BOUNCE_POLL_TASK,) not in runs
    assert (
        await query(
            database_url, "SELECT 1 FROM procrastinate_jobs WHERE task_name = %s", BOUNCE_POLL_TASK
        )
        == []
    )  # the job succeeded (and was deleted)


# -- the command -----------------------------------------------------------------------------------


def _mailroom_poll(settings: Settings, **extra: str) -> subprocess.CompletedProcess[str]:
    env = environment(settings)
    env.update(
        {
            "MAILROOM_IMAP_HOST": str(settings.imap_host),
            "MAILROOM_IMAP_PORT": str(settings.imap_port),
            "MAILROOM_IMAP_USERNAME": str(settings.imap_username),
            "MAILROOM_IMAP_PASSWORD": PASSWORD,
            "MAILROOM_IMAP_MAILBOX": settings.imap_mailbox,
            "MAILROOM_IMAP_CA_FILE": str(settings.imap_ca_file),
            **extra,
        }
    )
    return subprocess.run(
        [sys.executable, "-m", "mailroom", "bounces", "poll"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_mailroom_bounces_poll_says_what_it_did_and_why_it_failed(
    settings: Settings, dovecot: Dovecot, folder: str, tmp_path: Path
) -> None:
    dovecot.append(folder, dsn("gone@example.org"), out_of_office())
    done = await asyncio.to_thread(_mailroom_poll, settings)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "2 message(s) read (1 not report, 1 report); 1 address(es) found (1 hard bounce),"
        " 1 newly suppressed; 1 marked on the server"
    )
    refused = await asyncio.to_thread(
        _mailroom_poll, settings, MAILROOM_IMAP_PASSWORD="sekrit-but-wrong"
    )
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        f"mailroom bounces poll: 127.0.0.1:{settings.imap_port} refused the login of 'bounces':"
        " [AUTHENTICATIONFAILED] Authentication failed."
    )
    assert "sekrit-but-wrong" not in refused.stderr + refused.stdout
