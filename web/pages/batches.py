"""The batch pages: the form and the batch list, a batch's progress, its review and actions."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from yarl import URL

from shared.accounts import Role
from shared.db import BATCH_STATES, RECIPIENT_STATUSES, Selection
from shared.ratelimits import sender_limits
from shared.templating import in_render_thread
from web.auth import requires
from web.contract import Batch, BatchesQuery, BatchList, DraftEdit, problems_of
from web.enqueue import create_batch, limits
from web.inputs import actor, batch_id_of, batch_of, recipient_id_of
from web.keys import DB, SETTINGS
from web.pages.feedback import plural, shown_problems, with_notice
from web.pages.html import read_checked_form, render, text_field, uploaded_csv
from web.validation import InvalidSubmission, Submission, from_form

routes = web.RouteTableDef()

RECENT_BATCHES = 20
FORM_FIELDS = (
    "recipients",
    "subject",
    "body",
    "drafter",
    "context",
    "review",
    "send_at",
    "name",
)

# The "How the emails are written" fieldset (shared.composition).
COMPOSITION_FIELDS = ("body_format", "from_name", "reply_to")


@routes.get("/")
@requires(Role.VIEWER)
async def index(request: web.Request) -> web.Response:
    return await _index(request, {"form": {}, "problems": []})


async def _index(
    request: web.Request, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    # The search form sends every field; an empty one means "any".
    given = {name: request.query.getone(name) for name in request.query}
    given = {name: value for name, value in given.items() if value != ""}
    given.setdefault("limit", str(RECENT_BATCHES))
    try:
        query = BatchesQuery.model_validate(given)
    except ValidationError as exc:
        sentences = "; ".join(p.sentence() for p in problems_of(exc, BatchesQuery))
        raise web.HTTPBadRequest(text=f"The batch list cannot show that: {sentences}") from None
    summaries = await request.app[DB].list_batches(
        query.filter(), limit=query.limit, limits=sender_limits(request.app[SETTINGS])
    )
    page = BatchList.of(summaries, query.limit)
    next_page = None
    if page.next_cursor is not None:
        kept = {k: v for k, v in given.items() if k in {"status", "q", "limit"}}
        next_page = str(URL("/").with_query({**kept, "cursor": page.next_cursor}))
    context = {
        "batches": page.model_dump(mode="json")["batches"],
        "list_filter": {"status": query.status or "", "q": query.q or ""},
        "states": BATCH_STATES,
        "next_page": next_page,
        "paged": "cursor" in given,
        "max_batch_size": request.app[SETTINGS].max_batch_size,
        "default_from_name": request.app[SETTINGS].from_name,
        "default_reply_to": request.app[SETTINGS].reply_to,
        "llm_available": limits(request).llm_available,
        **values,
    }
    return render(request, "index.html", context, status=status)


@routes.post("/batches")
@requires(Role.SENDER)
async def submit_batch(request: web.Request) -> web.StreamResponse:
    form = await read_checked_form(request)
    fields = {name: text_field(form, name) for name in (*FORM_FIELDS, *COMPOSITION_FIELDS)}
    csv_text = uploaded_csv(form.get("csv"), request.app[SETTINGS].max_upload_bytes)
    try:
        # Validation dry-runs the templates, which must not hold up the event loop.
        submission: Submission = await in_render_thread(
            from_form, fields, limits=limits(request), csv_text=csv_text
        )
    except InvalidSubmission as exc:
        problems = shown_problems(exc.problems)
        values = {"form": fields, "problems": problems, "total_problems": exc.total}
        return await _index(request, values, status=422)
    batch_id = await create_batch(request, submission)
    raise web.HTTPSeeOther(
        location=with_notice(request, f"/batches/{batch_id}", _what_was_merged(submission))
    )


def _what_was_merged(submission: Submission) -> list[str]:
    """What the batch page says about the addresses given: how pasted ones and a CSV's rows
    came together, and how many duplicates were removed."""
    lines = []
    if submission.sources is not None:
        given = submission.sources
        lines.append(
            f"Merged {plural(given.pasted, 'pasted address', 'pasted addresses')} and "
            f"{plural(given.csv, 'CSV row', 'CSV rows')} into "
            f"{plural(len(submission.recipients), 'recipient', 'recipients')} "
            f"({plural(given.duplicates_across, 'address was', 'addresses were')} in both)."
        )
    if submission.duplicates_removed:
        removed = submission.duplicates_removed
        lines.append(f"{plural(removed, 'duplicate address', 'duplicate addresses')} removed.")
    return lines


@routes.get("/batches/{batch_id}")
@requires(Role.VIEWER)
async def batch_page(request: web.Request) -> web.Response:
    summary = await batch_of(request)
    db = request.app[DB]
    status = request.query.get("status") or None
    if status is not None and status not in RECIPIENT_STATUSES:
        raise web.HTTPBadRequest(text=f"status must be one of: {', '.join(RECIPIENT_STATUSES)}")
    recipients = await db.list_recipients(summary.id, status=status, limit=200)
    # A full sending-rate window holds every open batch back; say which, and until when.
    paused = (
        await db.full_windows(sender_limits(request.app[SETTINGS]))
        if summary.status == "paused"
        else []
    )
    return render(
        request,
        "batch.html",
        {
            "batch": Batch.of(summary).model_dump(mode="json"),
            "recipients": recipients,
            "filter": status,
            "paused": [
                {"name": limit.name, "max": limit.max_sent, "until": f"{ends:%Y-%m-%d %H:%M:%S}"}
                for limit, ends in paused
            ],
        },
    )


async def _posted_to_batch(request: web.Request) -> uuid.UUID:
    """The batch a button on its page was pressed for, once the form's CSRF token matches."""
    await read_checked_form(request)
    return batch_id_of(request)


