"""The dead letters page: every dead letter, and buttons to redrive or discard each or all.

Both actions ask first: without JavaScript the button leads to a confirmation (how many
letters, and a button that says so); with it, the browser's ``confirm()`` asks and the
confirmation page is skipped. Afterwards the page says what was done ("3 dead letters
requeued") and lists the letters just requeued, with their batch and status now.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.accounts import Role
from shared.db import MAX_ID, Selection
from web.auth import requires
from web.inputs import actor
from web.keys import DB
from web.pages.feedback import notice_of, plural, with_notice
from web.pages.html import read_checked_form, render, text_field

routes = web.RouteTableDef()

PAGE = "/dead-letters"
LISTED = 500
# Requeued letters listed after a redrive (their ids travel in the redirect's notice).
REQUEUED_LISTED = 50
_DONE = {"redrive": "requeued", "discard": "discarded"}


@routes.get(PAGE)
@requires(Role.VIEWER)
async def dead_letters_page(request: web.Request) -> web.Response:
    return await _page(request, confirm=None)


async def _page(request: web.Request, confirm: dict[str, Any] | None) -> web.Response:
    db = request.app[DB]
    rows = await db.list_dead_letters(limit=LISTED)
    notice = notice_of(request) or {}
    given = notice.get("requeued")
    ids = [i for i in given if isinstance(i, int)] if isinstance(given, list) else []
    requeued = await db.recipients_by_ids(ids[:REQUEUED_LISTED]) if ids else []
    more = notice.get("more")
    return render(
        request,
        "dead_letters.html",
        {
            "dead": rows,
            "requeued": requeued,
            "requeued_more": more if isinstance(more, int) else 0,
            "confirm": confirm,
        },
    )


@routes.post(PAGE)
@requires(Role.SENDER)
async def dead_letters_action(request: web.Request) -> web.StreamResponse:
    form = await read_checked_form(request)
    action = text_field(form, "action")
    if action not in _DONE:
        raise web.HTTPBadRequest(text="action must be redrive or discard")
    target = text_field(form, "target")
    selection = _target(target)
    db = request.app[DB]
    if text_field(form, "confirm") != "1":
        count = await db.count_dead_letters(selection)
        return await _page(request, {"action": action, "target": target, "count": count})
    if action == "redrive":
        # Which letters the redrive takes, to list them afterwards: the page's first ones.
        shown = (
            list(selection.ids)
            if selection.ids
            else [r["id"] for r in await db.list_dead_letters(limit=REQUEUED_LISTED)]
        )
        count = await db.redrive(selection, actor=actor(request))
    else:
        shown, count = [], await db.discard(selection, actor=actor(request))
    if count:
        lines = [f"{plural(count, 'dead letter', 'dead letters')} {_DONE[action]}."]
    else:
        lines = [f"Nothing was {_DONE[action]}: no dead letter matched (already handled?)."]
    requeued = shown if count else []
    location = with_notice(
        request, PAGE, lines, requeued=requeued, more=max(count - len(requeued), 0)
    )
    raise web.HTTPSeeOther(location=location)


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
