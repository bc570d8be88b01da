"""Operator controls: cancelling what is left of a batch, and idempotent batch creation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import AUTH, drain, query
from tests.smtp_server import RecordingSMTPServer

BATCH: dict[str, Any] = {
    "recipients": [f"p{i}@example.org" for i in range(5)],
    "subject": "S",
    "body": "B",
}


async def test_cancel_stops_queued_and_retrying_recipients_and_their_jobs(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    created = await (await client.post("/api/batches", json=BATCH, headers=AUTH)).json()
    url = settings.database_url or ""
    # p0 failed once and waits in backoff, as a retry leaves it.
    await query(
        url,
        "UPDATE recipients SET status = 'retrying', attempts = 1 WHERE email = 'p0@example.org'",
    )
    await query(
        url, "UPDATE procrastinate_jobs SET scheduled_at = now() + interval '1 hour' WHERE id = 1"
    )
    response = await client.post(f"/api/batches/{created['id']}/cancel", headers=AUTH)
    assert response.status == 200
    assert (await response.json())["cancelled"] == 5
    assert await query(url, "SELECT DISTINCT status FROM recipients") == [("cancelled",)]
    jobs = await query(
        url, "SELECT DISTINCT status::text FROM procrastinate_jobs WHERE queue_name = 'emails'"
    )
    assert jobs == [("cancelled",)]
    await query(url, "UPDATE procrastinate_jobs SET scheduled_at = NULL")
    await drain(settings)
    assert smtp.received == []
    status = await (await client.get(f"/api/batches/{created['id']}", headers=AUTH)).json()
    assert status["status"] == "cancelled" and status["counts"]["cancelled"] == 5


async def test_cancel_never_touches_sent_recipients_and_is_idempotent(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    created = await (await client.post("/api/batches", json=BATCH, headers=AUTH)).json()
    await drain(settings)
    first = await client.post(f"/api/batches/{created['id']}/cancel", headers=AUTH)
    assert (await first.json())["cancelled"] == 0
    assert await query(settings.database_url or "", "SELECT DISTINCT status FROM recipients") == [
        ("sent",)
    ]
    assert (
        await client.post("/api/batches/00000000-0000-0000-0000-000000000000/cancel", headers=AUTH)
    ).status == 404
    assert (await client.post("/api/batches/nope/cancel", headers=AUTH)).status == 404


async def test_the_batch_page_cancels_with_its_csrf_token(
    client: TestClient, settings: Settings
) -> None:
    from tests.test_pages import login

    csrf = await login(client)
    created = await (await client.post("/api/batches", json=BATCH, headers=AUTH)).json()
    page = await (await client.get(f"/batches/{created['id']}")).text()
    assert "Cancel what is left" in page
    forged = await client.post(f"/batches/{created['id']}/cancel", data={"csrf_token": "x"})
    assert forged.status == 403
    done = await client.post(
        f"/batches/{created['id']}/cancel", data={"csrf_token": csrf}, allow_redirects=False
    )
    assert done.status == 303
    assert await query(settings.database_url or "", "SELECT DISTINCT status FROM recipients") == [
        ("cancelled",)
    ]


async def test_the_same_idempotency_key_and_body_returns_the_same_batch(
    client: TestClient, settings: Settings
) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-42"}
    first = await client.post("/api/batches", json=BATCH, headers=headers)
    assert first.status == 201
    # The same body with its keys in another order is the same request.
    again = await client.post(
        "/api/batches", json=dict(reversed(list(BATCH.items()))), headers=headers
    )
    assert again.status == 200
    assert (await again.json())["id"] == (await first.json())["id"]
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(1,)]
    # One chunk job for the five recipients, and no second one for the replay.
    assert await query(settings.database_url or "", "SELECT count(*) FROM procrastinate_jobs") == [
        (1,)
    ]


async def test_the_same_key_with_another_body_is_a_conflict(
    client: TestClient, settings: Settings
) -> None:
    headers = {**AUTH, "Idempotency-Key": "order-43"}
    assert (await client.post("/api/batches", json=BATCH, headers=headers)).status == 201
    other = await client.post("/api/batches", json={**BATCH, "subject": "Other"}, headers=headers)
    assert other.status == 409
    assert (await other.json())["error"]["code"] == "idempotency_key_reused"
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(1,)]


async def test_two_requests_racing_with_one_key_create_one_batch(
    client: TestClient, settings: Settings
) -> None:
    headers = {**AUTH, "Idempotency-Key": "race-1"}
    responses = await asyncio.gather(
        *(client.post("/api/batches", json=BATCH, headers=headers) for _ in range(4))
    )
    assert sorted(r.status for r in responses) == [200, 200, 200, 201]
    assert len({(await r.json())["id"] for r in responses}) == 1
    assert await query(settings.database_url or "", "SELECT count(*) FROM recipients") == [(5,)]


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there", "é"])
async def test_a_malformed_idempotency_key_is_400(
    client: TestClient, settings: Settings, key: str
) -> None:
    response = await client.post(
        "/api/batches", json=BATCH, headers={**AUTH, "Idempotency-Key": key}
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "bad_idempotency_key"
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_a_scheduled_batch_waits_until_its_send_time(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    from datetime import UTC, datetime, timedelta

    send_at = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    response = await client.post(
        "/api/batches", json={**BATCH, "send_at": send_at.isoformat()}, headers=AUTH
    )
    assert response.status == 201
    created = await response.json()
    await drain(settings)
    assert smtp.received == []
    status = await (await client.get(f"/api/batches/{created['id']}", headers=AUTH)).json()
    assert status["status"] == "scheduled" and status["send_at"] == send_at.isoformat()
    url = settings.database_url or ""
    scheduled = await query(
        url, "SELECT DISTINCT scheduled_at FROM procrastinate_jobs WHERE queue_name = 'emails'"
    )
    assert scheduled == [(send_at,)]
    await query(url, "UPDATE procrastinate_jobs SET scheduled_at = now()")  # the time has come
    await drain(settings)
    assert len(smtp.received) == len(BATCH["recipients"])


@pytest.mark.parametrize(
    ("send_at", "fragment"),
    [
        ("tomorrow", "ISO 8601"),
        (1700000000, "ISO 8601"),
        ("2031-01-01T09:00:00", "time zone offset"),
        ("2001-01-01T09:00:00Z", "in the past"),
        ("2999-01-01T09:00:00Z", "more than a year ahead"),
    ],
)
async def test_a_bad_send_time_is_422(
    client: TestClient, settings: Settings, send_at: object, fragment: str
) -> None:
    response = await client.post("/api/batches", json={**BATCH, "send_at": send_at}, headers=AUTH)
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    assert any(p["field"] == "send_at" and fragment in p["message"] for p in problems), problems
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_the_form_schedules_in_utc(client: TestClient, settings: Settings) -> None:
    from datetime import UTC, datetime, timedelta

    from tests.test_pages import login

    csrf = await login(client)
    local = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M")
    response = await client.post(
        "/batches",
        data={
            "csrf_token": csrf,
            "recipients": "a@example.org",
            "subject": "S",
            "body": "B",
            "send_at": local,
        },
        allow_redirects=False,
    )
    assert response.status == 303
    rows = await query(
        settings.database_url or "",
        "SELECT to_char(send_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI') FROM batches",
    )
    assert rows == [(local,)]
