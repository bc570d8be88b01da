"""The captured-mail pages of ``mailroom dev``, read through :mod:`web.captured_mail`.

``/dev/mail`` searches and pages the list and deletes it all (after a confirmation);
``/dev/mail/<key>`` shows one message: its text (escaped, with its http, https and mailto
links clickable), its HTML part in a sandboxed frame, its headers, links and attachments.

A captured message is a sender's text. Its HTML is served on its own route
(``/dev/mail/<key>/html``) under a policy that runs no script, loads nothing from anywhere
(remote images included), submits no form and opens no window, and the frame that shows it is
sandboxed as well; ``/dev/mail/<key>/raw`` is only ever a download.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from shared.accounts import Role
from shared.db import MAX_ID
from web.auth import requires
from web.captured_mail import CapturedMail, display_text
from web.contract import DEFAULT_MAIL_PAGE_SIZE, MAX_SEARCH_CHARS
from web.keys import CAPTURED_MAIL
from web.middlewares import CSP
from web.pages.html import read_checked_form, render, text_field

routes = web.RouteTableDef()

# The message page frames its HTML part, served by this application.
MESSAGE_PAGE_CSP = CSP + "; frame-src 'self'"
# What a captured HTML part may do: show itself with its inline styles and inline images.
HTML_PART_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "frame-ancestors 'self'; form-action 'none'; base-uri 'none'; sandbox"
)


def _capture(request: web.Request) -> CapturedMail:
    capture = request.app.get(CAPTURED_MAIL)
    if capture is None:
        raise web.HTTPNotFound(text="the mail capture exists only in `mailroom dev`")
    return capture


def _search(request: web.Request) -> tuple[str, int]:
    """The page's ``q`` and ``offset``, whatever was sent: a page never refuses its query."""
    query = display_text(request.query.get("q", ""))[:MAX_SEARCH_CHARS]
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        offset = 0
    return query, min(max(offset, 0), MAX_ID)


def _list_url(query: str, offset: int) -> str:
    params = {k: v for k, v in (("q", query), ("offset", str(offset))) if v and v != "0"}
    return "/dev/mail" + ("?" + urlencode(params) if params else "")


@routes.get("/dev/mail")
@requires(Role.VIEWER)
async def captured_mail(request: web.Request) -> web.Response:
    capture = _capture(request)
    query, offset = _search(request)
    page = await asyncio.to_thread(capture.page, query, offset=offset, limit=DEFAULT_MAIL_PAGE_SIZE)
    values: dict[str, Any] = {
        "page": page,
        "query": query,
        "first": offset + 1,
        "last": offset + len(page.messages),
        "previous_url": _list_url(query, max(0, offset - page.limit)) if offset else None,
        "next_url": None if page.next_offset is None else _list_url(query, page.next_offset),
        "first_url": _list_url(query, 0),
        "directory": str(capture.directory),
    }
    return render(request, "mail.html", values)


@routes.post("/dev/mail")
@requires(Role.SENDER)
async def delete_captured_mail(request: web.Request) -> web.Response:
    """Ask first; delete every captured message once the confirmation is posted."""
    form = await read_checked_form(request)
    capture = _capture(request)
    if text_field(form, "confirmed") != "yes":
        total = (await asyncio.to_thread(capture.page, limit=1)).total
        return render(request, "mail_delete.html", {"total": total})
    await asyncio.to_thread(capture.delete_all)
    raise web.HTTPSeeOther(location="/dev/mail")


@routes.get("/dev/mail/{key}")
@requires(Role.VIEWER)
async def captured_message(request: web.Request) -> web.Response:
    view = await asyncio.to_thread(_capture(request).view, request.match_info["key"])
    if view is None:
        raise web.HTTPNotFound(text="no such message")
    response = render(request, "mail_message.html", {"view": view})
    response.headers["Content-Security-Policy"] = MESSAGE_PAGE_CSP
    return response


@routes.get("/dev/mail/{key}/html")
@requires(Role.VIEWER)
async def captured_html(request: web.Request) -> web.Response:
    """The message's HTML part, for the message page's sandboxed frame only."""
    view = await asyncio.to_thread(_capture(request).view, request.match_info["key"])
    if view is None or view.html is None:
        raise web.HTTPNotFound(text="no such message, or it has no HTML part")
    return web.Response(
        text=view.html,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": HTML_PART_CSP,
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "SAMEORIGIN",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


@routes.get("/dev/mail/{key}/raw")
@requires(Role.VIEWER)
async def captured_raw(request: web.Request) -> web.Response:
    """The message as received, as a download (never shown by the browser)."""
    key = request.match_info["key"]
    raw = await asyncio.to_thread(_capture(request).raw, key)
    if raw is None:
        raise web.HTTPNotFound(text="no such message")
    return web.Response(
        body=raw,
        content_type="message/rfc822",
        headers={
            # The key is a plain file name (web.captured_mail.KEY_PATTERN): nothing to quote.
            "Content-Disposition": f'attachment; filename="{key}.eml"',
            "Content-Security-Policy": "default-src 'none'; sandbox",
        },
    )
