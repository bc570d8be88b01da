"""The dead letters page: every dead letter, and a button to redrive or discard each or all."""

from __future__ import annotations

from aiohttp import web

from shared.db import MAX_ID, Selection
from web.keys import DB
from web.pages.html import read_checked_form, render, text_field

routes = web.RouteTableDef()


@routes.get("/dead-letters")
async def dead_letters_page(request: web.Request) -> web.Response:
    rows = await request.app[DB].list_dead_letters(limit=500)
    return render(request, "dead_letters.html", {"dead": rows})


@routes.post("/dead-letters")
async def dead_letters_action(request: web.Request) -> web.StreamResponse:
    form = await read_checked_form(request)
    action = text_field(form, "action")
    if action not in {"redrive", "discard"}:
        raise web.HTTPBadRequest(text="action must be redrive or discard")
    selection = _target(text_field(form, "target"))
    db = request.app[DB]
    await (db.redrive(selection) if action == "redrive" else db.discard(selection))
    raise web.HTTPSeeOther(location="/dead-letters")


def _target(target: str) -> Selection:
    """The form's ``target``: ``all``, or one recipient's id."""
    if target == "all":
        return Selection(everything=True)
    try:
        recipient_id = int(target)
    except ValueError:
        recipient_id = 0
    if not 1 <= recipient_id <= MAX_ID:
        raise web.HTTPBadRequest(text="target must be a recipient id or all")
    return Selection(ids=[recipient_id])
