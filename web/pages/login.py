"""Logging in and out of the pages: the token form, the session cookie, where to go next."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime

from aiohttp import web
from yarl import URL

from web.auth import SESSION_COOKIE, SESSION_TTL_SECONDS
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
    return render(
        request, "login.html", {"next": safe_next(request.query.get("next", "/")), "error": None}
    )


@routes.post("/login")
async def login(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    target = safe_next(text_field(form, "next") or "/")
    auth, limiter = request.app[AUTH], request.app[LOGIN_LIMITER]
    client = limiter.client_of(request)
    if limiter.blocked(client):
        response = render(
            request,
            "login.html",
            {"next": target, "error": "Too many failed attempts. Wait a minute and try again."},
            status=429,
        )
        response.headers["Retry-After"] = "60"
        return response
    if not auth.token_matches(text_field(form, "token")):
        limiter.failed(client)
        return render(
            request, "login.html", {"next": target, "error": "That token is not right."}, status=401
        )
    session, cookie = auth.new_session()
    await request.app[DB].start_session(
        session.id_hash, datetime.fromtimestamp(session.expires_at, tz=UTC)
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
    raise response


def is_https(request: web.Request) -> bool:
    """Served over TLS, directly or (only when MAILROOM_TRUST_PROXY is set) via a proxy."""
    if request.secure:
        return True
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.app[SETTINGS].trust_proxy and forwarded == "https"


@routes.post("/logout")
async def logout(request: web.Request) -> web.StreamResponse:
    """End the session for good: its row goes, so the cookie is refused even if kept."""
    await read_checked_form(request)
    await request.app[DB].end_session(request[SESSION].id_hash)
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response
