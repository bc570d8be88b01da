"""VERP envelope senders: written per recipient, read back only when Mailroom signed them, and
believed only from a message that clearly reports a failure. Also the settings of the bounce
mailbox and of the bounce address, fed garbage."""

from __future__ import annotations

from email.parser import BytesParser
from email.policy import compat32
from pathlib import Path
from typing import Any

import pytest

from shared.db import Database
from shared.settings import ConfigError, load_settings
from tests.conftest import drain, make_batch, make_settings, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_bounces import dsn, write_mbox
from worker.bounces import examine, examine_bytes, is_failure_notice, read_mbox
from worker.verp import Verp

VERP = Verp("bounces@example.org", "test-secret-key")


def message(raw: str) -> Any:
    return BytesParser(policy=compat32).parsebytes(raw.encode("utf-8", "surrogateescape"))


def notice(
    delivered_to: str, *, sender: str = "MAILER-DAEMON@mx.example.net", **headers: str
) -> str:
    subject = headers.pop("subject", "Undelivered Mail Returned to Sender")
    extra = "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in headers.items())
    return (
        f"Delivered-To: {delivered_to}\nFrom: {sender}\nTo: {delivered_to}\n"
        f"Subject: {subject}\n{extra}\nYour message could not be delivered.\n"
    )


def test_the_envelope_sender_names_its_recipient_and_fits_a_local_part() -> None:
    for recipient_id in (1, 1234, 9_223_372_036_854_775_807):
        address = VERP.envelope_sender(recipient_id)
        local, domain = address.split("@")
        assert domain == "example.org" and local.startswith("bounces+r")
        assert len(local) <= 64
        assert address.isascii() and address == address.lower()
        assert VERP.recipient_id(address) == recipient_id
        assert VERP.recipient_id(address.upper()) == recipient_id  # a server folded its case
    longest_local = "b" * 26
    address = Verp(f"{longest_local}@example.org", "k").envelope_sender(2**63 - 1)
    assert len(address.split("@")[0]) == 64


def test_a_forged_or_altered_verp_address_names_nobody() -> None:
    genuine = VERP.envelope_sender(1234)
    local, domain = genuine.split("@")
    tag = local.rsplit("-", 1)[1]
    for forged in (
        local[:-1] + ("a" if local[-1] != "a" else "b") + "@" + domain,  # one letter changed
        f"bounces+r1235-{tag}@{domain}",  # another recipient with this one's tag
        f"bounces+r01234-{tag}@{domain}",  # the same number spelt otherwise
        f"bounces+r1234-{tag}@example.net",  # another domain
        f"other+r1234-{tag}@{domain}",  # another bounce address
        f"bounces+r1234-{tag}x@{domain}",
        f"bounces+r1234-{tag[:-1]}@{domain}",
        "bounces@example.org",
        "",
        "\x00" * 10,
        "bounces+r1234-" + "é" * 16 + "@example.org",
    ):
        assert VERP.recipient_id(forged) is None, forged
    # Signed with another secret: not ours.
    assert Verp("bounces@example.org", "another-secret").recipient_id(genuine) is None


