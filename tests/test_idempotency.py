"""Each email is sent once: duplicate jobs, racing workers and failed sends included."""

from __future__ import annotations

import asyncio
import uuid

from shared.db import Database, NewBatch, NewRecipient
from shared.settings import Settings
from tests.conftest import EMAIL_JOB_STATUSES, NO_RETRY_WITHIN_A_DRAIN, drain, query, retries_due
from tests.smtp_server import RecordingSMTPServer, Rule


async def _one_recipient_batch(
    db: Database, address: str = "once@example.org"
) -> tuple[uuid.UUID, int]:
    batch_id = await db.create_batch(
        NewBatch(
            created_by="test",
            subject_template="S",
            body_template="Body",
            recipients=[NewRecipient(address)],
        )
    )
    rows = await db.list_recipients(batch_id)
    return batch_id, rows[0]["id"]


async def _duplicate_job(database_url: str, recipient_id: int) -> None:
    await query(
        database_url,
        "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW('emails', 'send_email', 0, NULL, NULL,"
        " jsonb_build_object('recipient_id', %s::bigint), NULL)::procrastinate_job_to_defer_v1])",
        recipient_id,
    )


async def test_the_same_job_run_twice_sends_once(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _one_recipient_batch(db)
    await drain(settings)
    assert len(smtp.received) == 1
    # Run the very same job again, as a retry after a lost acknowledgement would.
    url = settings.database_url or ""
    await query(url, "UPDATE procrastinate_jobs SET status = 'todo'")
    await drain(settings)
    assert len(smtp.received) == 1
    assert await query(url, "SELECT status FROM recipients") == [("sent",)]


async def test_a_job_that_finds_the_key_committed_acknowledges_without_sending(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    _, recipient_id = await _one_recipient_batch(db)
    url = settings.database_url or ""
    await drain(settings)
    # Even if the recipient row were somehow back to queued, the committed key wins.
    await query(url, "UPDATE recipients SET status = 'queued'")
    await _duplicate_job(url, recipient_id)
    await drain(settings)
    assert len(smtp.received) == 1
    assert await query(url, EMAIL_JOB_STATUSES) == []


async def test_two_workers_racing_on_one_recipient_send_once(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    _, recipient_id = await _one_recipient_batch(db)
    url = settings.database_url or ""
    for _ in range(3):
        await _duplicate_job(url, recipient_id)
    # A slow server keeps the first claim open while the duplicates arrive and wait on it.
    smtp.data_delay_seconds = 0.5
    await asyncio.gather(drain(settings), drain(settings), drain(settings))
    assert len(smtp.received) == 1
    assert await query(url, "SELECT count(*) FROM processed_jobs") == [(1,)]
    assert await query(url, EMAIL_JOB_STATUSES) == []  # succeeded jobs are deleted as they finish


async def test_a_failed_send_rolls_the_claim_back_and_a_retry_sends(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _one_recipient_batch(db, "flaky@example.org")
    url = settings.database_url or ""
    settings = settings.model_copy(update=NO_RETRY_WITHIN_A_DRAIN)
    smtp.rules["flaky@example.org"] = Rule("451 4.3.0 try again later", times=1)
    await drain(settings)
    assert smtp.received == []
    assert await query(url, "SELECT count(*) FROM processed_jobs") == [(0,)]
    row = await query(url, "SELECT status, attempts, last_error FROM recipients")
    assert row[0][0] == "retrying" and row[0][1] == 1
    assert "451" in row[0][2]
    # The retry is scheduled with backoff; the test moves time on to it.
    await retries_due(url)
    await drain(settings)
    assert len(smtp.received) == 1
    assert await query(url, "SELECT status, attempts, last_error FROM recipients") == [
        ("sent", 2, None)
    ]
