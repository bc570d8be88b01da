"""Logging in and out of the pages: the password and token forms, the session cookie, where
to go next."""

from __future__ import annotations

import asyncio
import unicodedata
from datetime import UTC, datetime

from aiohttp import web
from yarl import URL

from shared.accounts import (
    MAX_PASSWORD_CHARS,
    InvalidAccount,
    Role,
    check_name,
    verify_password,
)
from web.auth import SESSION_COOKIE, SESSION_TTL_SECONDS, requires
from web.keys import AUTH, DB, LOGIN_LIMITER, SESSION, SETTINGS
from web.pages.html import read_checked_form, read_form, render, text_field

routes = web.RouteTableDef()

MAX_NEXT_CHARS = 2048


def safe_next(target: str) -> str:
    """``target`` if it is a path on this site, else ``/``: where a login may send the browser.

    Only an absolute path qualifies: one leading ``/``, no ``//`` anywhere, no backslash, no
    control or whitespace character. Browsers drop tabs and line breaks from URLs and read
    ``\\`` as ``/``, and aiohttp drops them too when it writes ``Location``, so
    ``/<TAB>/evil.example`` passes a prefix check and then leaves as ``//evil.example``.
    Refusing those characters outright, then checking the URL aiohttp will actually send,
    leaves nothing to be normalized after the check.
    """
    if (
        len(target) > MAX_NEXT_CHARS
        or not target.startswith("/")
        or "//" in target
        or "\\" in target
        or any(c.isspace() or unicodedata.category(c) == "Cc" for c in target)
    ):
        return "/"
    try:
        sent = URL(target)
    except ValueError:
        return "/"
    if sent.scheme or sent.host is not None or not str(sent).startswith("/") or "//" in str(sent):
        return "/"
    return target


@routes.get("/login")
async def login_form(request: web.Request) -> web.Response:
    return _login_page(request, safe_next(request.query.get("next", "/")))


def _login_page(
    request: web.Request, target: str, error: str | None = None, *, status: int = 200
) -> web.Response:
    return render(request, "login.html", {"next": target, "error": error}, status=status)


WRONG_PASSWORD = "That user name and password do not match."


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    """Log in with a user name and password, or with ``MAILROOM_API_TOKEN`` (``token``).

    A wrong password counts against the client and the user name; an unknown name gets the
    same answer after the same work (a dummy hash is verified), so the form does not say which
    names exist.
    """
    form = await read_form(request)
    target = safe_next(text_field(form, "next") or "/")
    limiter = request.app[LOGIN_LIMITER]
    client = limiter.client_of(request)
    token = text_field(form, "token")
    name = text_field(form, "name").strip()
    keys = [client] if token or not name else [client, limiter.name_key(name)]
    if any(limiter.blocked(key) for key in keys):
        response = _login_page(
            request, target, "Too many failed attempts. Wait a minute and try again.", status=429
        )
        response.headers["Retry-After"] = "60"
        return response
    if token or not name:
        user_id = None
        if not request.app[AUTH].token_matches(token):
            limiter.failed(client)
            return _login_page(request, target, "That token is not right.", status=401)
    else:
        found = await _password_user(request, name, text_field(form, "password"))
        if found is None:
            for key in keys:
                limiter.failed(key)
            return _login_page(request, target, WRONG_PASSWORD, status=401)
        user_id = found
    raise await start_session(request, target, user_id=user_id)


async def _password_user(request: web.Request, name: str, password: str) -> int | None:
    """The id of the enabled user ``name`` whose password this is, else None (after the same
    work either way: argon2 in a thread, against a dummy hash for an unknown name)."""
    # A name no user can have (a NUL, a space, too long) is looked up by no query.
    user = await request.app[DB].user_by_name(name) if could_be_a_name(name) else None
    usable = user is not None and user["disabled_at"] is None
    stored = user["password_hash"] if user is not None and usable else None
    matches = await asyncio.to_thread(verify_password, stored, password[:MAX_PASSWORD_CHARS])
    return int(user["id"]) if matches and user is not None and usable else None


def could_be_a_name(name: str) -> bool:
    """Whether some user could have this name (else no query needs to look for it)."""
    try:
        check_name(name)
    except InvalidAccount:
        return False
    return True


async def start_session(
    request: web.Request, target: str, *, user_id: int | None
) -> web.HTTPSeeOther:
    """A new session for a user (or the bootstrap token), as a redirect to ``target`` that
    sets its cookie."""
    session, cookie = request.app[AUTH].new_session(of_user=user_id is not None)
    await request.app[DB].start_session(
        session.id_hash, datetime.fromtimestamp(session.expires_at, tz=UTC), user_id=user_id
    )
    response = web.HTTPSeeOther(location=target)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=SESSION_TTL_SECONDS,
        httponly=True,
        samesite="Lax",
        secure=is_https(request),
        path="/",
    )
    return response


def is_https(request: web.Request) -> bool:
    """Served over TLS, directly or (only when MAILROOM_TRUST_PROXY is set) via a proxy."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.app[SETTINGS].trust_proxy and forwarded == "https"


@routes.post("/logout")
@requires(Role.VIEWER)
async def logout(request: web.Request) -> web.StreamResponse:
    """End the session for good: its row goes, so the cookie is refused even if kept."""
    await read_checked_form(request)
    await request.app[DB].end_session(request[SESSION].id_hash)
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response
