"""A batch goes out in chunk jobs, and every recipient in a chunk keeps its own fate.

Each recipient of a chunk has its own status, attempts, claim key and dead letter; one that
must try again leaves the chunk for a job of its own, and a chunk that runs again skips what
was already decided.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from shared.db import Database, Selection
from shared.queue import SEND_CHUNK_TASK, SEND_EMAIL_TASK
from shared.settings import Settings
from tests.conftest import EMAIL_JOB_STATUSES, NO_RETRY_WITHIN_A_DRAIN, drain, make_batch, query
from tests.processes import wait_until
from tests.smtp_server import RecordingSMTPServer, Rule


async def _batch(db: Database, addresses: Sequence[str], **options: Any) -> uuid.UUID:
    return await make_batch(
        db, addresses, subject_template="Hello {{ email }}", body_template="Body", **options
    )


async def _recipients(url: str) -> list[tuple[str, str, int, bool]]:
    rows = await query(url, "SELECT email, status, attempts, own_job FROM recipients ORDER BY id")
    return [(e, s, a, o) for e, s, a, o in rows]


async def _requeue_chunk(url: str, batch_id: uuid.UUID) -> None:
    """Put the batch's chunk back in the queue, as the stalled-job sweep does after a crash."""
    ids = [i for (i,) in await query(url, "SELECT id FROM recipients ORDER BY id")]
    await query(
        url,
        "SELECT procrastinate_defer_jobs_v1(ARRAY[ROW('emails', %s, 0, NULL, NULL,"
        " jsonb_build_object('batch_id', %s::text, 'recipient_ids', %s::jsonb), NULL)"
        "::procrastinate_job_to_defer_v1])",
        SEND_CHUNK_TASK,
        str(batch_id),
        str(ids),
    )


