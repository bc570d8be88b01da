"""Bounce and complaint reports read from a mailbox suppress the addresses they name.

The reports are built here as their RFCs describe them (a DSN, RFC 3464; a feedback report,
RFC 5965), written to a real mbox file and read by ``mailroom bounces process``.
"""

from __future__ import annotations

import mailbox
import os
import subprocess
import sys
from email.message import Message
from email.mime.text import MIMEText
from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path

import pytest

from tests.conftest import query
from worker.bounces import findings_in, read_mbox


def dsn(address: str, *, action: str = "failed", status: str = "5.1.1") -> bytes:
    """A delivery status notification as Postfix writes one."""
    return f"""\
From: MAILER-DAEMON@mx.example.net
To: sender@example.com
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B1"

--B1
Content-Type: text/plain

I'm sorry to have to inform you that your message could not be delivered.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.net
Arrival-Date: Wed, 25 Nov 2026 06:00:00 +0000

Final-Recipient: rfc822; {address}
Original-Recipient: rfc822;{address}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.example.org
Diagnostic-Code: smtp; 550 5.1.1 <mailbox> User unknown

--B1
Content-Type: text/rfc822-headers

From: sender@example.com
To: {address}
Subject: Hello

--B1--
""".encode()


def arf(address: str, *, with_rcpt_to: bool = True) -> bytes:
    """A feedback-loop complaint (RFC 5965), with or without Original-Rcpt-To."""
    rcpt_to = f"Original-Rcpt-To: <{address}>\n" if with_rcpt_to else ""
    return f"""\
From: fbl@isp.example.net
To: abuse@example.com
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="B2"

--B2
Content-Type: text/plain

This is an email abuse report for an email message received.

--B2
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: ExampleFBL/1.0
Version: 1
{rcpt_to}
--B2
Content-Type: message/rfc822

From: sender@example.com
To: {address}
Subject: Hello

Hi, this came through Mailroom.

--B2--
""".encode()


def write_mbox(path: Path, messages: list[Message | bytes]) -> Path:
    box = mailbox.mbox(path)
    for message in messages:
        box.add(message)
    box.flush()
    box.close()
    return path


def test_a_permanent_failure_and_a_complaint_are_found_and_nothing_else(tmp_path: Path) -> None:
    ordinary = MIMEText("An out-of-office reply, not a report.")
    ordinary["Subject"] = "Out of office"
    path = write_mbox(
        tmp_path / "bounces.mbox",
        [
            dsn("gone@example.org"),
            dsn("later@example.org", action="delayed", status="4.4.7"),
            dsn("busy@example.org", status="4.2.2"),
            arf("grace@example.org"),
            arf("ada@example.org", with_rcpt_to=False),
            ordinary,
            b"From: x\n\n\xff\xfe garbage that is not MIME",
        ],
    )
    summary = read_mbox(path)
    assert summary.messages == 7
    assert (summary.reports, summary.not_reports) == (5, 2)
    assert [(f.address, f.reason) for f in summary.findings] == [
        ("gone@example.org", "hard_bounce"),
        ("grace@example.org", "complaint"),
        ("ada@example.org", "complaint"),
    ]
    assert "5.1.1" in summary.findings[0].detail


def test_a_report_naming_no_valid_address_finds_nothing() -> None:
    for report in (dsn("not an address"), arf("nobody")):
        assert list(findings_in(BytesParser(policy=compat32).parsebytes(report))) == []


def _mailroom(*args: str, database_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env["MAILROOM_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "mailroom", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
def test_mailroom_bounces_process_suppresses_once_and_says_what_it_did(
    tmp_path: Path, database_url: str
) -> None:
    path = write_mbox(tmp_path / "b.mbox", [dsn("gone@example.org"), arf("grace@example.org")])
    dry = _mailroom(
        "bounces", "process", "--mbox", str(path), "--dry-run", database_url=database_url
    )
    assert dry.returncode == 0, dry.stderr
    assert "hard_bounce\tgone@example.org" in dry.stdout
    assert "nothing changed (--dry-run)" in dry.stderr

    first = _mailroom("bounces", "process", "--mbox", str(path), database_url=database_url)
    assert first.returncode == 0, first.stderr
    assert "2 newly suppressed" in first.stderr
    again = _mailroom("bounces", "process", "--mbox", str(path), database_url=database_url)
    assert "0 newly suppressed" in again.stderr


@pytest.mark.slow
async def test_the_suppressions_land_in_the_database(tmp_path: Path, database_url: str) -> None:
    path = write_mbox(tmp_path / "b.mbox", [dsn("Gone@Example.org"), arf("grace@example.org")])
    result = _mailroom("bounces", "process", "--mbox", str(path), database_url=database_url)
    assert result.returncode == 0, result.stderr
    rows = await query(database_url, "SELECT address, reason FROM suppressions ORDER BY id")
    assert rows == [("Gone@example.org", "hard_bounce"), ("grace@example.org", "complaint")]


@pytest.mark.slow
def test_a_missing_mbox_is_one_clear_line_and_exit_2(tmp_path: Path, database_url: str) -> None:
    result = _mailroom(
        "bounces", "process", "--mbox", str(tmp_path / "nope.mbox"), database_url=database_url
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"mailroom bounces: cannot read {tmp_path / 'nope.mbox'}: no such mbox file:"
        f" {tmp_path / 'nope.mbox'}"
    ]