def test_the_address_a_bounce_was_delivered_to_is_read_from_its_headers_safely() -> None:
    ada = VERP.envelope_sender(7)
    assert VERP.recipients_in(message(notice(ada))) == [7]
    # X-Original-To, a display name, a folded header, another header first.
    raw = f"X-Original-To: Bounces\n <{ada}>\nTo: someone@example.net\nSubject: x\n\nbody\n"
    assert VERP.recipients_in(message(raw)) == [7]
    # A header value carrying a control character is not believed, whatever is in it.
    for unsafe in ("\x0c", "\x00", "\u2028", "\x85", "\udcff"):
        raw = f"Delivered-To: {ada}{unsafe}\nSubject: x\n\nbody\n"
        assert VERP.recipients_in(message(raw)) == [], repr(unsafe)
    # Hundreds of headers: only the first few are looked at.
    raw = "".join(f"To: n{i}@example.net\n" for i in range(500)) + f"To: {ada}\n\nbody\n"
    assert VERP.recipients_in(message(raw)) == []


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (notice("x@example.org"), True),
        (notice("x@example.org", sender="postmaster@example.net", subject="failure notice"), True),
        (notice("x@example.org", subject="=?utf-8?q?Undeliverable=3A_Hello?="), True),
        (notice("x@example.org", subject="Mail delivery failed: returning message"), True),
        (notice("x@example.org", subject="Delayed Mail (still being retried)"), False),
        (notice("x@example.org", subject="Delivery Status Notification (Delay)"), False),
        (notice("x@example.org", subject="Automatic reply: Hello"), False),
        (notice("x@example.org", sender="ada@example.org"), False),  # a person, same subject
        (notice("x@example.org", sender="MAILER-DAEMON <ada@example.org>"), False),
        (dsn("gone@example.org").decode(), True),
        (dsn("later@example.org", action="delayed", status="4.4.7").decode(), False),
        (dsn("busy@example.org", status="4.2.2").decode(), False),
    ],
)
def test_only_a_clear_failure_report_counts_as_a_bounce(raw: str, expected: bool) -> None:
    assert is_failure_notice(message(raw)) is expected


def test_a_dsn_that_names_its_recipient_wins_over_the_verp_address() -> None:
    raw = (
        dsn("gone@example.org")
        .decode()
        .replace(
            "From: MAILER-DAEMON", f"Delivered-To: {VERP.envelope_sender(5)}\nFrom: MAILER-DAEMON"
        )
    )
    examined = examine(message(raw), VERP)
    assert (examined.outcome, examined.recipient_ids) == ("report", [])
    assert [f.address for f in examined.findings] == ["gone@example.org"]
    # A DSN whose recipient is not an address falls back to the VERP address.
    broken = raw.replace("rfc822; gone@example.org", "rfc822; not an address").replace(
        "rfc822;gone@example.org", "rfc822;not an address"
    )
    examined = examine(message(broken), VERP)
    assert (examined.outcome, examined.recipient_ids) == ("verp_bounce", [5])


def test_without_a_bounce_address_nothing_is_read_from_the_envelope() -> None:
    examined = examine_bytes(notice(VERP.envelope_sender(5)).encode(), None)
    assert (examined.outcome, examined.recipient_ids) == ("not_report", [])


def test_mailroom_bounces_process_reads_verp_bounces_from_an_mbox(tmp_path: Path) -> None:
    path = write_mbox(
        tmp_path / "b.mbox",
        [notice(VERP.envelope_sender(3)).encode(), notice(VERP.envelope_sender(4) + "x").encode()],
    )
    summary = read_mbox(path, VERP)
    assert (summary.verp_bounces, summary.not_reports, summary.recipient_ids) == (1, 1, [3])


async def test_the_command_suppresses_a_verp_bounce_s_recipient_by_its_row(
    database_url: str, smtp: RecordingSMTPServer, db: Database
) -> None:
    from mailroom.cli import _suppress_findings

    await make_batch(db, ["Ada@example.org", "bob@example.org"])
    rows = dict(await query(database_url, "SELECT email, id FROM recipients"))
    settings = make_settings(database_url, smtp.port)
    assert await _suppress_findings(settings, [], [rows["Ada@example.org"], 999_999]) == 1
    assert await query(database_url, "SELECT address, reason FROM suppressions") == [
        ("Ada@example.org", "hard_bounce")
    ]


async def test_each_message_goes_out_with_its_own_verp_envelope_sender(
    database_url: str, smtp: RecordingSMTPServer, db: Database
) -> None:
    settings = make_settings(database_url, smtp.port, bounce_address="Bounces@Example.com")
    await make_batch(db, ["ada@example.org", "bob@example.org"])
    await drain(settings)
    verp = Verp.from_settings(settings)
    assert verp is not None
    ids = {r.rcpt_tos[0]: verp.recipient_id(r.mail_from) for r in smtp.received}
    rows = await query(database_url, "SELECT email, id FROM recipients")
    assert ids == dict(rows)
    for received in smtp.received:
        assert received.mail_from.startswith("bounces+r")
        assert received.message["From"] == "sender@example.com"  # the header is unchanged


