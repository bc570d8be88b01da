"""The HTML side: login, the batch form with per-line errors, CSRF, escaping, dev mail."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mailroom.capture import MailCapture
from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, AUTH, drain, query
from web.app import create_app
from web.captured_mail import CapturedMail


async def login(client: TestClient) -> str:
    """Log in with the token; return the CSRF token the form pages carry."""
    response = await client.post(
        "/login", data={"token": API_TOKEN, "next": "/"}, allow_redirects=False
    )
    assert response.status == 303
    cookie = response.cookies["mailroom_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Lax"
    page = await (await client.get("/")).text()
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    return match.group(1)


async def test_pages_redirect_to_login_without_a_session(client: TestClient) -> None:
    for path in ["/", "/batches/00000000-0000-0000-0000-000000000000"]:
        response = await client.get(path, allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"].startswith("/login?next=")


async def test_a_wrong_token_does_not_log_in(client: TestClient) -> None:
    response = await client.post("/login", data={"token": "nope"}, allow_redirects=False)
    assert response.status == 401
    assert "not right" in await response.text()
    assert "mailroom_session" not in response.cookies
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_login_only_redirects_to_local_paths(client: TestClient) -> None:
    response = await client.post(
        "/login", data={"token": API_TOKEN, "next": "//evil.example/x"}, allow_redirects=False
    )
    assert response.headers["Location"] == "/"


async def test_a_forged_cookie_is_not_a_session(client: TestClient) -> None:
    client.session.cookie_jar.update_cookies(
        {"mailroom_session": "eyJleHAiOiA5OTk5OTk5OTk5fQ==.abc"}
    )
    assert (await client.get("/", allow_redirects=False)).status == 303


async def test_the_form_creates_a_batch_and_shows_its_progress(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    response = await client.post(
        "/batches",
        data={
            "csrf_token": csrf,
            "recipients": "ada@example.org\n\ngrace@example.org, linus@example.org\n",
            "subject": "Hello {{ email }}",
            "body": "Hi!",
            "drafter": "template",
        },
        allow_redirects=False,
    )
    assert response.status == 303, await response.text()
    location = response.headers["Location"]
    batch_id = location.rsplit("/", 1)[1]
    assert await query(settings.database_url or "", "SELECT count(*) FROM recipients") == [(3,)]
    await drain(settings)
    page = await (await client.get(location)).text()
    assert batch_id in page
    assert 'data-count="sent">3<' in page
    # The page refreshes through the JSON API with the session cookie.
    status = await (await client.get(f"/api/batches/{batch_id}")).json()
    assert status["counts"]["sent"] == 3


async def test_form_errors_name_each_bad_line_and_keep_the_input(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    pasted = "ok@example.org\nbroken-address\n\n<script>alert(1)</script>@x\nfine@example.org"
    response = await client.post(
        "/batches",
        data={"csrf_token": csrf, "recipients": pasted, "subject": "Hi\nthere", "body": "{% if %}"},
    )
    assert response.status == 422
    page = await response.text()
    assert "Recipients, line 2:" in page and "Recipients, line 4:" in page
    assert "Recipients, line 1:" not in page and "Recipients, line 5:" not in page
    assert page.index("Recipients, line 2:") < page.index("Recipients, line 4:")
    assert "must be a single line" in page
    assert "template error" in page
    # Echoed input is escaped and preserved in the textarea.
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;@x" in page
    assert "broken-address" in page
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


@pytest.mark.parametrize("token", [None, "", "forged"])
async def test_a_form_post_without_the_csrf_token_is_refused(
    client: TestClient, settings: Settings, token: str | None
) -> None:
    await login(client)
    data = {"recipients": "a@example.org", "subject": "S", "body": "B"}
    if token is not None:
        data["csrf_token"] = token
    response = await client.post("/batches", data=data)
    assert response.status == 403
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_a_cookie_authenticated_api_write_needs_the_csrf_header(client: TestClient) -> None:
    csrf = await login(client)
    body = {"recipients": ["a@example.org"], "subject": "S", "body": "B"}
    refused = await client.post("/api/batches", json=body)
    assert refused.status == 403
    assert (await refused.json())["error"]["code"] == "csrf_failed"
    non_ascii = await client.post("/api/batches", json=body, headers={"X-CSRF-Token": "jeton-é"})
    assert non_ascii.status == 403
    accepted = await client.post("/api/batches", json=body, headers={"X-CSRF-Token": csrf})
    assert accepted.status == 201


async def test_pages_carry_a_strict_content_security_policy(client: TestClient) -> None:
    response = await client.get("/login")
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_logout_ends_the_session(client: TestClient) -> None:
    csrf = await login(client)
    response = await client.post("/logout", data={"csrf_token": csrf}, allow_redirects=False)
    assert response.status == 303
    assert (await client.get("/", allow_redirects=False)).status == 303


@pytest.fixture
async def dev_client(settings: Settings, db: Database, tmp_path) -> AsyncIterator[TestClient]:  # type: ignore[no-untyped-def]
    capture = MailCapture(tmp_path / "mail")
    port = await capture.start("127.0.0.1", 0)
    dev_settings = settings.model_copy(update={"smtp_port": port})
    app = create_app(dev_settings, db=db, captured_mail=CapturedMail(capture.directory))
    async with TestClient(TestServer(app)) as test_client:
        test_client.app_settings = dev_settings  # type: ignore[attr-defined]
        yield test_client
    await capture.close()


async def test_dev_mode_shows_captured_mail(dev_client: TestClient) -> None:
    settings: Settings = dev_client.app_settings  # type: ignore[attr-defined]
    created = await dev_client.post(
        "/api/batches",
        json={
            "recipients": ["a@example.org", "b@example.org"],
            "subject": "Hi <b>{{ email }}</b>",
            "body": "B",
        },
        headers=AUTH,
    )
    assert created.status == 201
    await drain(settings)
    messages = (await (await dev_client.get("/api/dev/messages", headers=AUTH)).json())["messages"]
    assert sorted(m["to"][0] for m in messages) == ["a@example.org", "b@example.org"]
    assert all(m["message_id"].startswith("<mailroom.") and m["received_at"] for m in messages)
    assert {m["subject"] for m in messages} == {
        "Hi <b>a@example.org</b>",
        "Hi <b>b@example.org</b>",
    }
    await login(dev_client)
    page = await (await dev_client.get("/dev/mail")).text()
    assert "Hi &lt;b&gt;a@example.org&lt;/b&gt;" in page
    key = re.search(r'href="/dev/mail/([^"]+)"', page)
    assert key
    raw = await dev_client.get(f"/dev/mail/{key.group(1)}/raw")
    assert raw.content_type == "message/rfc822"
    assert "Message-ID: <mailroom." in await raw.text()
    assert (await dev_client.get("/dev/mail/no-such-key")).status == 404


async def test_failed_logins_are_rate_limited_per_client(
    client: TestClient, settings: Settings
) -> None:
    for _ in range(settings.login_attempts_per_minute):
        assert (await client.post("/login", data={"token": "guess"})).status == 401
    blocked = await client.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
    assert blocked.status == 429
    assert blocked.headers["Retry-After"] == "60"
    assert "mailroom_session" not in blocked.cookies


@pytest.mark.parametrize(("trust", "secure"), [(False, ""), (True, True)])
async def test_forwarded_https_is_trusted_only_when_configured(
    settings: Settings, db: Database, trust: bool, secure: object
) -> None:
    app = create_app(settings.model_copy(update={"trust_proxy": trust}), db=db)
    async with TestClient(TestServer(app)) as c:
        response = await c.post(
            "/login",
            data={"token": API_TOKEN},
            headers={"X-Forwarded-Proto": "https"},
            allow_redirects=False,
        )
        assert response.cookies["mailroom_session"]["secure"] == secure


async def test_the_dead_letters_page_redrives_and_discards(
    client: TestClient, settings: Settings, smtp: Any
) -> None:
    from tests.smtp_server import Rule

    smtp.rules["a@example.org"] = Rule("550 no such user")
    smtp.rules["b@example.org"] = Rule("550 no such user")
    await client.post(
        "/api/batches",
        json={"recipients": ["a@example.org", "b@example.org"], "subject": "S", "body": "B"},
        headers=AUTH,
    )
    await drain(settings)
    csrf = await login(client)
    page = await (await client.get("/dead-letters")).text()
    assert "a@example.org" in page and "SMTP 550 during rcpt: no such user" in page
    ids = [
        row[0]
        for row in await query(settings.database_url or "", "SELECT id FROM recipients ORDER BY id")
    ]
    forged = await client.post(
        "/dead-letters", data={"csrf_token": "x", "action": "redrive", "target": "all"}
    )
    assert forged.status == 403
    for bad in (
        {"action": "explode", "target": "all"},
        {"action": "redrive", "target": "one"},
        {"action": "redrive", "target": str(2**70)},
    ):
        assert (await client.post("/dead-letters", data={"csrf_token": csrf, **bad})).status == 400
    smtp.rules.clear()
    for action, target in (("redrive", ids[0]), ("discard", ids[1])):
        asked = await client.post(
            "/dead-letters", data={"csrf_token": csrf, "action": action, "target": str(target)}
        )
        assert asked.status == 200 and f"Yes, {action} 1 dead letter" in await asked.text()
        done = await client.post(
            "/dead-letters",
            data={"csrf_token": csrf, "action": action, "target": str(target), "confirm": "1"},
        )
        assert done.status == 200
        assert f"1 dead letter {'requeued' if action == 'redrive' else 'discarded'}." in (
            await done.text()
        )
    await drain(settings)
    rows = await query(
        settings.database_url or "", "SELECT email, status FROM recipients ORDER BY id"
    )
    assert rows == [("a@example.org", "sent"), ("b@example.org", "cancelled")]


async def test_the_batch_page_filters_recipients_by_status(
    client: TestClient, settings: Settings, smtp: Any
) -> None:
    from tests.smtp_server import Rule

    smtp.rules["dead@example.org"] = Rule("550 nope")
    created = await (
        await client.post(
            "/api/batches",
            json={
                "recipients": ["ok@example.org", "dead@example.org"],
                "subject": "S",
                "body": "B",
            },
            headers=AUTH,
        )
    ).json()
    await drain(settings)
    await login(client)
    page = await (await client.get(f"/batches/{created['id']}?status=dead")).text()
    assert "dead@example.org" in page and "ok@example.org" not in page
    assert (await client.get(f"/batches/{created['id']}?status=lost")).status == 400


async def test_the_batch_page_redrives_its_dead_letters(
    client: TestClient, settings: Settings, smtp: Any
) -> None:
    from tests.smtp_server import Rule

    smtp.rules["gone@example.org"] = Rule("550 no such user")
    created = await (
        await client.post(
            "/api/batches",
            json={
                "recipients": ["ok@example.org", "gone@example.org"],
                "subject": "S",
                "body": "B",
            },
            headers=AUTH,
        )
    ).json()
    await drain(settings)
    csrf = await login(client)
    page = await (await client.get(f"/batches/{created['id']}")).text()
    assert "Redrive 1 dead letter(s)" in page
    assert (
        await client.post(f"/batches/{created['id']}/redrive", data={"csrf_token": "x"})
    ).status == 403
    smtp.rules.clear()
    # Without JavaScript's prompt, the server asks first and changes nothing.
    asked = await client.post(f"/batches/{created['id']}/redrive", data={"csrf_token": csrf})
    assert asked.status == 200
    assert "Redrive 1 dead letter of this batch?" in await asked.text()
    await drain(settings)
    assert smtp.to_addresses() == {"ok@example.org": 1}
    done = await client.post(
        f"/batches/{created['id']}/redrive",
        data={"csrf_token": csrf, "confirm": "1"},
        allow_redirects=False,
    )
    assert done.status == 303
    said = await (await client.get(done.headers["Location"])).text()
    assert "1 dead letter requeued." in said
    await drain(settings)
    assert smtp.to_addresses() == {"ok@example.org": 1, "gone@example.org": 1}
    again = await client.post(
        f"/batches/{created['id']}/redrive", data={"csrf_token": csrf, "confirm": "1"}
    )
    assert "Nothing was requeued" in await again.text()


async def test_no_page_and_no_api_route_answers_without_authentication(client: TestClient) -> None:
    """Every registered route, with every method it has: no session, no token, no data."""
    public = {"/healthz", "/readyz", "/login", "/metrics", "/api/openapi.json"}
    checked = 0
    for route in client.app.router.routes():
        resource = route.resource
        if (
            resource is None
            or route.method in {"HEAD", "*"}
            or resource.canonical.startswith("/static")
        ):
            continue
        path = resource.canonical
        if path in public:
            continue
        url = re.sub(r"\{[^}]+\}", "1", path)
        response = await client.request(route.method, url, allow_redirects=False)
        if path.startswith("/u/"):
            # Unsubscribe links are public (RFC 8058); a token not signed by us gets nothing.
            assert response.status == 404, (route.method, path, response.status)
        elif path.startswith("/webhooks/"):
            # Provider webhooks prove themselves (a signature, Postmark's credentials); these
            # settings configure none, so each is off.
            assert response.status == 404, (route.method, path, response.status)
            assert (await response.json())["error"]["code"] == "webhook_disabled"
        elif path.startswith("/api/"):
            assert response.status == 401, (route.method, path, response.status)
        else:
            assert response.status == 303, (route.method, path, response.status)
            assert response.headers["Location"].startswith("/login")
        checked += 1
    assert checked >= 20
