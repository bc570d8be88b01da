"""What the dev mail capture received, as JSON (only in ``mailroom dev``)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from web.contract import CapturedMessage, CapturedMessages, respond
from web.errors import ApiError
from web.keys import CAPTURED_MAIL

routes = web.RouteTableDef()


@routes.get("/api/dev/messages")
async def get_dev_messages(request: web.Request) -> web.Response:
    capture = request.app.get(CAPTURED_MAIL)
    if capture is None:
        raise ApiError(404, "not_found", "the mail capture exists only in `mailroom dev`")
    messages = await asyncio.to_thread(capture.messages)
    return respond(
        CapturedMessages(
            messages=[CapturedMessage.model_validate(m, from_attributes=True) for m in messages]
        )
    )
