"""No input makes the web tier answer 5xx: every hostile request gets a clear 4xx.

Each 5xx counts toward the web-5xx alert and pages someone, so bytes a client chose must never
produce one. Raw non-ASCII header bytes need :mod:`tests.raw_http` (aiohttp's client refuses to
send them); aiohttp's server decodes header bytes as UTF-8 with ``surrogateescape``, so
``\\xff`` arrives as the lone surrogate ``\\udcff``, which ``str.encode()`` refuses.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from shared.db import Database
from shared.settings import Settings
from tests import raw_http
from tests.conftest import API_TOKEN, AUTH, query
from web.app import create_app
from web.captured_mail import CapturedMail

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
        assert error_of(response)["code"] == "unauthorized"
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
    ("POST", "/api/tokens"),
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


# -- the dev mail viewer ----------------------------------------------------------------------

HOSTILE_MAIL = [
    b"Message-ID: <@>\r\nTo: a@example.org\r\nSubject: empty id\r\n\r\nbody\r\n",
    b'To: "\\\r\nMessage-ID: <\r\nSubject: =?utf-8?q?unterminated\r\n\r\n',
    b'Message-ID: <\xff\xfe@x>\r\nTo: \xff@example.org, <@>, "open\r\nSubject: \xc3\x28\r\n\r\n',
    b"Subject: =?x-no-such-charset?q?abc?= =?utf-8?b?7aCA?= =?utf-8?b?/w==?=\r\n\r\n",
    b"Subject: =?utf-8?b?notbase64!!?=\r\nTo: =?utf-8?q?=FF?= <x@y>\r\n\r\n",
    b"\x00\x01\x02\xff\xfe\xfd binary junk \x80\x81\r\n\r\n\x00",
    b"",
    b"Subject: " + b"x" * 200_000 + b"\r\n\r\n",
    b"Message-ID: <a@b>\r\nMessage-ID: <c@d>\r\nTo:\r\nSubject:\r\n\r\n",
    b"From nobody\nTo: mbox-style@example.org\nSubject: <script>alert(1)</script>\n\n",
]


@pytest.fixture
async def hostile_dev_client(
    settings: Settings, db: Database, tmp_path: Path
) -> AsyncIterator[TestClient]:
    captured_mail = CapturedMail(tmp_path / "mail")
    new = tmp_path / "mail" / "new"
    for number, content in enumerate(HOSTILE_MAIL):
        (new / f"1700000000.M{number}P1Q1.host").write_bytes(content)
    (new / "a-directory").mkdir()
    os.symlink(new / "gone", new / "dangling")
    (new / os.fsdecode(b"name-not-utf8-\xff")).write_bytes(b"Subject: odd name\r\n\r\n")
    (tmp_path / "mail" / "cur" / "1700000001.M1P1Q1.host:2,S").write_bytes(HOSTILE_MAIL[0])
    app = create_app(settings, db=db, captured_mail=captured_mail)
    async with TestClient(TestServer(app)) as c:
        await c.post("/login", data={"token": API_TOKEN})
        yield c


async def test_the_captured_mail_list_survives_any_captured_file(
    hostile_dev_client: TestClient,
) -> None:
    client = hostile_dev_client
    page = await client.get("/dev/mail")
    assert page.status == 200, await page.text()
    text = await page.text()
    assert "empty id" in text and "&lt;@&gt;" in text
    assert "<script>alert(1)</script>" not in text
    links = re.findall(r'href="/dev/mail/([^"]+)"', text)
    assert len(links) >= len(HOSTILE_MAIL)
    for key in links:
        shown = await client.get(f"/dev/mail/{key}")
        assert shown.status == 200, (key, shown.status)
        assert "<script>alert(1)</script>" not in await shown.text()
        raw = await client.get(f"/dev/mail/{key}/raw")
        assert raw.status == 200, (key, raw.status)
        assert raw.content_type == "message/rfc822"
    api = await client.get("/api/dev/messages", headers=AUTH)
    assert api.status == 200, await api.text()
    messages = (await api.json())["messages"]
    assert len(messages) >= len(HOSTILE_MAIL)
    assert {"<@>"} <= {m["message_id"] for m in messages}
    assert any(m["subject"] == "empty id" and m["to"] == ["a@example.org"] for m in messages)
    assert all(len(m["subject"]) <= 1000 for m in messages)


@pytest.mark.parametrize(
    "key", [b"a-directory", b"dangling", b"no-such-key", b"%FF", b"..", b"%2e%2e%2fcur", b"x%00y"]
)
async def test_a_captured_message_that_cannot_be_read_is_404(
    hostile_dev_client: TestClient, key: bytes
) -> None:
    client = hostile_dev_client
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))["mailroom_session"]
    response = await raw(
        client,
        "GET",
        b"/dev/mail/" + key,
        [(b"Cookie", b"mailroom_session=" + cookie.value.encode())],
    )
    assert response.status == 404, (key, response.status, response.body)


async def test_a_file_removed_while_the_list_is_read_is_skipped(
    hostile_dev_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = hostile_dev_client
    real_stat = Path.stat

    def vanishing(self: Path, **kwargs: Any) -> os.stat_result:
        if self.name.startswith("1700000000.M0"):
            raise FileNotFoundError(self)
        return real_stat(self, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    page = await client.get("/dev/mail")
    assert page.status == 200
    assert "empty id" in await page.text()  # the copy in cur/ is still there
