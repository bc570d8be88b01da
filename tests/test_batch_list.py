"""Batches people can tell apart: a name (given, or made from the subject or the context),
checked like any text that reaches a page, and a list searched by name, filtered by state and
paged newest first by a cursor, without counting every recipient of every batch."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from shared.db import BatchFilter, Database, NewBatch, NewRecipient, batch_list_query
from shared.settings import Settings
from tests.conftest import AUTH, make_settings, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_pages import login
from web.app import create_app

BATCH: dict[str, Any] = {"recipients": ["a@example.org"], "subject": "S", "body": "B"}


async def create(client: TestClient, **changes: Any) -> dict[str, Any]:
    response = await client.post("/api/batches", json={**BATCH, **changes}, headers=AUTH)
    assert response.status == 201, await response.text()
    batch_id = (await response.json())["id"]
    return dict(await (await client.get(f"/api/batches/{batch_id}", headers=AUTH)).json())


async def listed(client: TestClient, query_string: str) -> dict[str, Any]:
    response = await client.get(f"/api/batches?{query_string}", headers=AUTH)
    assert response.status == 200, await response.text()
    return dict(await response.json())


# -- names ------------------------------------------------------------------------------------


async def test_a_batch_is_named_by_its_subject_unless_it_is_given_a_name(
    client: TestClient,
) -> None:
    assert (await create(client, subject="Hello {{ email }}"))["name"] == "Hello {{ email }}"
    given = await create(client, name="  March newsletter  ")
    assert (given["name"], given["subject"]) == ("March newsletter", "S")
    assert (await create(client, name="   "))["name"] == "S"
    long = await create(client, subject="An announcement about " + "many things " * 20)
    assert long["name"].endswith("…") and len(long["name"]) <= 60
    assert long["name"].startswith("An announcement about many things")
    assert not long["name"].removesuffix("…").endswith(" ")


async def test_an_llm_batch_is_named_by_the_first_words_of_its_context(
    database_url: str, smtp: RecordingSMTPServer, db: Database
) -> None:
    settings = make_settings(database_url, smtp.port, groq_api_key="k")
    async with TestClient(TestServer(create_app(settings, db=db))) as client:
        context = "We are hiring\na senior PostgreSQL engineer\tin Lisbon, remote friendly. " * 3
        created = await create(
            client, drafter="llm", subject=None, body=None, context=context, send=False
        )
    assert created["name"].startswith("We are hiring a senior PostgreSQL engineer in Lisbon")
    assert created["name"].endswith("…") and len(created["name"]) <= 60
    assert created["subject"] == ""


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("News\x0cletter", "U+000C (form feed) at position 5"),
        ("two\r\nlines", "U+000D"),
        ("tab\there", "U+0009"),
        ("next\x85line", "U+0085"),
        ("line\u2028separator", "U+2028"),
        ("x" * 101, "at most 100 characters"),
        (7, "must be a string"),
        (["a list"], "must be a string"),
    ],
)
async def test_a_hostile_name_is_refused_and_nothing_is_written(
    client: TestClient, settings: Settings, name: Any, fragment: str
) -> None:
    response = await client.post("/api/batches", json={**BATCH, "name": name}, headers=AUTH)
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    assert [p["field"] for p in problems] == ["name"]
    assert fragment in problems[0]["message"]
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_the_database_refuses_a_bad_name_again(db: Database) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        await db.create_batch(
            NewBatch(
                created_by="test",
                subject_template="S",
                body_template="B",
                recipients=[NewRecipient("a@example.org")],
                name="bad\x1bname",
            )
        )


async def test_a_name_is_shown_escaped_on_the_list_and_the_batch_page(
    client: TestClient,
) -> None:
    created = await create(client, name="<script>alert(1)</script> & co")
    await login(client)
    for path in ["/", f"/batches/{created['id']}"]:
        page = await (await client.get(path)).text()
        assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page
        assert "<script>alert" not in page


async def test_the_form_takes_a_name_and_refuses_a_hostile_one(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    form = {"csrf_token": csrf, "recipients": "a@example.org", "subject": "S", "body": "B"}
    refused = await client.post("/batches", data={**form, "name": "bell\x07"})
    assert refused.status == 422
    assert "U+0007" in await refused.text()
    posted = await client.post("/batches", data={**form, "name": "Spring launch"})
    assert posted.status == 200 and "<h1>Spring launch</h1>" in await posted.text()
    rows = await query(settings.database_url or "", "SELECT name FROM batches")
    assert rows == [("Spring launch",)]


# -- the list ---------------------------------------------------------------------------------


async def test_the_list_searches_names_in_any_case_and_takes_wildcards_literally(
    client: TestClient,
) -> None:
    for name in ["March newsletter", "April NEWSLETTER", "100% off", "100 off", "a_b", "ab"]:
        await create(client, name=name)
    found = await listed(client, "q=newsletter")
    assert [b["name"] for b in found["batches"]] == ["April NEWSLETTER", "March newsletter"]
    assert [b["name"] for b in (await listed(client, "q=%25"))["batches"]] == ["100% off"]
    assert [b["name"] for b in (await listed(client, "q=_"))["batches"]] == ["a_b"]
    assert (await listed(client, "q=nothing+like+it"))["batches"] == []


async def test_the_list_filters_by_state(client: TestClient) -> None:
    kept = await create(client, name="kept")
    stopped = await create(client, name="stopped")
    await client.post(f"/api/batches/{stopped['id']}/cancel", headers=AUTH)
    assert [b["id"] for b in (await listed(client, "status=cancelled"))["batches"]] == [
        stopped["id"]
    ]
    assert [b["id"] for b in (await listed(client, "status=queued"))["batches"]] == [kept["id"]]
    both = await listed(client, "status=queued&q=STOP")
    assert both["batches"] == []


async def test_the_list_pages_newest_first_through_its_cursor_even_on_equal_times(
    client: TestClient, settings: Settings
) -> None:
    made = [(await create(client, name=f"batch {i}"))["id"] for i in range(7)]
    # Four of them share a creation time: the id breaks the tie, so none repeats or is lost.
    await query(
        settings.database_url or "",
        "UPDATE batches SET created_at = '2026-01-01T00:00:00Z' WHERE id = ANY(%s::uuid[])",
        made[1:5],
    )
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        page = await listed(client, f"limit=3{cursor}")
        pages += 1
        seen += [b["id"] for b in page["batches"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert pages == 3 and sorted(seen) == sorted(made) and len(set(seen)) == 7
    assert seen[:2] == [made[6], made[5]]  # newest first


@pytest.mark.parametrize(
    ("query_string", "field"),
    [
        ("status=bogus", "status"),
        ("status=", "status"),
        ("status=DONE", "status"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("limit=abc", "limit"),
        ("limit=1e3", "limit"),
        ("limit=-1", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=", "cursor"),
        ("cursor=1_zz", "cursor"),
        ("cursor=99999999999999999999_" + "a" * 32, "cursor"),
        ("cursor=" + "1" * 70, "cursor"),
        ("q=" + "x" * 101, "q"),
        ("q=a%0Cb", "q"),
        ("q=a%00b", "q"),
        ("q=a%E2%80%A8b", "q"),
    ],
)
async def test_garbage_list_parameters_are_a_clear_422(
    client: TestClient, query_string: str, field: str
) -> None:
    response = await client.get(f"/api/batches?{query_string}", headers=AUTH)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_query"
    assert [p["field"] for p in error["details"]["problems"]] == [field]


async def test_the_list_page_searches_filters_and_links_the_next_page(
    client: TestClient, db: Database
) -> None:
    for i in range(23):
        await db.create_batch(
            NewBatch(
                created_by="test",
                subject_template=f"Subject {i}",
                body_template="B",
                recipients=[NewRecipient("a@example.org")],
                name=f"Weekly {i:02d}",
            )
        )
    await login(client)
    first = await (await client.get("/")).text()
    assert first.count('<a href="/batches/') == 20 and "Weekly 22" in first
    link = first.split('rel="next"')[0].rsplit('href="', 1)[1].split('"')[0]
    assert "cursor=" in link
    second = await (await client.get(link.replace("&amp;", "&"))).text()
    assert second.count('<a href="/batches/') == 3 and "Weekly 00" in second
    assert 'rel="next"' not in second and "First page" in second
    searched = await (await client.get("/?q=weekly+1&status=")).text()
    assert searched.count('<a href="/batches/') == 10
    assert (await client.get("/?status=lost")).status == 400
    assert (await client.get("/?q=%07")).status == 400
    assert (await client.get("/?cursor=nope")).status == 400
    none = await (await client.get("/?status=cancelled")).text()
    assert "No batch matches." in none


# -- the list stays bounded -------------------------------------------------------------------


def _recipient_rows_read(plan: dict[str, Any]) -> int:
    """Rows every node reading the recipients table returned, over all its loops."""
    rows = 0
    if plan.get("Relation Name") == "recipients":
        rows += int(plan["Actual Rows"] * plan["Actual Loops"])
    for child in plan.get("Plans", []):
        rows += _recipient_rows_read(child)
    return rows


def _index_names(plan: dict[str, Any]) -> set[str]:
    names = {plan["Index Name"]} if "Index Name" in plan else set()
    for child in plan.get("Plans", []):
        names |= _index_names(child)
    return names


async def test_a_page_of_the_list_counts_only_its_own_batches_recipients(
    settings: Settings,
) -> None:
    url = settings.database_url or ""
    # 300 batches of 40 recipients, all delivered, and the oldest one cancelled.
    await query(
        url,
        "WITH b AS (INSERT INTO batches (id, created_at, created_by, subject_template,"
        "  body_template, total, name)"
        "  SELECT gen_random_uuid(), now() - make_interval(mins => n), 'test', 'S', 'B', 40,"
        "   'batch ' || n FROM generate_series(1, 300) n RETURNING id)"
        " INSERT INTO recipients (batch_id, email, status)"
        " SELECT b.id, 'r' || k || '@example.org', 'sent' FROM b, generate_series(1, 40) k",
    )
    await query(
        url,
        "UPDATE batches SET cancelled_at = now() WHERE name = 'batch 300';"
        " UPDATE recipients SET status = 'cancelled'"
        "  WHERE batch_id = (SELECT id FROM batches WHERE name = 'batch 300')",
    )
    await query(url, "VACUUM ANALYZE batches")
    await query(url, "VACUUM ANALYZE recipients")
    oldest = await query(url, "SELECT created_at, id FROM batches ORDER BY created_at LIMIT 1")

    async def explain(where: BatchFilter) -> dict[str, Any]:
        text, params = batch_list_query(where, limit=20)
        rows = await query_named(url, "EXPLAIN (ANALYZE, FORMAT JSON) " + text, params)
        return dict(json.loads(rows[0][0])[0] if isinstance(rows[0][0], str) else rows[0][0][0])

    first = await explain(BatchFilter())
    assert "batches_newest" in _index_names(first["Plan"])
    # 20 batches' 40 recipients, plus a probe or two per batch for its state: never 12,000.
    assert _recipient_rows_read(first["Plan"]) <= 20 * 40 + 20 * 6
    later = await explain(BatchFilter(before=(oldest[0][0] + timedelta(minutes=100), uuid.uuid4())))
    assert _recipient_rows_read(later["Plan"]) <= 20 * 40 + 20 * 6
    # A rare state walks the list in order, a few index probes per batch, and counts one.
    rare = await explain(BatchFilter(status="cancelled"))
    assert _recipient_rows_read(rare["Plan"]) <= 40 + 300 * 6
    nothing = await explain(BatchFilter(status="done_with_failures"))
    assert _recipient_rows_read(nothing["Plan"]) <= 300 * 6


async def query_named(url: str, text: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(text, params)
        return await cursor.fetchall()
