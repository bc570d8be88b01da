"""Sessions end when they should (logout, a token rotation, expiry); guessing is rate-limited."""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from pydantic import SecretStr
from yarl import URL

from shared.db import Database
from shared.settings import Settings
from shared.signing import Purpose, SignedValues
from tests.conftest import API_TOKEN, AUTH, query
from tests.test_pages import login
from web.app import create_app

BATCH_ID = "00000000-0000-0000-0000-000000000000"


@asynccontextmanager
async def browser(settings: Settings, db: Database, **changes: Any) -> AsyncIterator[TestClient]:
    app = create_app(settings.model_copy(update=changes), db=db)
    async with TestClient(TestServer(app)) as client:
        yield client


async def cookie_of(client: TestClient) -> str:
    jar = client.session.cookie_jar.filter_cookies(client.make_url("/"))
    return jar["mailroom_session"].value


async def works(client: TestClient, cookie: str, csrf: str) -> bool:
    """Whether ``cookie`` is a session: for a page, and for an API write with its CSRF token."""
    client.session.cookie_jar.clear()
    client.session.cookie_jar.update_cookies({"mailroom_session": cookie})
    page = await client.get("/", allow_redirects=False)
    api = await client.post(f"/api/batches/{BATCH_ID}/cancel", headers={"X-CSRF-Token": csrf})
    assert (page.status == 200) == (api.status == 404), (page.status, api.status)
    return page.status == 200


async def test_a_cookie_works_until_logout_and_never_after(
    settings: Settings, db: Database
) -> None:
    async with browser(settings, db) as client:
        csrf = await login(client)
        cookie = await cookie_of(client)
        assert await works(client, cookie, csrf)
        out = await client.post("/logout", data={"csrf_token": csrf}, allow_redirects=False)
        assert out.status == 303
        # Someone who copied the cookie before the logout cannot use it after.
        assert not await works(client, cookie, csrf)
    async with browser(settings, db) as other_process:
        assert not await works(other_process, cookie, csrf)


async def test_logging_out_ends_only_that_session(settings: Settings, db: Database) -> None:
    async with browser(settings, db) as first, browser(settings, db) as second:
        csrf_1, csrf_2 = await login(first), await login(second)
        cookie_1, cookie_2 = await cookie_of(first), await cookie_of(second)
        await first.post("/logout", data={"csrf_token": csrf_1}, allow_redirects=False)
        assert not await works(first, cookie_1, csrf_1)
        assert await works(second, cookie_2, csrf_2)


async def test_rotating_the_api_token_ends_every_session(settings: Settings, db: Database) -> None:
    async with browser(settings, db) as before:
        csrf = await login(before)
        cookie = await cookie_of(before)
        assert await works(before, cookie, csrf)
    async with browser(settings, db, api_token=SecretStr("a-rotated-token-" + "y" * 20)) as after:
        assert not await works(after, cookie, csrf)
        # The old token no longer logs in either; the new one does.
        refused = await after.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
        assert refused.status == 401


async def test_a_session_of_another_secret_key_is_refused(settings: Settings, db: Database) -> None:
    async with browser(settings, db) as before:
        csrf = await login(before)
        cookie = await cookie_of(before)
    async with browser(settings, db, secret_key=SecretStr("another-secret-key")) as after:
        assert not await works(after, cookie, csrf)


async def test_only_a_cookie_signed_for_sessions_is_a_session(
    settings: Settings, db: Database
) -> None:
    secret = "test-secret-key"
    async with browser(settings, db) as client:
        csrf = await login(client)
        claims = SignedValues(secret, Purpose.SESSION).read(await cookie_of(client))
        assert isinstance(claims, dict)
        # The same claims of a live session, signed as an unsubscribe link: not a session.
        assert not await works(client, SignedValues(secret, Purpose.UNSUBSCRIBE).sign(claims), csrf)
        assert await works(client, SignedValues(secret, Purpose.SESSION).sign(claims), csrf)


