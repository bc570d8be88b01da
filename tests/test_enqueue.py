"""Enqueueing is one transaction: a commit leaves every job, a failure leaves nothing."""

from __future__ import annotations

import psycopg
import pytest
from aiohttp.test_utils import TestClient

from shared.db import ANALYZE_AFTER_ROWS, Database, NewBatch, NewRecipient, analyze_grown_tables
from shared.queue import EMAIL_QUEUE, SEND_CHUNK_TASK
from shared.settings import Settings
from tests.conftest import AUTH, query

BATCH = {
    "recipients": ["a@example.org", "b@example.org", "c@example.org"],
    "subject": "S",
    "body": "B",
}


async def _counts(database_url: str) -> tuple[int, int, int]:
    rows = await query(
        database_url,
        "SELECT (SELECT count(*) FROM batches), (SELECT count(*) FROM recipients),"
        " (SELECT count(*) FROM procrastinate_jobs)",
    )
    return rows[0]  # type: ignore[return-value]


async def test_a_committed_batch_has_one_job_per_chunk_carrying_only_ids(
    client: TestClient, settings: Settings
) -> None:
    response = await client.post("/api/batches", json=BATCH, headers=AUTH)
    assert response.status == 201
    url = settings.database_url or ""
    assert await _counts(url) == (1, 3, 1)
    jobs = await query(
        url, "SELECT queue_name, task_name, status::text, args FROM procrastinate_jobs"
    )
    ids = await query(url, "SELECT id FROM recipients ORDER BY id")
    assert jobs == [
        (
            EMAIL_QUEUE,
            SEND_CHUNK_TASK,
            "todo",
            {"batch_id": response_id(await response.json()), "recipient_ids": [i for (i,) in ids]},
        )
    ]


async def test_a_large_batch_is_cut_into_chunks_of_the_configured_size_in_order(
    db: Database, settings: Settings
) -> None:
    url = settings.database_url or ""
    chunked = Database(db.pool, chunk_size=4)
    batch_id = await chunked.create_batch(
        NewBatch(
            created_by="test",
            subject_template="S",
            body_template="B",
            recipients=[NewRecipient(f"r{i}@example.org") for i in range(10)],
        )
    )
    jobs = await query(url, "SELECT args FROM procrastinate_jobs ORDER BY id")
    ids = [i for (i,) in await query(url, "SELECT id FROM recipients ORDER BY id")]
    assert [args["recipient_ids"] for (args,) in jobs] == [ids[0:4], ids[4:8], ids[8:10]]
    assert {args["batch_id"] for (args,) in jobs} == {str(batch_id)}


def response_id(body: dict[str, object]) -> str:
    return str(body["id"])


async def test_a_failure_after_the_recipients_insert_leaves_no_batch_recipient_or_job(
    client: TestClient, settings: Settings
) -> None:
    url = settings.database_url or ""
    # The job insert runs after the recipients insert in the same transaction; make it fail.
    await query(
        url,
        "CREATE FUNCTION fail_job_insert() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'injected failure'; END $$;"
        " CREATE TRIGGER fail_job_insert BEFORE INSERT ON procrastinate_jobs"
        " FOR EACH ROW EXECUTE FUNCTION fail_job_insert();",
    )
    response = await client.post("/api/batches", json=BATCH, headers=AUTH)
    assert response.status == 500
    body = await response.json()
    assert body["error"]["code"] == "internal_error"
    assert "injected" not in body["error"]["message"]  # no internals leak to the client
    assert await _counts(url) == (0, 0, 0)


async def test_a_failure_inside_create_batch_rolls_back_the_batch_row(
    db: Database, settings: Settings
) -> None:
    url = settings.database_url or ""
    # The unique (batch, address) index is the backstop behind validation's de-duplication.
    duplicate = NewBatch(
        created_by="test",
        subject_template="S",
        body_template="B",
        recipients=[NewRecipient("a@example.org"), NewRecipient("A@example.org")],
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        await db.create_batch(duplicate)
    assert await _counts(url) == (0, 0, 0)


def _batch_of(count: int) -> NewBatch:
    return NewBatch(
        created_by="test",
        subject_template="S",
        body_template="B",
        recipients=[NewRecipient(f"user{i}@example.org") for i in range(count)],
    )


async def _status_statistics(url: str) -> dict[str, str]:
    rows = await query(
        url,
        "SELECT tablename::text, most_common_vals::text FROM pg_stats"
        " WHERE tablename IN ('procrastinate_jobs', 'recipients') AND attname = 'status'",
    )
    return dict(rows)  # type: ignore[arg-type]


async def test_a_large_batch_leaves_statistics_that_show_its_waiting_jobs(
    db: Database, settings: Settings
) -> None:
    # Without them the fetch plans to read every waiting job (see analyze_grown_tables).
    url = settings.database_url or ""
    await db.create_batch(_batch_of(10))
    assert await _status_statistics(url) == {}  # a small batch is left to autovacuum
    await db.create_batch(_batch_of(ANALYZE_AFTER_ROWS))
    assert await _status_statistics(url) == {
        "procrastinate_jobs": "{todo}",
        "recipients": "{queued}",
    }


async def test_a_failed_analyze_is_logged_not_raised(db: Database) -> None:
    async with db.pool.connection() as conn:
        assert await analyze_grown_tables(conn, {"no_such_table": 5000}) == []