async def test_a_chunk_with_mixed_outcomes_leaves_each_recipient_in_its_own_state(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    settings = settings.model_copy(update=NO_RETRY_WITHIN_A_DRAIN)
    smtp.rules["gone@example.org"] = Rule("550 5.1.1 no such user")
    smtp.rules["later@example.org"] = Rule("451 4.3.0 try again later", times=1)
    await _batch(db, ["a@example.org", "gone@example.org", "later@example.org", "b@example.org"])
    await drain(settings)
    assert await _recipients(url) == [
        ("a@example.org", "sent", 1, False),
        ("gone@example.org", "dead", 1, False),
        ("later@example.org", "retrying", 1, True),
        ("b@example.org", "sent", 1, False),
    ]
    # The chunk is done; the 451 waits in a job of its own, behind fresh emails.
    jobs = await query(
        url,
        "SELECT task_name, status::text, priority, args FROM procrastinate_jobs"
        " WHERE queue_name = 'emails'",
    )
    later_id = (await query(url, "SELECT id FROM recipients WHERE email = 'later@example.org'"))[0]
    assert jobs == [(SEND_EMAIL_TASK, "todo", -1, {"recipient_id": later_id[0]})]

    await query(url, "UPDATE procrastinate_jobs SET scheduled_at = now()")  # its time has come
    await drain(settings)
    assert await _recipients(url) == [
        ("a@example.org", "sent", 1, False),
        ("gone@example.org", "dead", 1, False),
        ("later@example.org", "sent", 2, True),
        ("b@example.org", "sent", 1, False),
    ]
    assert sorted(smtp.to_addresses()) == ["a@example.org", "b@example.org", "later@example.org"]


async def test_a_chunk_that_runs_again_skips_what_was_sent_and_what_left_it(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    settings = settings.model_copy(update=NO_RETRY_WITHIN_A_DRAIN)
    smtp.rules["later@example.org"] = Rule("451 4.3.0 try again later", times=1)
    batch_id = await _batch(db, ["a@example.org", "later@example.org", "b@example.org"])
    await drain(settings)
    await query(url, "UPDATE procrastinate_jobs SET scheduled_at = now() + interval '1 hour'")
    await _requeue_chunk(url, batch_id)
    await drain(settings)
    # Nothing was sent twice, and the recipient with a job of its own was left to that job.
    assert sorted(smtp.to_addresses()) == ["a@example.org", "b@example.org"]
    assert ("later@example.org", "retrying", 1, True) in await _recipients(url)


async def test_a_chunk_interrupted_mid_send_sends_the_rest_when_it_runs_again(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    addresses = [f"r{i}@example.org" for i in range(6)]
    batch_id = await _batch(db, addresses)
    # A worker died mid-chunk: two were sent (keys committed), the rest were left "sending".
    await query(
        url,
        "UPDATE recipients SET status = 'sending', attempts = 1;"
        " INSERT INTO processed_jobs (idempotency_key)"
        "  SELECT 'email:' || id FROM recipients ORDER BY id LIMIT 2;"
        " UPDATE recipients SET status = 'sent' WHERE id IN (SELECT id FROM recipients"
        "  ORDER BY id LIMIT 2);"
        " DELETE FROM procrastinate_jobs",
    )
    await _requeue_chunk(url, batch_id)
    await drain(settings)
    assert sorted(smtp.to_addresses()) == sorted(addresses[2:])
    assert [s for _, s, _, _ in await _recipients(url)] == ["sent"] * 6
    assert [a for _, _, a, _ in await _recipients(url)] == [1, 1, 2, 2, 2, 2]


async def test_one_slow_address_does_not_hold_the_rest_of_its_chunk(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    slow = settings.model_copy(update={"worker_concurrency": 4, "job_timeout_seconds": 10})
    smtp.rules["stuck@example.org"] = Rule("451 4.4.2 slow", times=1, delay_seconds=3.0)
    addresses = ["stuck@example.org", *(f"r{i}@example.org" for i in range(20))]
    await _batch(db, addresses)
    worker = asyncio.create_task(drain(slow))
    try:
        # Every other recipient is delivered while the first one's reply is still coming.
        await wait_until(lambda: _sent_count(url, 20), 10, "the rest of the chunk to be sent")
        stuck = await query(url, "SELECT status FROM recipients WHERE email = 'stuck@example.org'")
        assert stuck == [("sending",)]
    finally:
        await worker


async def _sent_count(url: str, expected: int) -> bool:
    rows = await query(url, "SELECT count(*) FROM recipients WHERE status = 'sent'")
    return bool(rows[0][0] >= expected)


async def test_cancelling_mid_chunk_stops_what_has_not_been_sent(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    one_at_a_time = settings.model_copy(update={"worker_concurrency": 1})
    smtp.data_delay_seconds = 0.2
    addresses = [f"r{i}@example.org" for i in range(10)]
    batch_id = await _batch(db, addresses)
    worker = asyncio.create_task(drain(one_at_a_time))
    await wait_until(lambda: _sent_count(url, 2), 10, "the chunk to be under way")
    cancelled = await db.cancel(batch_id)
    await worker
    statuses = [s for _, s, _, _ in await _recipients(url)]
    sent = statuses.count("sent")
    assert cancelled is not None and cancelled >= 1
    assert statuses == ["sent"] * sent + ["cancelled"] * (10 - sent)
    assert len(smtp.received) == sent < 10


async def test_cancelling_before_the_chunk_runs_cancels_its_job(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    batch_id = await _batch(db, ["a@example.org", "b@example.org"])
    assert await db.cancel(batch_id) == 2
    assert await query(url, "SELECT status::text FROM procrastinate_jobs") == [("cancelled",)]
    await drain(settings)
    assert smtp.received == []


async def test_a_redrive_sends_dead_letters_in_chunks_of_their_batch(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    chunked = Database(db.pool, chunk_size=2)
    first = await _batch(chunked, [f"a{i}@example.org" for i in range(3)])
    second = await _batch(chunked, [f"b{i}@example.org" for i in range(2)])
    await query(url, "DELETE FROM procrastinate_jobs; UPDATE recipients SET status = 'dead'")
    assert await chunked.redrive(Selection(everything=True)) == 5
    jobs = await query(url, "SELECT args FROM procrastinate_jobs ORDER BY id")
    assert [(args["batch_id"], len(args["recipient_ids"])) for (args,) in jobs] == [
        (str(first), 2),
        (str(first), 1),
        (str(second), 2),
    ]
    await drain(settings)
    assert len(smtp.received) == 5


async def test_a_job_queued_by_the_version_before_chunks_still_sends(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    await _batch(db, ["old@example.org"])
    # What the previous version queued: one send_email job per recipient, carrying its id.
    await query(
        url,
        "DELETE FROM procrastinate_jobs;"
        " SELECT procrastinate_defer_jobs_v1(ARRAY(SELECT ROW('emails', 'send_email', 0, NULL,"
        " NULL, jsonb_build_object('recipient_id', id), NULL)::procrastinate_job_to_defer_v1"
        " FROM recipients))",
    )
    await drain(settings)
    assert smtp.to_addresses() == {"old@example.org": 1}
    assert await query(url, "SELECT status, attempts FROM recipients") == [("sent", 1)]


async def test_a_send_in_flight_when_its_batch_is_cancelled_is_not_retried_after_a_4xx(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    url = settings.database_url or ""
    slow = Rule("451 4.3.0 try again later", times=1, delay_seconds=1.0)
    smtp.rules["slow@example.org"] = slow
    batch_id = await _batch(db, ["slow@example.org"])
    worker = asyncio.create_task(drain(settings))
    # The server has the RCPT (so the claim holds the row) when the operator cancels.
    await wait_until(lambda: _seen(slow), 10, "the send to be in flight")
    assert await db.cancel(batch_id) == 0  # nothing cancellable: the one send is in flight
    await worker
    assert await _recipients(url) == [("slow@example.org", "cancelled", 1, True)]
    assert await query(url, EMAIL_JOB_STATUSES) == []
    await drain(settings)
    assert smtp.received == []


async def _seen(rule: Rule) -> bool:
    return rule.seen > 0


async def test_a_worker_that_stops_for_any_reason_starts_no_new_send_in_its_chunks(
    db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # procrastinate ends its run loop by itself when it loses the database (its side-task
    # monitor calls stop()), with no signal for Mailroom to see: the chunk must still stop
    # starting sends, or the ones started during the grace are cut off mid-send at its end.
    from procrastinate.worker import Worker

    from worker.main import MailroomWorker, worker_options, worker_runtime

    assert issubclass(MailroomWorker, Worker)
    settings = settings.model_copy(update={"worker_concurrency": 1})
    smtp.data_delay_seconds = 0.2
    await _batch(db, [f"r{i}@example.org" for i in range(20)])
    async with worker_runtime(settings) as (app, deps):
        worker = MailroomWorker(
            app=app, **worker_options(settings, deps, install_signal_handlers=False)
        )
        running = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]

        async def two_sent() -> bool:
            return len(smtp.received) >= 2

        await wait_until(two_sent, 30, "two emails to be sent")
        at_stop = len(smtp.received)
        worker.stop()  # type: ignore[no-untyped-call]
        await asyncio.wait_for(running, 30)
    assert len(smtp.received) <= at_stop + 1  # the one in flight, no more
    assert deps.stopping.is_set()
    rows = await query(
        settings.database_url or "", "SELECT status, attempts FROM recipients ORDER BY id"
    )
    sent = [r for r in rows if r[0] == "sent"]
    assert len(sent) == len(smtp.received)
    # What was not started goes back with its chunk, its attempt given back.
    assert {r for r in rows if r[0] != "sent"} == {("queued", 0)}

    smtp.data_delay_seconds = 0.0
    await drain(settings)
    assert sorted(smtp.to_addresses().values()) == [1] * 20
