"""The captured-mail viewer over HTTP: ``/api/dev/messages`` and the ``/dev/mail`` pages.

Search, paging and its total, deleting everything, one message decoded; keys and queries that
name nothing, or try to, are a clear 4xx; the HTML part is served so that nothing in it runs.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from shared.db import Database
from shared.settings import Settings
from tests.conftest import AUTH
from tests.test_hostile_input import raw
from tests.test_pages import login
from web.app import create_app
from web.captured_mail import CapturedMail
from worker.smtp import build_message

EN_DASH = "\N{EN DASH}"
UNSUBSCRIBE = "http://127.0.0.1:8080/u/" + "t" * 120
HOSTILE_HTML = (
    b"Subject: hostile\r\nTo: eve@example.org\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>Hi</p><script>document.title='ran'</script>"
    b'<img src="https://tracker.example/pixel.gif"><a href="javascript:alert(1)">x</a>\r\n'
)


def _write(mail: CapturedMail, name: str, content: bytes, mtime: float) -> None:
    path = mail.directory / "new" / name
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def _message(to: str, subject: str, body: str = "Ünïcödé body https://example.org/x") -> bytes:
    return build_message(
        sender="sender@example.com",
        to=to,
        subject=subject,
        body=body,
        message_id=f"<{abs(hash(subject))}.abc@example.com>",
        unsubscribe_url=UNSUBSCRIBE,
    ).data


@pytest.fixture
def mail(tmp_path: Path) -> CapturedMail:
    mail = CapturedMail(tmp_path / "mail")
    for i in range(120):
        to = f"user{i}@{'other.net' if i % 4 == 0 else 'example.org'}"
        _write(mail, f"{1000 + i}.M{i}.host", _message(to, f"Issue {i}"), 1_700_000_000 + i)
    _write(mail, "2000.M0.host", HOSTILE_HTML, 1_700_001_000)
    return mail


@pytest.fixture
async def dev(settings: Settings, db: Database, mail: CapturedMail) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(settings, db=db, captured_mail=mail))) as client:
        yield client


async def test_the_api_searches_and_pages_with_a_total(dev: TestClient) -> None:
    first = await (await dev.get("/api/dev/messages?limit=50", headers=AUTH)).json()
    assert (first["total"], first["offset"], first["limit"], first["next_offset"]) == (
        121,
        0,
        50,
        50,
    )
    assert [m["subject"] for m in first["messages"][:2]] == ["hostile", "Issue 119"]
    last = await (await dev.get("/api/dev/messages?offset=100&limit=50", headers=AUTH)).json()
    assert len(last["messages"]) == 21 and last["next_offset"] is None
    assert last["messages"][-1]["subject"] == "Issue 0"

    found = await (await dev.get("/api/dev/messages?q=OTHER.NET&limit=7", headers=AUTH)).json()
    assert found["total"] == 30 and len(found["messages"]) == 7 and found["next_offset"] == 7
    assert all(m["to"][0].endswith("@other.net") for m in found["messages"])
    by_subject = await (await dev.get("/api/dev/messages?q=issue%2042", headers=AUTH)).json()
    assert [m["key"] for m in by_subject["messages"]] == ["1042.M42.host"]


async def test_one_message_is_decoded_with_its_links(dev: TestClient) -> None:
    response = await dev.get("/api/dev/messages/1042.M42.host", headers=AUTH)
    assert response.status == 200, await response.text()
    message = await response.json()
    assert message["subject"] == "Issue 42" and message["to"] == ["user42@example.org"]
    assert "Ünïcödé body" in message["text"] and "=C3" not in message["text"]
    assert "Ünïcödé" in message["html"]
    assert {"name": "List-Unsubscribe", "value": f"<{UNSUBSCRIBE}>"} in message["headers"]
    assert message["links"][:2] == ["https://example.org/x", UNSUBSCRIBE]

    hostile = await (await dev.get("/api/dev/messages/2000.M0.host", headers=AUTH)).json()
    assert hostile["links"] == []  # neither the image nor the javascript: href


async def test_delete_empties_the_capture_and_needs_the_token(dev: TestClient) -> None:
    assert (await dev.delete("/api/dev/messages")).status == 401
    response = await dev.delete("/api/dev/messages", headers=AUTH)
    assert response.status == 204
    assert await response.read() == b""
    after = await (await dev.get("/api/dev/messages", headers=AUTH)).json()
    assert (after["total"], after["messages"], after["next_offset"]) == (0, [], None)


@pytest.mark.parametrize(
    "target",
    [
        b"/api/dev/messages/no-such-key",
        b"/api/dev/messages/..%2Fx",
        b"/api/dev/messages/%2E%2E",
        b"/api/dev/messages/x%00y",
        b"/api/dev/messages/%FF",
        b"/api/dev/messages/1042.M42.host%0A",
    ],
)
async def test_a_key_that_names_no_message_is_404(dev: TestClient, target: bytes) -> None:
    response = await raw(dev, "GET", target, [(b"Authorization", AUTH["Authorization"].encode())])
    assert response.status == 404, (target, response.status, response.body)
    assert b'"not_found"' in response.body


async def test_an_offset_past_the_end_is_an_empty_page(dev: TestClient) -> None:
    page = await (await dev.get("/api/dev/messages?offset=1000000000", headers=AUTH)).json()
    assert (page["messages"], page["total"], page["next_offset"]) == ([], 121, None)


@pytest.mark.parametrize(
    ("query", "field", "message"),
    [
        ("limit=-1", "limit", "must be at least 1"),
        ("limit=0", "limit", "must be at least 1"),
        ("limit=501", "limit", "must be at most 500"),
        ("offset=-5", "offset", "must be at least 0"),
        ("offset=" + "9" * 40, "offset", "must be at most 9223372036854775807"),
        ("offset=abc", "offset", "must be an integer"),
        ("q=" + "x" * 201, "q", "must be at most 200 characters"),
    ],
)
async def test_a_bad_paging_parameter_is_a_422_naming_it(
    dev: TestClient, query: str, field: str, message: str
) -> None:
    response = await dev.get(f"/api/dev/messages?{query}", headers=AUTH)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_query"
    assert [(p["field"], p["message"]) for p in error["details"]["problems"]] == [(field, message)]


async def test_the_list_page_searches_and_pages(dev: TestClient) -> None:
    await login(dev)
    page = await (await dev.get("/dev/mail")).text()
    assert f"1{EN_DASH}50 of 121" in page
    assert 'href="/dev/mail?offset=50" rel="next"' in page and 'rel="prev"' not in page
    assert 'href="/dev/mail/1119.M119.host"' in page and "Issue 69" not in page
    second = await (await dev.get("/dev/mail?offset=50")).text()
    assert f"51{EN_DASH}100 of 121" in second and 'href="/dev/mail" rel="prev"' in second
    last = await (await dev.get("/dev/mail?offset=100")).text()
    assert f"101{EN_DASH}121 of 121" in last and 'rel="next"' not in last

    found = await (await dev.get("/dev/mail?q=other.net")).text()
    assert f"1{EN_DASH}30 of 30" in found and 'value="other.net"' in found
    assert "user4@other.net" in found and "user5@example.org" not in found


@pytest.mark.parametrize(
    "target",
    [
        b"/dev/mail?offset=-3",
        b"/dev/mail?offset=abc",
        b"/dev/mail?offset=" + b"9" * 5000,
        b"/dev/mail?q=%ED%A0%80&offset=%FF",
        b"/dev/mail?q=%FF%FE%00",
        b"/dev/mail?q=" + b"%22%3E%3Cscript%3E" * 50,
    ],
)
async def test_no_query_makes_the_list_page_fail(dev: TestClient, target: bytes) -> None:
    await login(dev)
    cookie = dev.session.cookie_jar.filter_cookies(dev.make_url("/"))["mailroom_session"]
    response = await raw(
        dev, "GET", target, [(b"Cookie", b"mailroom_session=" + cookie.value.encode())]
    )
    assert response.status == 200, (target, response.status, response.body[:300])
    assert b'"><script>' not in response.body


async def test_delete_all_asks_first_and_needs_the_csrf_token(
    dev: TestClient, mail: CapturedMail
) -> None:
    csrf = await login(dev)
    assert (await dev.post("/dev/mail", data={"confirmed": "yes"})).status == 403
    asked = await dev.post("/dev/mail", data={"csrf_token": csrf})
    assert asked.status == 200
    assert "all 121 captured messages" in await asked.text()
    assert mail.page().total == 121
    done = await dev.post(
        "/dev/mail", data={"csrf_token": csrf, "confirmed": "yes"}, allow_redirects=False
    )
    assert done.status == 303 and done.headers["Location"] == "/dev/mail"
    assert mail.page().total == 0
    assert "Nothing captured yet." in await (await dev.get("/dev/mail")).text()


async def test_the_message_page_shows_the_decoded_text_with_links(dev: TestClient) -> None:
    await login(dev)
    response = await dev.get("/dev/mail/1042.M42.host")
    assert response.status == 200
    page = await response.text()
    assert "Ünïcödé body" in page and "=C3" not in page
    link = '<a href="https://example.org/x" rel="noopener noreferrer" target="_blank">'
    assert link + "https://example.org/x</a>" in page
    assert f'<a href="{UNSUBSCRIBE}" rel="noopener noreferrer" target="_blank">' in page
    assert '<iframe class="mail-html" sandbox src="/dev/mail/1042.M42.host/html"' in page
    assert '<th scope="row">List-Unsubscribe</th>' in page
    # The page frames its HTML part and nothing else.
    assert "frame-src 'self'" in response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]


async def test_a_hostile_html_part_is_served_so_that_nothing_in_it_runs(dev: TestClient) -> None:
    await login(dev)
    page = await (await dev.get("/dev/mail/2000.M0.host")).text()
    assert "<script>" not in page and "javascript:" not in page
    part = await dev.get("/dev/mail/2000.M0.host/html")
    assert part.status == 200 and part.content_type == "text/html"
    assert "<script>document.title='ran'</script>" in await part.text()  # as written, inert:
    policy = part.headers["Content-Security-Policy"]
    assert re.search(r"(^|; )default-src 'none'(;|$)", policy)
    assert re.search(r"(^|; )sandbox(;|$)", policy)
    assert "img-src data:" in policy and "script" not in policy
    assert part.headers["X-Content-Type-Options"] == "nosniff"
    assert part.headers["X-Frame-Options"] == "SAMEORIGIN"


async def test_the_raw_message_is_a_download(dev: TestClient, mail: CapturedMail) -> None:
    await login(dev)
    response = await dev.get("/dev/mail/1042.M42.host/raw")
    assert response.status == 200
    assert response.content_type == "message/rfc822"
    assert response.headers["Content-Disposition"] == 'attachment; filename="1042.M42.host.eml"'
    assert await response.read() == mail.raw("1042.M42.host")


@pytest.mark.parametrize(
    "target",
    [
        b"/dev/mail/no-such-key/html",
        b"/dev/mail/..%2Fx/raw",
        b"/dev/mail/%2E%2E/html",
        b"/dev/mail/x%00y/raw",
        b"/dev/mail/1042.M42.host%0A",
    ],
)
async def test_a_page_for_no_message_is_404(dev: TestClient, target: bytes) -> None:
    await login(dev)
    cookie = dev.session.cookie_jar.filter_cookies(dev.make_url("/"))["mailroom_session"]
    response = await raw(
        dev, "GET", target, [(b"Cookie", b"mailroom_session=" + cookie.value.encode())]
    )
    assert response.status == 404, (target, response.status, response.body[:300])


async def test_a_message_without_an_html_part_has_no_html_route(
    dev: TestClient, mail: CapturedMail
) -> None:
    _write(mail, "3000.M0.host", b"Subject: plain\r\n\r\nJust text.\r\n", 1_700_002_000)
    await login(dev)
    page = await (await dev.get("/dev/mail/3000.M0.host")).text()
    assert "Just text." in page and "<iframe" not in page
    assert (await dev.get("/dev/mail/3000.M0.host/html")).status == 404
