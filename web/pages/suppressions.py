"""The suppressions page: every suppressed address; add pasted or uploaded ones, remove one."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.accounts import Role
from shared.db import SUPPRESSION_REASONS
from web.auth import requires
from web.inputs import actor
from web.keys import DB, SETTINGS
from web.pages.html import read_checked_form, render, text_field, uploaded_csv
from web.validation import InvalidSubmission, addresses_from_form

routes = web.RouteTableDef()


@routes.get("/suppressions")
@requires(Role.VIEWER)
async def suppressions_page(request: web.Request) -> web.Response:
    return await _suppressions(request, {})


async def _suppressions(
    request: web.Request, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    rows = await request.app[DB].list_suppressions(limit=1000)
    context = {"suppressions": rows, "reasons": SUPPRESSION_REASONS, "problems": [], **values}
    return render(request, "suppressions.html", context, status=status)


@routes.post("/suppressions")
@requires(Role.SENDER)
async def suppressions_action(request: web.Request) -> web.StreamResponse:
    """Add pasted or uploaded addresses, or remove one, then show the list again."""
    form = await read_checked_form(request)
    db = request.app[DB]
    if text_field(form, "action") == "remove":
        await db.unsuppress([text_field(form, "address")], actor=actor(request))
        raise web.HTTPSeeOther(location="/suppressions")
    reason = text_field(form, "reason") if "reason" in form else "manual"
    if reason not in SUPPRESSION_REASONS:
        raise web.HTTPBadRequest(text=f"reason must be one of: {', '.join(SUPPRESSION_REASONS)}")
    text = text_field(form, "addresses")
    csv_text = uploaded_csv(form.get("csv"), request.app[SETTINGS].max_upload_bytes)
    try:
        addresses = addresses_from_form(text, csv_text)
    except InvalidSubmission as exc:
        return await _suppressions(
            request, {"problems": exc.problems, "addresses": text, "reason": reason}, status=422
        )
    await db.suppress(addresses, reason=reason, detail="added by an operator", actor=actor(request))
    raise web.HTTPSeeOther(location="/suppressions")
