"""The dev SMTP capture: it keeps what it accepts, and address tags make it fail on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from procrastinate.worker import Worker

from mailroom.capture import Behaviour, MailCapture, behaviour_for
from shared.settings import Settings
from tests.conftest import make_batch, make_settings, query
from tests.processes import wait_until
from web.captured_mail import CapturedMail
from worker.main import worker_options, worker_runtime

MESSAGE = b"From: s@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
async def capture(tmp_path: Path) -> AsyncIterator[tuple[MailCapture, int]]:
    capture = MailCapture(tmp_path / "mail", slow_reply_seconds=1.5)
    port = await capture.start("127.0.0.1", 0)
    yield capture, port
    await capture.close()


async def _send(port: int, to: str, *, reply_timeout: float = 5) -> None:
    await aiosmtplib.send(
        MESSAGE,
        sender="s@example.com",
        recipients=[to],
        hostname="127.0.0.1",
        port=port,
        timeout=reply_timeout,
    )


@pytest.mark.parametrize(
    ("address", "behaviour"),
    [
        ("ann@example.org", Behaviour.ACCEPT),
        ("ann+bounce@example.org", Behaviour.BOUNCE),
        ("ANN+BOUNCE@EXAMPLE.ORG", Behaviour.BOUNCE),
        ("ann+news+tempfail@example.org", Behaviour.TEMPFAIL),
        ("ann+tempfail+news@example.org", Behaviour.ACCEPT),  # the last tag decides
        ("ann+slow@example.org", Behaviour.SLOW),
        ("ann+reject@example.org", Behaviour.REJECT),
        ("ann+unknown@example.org", Behaviour.ACCEPT),
        ("ann+@example.org", Behaviour.ACCEPT),
        ("+bounce", Behaviour.BOUNCE),  # no domain: still read, never raises
        ("", Behaviour.ACCEPT),
        ("a@b@c+bounce", Behaviour.ACCEPT),  # the tag must come before the last @
        ("\udcff+reject@x", Behaviour.REJECT),
    ],
)
def test_the_last_tag_of_the_local_part_picks_the_behaviour(
    address: str, behaviour: Behaviour
) -> None:
    assert behaviour_for(address) is behaviour


async def test_each_tag_gets_its_reply_and_only_accepted_mail_is_kept(
    capture: tuple[MailCapture, int],
) -> None:
    mail, port = capture
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as bounced:
        await _send(port, "a+bounce@example.org")
    assert bounced.value.recipients[0].code == 550
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as deferred:
        await _send(port, "b+tempfail@example.org")
    assert deferred.value.recipients[0].code == 451
    await _send(port, "B+TempFail@example.org")  # the second try, in any case, is accepted
    with pytest.raises(aiosmtplib.SMTPDataError) as rejected:
        await _send(port, "c+reject@example.org")
    assert rejected.value.code == 554
    with pytest.raises(aiosmtplib.SMTPTimeoutError):
        await _send(port, "d+slow@example.org", reply_timeout=0.5)
    await _send(port, "e@example.org")

    kept = CapturedMail(mail.directory).messages()
    assert len(kept) == 2


async def test_a_worker_against_the_tags_shows_a_retry_a_bounce_a_rejection_and_a_timeout(
    capture: tuple[MailCapture, int], database_url: str
) -> None:
    mail, port = capture
    settings: Settings = make_settings(
        database_url,
        port,
        smtp_timeout_seconds=0.5,
        retry_base_seconds=0.01,
        retry_cap_seconds=0.05,
        retry_max_attempts=2,
    )
    addresses = {
        "plain@example.org": "sent",
        "ann+tempfail@example.org": "sent",
        "bob+bounce@example.org": "dead",
        "cy+reject@example.org": "dead",
        "di+slow@example.org": "dead",
    }
    async with worker_runtime(settings) as (app, deps):
        await make_batch(deps.db, list(addresses))
        worker = Worker(
            app=app,
            **worker_options(
                settings, deps, install_signal_handlers=False, fetch_job_polling_interval=0.05
            ),
        )
        task = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]

        async def all_final() -> bool:
            rows = await query(
                database_url, "SELECT count(*) FROM recipients WHERE status IN ('sent', 'dead')"
            )
            return bool(rows[0][0] == len(addresses))

        try:
            await wait_until(all_final, 30, "every recipient to be sent or dead")
        finally:
            worker.stop()  # type: ignore[no-untyped-call]
            await task

    rows = await query(database_url, "SELECT email, status, attempts FROM recipients")
    assert {email: status for email, status, _ in rows} == addresses
    attempts = {email: n for email, _, n in rows}
    assert attempts["ann+tempfail@example.org"] == 2
    assert attempts["di+slow@example.org"] == 2
    suppressed = await query(database_url, "SELECT address, reason FROM suppressions")
    assert suppressed == [("bob+bounce@example.org", "hard_bounce")]
    kept = sorted(m.to[0] for m in CapturedMail(mail.directory).messages())
    assert kept == ["ann+tempfail@example.org", "plain@example.org"]
