"""A batch says what it is doing, and how much of it was delivered, built for real each time:
scheduled ahead with a suppressed address, waiting for a worker, under way with a retry, held
by a full sending-rate window, done, done with a dead letter from a 550, cancelled."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from shared.db import Database
from shared.settings import Settings
from tests.conftest import AUTH, NO_RETRY_WITHIN_A_DRAIN, drain, make_settings, retries_due
from tests.smtp_server import RecordingSMTPServer, Rule
from web.app import create_app

ADDRESSES = ["a@example.org", "b@example.org", "c@example.org"]
BATCH: dict[str, Any] = {"recipients": ADDRESSES, "subject": "S", "body": "B"}


async def create(client: TestClient, **changes: Any) -> str:
    response = await client.post("/api/batches", json={**BATCH, **changes}, headers=AUTH)
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def batch_json(client: TestClient, batch_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/batches/{batch_id}", headers=AUTH)
    assert response.status == 200
    return dict(await response.json())


async def batch_page(client: TestClient, batch_id: str) -> str:
    response = await client.get(f"/batches/{batch_id}", headers=AUTH)
    assert response.status == 200
    return await response.text()


def badge(page: str) -> str:
    found = re.search(r'id="batch-status" class="status status-([a-z_]+)"', page)
    assert found, "no state badge on the page"
    return found.group(1)


def in_an_hour() -> str:
    return (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0).isoformat()


async def test_a_scheduled_batch_with_a_suppressed_address_is_scheduled_not_sending(
    client: TestClient, db: Database, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await db.suppress(["b@example.org"], reason="manual")
    batch_id = await create(client, send_at=in_an_hour())
    await drain(settings)
    assert smtp.received == []
    status = await batch_json(client, batch_id)
    assert status["status"] == "scheduled"
    assert (status["counts"]["queued"], status["counts"]["suppressed"]) == (2, 1)
    assert status["progress"] == {"delivered": 0.0, "finished": 0.3333}
    page = await batch_page(client, batch_id)
    assert badge(page) == "scheduled"
    assert "Scheduled to start at" in page
    assert "0 delivered · 0 failed · 1 suppressed · 0 cancelled of 3 · 2 to go" in page


async def test_a_batch_no_worker_has_started_is_queued_even_with_a_suppressed_address(
    client: TestClient, db: Database
) -> None:
    await db.suppress(["c@example.org"], reason="unsubscribed")
    batch_id = await create(client)
    status = await batch_json(client, batch_id)
    assert status["status"] == "queued" and status["paused_until"] is None


async def test_a_batch_with_a_retry_pending_is_sending_and_counts_only_what_was_delivered(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["c@example.org"] = Rule("451 4.7.1 try again later", times=1)
    batch_id = await create(client)
    await drain(settings.model_copy(update=NO_RETRY_WITHIN_A_DRAIN))
    status = await batch_json(client, batch_id)
    assert status["status"] == "sending"
    assert status["counts"]["retrying"] == 1
    assert status["progress"] == {"delivered": 0.6667, "finished": 0.6667}
    await retries_due(settings.database_url or "")
    await drain(settings)
    status = await batch_json(client, batch_id)
    assert status["status"] == "done"
    assert status["progress"] == {"delivered": 1.0, "finished": 1.0}
    assert badge(await batch_page(client, batch_id)) == "done"


async def test_a_550_makes_the_batch_done_with_failures_and_is_not_counted_as_delivered(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["b@example.org"] = Rule("550 5.1.1 no such user")
    batch_id = await create(client)
    await drain(settings)
    status = await batch_json(client, batch_id)
    assert status["status"] == "done_with_failures"
    assert status["progress"] == {"delivered": 0.6667, "finished": 1.0}
    page = await batch_page(client, batch_id)
    assert badge(page) == "done_with_failures"
    assert "2 delivered · 1 failed · 1 suppressed · 0 cancelled of 3" not in page
    assert "2 delivered · 1 failed · 0 suppressed · 0 cancelled of 3<" in page
    # The bar gives the dead letter its own part, never the delivered one's.
    assert re.search(r'class="bar-sent" data-part="sent" x="0" y="0" width="666\.6', page)
    assert re.search(r'class="bar-dead" data-part="dead" x="666\.6[0-9]*" y="0" width="333', page)


async def test_a_cancelled_batch_is_cancelled_not_done(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    batch_id = await create(client, send_at=in_an_hour())
    cancelled = await client.post(f"/api/batches/{batch_id}/cancel", headers=AUTH)
    assert (await cancelled.json())["cancelled"] == 3
    status = await batch_json(client, batch_id)
    assert status["status"] == "cancelled" and status["cancelled_at"] is not None
    assert status["progress"] == {"delivered": 0.0, "finished": 1.0}
    page = await batch_page(client, batch_id)
    assert badge(page) == "cancelled" and "status-done" not in page
    assert "0 delivered · 0 failed · 0 suppressed · 3 cancelled of 3" in page
    assert 'id="cancel-batch" hidden' in page


@pytest.fixture
async def limited(
    database_url: str, smtp: RecordingSMTPServer, db: Database
) -> AsyncIterator[tuple[Settings, TestClient]]:
    """A web tier and a worker that may send two messages a day."""
    settings = make_settings(database_url, smtp.port, rate_per_day=2)
    async with TestClient(TestServer(create_app(settings, db=db))) as client:
        yield settings, client


async def test_a_full_sending_window_pauses_the_batch_until_the_window_ends(
    limited: tuple[Settings, TestClient], smtp: RecordingSMTPServer
) -> None:
    settings, client = limited
    batch_id = await create(client)
    await drain(settings)
    assert len(smtp.received) == 2
    status = await batch_json(client, batch_id)
    tomorrow = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), time(), UTC)
    assert status["status"] == "paused"
    assert status["paused_until"] == tomorrow.isoformat()
    listed = await (await client.get("/api/batches?status=paused", headers=AUTH)).json()
    assert [b["id"] for b in listed["batches"]] == [batch_id]
    page = await batch_page(client, batch_id)
    assert badge(page) == "paused"
    assert "The per day sending limit (2) is reached: sending resumes at" in page
    # A batch that has not started waits behind the same window.
    assert (await batch_json(client, await create(client)))["status"] == "paused"


async def test_without_a_full_window_nothing_is_paused(
    client: TestClient, settings: Settings
) -> None:
    batch_id = await create(client)
    assert (await batch_json(client, batch_id))["status"] == "queued"
    listed = await (await client.get("/api/batches?status=paused", headers=AUTH)).json()
    assert listed == {"batches": [], "next_cursor": None}


async def test_discarded_dead_letters_leave_the_batch_done_with_failures(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["a@example.org"] = Rule("554 5.7.1 refused")
    batch_id = await create(client)
    await drain(settings)
    discarded = await client.post(
        "/api/dead-letters/discard", json={"batch_id": batch_id}, headers=AUTH
    )
    assert (await discarded.json())["discarded"] == 1
    status = await batch_json(client, batch_id)
    assert status["status"] == "done_with_failures"
    assert status["progress"]["delivered"] == 0.6667


async def test_a_batch_whose_drafts_wait_for_review_is_awaiting_review_until_sent(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    batch_id = await create(client, send=False)
    await drain(settings)
    status = await batch_json(client, batch_id)
    assert status["status"] == "awaiting_review" and status["counts"]["drafted"] == 3
    assert status["progress"] == {"delivered": 0.0, "finished": 0.0}
    assert badge(await batch_page(client, batch_id)) == "awaiting_review"
    await client.post(f"/api/batches/{batch_id}/send", headers=AUTH)
    assert (await batch_json(client, batch_id))["status"] == "queued"
    await drain(settings)
    assert (await batch_json(client, batch_id))["status"] == "done"
    assert len(smtp.received) == 3
