"""Failures inside the worker never strand a recipient: they retry or become dead letters."""

from __future__ import annotations

from shared.db import Database, NewBatch, NewRecipient, RecipientForSend
from shared.settings import Settings
from tests.conftest import drain, query, retries_due
from tests.smtp_server import RecordingSMTPServer
from worker.drafting import Draft


async def _one(db: Database, subject: str = "S") -> None:
    await db.create_batch(
        NewBatch(
            created_by="t",
            subject_template=subject,
            body_template="B",
            recipients=[NewRecipient("x@example.org")],
        )
    )


async def test_a_database_error_at_the_start_of_an_attempt_is_retried(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _one(db)
    url = settings.database_url or ""
    await query(
        url,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'database hiccup'; END $$;"
        " CREATE TRIGGER refuse BEFORE UPDATE ON recipients"
        " FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    # More tries than the attempt budget: database errors do not spend it.
    for _ in range(settings.retry_max_attempts + 2):
        await drain(settings)
        await retries_due(url)
    jobs = await query(
        url, "SELECT status::text, attempts FROM procrastinate_jobs WHERE queue_name = 'emails'"
    )
    assert len(jobs) == 1 and jobs[0][0] == "todo", "still scheduled for another try, not failed"
    assert jobs[0][1] > settings.retry_max_attempts
    assert await query(url, "SELECT status, attempts FROM recipients") == [("queued", 0)]
    await query(url, "DROP TRIGGER refuse ON recipients")
    await retries_due(url)
    await drain(settings)
    assert await query(url, "SELECT status FROM recipients") == [("sent",)]
    assert len(smtp.received) == 1


class BrokenDrafter:
    async def draft(self, recipient: RecipientForSend) -> Draft:
        raise RuntimeError("drafter bug")


async def test_a_bug_while_drafting_makes_a_visible_dead_letter(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _one(db)
    await drain(settings, drafters={"template": BrokenDrafter()})
    row = await query(settings.database_url or "", "SELECT status, last_error FROM recipients")
    assert row == [
        ("dead", "internal error: RuntimeError (see send_email_crashed in the worker log)")
    ]
    assert smtp.received == []


async def test_a_template_that_fails_at_send_time_is_a_dead_letter(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # Validation renders once per shape of fields; values can still break a template later.
    await _one(db, subject="{{ email | int // 0 }}")
    await drain(settings)
    row = await query(
        settings.database_url or "", "SELECT status, attempts, last_error FROM recipients"
    )
    assert row[0][:2] == ("dead", 1)
    assert row[0][2].startswith("template: ")


async def test_a_template_that_renders_a_nul_character_is_a_dead_letter_not_an_outage(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _one(db, subject='Hi {{ "\\x00" }}')
    await drain(settings)
    row = await query(
        settings.database_url or "", "SELECT status, attempts, last_error FROM recipients"
    )
    assert row == [
        (
            "dead",
            1,
            "drafted subject: character U+0000 (NUL) at position 4 is not allowed in an email"
            " header",
        )
    ]
    assert smtp.received == []


async def test_a_subject_with_a_control_character_is_a_dead_letter_and_never_sent(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # An escape sequence survives rendering (it is not a line break); the drafter refuses it
    # like any other character that cannot go into a header (as the message builder would).
    await _one(db, subject='Hi {{ "\\x1b" }}[31mthere')
    await drain(settings)
    row = await query(
        settings.database_url or "", "SELECT status, attempts, last_error FROM recipients"
    )
    assert row == [
        (
            "dead",
            1,
            "drafted subject: character U+001B (escape) at position 4 is not allowed in an"
            " email header",
        )
    ]
    assert smtp.received == []
