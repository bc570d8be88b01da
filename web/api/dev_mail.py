"""What the dev mail capture received, as JSON (only in ``mailroom dev``).

``GET /api/dev/messages`` searches and pages the list, ``GET /api/dev/messages/{key}`` is one
message decoded, ``DELETE /api/dev/messages`` empties the capture.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from shared.accounts import Role
from web.auth import requires
from web.captured_mail import CapturedMail
from web.contract import (
    CapturedHeader,
    CapturedMessage,
    CapturedMessages,
    CapturedMessageView,
    DevMessagesQuery,
    respond,
)
from web.errors import ApiError
from web.inputs import read_query
from web.keys import CAPTURED_MAIL

routes = web.RouteTableDef()


def _capture(request: web.Request) -> CapturedMail:
    capture = request.app.get(CAPTURED_MAIL)
    if capture is None:
        raise ApiError(404, "not_found", "the mail capture exists only in `mailroom dev`")
    return capture


@routes.get("/api/dev/messages")
@requires(Role.VIEWER)
async def get_dev_messages(request: web.Request) -> web.Response:
    capture = _capture(request)
    asked = read_query(request, DevMessagesQuery)
    page = await asyncio.to_thread(capture.page, asked.q, offset=asked.offset, limit=asked.limit)
    return respond(
        CapturedMessages(
            messages=[
                CapturedMessage.model_validate(m, from_attributes=True) for m in page.messages
            ],
            total=page.total,
            offset=page.offset,
            limit=page.limit,
            next_offset=page.next_offset,
        )
    )


@routes.get("/api/dev/messages/{key}")
@requires(Role.VIEWER)
async def get_dev_message(request: web.Request) -> web.Response:
    capture = _capture(request)
    view = await asyncio.to_thread(capture.view, request.match_info["key"])
    if view is None:
        raise ApiError(404, "not_found", "no such message")
    summary = view.summary
    return respond(
        CapturedMessageView(
            key=summary.key,
            message_id=summary.message_id,
            to=summary.to,
            subject=summary.subject,
            received_at=summary.received_at,
            headers=[CapturedHeader(name=name, value=value) for name, value in view.headers],
            text=view.text,
            html=view.html,
            links=view.links,
            attachments=view.attachments,
        )
    )


@routes.delete("/api/dev/messages")
@requires(Role.SENDER)
async def delete_dev_messages(request: web.Request) -> web.Response:
    capture = _capture(request)
    await asyncio.to_thread(capture.delete_all)
    return web.Response(status=204)
