"""No input makes the web tier answer 5xx: every hostile request gets a clear 4xx.

Each 5xx counts toward the web-5xx alert and pages someone, so bytes a client chose must never
produce one. Raw non-ASCII header bytes need :mod:`tests.raw_http` (aiohttp's client refuses to
send them); aiohttp's server decodes header bytes as UTF-8 with ``surrogateescape``, so
``\\xff`` arrives as the lone surrogate ``\\udcff``, which ``str.encode()`` refuses.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from shared.db import Database
from shared.settings import Settings
from tests import raw_http
from tests.conftest import API_TOKEN, AUTH, query
from web.app import create_app

BEARER = b"Bearer " + API_TOKEN.encode()


async def raw(
    client: TestClient,
    method: str,
    target: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> raw_http.RawResponse:
    server = client.server
    assert server.port is not None
    return await raw_http.request(str(server.host), server.port, method, target, headers, body)


def error_of(response: raw_http.RawResponse) -> dict[str, Any]:
    """The API's error shape, checked: ``{"error": {"code", "message", "details"}}``."""
    error = json.loads(response.body)["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and isinstance(error["message"], str)
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "value",
    [b"Bearer \xff", b"Bearer \xc3\xa9", b"\xff\xfe", b"Bearer " + API_TOKEN.encode() + b"\xff"],
)
async def test_a_non_ascii_bearer_token_is_401(client: TestClient, value: bytes) -> None:
    response = await raw(client, "GET", b"/api/batches", [(b"Authorization", value)])
    assert response.status == 401, response.body
    assert error_of(response)["code"] == "unauthorized"


async def test_a_non_ascii_csrf_header_is_403(client: TestClient) -> None:
    # A Bearer token needs no CSRF token; a session does, so log in and send junk bytes.
    login = await client.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
    cookie = login.cookies["mailroom_session"].value.encode()
    response = await raw(
        client,
        "POST",
        b"/api/batches/00000000-0000-0000-0000-000000000000/cancel",
        [(b"Cookie", b"mailroom_session=" + cookie), (b"X-CSRF-Token", b"\xff\xfe")],
    )
    assert response.status == 403, response.body
    assert error_of(response)["code"] == "csrf_failed"


@pytest.mark.parametrize(
    "cookie",
    [b"\xc3\xa9.\xc3\xa9", b"\xff.\xff", b"abc.\xff", b"\xff", "é.é".encode(), b"e30.\xc3\xa9"],
)
async def test_a_non_ascii_session_cookie_is_no_session(client: TestClient, cookie: bytes) -> None:
    headers = [(b"Cookie", b"mailroom_session=" + cookie)]
    page = await raw(client, "GET", b"/", headers)
    assert page.status == 303, page.body
    assert (page.header("Location") or "").startswith("/login")
    api = await raw(client, "GET", b"/api/batches", headers)
    assert api.status == 401, api.body
    assert error_of(api)["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (b"application/x-www-form-urlencoded", b"token=\xff\xfe&next=/"),
        (b"application/x-www-form-urlencoded; charset=utf-8", b"token=%FF&next=\xc3"),
        (
            b"multipart/form-data; boundary=X",
            b'--X\r\nContent-Disposition: form-data; name="token"\r\n\r\n\xff\xfe\r\n--X--\r\n',
        ),
        (b"multipart/form-data; boundary=X", b"--X\r\n\xff\r\n\r\n"),
        (b"multipart/form-data", b"no boundary"),
        (b"application/x-www-form-urlencoded; charset=no-such-charset", b"token=x"),
    ],
)
async def test_a_login_form_that_is_not_utf8_is_400(
    client: TestClient, content_type: bytes, body: bytes
) -> None:
    response = await raw(client, "POST", b"/login", [(b"Content-Type", content_type)], body)
    assert response.status == 400, response.body