def _cookie_of_the_earlier_format(claims: dict[str, Any], secret: str) -> str:
    """A cookie as sessions were signed before shared.signing, for the same session."""
    key = hashlib.sha256(b"mailroom-session\0" + secret.encode()).digest()
    token = hmac.new(key, b"api-token\0" + API_TOKEN.encode(), hashlib.sha256).hexdigest()[:32]
    body = base64.urlsafe_b64encode(json.dumps({**claims, "tok": token}).encode()).decode()
    return f"{body}.{hmac.new(key, body.encode(), hashlib.sha256).hexdigest()}"


async def test_a_cookie_of_the_earlier_format_is_refused_so_its_owner_logs_in_again(
    settings: Settings, db: Database
) -> None:
    # Sessions live in web_sessions under a random id, so ending them at an upgrade costs a
    # login and keeps one cookie format to verify.
    async with browser(settings, db) as client:
        csrf = await login(client)
        claims = SignedValues("test-secret-key", Purpose.SESSION).read(await cookie_of(client))
        assert isinstance(claims, dict)
        earlier = _cookie_of_the_earlier_format(claims, "test-secret-key")
        assert not await works(client, earlier, csrf)


async def test_expired_sessions_are_refused_and_forgotten(settings: Settings, db: Database) -> None:
    async with browser(settings, db) as client:
        csrf = await login(client)
        cookie = await cookie_of(client)
        await query(
            settings.database_url or "",
            "UPDATE web_sessions SET expires_at = now() - interval '1 second'",
        )
        assert not await works(client, cookie, csrf)
        await login(client)  # a login forgets sessions that have expired
        rows = await query(
            settings.database_url or "",
            "SELECT count(*) FROM web_sessions WHERE expires_at < now()",
        )
        assert rows == [(0,)]


# -- lockout after failed logins and wrong tokens ---------------------------------------------


async def fail_logins(client: TestClient, times: int, **headers: str) -> None:
    for _ in range(times):
        response = await client.post("/login", data={"token": "guess"}, headers=headers)
        assert response.status == 401


async def log_in(client: TestClient, **headers: str) -> int:
    response = await client.post(
        "/login", data={"token": API_TOKEN}, headers=headers, allow_redirects=False
    )
    return response.status


async def test_behind_a_trusted_proxy_each_client_has_its_own_lockout(
    settings: Settings, db: Database
) -> None:
    async with browser(settings, db, trust_proxy=True) as client:
        await fail_logins(
            client, settings.login_attempts_per_minute, **forwarded_for("203.0.113.7")
        )
        assert await log_in(client, **forwarded_for("203.0.113.7")) == 429
        # Another client behind the same proxy (the same peer address) is not locked out.
        assert await log_in(client, **forwarded_for("203.0.113.8")) == 303


