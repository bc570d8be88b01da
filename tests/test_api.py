"""The batch API: every kind of bad input is refused clearly, and nothing is written."""

from __future__ import annotations

import io
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import AUTH, query

GOOD: dict[str, Any] = {"recipients": ["a@example.org"], "subject": "Hello", "body": "Hi there"}


def batch(**changes: Any) -> dict[str, Any]:
    body = {**GOOD, **changes}
    return {k: v for k, v in body.items() if v is not ...}


async def _nothing_written(settings: Settings) -> None:
    rows = await query(
        settings.database_url or "",
        "SELECT (SELECT count(*) FROM batches) + (SELECT count(*) FROM recipients)"
        " + (SELECT count(*) FROM procrastinate_jobs)",
    )
    assert rows == [(0,)]


@pytest.mark.parametrize(
    ("payload", "field", "fragment"),
    [
        (batch(recipients=...), "recipients", "expected a list"),
        (batch(recipients="a@example.org"), "recipients", "expected a list"),
        (batch(recipients=[]), "recipients", "at least one"),
        (batch(recipients=["not-an-address"]), "recipients", "@-sign"),
        (batch(recipients=["a@example"]), "recipients", "not valid"),
        (batch(recipients=["a@example.org\r\nBcc: x@evil.example"]), "recipients", "line break"),
        (batch(recipients=["x" * 300 + "@example.org"]), "recipients", "longer than"),
        (batch(recipients=[42]), "recipients", "address string"),
        (batch(recipients=[None]), "recipients", "address string"),
        (batch(recipients=[{"name": "no email"}]), "recipients", "address string"),
        (
            batch(recipients=[{"email": "a@example.org", "bad name": "x"}]),
            "recipients",
            "field name",
        ),
        (
            batch(recipients=[{"email": "a@example.org", "nested": {"a": 1}}]),
            "recipients",
            "string, number",
        ),
        (
            batch(recipients=[{"email": "a@example.org", "n": "x" * 3000}]),
            "recipients",
            "longer than",
        ),
        (batch(subject=...), "subject", "required"),
        (batch(subject=""), "subject", "required"),
        (batch(subject="   "), "subject", "required"),
        (batch(subject=7), "subject", "must be a string"),
        (batch(subject="Hi\r\nBcc: x@evil.example"), "subject", "single line"),
        (batch(subject="x" * 1000), "subject", "longer than"),
        (batch(subject="Hi {{ name"), "subject", "template error"),
        (batch(body=...), "body", "required"),
        (batch(body=["list"]), "body", "must be a string"),
        (batch(body="{% for %}"), "body", "template error"),
        (batch(body="x" * 100_001), "body", "longer than"),
        (batch(body="nul \u0000 here"), "body", "NUL"),
        (batch(subject="nul \u0000"), "subject", "NUL"),
        (batch(recipients=[{"email": "a@example.org", "n": "a\u0000b"}]), "recipients", "NUL"),
        (batch(drafter="carrier-pigeon"), "drafter", "must be one of"),
        (batch(subject="Hi {{ name }}"), "recipients", "subject template fails: undefined: 'name'"),
        (batch(body="{{ 1 / 0 }}"), "recipients", "body template fails"),
        ({**GOOD, "subjet": "typo"}, "subjet", "unknown field"),
    ],
)
async def test_bad_input_is_422_naming_the_field_and_nothing_is_written(
    client: TestClient, settings: Settings, payload: Any, field: str, fragment: str
) -> None:
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_batch"
    problems = error["details"]["problems"]
    assert any(p["field"] == field and fragment in p["message"] for p in problems), problems
    await _nothing_written(settings)