async def test_every_form_route_refuses_a_body_that_is_not_utf8(client: TestClient) -> None:
    login = await client.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
    cookie = b"mailroom_session=" + login.cookies["mailroom_session"].value.encode()
    batch = b"/batches/00000000-0000-0000-0000-000000000000"
    for target in [
        b"/logout",
        b"/batches",
        b"/dead-letters",
        b"/suppressions",
        batch + b"/send",
        batch + b"/cancel",
        batch + b"/redrive",
        batch + b"/recipients/1/edit",
    ]:
        response = await raw(
            client,
            "POST",
            target,
            [(b"Cookie", cookie), (b"Content-Type", b"application/x-www-form-urlencoded")],
            b"csrf_token=\xff",
        )
        assert response.status == 400, (target, response.status, response.body)


@pytest.mark.parametrize("value", [b"Bearer \xff", b"Bearer sc\xc3\xa9", b"\xff"])
async def test_metrics_with_a_non_ascii_token_is_401(
    settings: Settings, db: Database, value: bytes
) -> None:
    app = create_app(settings.model_copy(update={"metrics_token": SecretStr("scrape-me")}), db=db)
    async with TestClient(TestServer(app)) as c:
        response = await raw(c, "GET", b"/metrics", [(b"Authorization", value)])
        assert response.status == 401, response.body
        ok = await raw(c, "GET", b"/metrics", [(b"Authorization", b"Bearer scrape-me")])
        assert ok.status == 200


# -- JSON bodies ------------------------------------------------------------------------------

NO_BATCH = "00000000-0000-0000-0000-000000000000"
JSON_ROUTES = [
    ("POST", "/api/batches"),
    ("POST", "/api/dead-letters/redrive"),
    ("POST", "/api/dead-letters/discard"),
    ("POST", "/api/suppressions"),
    ("POST", "/api/suppressions/remove"),
    ("PATCH", f"/api/batches/{NO_BATCH}/recipients/1"),
]
JSON = {**AUTH, "Content-Type": "application/json"}


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", lambda m: NO_BATCH if "batch" in m.group() else "1", path)


async def test_every_body_taking_api_route_is_listed_here(client: TestClient) -> None:
    """A new JSON route must join JSON_ROUTES, so every test below covers it."""
    writes = {
        (route.method, _concrete(route.resource.canonical))
        for route in client.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method in {"POST", "PUT", "PATCH"}
    }
    bodyless = {
        ("POST", f"/api/batches/{NO_BATCH}/send"),
        ("POST", f"/api/batches/{NO_BATCH}/cancel"),
    }
    assert writes - bodyless == set(JSON_ROUTES)


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
@pytest.mark.parametrize(
    "body",
    [b"[" * 1000 + b"]" * 1000, b'{"a":' * 1000 + b"1" + b"}" * 1000, b"[" * 100_000],
    ids=["arrays", "objects", "unclosed"],
)
async def test_json_nested_a_thousand_deep_is_400_on_every_json_route(
    client: TestClient, method: str, path: str, body: bytes
) -> None:
    response = await client.request(method, path, data=body, headers=JSON)
    assert response.status == 400, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "json_too_deep", error
    assert set(error) == {"code", "message", "details"}


