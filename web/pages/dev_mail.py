"""The captured-mail pages of ``mailroom dev``, read through :mod:`web.captured_mail`."""

from __future__ import annotations

import asyncio

from aiohttp import web

from web.keys import CAPTURED_MAIL
from web.pages.html import render

routes = web.RouteTableDef()


@routes.get("/dev/mail")
async def captured_mail(request: web.Request) -> web.Response:
    capture = request.app.get(CAPTURED_MAIL)
    if capture is None:
        raise web.HTTPNotFound(text="the mail capture exists only in `mailroom dev`")
    messages = await asyncio.to_thread(capture.messages)
    return render(request, "mail.html", {"messages": messages, "directory": str(capture.directory)})


@routes.get("/dev/mail/{key}")
async def captured_message(request: web.Request) -> web.Response:
    capture = request.app.get(CAPTURED_MAIL)
    raw = await asyncio.to_thread(capture.raw, request.match_info["key"]) if capture else None
    if raw is None:
        raise web.HTTPNotFound(text="no such message")
    # Shown as plain text so nothing in a captured message can run in the operator's browser.
    return web.Response(body=raw, content_type="text/plain", charset="utf-8")