@pytest.mark.parametrize("payload", [[1, 2], "just a string", True, 7])
async def test_a_body_that_is_not_an_object_is_a_problem_of_the_body_not_of_a_field(
    client: TestClient, settings: Settings, payload: Any
) -> None:
    # "body" is also a batch's field: the whole request must not be mistaken for it.
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_batch"
    assert error["details"]["problems"] == [
        {"field": None, "message": "the body must be a JSON object"}
    ]
    await _nothing_written(settings)


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"subject": 7}, "subject", "must be a string"),
        ({"body": None, "subject": ["S"]}, "subject", "must be a string"),
        ({"send": "no"}, "send", "must be true or false"),
        ({"send_at": 1893456000}, "send_at", "must be an ISO 8601 date and time"),
        (
            {"recipients": {"email": "a@example.org"}},
            "recipients",
            "expected a list of addresses or objects",
        ),
    ],
)
async def test_a_wrong_type_is_reported_as_a_type_error_not_as_missing(
    client: TestClient, changes: dict[str, Any], field: str, message: str
) -> None:
    response = await client.post("/api/batches", json=batch(**changes), headers=AUTH)
    assert response.status == 422, await response.text()
    problems = (await response.json())["error"]["details"]["problems"]
    assert [(p["field"], p["message"]) for p in problems if p["field"] == field] == [
        (field, message)
    ]
    assert "required" not in message


async def test_a_missing_field_is_reported_as_required(client: TestClient) -> None:
    response = await client.post("/api/batches", json={"subject": "S", "body": "B"}, headers=AUTH)
    problems = (await response.json())["error"]["details"]["problems"]
    assert problems == [
        {"field": "recipients", "message": "required: expected a list of addresses or objects"}
    ]


async def test_fields_with_a_default_need_not_be_given(
    client: TestClient, settings: Settings
) -> None:
    payload = batch(
        recipients=["ada@example.org", {"email": "grace@example.org", "name": "Grace"}],
        subject="Hello {{ name | default(email) }}",
    )
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 201, await response.text()


async def test_only_recipients_lacking_a_needed_field_are_reported(client: TestClient) -> None:
    payload = batch(
        recipients=[
            {"email": "a@example.org", "name": "A"},
            "b@example.org",
            {"email": "c@example.org", "name": "C"},
            "d@example.org",
        ],
        body="Dear {{ name }}",
    )
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    # Both fail the same way: one problem, with their count and positions.
    assert [(p["position"], p["positions"], p["count"]) for p in problems] == [(1, [1, 3], 2)]


async def test_every_bad_address_is_listed_by_position(
    client: TestClient, settings: Settings
) -> None:
    recipients = ["ok@example.org", "bad1", "ok2@example.org", "bad2@", "", "ok3@example.org"]
    response = await client.post("/api/batches", json=batch(recipients=recipients), headers=AUTH)
    assert response.status == 422
    details = (await response.json())["error"]["details"]
    assert [p["position"] for p in details["problems"]] == [1, 3, 4]
    assert details["total_problems"] == 3
    await _nothing_written(settings)


async def test_addresses_differing_only_in_case_are_sent_once(
    client: TestClient, settings: Settings
) -> None:
    recipients = ["Ada@Example.org", "ada@example.org", "ADA@EXAMPLE.ORG", "grace@example.org"]
    response = await client.post("/api/batches", json=batch(recipients=recipients), headers=AUTH)
    assert response.status == 201
    body = await response.json()
    assert (body["total"], body["duplicates_removed"]) == (2, 2)
    rows = await query(settings.database_url or "", "SELECT email FROM recipients ORDER BY id")
    assert rows == [("Ada@example.org",), ("grace@example.org",)]


async def test_more_recipients_than_the_limit_is_refused(
    client: TestClient, settings: Settings
) -> None:
    too_many = [f"p{i}@example.org" for i in range(settings.max_batch_size + 1)]
    response = await client.post("/api/batches", json=batch(recipients=too_many), headers=AUTH)
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    assert any(f"at most {settings.max_batch_size}" in p["message"] for p in problems)
    await _nothing_written(settings)