async def test_ordinary_nesting_is_still_accepted(client: TestClient) -> None:
    # 28 levels inside a recipient field (31 in all) is refused for its type, not its depth.
    deep_field = {"email": "a@example.org", "n": json.loads("[" * 28 + "]" * 28)}
    payload = {"recipients": [deep_field], "subject": "S", "body": "B"}
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 422
    assert "string, number" in (await response.text())
    ok = {"recipients": [{"email": "a@example.org", "n": "[[{{\\"}], "subject": "S", "body": "B"}
    assert (await client.post("/api/batches", json=ok, headers=AUTH)).status == 201


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "field"),
    [
        (
            "POST",
            "/api/batches",
            b'{"recipients": ["a@example.org"], "subject": "s\\ud800", "body": "b"}',
            "invalid_batch",
            "subject",
        ),
        (
            "POST",
            "/api/batches",
            b'{"recipients": ["a@example.org"], "subject": "s", "body": "\\udfff b"}',
            "invalid_batch",
            "body",
        ),
        (
            "POST",
            "/api/batches",
            b'{"recipients": ["a@example.org", {"email": "b@example.org", "name": "\\udc80"}],'
            b' "subject": "s", "body": "b"}',
            "invalid_batch",
            "recipients",
        ),
        (
            "POST",
            "/api/batches",
            b'{"recipients": [{"email": "b@example.org", "n\\ud800": "x"}],'
            b' "subject": "s", "body": "b"}',
            "invalid_batch",
            "recipients",
        ),
        (
            "PATCH",
            f"/api/batches/{NO_BATCH}/recipients/1",
            b'{"subject": "s\\ud800", "body": "b"}',
            "invalid_draft",
            "subject",
        ),
        (
            "PATCH",
            f"/api/batches/{NO_BATCH}/recipients/1",
            b'{"subject": "s", "body": "\\ud800"}',
            "invalid_draft",
            "body",
        ),
        (
            "POST",
            "/api/suppressions",
            b'{"addresses": ["a\\ud800@example.org"]}',
            "invalid_suppression",
            "addresses",
        ),
        (
            "POST",
            "/api/suppressions/remove",
            b'{"addresses": ["a\\ud800@example.org"]}',
            "invalid_suppression",
            "addresses",
        ),
        (
            "POST",
            "/api/dead-letters/redrive",
            b'{"batch_id": "\\ud800"}',
            "invalid_selection",
            "batch_id",
        ),
    ],
)
async def test_a_lone_surrogate_is_422_naming_the_field(
    client: TestClient,
    settings: Settings,
    method: str,
    path: str,
    body: bytes,
    code: str,
    field: str,
) -> None:
    response = await client.request(method, path, data=body, headers=JSON)
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == code
    assert "lone surrogate" in error["message"]
    assert [p["field"] for p in error["details"]["problems"]] == [field]
    rows = await query(
        settings.database_url or "",
        "SELECT (SELECT count(*) FROM batches) + (SELECT count(*) FROM suppressions)",
    )
    assert rows == [(0,)]


async def test_a_complete_surrogate_pair_is_text(client: TestClient) -> None:
    body = b'{"recipients": ["a@example.org"], "subject": "\\ud83d\\udce8 news", "body": "b"}'
    response = await client.post("/api/batches", data=body, headers=JSON)
    assert response.status == 201, await response.text()


@pytest.mark.parametrize(
    "body",
    [
        b'{"recipients": [{"email": "a@example.org", "n": NaN}], "subject": "s", "body": "b"}',
        b'{"recipients": [{"email": "a@example.org", "n": 1e400}], "subject": "s", "body": "b"}',
        b'{"recipients": [{"email": "a@example.org", "n": -Infinity}], "subject": "s",'
        b' "body": "b"}',
        b'{"recipients": [{"email": "a@example.org", "n": ' + b"9" * 5000 + b'}], "subject": "s"}',
        b"\xef\xbb\xbf{}",
        b"",
        b'{"subject": "\xed\xa0\x80"}',
    ],
    ids=["nan", "overflow", "infinity", "5000-digit", "bom", "empty", "utf8-surrogate"],
)
async def test_json_that_python_accepts_but_json_does_not_is_400(
    client: TestClient, settings: Settings, body: bytes
) -> None:
    response = await client.post("/api/batches", data=body, headers=JSON)
    assert response.status == 400, await response.text()
    assert (await response.json())["error"]["code"] == "malformed_json"
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


@pytest.mark.parametrize(("method", "path"), JSON_ROUTES)
async def test_every_json_route_wants_application_json(
    client: TestClient, method: str, path: str
) -> None:
    response = await client.request(
        method, path, data=b'{"all": true}', headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert response.status == 415, await response.text()
    assert (await response.json())["error"]["code"] == "unsupported_media_type"
