"""What the operator is told: duplicates removed, pasted addresses merged with a CSV, a
template field missing on many recipients said once, errors in the form's own words, an LLM
that is not configured, a replayed Idempotency-Key answered as the first time, and error pages
in the site's layout."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer

from shared.db import Database
from shared.settings import Settings
from tests.conftest import AUTH, make_settings, query
from tests.test_pages import login
from web.app import create_app

BODY_NEEDS_NAME = "Dear {{ name }}"


def _batch(**changes: Any) -> dict[str, Any]:
    return {"recipients": ["a@example.org"], "subject": "S", "body": "B", **changes}


def _form(csrf: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf, "subject": "Hello", "body": "Hi", "drafter": "template", **fields}


async def _nothing_written(settings: Settings) -> None:
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


# -- a template field missing on many recipients: one problem, with a count ------------------


async def test_a_field_missing_on_47_recipients_is_one_api_problem_with_count_and_positions(
    client: TestClient, settings: Settings
) -> None:
    recipients: list[Any] = [{"email": "named@example.org", "name": "N"}]
    recipients += [f"r{i}@example.org" for i in range(47)]
    response = await client.post(
        "/api/batches", json=_batch(recipients=recipients, body=BODY_NEEDS_NAME), headers=AUTH
    )
    assert response.status == 422
    details = (await response.json())["error"]["details"]
    assert details["total_problems"] == 1
    [problem] = details["problems"]
    assert problem["field"] == "recipients"
    assert (problem["position"], problem["positions"], problem["count"]) == (
        1,
        [1, 2, 3, 4, 5],
        47,
    )
    assert problem["message"] == (
        "47 recipients (the first r0@example.org): the body template fails:"
        " undefined: 'name' is undefined"
    )
    await _nothing_written(settings)


async def test_recipients_of_different_shapes_failing_the_same_way_are_one_problem(
    client: TestClient,
) -> None:
    recipients = ["a@example.org", {"email": "b@example.org", "city": "Oslo"}, "c@example.org"]
    response = await client.post(
        "/api/batches", json=_batch(recipients=recipients, body=BODY_NEEDS_NAME), headers=AUTH
    )
    [problem] = (await response.json())["error"]["details"]["problems"]
    assert (problem["positions"], problem["count"]) == ([0, 1, 2], 3)


async def test_one_recipient_missing_a_field_keeps_the_single_problem_shape(
    client: TestClient,
) -> None:
    recipients = [{"email": "a@example.org", "name": "A"}, "b@example.org"]
    response = await client.post(
        "/api/batches", json=_batch(recipients=recipients, body=BODY_NEEDS_NAME), headers=AUTH
    )
    [problem] = (await response.json())["error"]["details"]["problems"]
    assert problem == {
        "field": "recipients",
        "message": "b@example.org: the body template fails: undefined: 'name' is undefined",
        "position": 1,
    }


async def test_the_form_reports_a_field_missing_on_47_csv_rows_once(client: TestClient) -> None:
    csrf = await login(client)
    form = FormData(_form(csrf, subject="Hi {{ name }}"))
    csv = "email,city\n" + "".join(f"r{i}@example.org,Oslo\n" for i in range(47))
    form.add_field("csv", csv.encode(), filename="people.csv", content_type="text/csv")
    response = await client.post("/batches", data=form)
    assert response.status == 422
    page = await response.text()
    expected = (
        "CSV file, lines 2, 3, 4, 5, 6 and 42 more: 47 recipients (the first r0@example.org):"
        " the subject template fails: undefined: &#39;name&#39;"
    )
    assert page.count(expected) == 2, page  # in the summary at the top, and at the field
    assert "1 problem(s)" in page


# -- errors in the form's words -------------------------------------------------------------


async def test_form_errors_name_their_field_as_the_form_labels_it(client: TestClient) -> None:
    csrf = await login(client)
    far = (datetime.now(UTC) + timedelta(days=400)).strftime("%Y-%m-%dT%H:%M")
    response = await client.post(
        "/batches", data=_form(csrf, recipients="a@example.org", subject="", send_at=far)
    )
    assert response.status == 422
    page = await response.text()
    assert "Send at: more than a year ahead (at most 365 days)" in page
    assert "Subject: required" in page
    assert "send_at:" not in page
    assert '<a href="#send_at">' in page and 'id="send_at"' in page


async def test_the_api_keeps_its_machine_readable_field_names(client: TestClient) -> None:
    far = (datetime.now(UTC) + timedelta(days=400)).isoformat()
    response = await client.post("/api/batches", json=_batch(send_at=far), headers=AUTH)
    [problem] = (await response.json())["error"]["details"]["problems"]
    assert problem == {"field": "send_at", "message": "more than a year ahead (at most 365 days)"}


async def test_the_send_at_example_is_a_time_the_server_accepts(client: TestClient) -> None:
    response = await client.post("/api/batches", json=_batch(send_at="tomorrow"), headers=AUTH)
    [problem] = (await response.json())["error"]["details"]["problems"]
    match = re.search(r"e\.g\. (\S+)$", problem["message"])
    assert match, problem
    accepted = await client.post("/api/batches", json=_batch(send_at=match[1]), headers=AUTH)
    assert accepted.status == 201, await accepted.text()


# -- duplicates and merged sources, said on the batch page ----------------------------------


async def test_the_batch_page_says_how_many_duplicates_were_removed(client: TestClient) -> None:
    csrf = await login(client)
    pasted = "ada@example.org\nADA@example.org\ngrace@example.org\nada@example.org"
    response = await client.post(
        "/batches", data=_form(csrf, recipients=pasted), allow_redirects=False
    )
    assert response.status == 303
    location = response.headers["Location"]
    assert re.fullmatch(r"/batches/[0-9a-f-]{36}\?notice=[A-Za-z0-9._-]+", location), location
    page = await (await client.get(location)).text()
    assert '<p class="notice notice-done" role="status">2 duplicate addresses removed.</p>' in page
    # The page without the notice, or with a notice it did not sign, says nothing of it.
    bare = await (await client.get(location.split("?")[0])).text()
    assert "duplicate" not in bare
    token = location.split("notice=")[1]
    forged = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    tampered = await client.get(location.split("?")[0], params={"notice": forged})
    assert tampered.status == 200 and "duplicate" not in await tampered.text()


async def test_a_notice_is_shown_only_on_the_page_it_was_written_for(client: TestClient) -> None:
    csrf = await login(client)
    response = await client.post(
        "/batches",
        data=_form(csrf, recipients="a@example.org\na@example.org"),
        allow_redirects=False,
    )
    location = response.headers["Location"]
    other = await client.post(
        "/batches", data=_form(csrf, recipients="b@example.org"), allow_redirects=False
    )
    # A batch without duplicates is sent on without a notice.
    assert "?" not in other.headers["Location"]
    moved = other.headers["Location"] + "?" + location.split("?")[1]
    assert "duplicate" not in await (await client.get(moved)).text()
    assert "duplicate address" not in await (await client.get("/?" + location.split("?")[1])).text()


async def test_pasted_addresses_and_a_csv_are_merged_and_the_page_says_so(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    form = FormData(_form(csrf, recipients="ada@example.org\nlin@example.org\nlin@example.org"))
    csv = b"email,name\nada@example.org,Ada\ngrace@example.org,Grace\n"
    form.add_field("csv", csv, filename="people.csv", content_type="text/csv")
    response = await client.post("/batches", data=form)
    assert response.status == 200
    page = await response.text()
    assert (
        "Merged 3 pasted addresses and 2 CSV rows into 3 recipients (1 address was in both)."
        in page
    )
    assert "2 duplicate addresses removed." in page
    rows = await query(settings.database_url or "", "SELECT email FROM recipients ORDER BY id")
    assert rows == [("ada@example.org",), ("lin@example.org",), ("grace@example.org",)]


async def test_the_api_answers_duplicates_removed(client: TestClient) -> None:
    recipients = ["a@example.org", "A@example.org", "b@example.org"]
    response = await client.post("/api/batches", json=_batch(recipients=recipients), headers=AUTH)
    assert response.status == 201
    assert (await response.json())["duplicates_removed"] == 1


# -- Idempotency-Key: the replay answers what the first request did --------------------------


async def test_a_replayed_idempotency_key_answers_the_same_body(
    client: TestClient, settings: Settings
) -> None:
    headers = {**AUTH, "Idempotency-Key": "replay-1"}
    payload = _batch(recipients=["a@example.org", "A@example.org", "b@example.org"])
    first = await client.post("/api/batches", json=payload, headers=headers)
    again = await client.post("/api/batches", json=payload, headers=headers)
    assert (first.status, again.status) == (201, 200)
    body = await first.json()
    assert body["duplicates_removed"] == 1 and body["total"] == 2
    assert await again.json() == body


async def test_a_refused_body_does_not_use_up_its_idempotency_key(
    client: TestClient, settings: Settings
) -> None:
    headers = {**AUTH, "Idempotency-Key": "typed-1"}
    for bad in ([_batch()], _batch(subject=7), _batch(send="yes")):
        response = await client.post("/api/batches", json=bad, headers=headers)
        assert response.status == 422, await response.text()
    await _nothing_written(settings)
    assert (await client.post("/api/batches", json=_batch(), headers=headers)).status == 201


# -- the LLM option when no key is configured ------------------------------------------------


async def test_the_llm_option_is_disabled_with_a_hint_when_no_key_is_configured(
    client: TestClient,
) -> None:
    await login(client)
    page = await (await client.get("/")).text()
    [radio] = re.findall(r'<input type="radio" name="drafter" value="llm"[^>]*>', page)
    assert "disabled" in radio and 'aria-describedby="llm-unavailable"' in radio
    assert "no LLM key is configured" in page and "MAILROOM_GROQ_API_KEY" in page


async def test_the_llm_option_is_offered_when_a_key_is_configured(
    database_url: str, smtp: Any, db: Database
) -> None:
    settings = make_settings(database_url, smtp.port, groq_api_key="gsk-test")
    async with TestClient(TestServer(create_app(settings, db=db))) as client:
        await login(client)
        page = await (await client.get("/")).text()
    [radio] = re.findall(r'<input type="radio" name="drafter" value="llm"[^>]*>', page)
    assert "disabled" not in radio and "llm-unavailable" not in page


# -- dead letters: confirmed, then said and listed ------------------------------------------


async def _dead_letters(client: TestClient, settings: Settings, smtp: Any, n: int) -> list[int]:
    from tests.conftest import drain
    from tests.smtp_server import Rule

    addresses = [f"gone{i}@example.org" for i in range(n)]
    for address in addresses:
        smtp.rules[address] = Rule("550 no such user")
    await client.post("/api/batches", json=_batch(recipients=addresses), headers=AUTH)
    await drain(settings)
    smtp.rules.clear()
    rows = await query(settings.database_url or "", "SELECT id FROM recipients ORDER BY id")
    return [row[0] for row in rows]


async def test_redrive_all_asks_first_then_says_and_lists_what_it_requeued(
    client: TestClient, settings: Settings, smtp: Any
) -> None:
    await _dead_letters(client, settings, smtp, 3)
    csrf = await login(client)
    asked = await client.post(
        "/dead-letters", data={"csrf_token": csrf, "action": "redrive", "target": "all"}
    )
    assert asked.status == 200
    page = await asked.text()
    assert "Redrive 3 dead letters?" in page and "Yes, redrive 3 dead letters" in page
    assert await query(settings.database_url or "", "SELECT DISTINCT status FROM recipients") == [
        ("dead",)
    ], "asking changes nothing"

    done = await client.post(
        "/dead-letters",
        data={"csrf_token": csrf, "action": "redrive", "target": "all", "confirm": "1"},
        allow_redirects=False,
    )
    assert done.status == 303
    page = await (await client.get(done.headers["Location"])).text()
    assert "3 dead letters requeued." in page
    requeued = page.split('id="requeued"')[1]
    assert all(f"gone{i}@example.org" in requeued for i in range(3))
    assert requeued.count("requeued · queued") == 3
    batch_id = (await query(settings.database_url or "", "SELECT id FROM batches"))[0][0]
    assert f'href="/batches/{batch_id}"' in requeued
    assert "No dead letters left." in page
    # The plain page afterwards is the plain list again.
    assert "requeued" not in (await (await client.get("/dead-letters")).text()).lower()


async def test_discard_asks_first_and_says_what_it_did(
    client: TestClient, settings: Settings, smtp: Any
) -> None:
    ids = await _dead_letters(client, settings, smtp, 2)
    csrf = await login(client)
    form = {"csrf_token": csrf, "action": "discard", "target": str(ids[0])}
    asked = await (await client.post("/dead-letters", data=form)).text()
    assert "Discard 1 dead letter?" in asked
    done = await (await client.post("/dead-letters", data={**form, "confirm": "1"})).text()
    assert "1 dead letter discarded." in done and 'id="requeued"' not in done
    # Again: nothing matches any more, and the page says so instead of pretending.
    again = await (await client.post("/dead-letters", data=form)).text()
    assert "Nothing to discard" in again
    repeated = await (await client.post("/dead-letters", data={**form, "confirm": "1"})).text()
    assert "Nothing was discarded" in repeated


# -- error pages -----------------------------------------------------------------------------


@pytest.fixture
async def failing_client(settings: Settings, db: Database) -> AsyncIterator[TestClient]:
    """The real app with one more route, which fails with a message no one may see."""

    async def fails(request: web.Request) -> web.Response:
        raise RuntimeError("secret detail: ada@example.org")

    app = create_app(settings, db=db)
    app.router.add_get("/fails", fails)
    app.router.add_get("/api/fails", fails)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


def _has_layout(page: str) -> bool:
    return '<a href="/dead-letters">Dead letters</a>' in page and "Log out" in page


async def test_a_404_page_has_the_site_layout_and_the_api_keeps_json(client: TestClient) -> None:
    await login(client)
    response = await client.get("/no/such/page")
    assert response.status == 404
    assert response.content_type == "text/html"
    page = await response.text()
    assert _has_layout(page) and "<h1>Page not found</h1>" in page
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    missing = await client.get("/batches/00000000-0000-0000-0000-000000000000")
    assert missing.status == 404 and _has_layout(await missing.text())
    api = await client.get("/api/no/such/route", headers=AUTH)
    assert api.status == 404
    assert (await api.json())["error"]["code"] == "not_found"


async def test_a_403_page_has_the_site_layout(client: TestClient) -> None:
    await login(client)
    response = await client.post("/dead-letters", data={"csrf_token": "forged"})
    assert response.status == 403
    page = await response.text()
    assert _has_layout(page) and "<h1>Not allowed</h1>" in page and "CSRF" in page


async def test_a_405_page_keeps_its_allow_header(client: TestClient) -> None:
    await login(client)
    response = await client.put("/dead-letters")
    assert response.status == 405 and "Allow" in response.headers
    assert _has_layout(await response.text())


async def test_a_500_page_shows_the_request_id_and_not_the_exception(
    failing_client: TestClient,
) -> None:
    await login(failing_client)
    response = await failing_client.get("/fails", headers={"X-Request-ID": "req-500-check"})
    assert response.status == 500
    page = await response.text()
    assert _has_layout(page) and "<h1>Something went wrong</h1>" in page
    assert '<code id="request-id">req-500-check</code>' in page
    assert "secret detail" not in page and "RuntimeError" not in page and "ada@" not in page
    api = await failing_client.get("/api/fails", headers=AUTH)
    assert api.status == 500
    assert (await api.json())["error"] == {
        "code": "internal_error",
        "message": "the server failed; see its log",
        "details": None,
    }