async def test_malformed_json_is_400(client: TestClient, settings: Settings) -> None:
    response = await client.post(
        "/api/batches",
        data=b'{"recipients": [',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "malformed_json"
    await _nothing_written(settings)


async def test_invalid_utf8_is_400(client: TestClient) -> None:
    response = await client.post(
        "/api/batches",
        data=b'{"subject": "\xff"}',
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 400


async def test_a_form_encoded_body_is_415(client: TestClient) -> None:
    response = await client.post("/api/batches", data={"subject": "x"}, headers=AUTH)
    assert response.status == 415
    assert (await response.json())["error"]["code"] == "unsupported_media_type"


async def test_an_oversized_body_is_413_in_the_error_shape(client: TestClient) -> None:
    huge = b'{"body": "' + b"x" * (11 * 1024 * 1024) + b'"}'
    response = await client.post(
        "/api/batches", data=io.BytesIO(huge), headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic " + "x" * 10},
        {"Authorization": "Bearer"},
        {"Authorization": AUTH["Authorization"] + "x"},
    ],
)
async def test_a_missing_or_wrong_token_is_401(
    client: TestClient, settings: Settings, headers: dict[str, str]
) -> None:
    response = await client.post("/api/batches", json=GOOD, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "unauthorized"
    assert (await client.get("/api/batches", headers=headers)).status == 401
    await _nothing_written(settings)


async def test_unknown_or_malformed_batch_ids_are_404(client: TestClient) -> None:
    for path in [
        "/api/batches/not-a-uuid",
        "/api/batches/00000000-0000-0000-0000-000000000000",
        "/api/batches/00000000-0000-0000-0000-000000000000/recipients",
    ]:
        response = await client.get(path, headers=AUTH)
        assert response.status == 404, path
        assert (await response.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "query_string",
    ["status=lost", "limit=0", "limit=100000", "after=-1", "limit=abc", f"after={2**64}"],
)
async def test_bad_recipient_list_queries_are_422(client: TestClient, query_string: str) -> None:
    created = await (await client.post("/api/batches", json=GOOD, headers=AUTH)).json()
    response = await client.get(
        f"/api/batches/{created['id']}/recipients?{query_string}", headers=AUTH
    )
    assert response.status == 422
    assert (await response.json())["error"]["code"] == "invalid_query"


async def test_recipient_pages_chain_with_next_after(client: TestClient) -> None:
    recipients = [f"p{i}@example.org" for i in range(5)]
    created = await (
        await client.post("/api/batches", json=batch(recipients=recipients), headers=AUTH)
    ).json()
    seen: list[str] = []
    after = 0
    while after is not None:
        page = await (
            await client.get(
                f"/api/batches/{created['id']}/recipients?limit=2&after={after}", headers=AUTH
            )
        ).json()
        seen += [r["email"] for r in page["recipients"]]
        after = page["next_after"]
    assert seen == recipients


async def test_request_ids_are_echoed_or_generated(client: TestClient) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"
    generated = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith junk"})
    assert generated.headers["X-Request-ID"] != "bad id\twith junk"
    assert len(generated.headers["X-Request-ID"]) == 16


async def test_health_and_readiness(client: TestClient, settings: Settings) -> None:
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200, await ready.text()
    await query(
        settings.database_url or "", "DELETE FROM mailroom_migrations WHERE name = '0001_core'"
    )
    not_ready = await client.get("/readyz")
    assert not_ready.status == 503
    assert (await not_ready.json())["pending"] == ["0001_core"]


async def test_the_dev_mail_route_does_not_exist_outside_dev(client: TestClient) -> None:
    response = await client.get("/api/dev/messages", headers=AUTH)
    assert response.status == 404


async def test_a_bad_query_parameter_is_named_in_the_problems(client: TestClient) -> None:
    response = await client.get("/api/dead-letters?limit=0&batch_id=nope", headers=AUTH)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_query"
    assert [(p["field"], p["message"]) for p in error["details"]["problems"]] == [
        ("limit", "must be at least 1"),
        ("batch_id", "must be a UUID"),
    ]


@pytest.mark.parametrize("recipient_id", ["abc", "0", str(2**63)])
async def test_a_recipient_id_that_names_no_row_is_404(
    client: TestClient, recipient_id: str
) -> None:
    created = await (await client.post("/api/batches", json=GOOD, headers=AUTH)).json()
    response = await client.patch(
        f"/api/batches/{created['id']}/recipients/{recipient_id}",
        json={"subject": "S", "body": "B"},
        headers=AUTH,
    )
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "not_found"
