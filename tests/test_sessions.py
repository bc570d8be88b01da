"""Sessions end when they should: at logout, on a token rotation, at expiry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, query
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