async def test_the_client_is_the_right_most_hop_so_it_cannot_be_spoofed(
    settings: Settings, db: Database
) -> None:
    """The proxy appends the address it saw; anything left of it is the client's to write."""
    async with browser(settings, db, trust_proxy=True) as client:
        for n in range(settings.login_attempts_per_minute):
            await fail_logins(client, 1, **forwarded_for(f"198.51.100.{n}, 203.0.113.7"))
        assert await log_in(client, **forwarded_for("192.0.2.1, 203.0.113.7")) == 429
        assert await log_in(client, **forwarded_for("203.0.113.7")) == 429
        assert await log_in(client, **forwarded_for("203.0.113.9")) == 303
        # Several headers are one list, in order: the last one's last hop is the client.
        two = CIMultiDict([("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "203.0.113.7")])
        response = await client.post(
            "/login", data={"token": API_TOKEN}, headers=two, allow_redirects=False
        )
        assert response.status == 429


async def test_an_ipv6_client_is_counted_by_its_slash_64(settings: Settings, db: Database) -> None:
    async with browser(settings, db, trust_proxy=True) as client:
        for n in range(settings.login_attempts_per_minute):
            await fail_logins(client, 1, **forwarded_for(f"2001:db8:1:2::{n + 1:x}"))
        assert await log_in(client, **forwarded_for("2001:db8:1:2:ffff::1")) == 429
        assert await log_in(client, **forwarded_for("2001:db8:1:3::1")) == 303


async def test_without_a_trusted_proxy_forwarded_for_is_ignored(
    settings: Settings, db: Database
) -> None:
    async with browser(settings, db, trust_proxy=False) as client:
        for n in range(settings.login_attempts_per_minute):
            await fail_logins(client, 1, **forwarded_for(f"198.51.100.{n}"))
        assert await log_in(client, **forwarded_for("192.0.2.1")) == 429


@pytest.mark.parametrize("wrong", ["Bearer wrong", "Bearer", "Basic dXNlcjpwYXNz", "junk"])
async def test_wrong_bearer_tokens_lock_the_client_out_of_the_api(
    settings: Settings, db: Database, wrong: str
) -> None:
    async with browser(settings, db, trust_proxy=True) as client:
        attacker = {**forwarded_for("203.0.113.66"), "Authorization": wrong}
        for _ in range(settings.login_attempts_per_minute):
            response = await client.get("/api/batches", headers=attacker)
            assert response.status == 401
        blocked = await client.get("/api/batches", headers=attacker)
        assert blocked.status == 429
        assert blocked.headers["Retry-After"] == "60"
        error = (await blocked.json())["error"]
        assert error["code"] == "too_many_attempts" and set(error) == {
            "code",
            "message",
            "details",
        }
        # Even the right token, from that client, until the minute is over: otherwise the
        # lockout would not slow a guesser down at all.
        right = await client.get("/api/batches", headers={**AUTH, **forwarded_for("203.0.113.66")})
        assert right.status == 429
        # The same budget covers the login form, and other clients are not affected.
        assert await log_in(client, **forwarded_for("203.0.113.66")) == 429
        other = await client.get("/api/batches", headers={**AUTH, **forwarded_for("203.0.113.67")})
        assert other.status == 200


async def test_a_session_without_a_token_header_is_not_locked_out(
    settings: Settings, db: Database
) -> None:
    async with browser(settings, db) as client:
        await login(client)
        for _ in range(settings.login_attempts_per_minute):
            await client.get("/api/batches", headers={"Authorization": "Bearer wrong"})
        # The browser's own requests carry no Authorization header: they still work.
        assert (await client.get("/", allow_redirects=False)).status == 200
        assert (await client.get("/api/batches")).status == 200


def forwarded_for(value: str) -> dict[str, str]:
    return {"X-Forwarded-For": value}


# -- where a login sends the browser ----------------------------------------------------------

OFF_SITE = [
    "/\t/evil.example",
    "/\n/evil.example",
    "/\r/evil.example",
    "/\t\t/evil.example/x",
    "\t//evil.example",
    " //evil.example",
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "/\\/evil.example",
    "/x/\\..\\..\\/evil.example",
    "/ok//evil.example",
    "https://evil.example/",
    "https:/evil.example",
    "javascript:alert(1)",
    "evil.example",
    "",
    "/\x00/evil.example",
    "/\x1f",
    "/\x7f",
    "/\x85/evil.example",
    "/\u2028/evil.example",
    "/\u3000/evil.example",
    "/" + "a" * 3000,
]
ON_SITE = ["/", "/batches/abc?status=dead", "/dead-letters", "/%09/x", "/caf\u00e9"]


@pytest.mark.parametrize("target", OFF_SITE + ON_SITE)
async def test_login_redirects_only_to_a_same_origin_path(client: TestClient, target: str) -> None:
    response = await client.post(
        "/login", data={"token": API_TOKEN, "next": target}, allow_redirects=False
    )
    assert response.status == 303
    location = response.headers["Location"]
    if target in OFF_SITE:
        assert location == "/", (target, location)
    else:
        assert location == str(URL(target)), (target, location)
    assert location.startswith("/") and not location.startswith(("//", "/\\"))
    # The form carries the same check: what it would post back is already safe.
    page = await (await client.get("/login", params={"next": target})).text()
    match = re.search(r'name="next" value="([^"]*)"', page)
    assert match is not None
    assert html.unescape(match.group(1)) == ("/" if target in OFF_SITE else target)