def _back_to(batch_id: uuid.UUID) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location=f"/batches/{batch_id}")


@routes.post("/batches/{batch_id}/send")
@requires(Role.SENDER)
async def send_reviewed_page(request: web.Request) -> web.StreamResponse:
    batch_id = await _posted_to_batch(request)
    await request.app[DB].approve(batch_id, actor=actor(request))
    raise _back_to(batch_id)


@routes.post("/batches/{batch_id}/cancel")
@requires(Role.SENDER)
async def cancel_batch_page(request: web.Request) -> web.StreamResponse:
    batch_id = await _posted_to_batch(request)
    await request.app[DB].cancel(batch_id, actor=actor(request))
    raise _back_to(batch_id)


@routes.post("/batches/{batch_id}/redrive")
@requires(Role.SENDER)
async def redrive_batch_page(request: web.Request) -> web.StreamResponse:
    """Redrive the batch's dead letters once confirmed (the browser's prompt, or a page that
    asks), then say on the batch page how many were requeued."""
    form = await read_checked_form(request)
    batch_id = batch_id_of(request)
    db = request.app[DB]
    selection = Selection(batch_id=batch_id)
    if text_field(form, "confirm") != "1":
        count = await db.count_dead_letters(selection)
        return render(request, "confirm_redrive.html", {"batch_id": batch_id, "count": count})
    count = await db.redrive(selection, actor=actor(request))
    lines = (
        [f"{plural(count, 'dead letter', 'dead letters')} requeued."]
        if count
        else ["Nothing was requeued: no dead letter was left (already handled?)."]
    )
    raise web.HTTPSeeOther(location=with_notice(request, f"/batches/{batch_id}", lines))


@routes.get("/batches/{batch_id}/recipients/{recipient_id}/edit")
@requires(Role.SENDER)
async def edit_draft_page(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    draft = await _draft(request, batch_id)
    return render(request, "edit.html", {"batch_id": batch_id, "draft": draft, "error": None})


@routes.post("/batches/{batch_id}/recipients/{recipient_id}/edit")
@requires(Role.SENDER)
async def save_draft_page(request: web.Request) -> web.StreamResponse:
    form = await read_checked_form(request)
    batch_id = batch_id_of(request)
    draft = await _draft(request, batch_id)
    given = {"subject": text_field(form, "subject"), "body": text_field(form, "body")}
    try:
        edit = DraftEdit.model_validate(given)
    except ValidationError as exc:
        error = "; ".join(p.sentence() for p in problems_of(exc, DraftEdit))
        return render(
            request,
            "edit.html",
            {"batch_id": batch_id, "draft": {**draft, **given}, "error": error},
            status=422,
        )
    if not await request.app[DB].edit_draft(
        batch_id, draft["id"], edit.subject, edit.body, actor=actor(request)
    ):
        raise web.HTTPConflict(text="this draft is no longer waiting for review")
    raise _back_to(batch_id)


async def _draft(request: web.Request, batch_id: uuid.UUID) -> dict[str, Any]:
    recipient_id = recipient_id_of(request)
    rows = await request.app[DB].list_recipients(batch_id, after_id=recipient_id - 1, limit=1)
    if not rows or rows[0]["id"] != recipient_id:
        raise web.HTTPNotFound(text="no such recipient")
    return rows[0]
