"""A batch submitted through the API is delivered, every email exactly once."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import AUTH, drain, query
from tests.smtp_server import RecordingSMTPServer


async def test_fifty_recipients_arrive_exactly_once_with_the_right_headers(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    recipients = [{"email": f"person{i}@example.org", "name": f"Person <{i}>"} for i in range(50)]
    response = await client.post(
        "/api/batches",
        json={
            "recipients": recipients,
            "subject": "Hello {{ name }}",
            "body": "Dear {{ name }},\n\nyour address is {{ email }}.\n\n<script>x</script>",
        },
        headers=AUTH,
    )
    assert response.status == 201, await response.text()
    created = await response.json()
    assert created["total"] == 50
    assert created["status_url"] == f"/api/batches/{created['id']}"

    await drain(settings)

    assert len(smtp.received) == 50
    assert sorted(smtp.to_addresses()) == sorted(r["email"] for r in recipients)
    assert set(smtp.message_ids().values()) == {1}
    by_address = {r.rcpt_tos[0]: r for r in smtp.received}
    first = by_address["person0@example.org"]
    assert first.mail_from == "sender@example.com"
    assert first.message["From"] == "sender@example.com"
    assert first.message["To"] == "person0@example.org"
    assert first.message["Subject"] == "Hello Person <0>"
    assert first.message["Message-ID"].startswith(f"<mailroom.{created['id']}.")
    assert first.message["Date"]
    assert first.message.get_content_type() == "multipart/alternative"
    text = first.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    markup = first.message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "Dear Person <0>," in text and "<script>x</script>" in text
    assert "Person &lt;0&gt;" in markup and "&lt;script&gt;" in markup
    assert "<script>" not in markup

    status = await (await client.get(created["status_url"], headers=AUTH)).json()
    assert status["status"] == "done"
    assert status["counts"]["sent"] == 50
    assert sum(status["counts"].values()) == 50

    stored = await query(
        settings.database_url or "",
        "SELECT count(*) FILTER (WHERE message_id IS NOT NULL AND sent_at IS NOT NULL),"
        " count(DISTINCT message_id) FROM recipients",
    )
    assert stored == [(50, 50)]
    # The Message-ID stored is the one the server received.
    sent_ids = {
        row[0]
        for row in await query(settings.database_url or "", "SELECT message_id FROM recipients")
    }
    assert sent_ids == set(smtp.message_ids())


async def test_recipients_list_shows_status_and_attempts(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    response = await client.post(
        "/api/batches",
        json={"recipients": ["a@example.org", "b@example.org"], "subject": "S", "body": "B"},
        headers=AUTH,
    )
    batch = await response.json()
    await drain(settings)
    listing = await (
        await client.get(f"/api/batches/{batch['id']}/recipients?status=sent", headers=AUTH)
    ).json()
    assert [(r["email"], r["status"], r["attempts"]) for r in listing["recipients"]] == [
        ("a@example.org", "sent", 1),
        ("b@example.org", "sent", 1),
    ]
    assert listing["next_after"] is None