async def test_without_a_bounce_address_the_envelope_sender_is_the_from_address(
    database_url: str, smtp: RecordingSMTPServer, db: Database
) -> None:
    await make_batch(db, ["ada@example.org"])
    await drain(make_settings(database_url, smtp.port))
    assert [r.mail_from for r in smtp.received] == ["sender@example.com"]


# -- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "variable"),
    [
        ({"bounce_address": "not an address"}, "MAILROOM_BOUNCE_ADDRESS"),
        ({"bounce_address": "b+x@example.org"}, "MAILROOM_BOUNCE_ADDRESS"),
        ({"bounce_address": "b" * 27 + "@example.org"}, "MAILROOM_BOUNCE_ADDRESS"),
        ({"bounce_address": "b@example.org\r\nBcc: x@example.net"}, "MAILROOM_BOUNCE_ADDRESS"),
        ({"bounce_address": "bé@example.org"}, "MAILROOM_BOUNCE_ADDRESS"),
        ({"imap_host": "imap.example.org\n"}, "MAILROOM_IMAP_HOST"),
        ({"imap_host": "imap.example.org"}, "MAILROOM_IMAP_USERNAME"),
        ({"imap_host": "h", "imap_username": "u"}, "MAILROOM_IMAP_PASSWORD"),
        ({"imap_security": "ssl"}, "MAILROOM_IMAP_SECURITY"),
        ({"imap_port": 0}, "MAILROOM_IMAP_PORT"),
        ({"imap_mailbox": 'IN"BOX'}, "MAILROOM_IMAP_MAILBOX"),
        ({"imap_mailbox": "a\r\nb"}, "MAILROOM_IMAP_MAILBOX"),
        ({"imap_mailbox": ""}, "MAILROOM_IMAP_MAILBOX"),
        ({"imap_processed_mailbox": "Done*"}, "MAILROOM_IMAP_PROCESSED_MAILBOX"),
        ({"imap_processed_mailbox": "inbox"}, "MAILROOM_IMAP_PROCESSED_MAILBOX"),
        ({"imap_ca_file": "/no/such/ca.pem"}, "MAILROOM_IMAP_CA_FILE"),
        ({"imap_poll_interval_seconds": 90}, "MAILROOM_IMAP_POLL_INTERVAL_SECONDS"),
        ({"imap_poll_interval_seconds": 0}, "MAILROOM_IMAP_POLL_INTERVAL_SECONDS"),
        ({"imap_max_messages": 0}, "MAILROOM_IMAP_MAX_MESSAGES"),
        ({"imap_max_message_bytes": 10}, "MAILROOM_IMAP_MAX_MESSAGE_BYTES"),
        ({"imap_timeout_seconds": -1}, "MAILROOM_IMAP_TIMEOUT_SECONDS"),
    ],
)
def test_bad_imap_and_bounce_settings_are_a_config_error_naming_the_variable(
    values: dict[str, Any], variable: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None, **values)
    assert variable in str(error.value)


def test_the_imap_password_is_never_shown_in_a_config_error() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(_env_file=None, imap_password=["s3cret-imap-password"])
    assert "MAILROOM_IMAP_PASSWORD" in str(error.value)
    assert "s3cret-imap-password" not in str(error.value)


def test_the_imap_port_follows_the_security_unless_given() -> None:
    assert load_settings(_env_file=None).imap_port_or_default == 993
    assert load_settings(_env_file=None, imap_security="starttls").imap_port_or_default == 143
    assert load_settings(_env_file=None, imap_port=1993).imap_port_or_default == 1993
