"""Server-rendered pages: login, the batch form, batch progress and (in dev) captured mail."""

from __future__ import annotations

import asyncio
import unicodedata
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import FileField
from multidict import MultiDictProxy
from yarl import URL

from shared.db import MAX_ID, RECIPIENT_STATUSES, SUPPRESSION_REASONS, Selection
from shared.ratelimits import sender_limits
from shared.templating import in_render_thread
from web.api import batch_id_of, batch_json, checked_edit, create_batch, limits
from web.auth import SESSION_COOKIE, SESSION_TTL_S
from web.keys import AUTH, CAPTURED_MAIL, DB, LOGIN_LIMITER, SESSION, SETTINGS
from web.validation import InvalidSubmission, addresses_from_form, from_form

routes = web.RouteTableDef()


def render(
    request: web.Request, template: str, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    """Render a page with what every page needs (the CSRF token, whether this is dev mode)."""
    session = request.get(SESSION)
    context = {
        "csrf_token": session.csrf_token if session else "",
        "dev_mode": CAPTURED_MAIL in request.app,
        **values,
    }
    response = aiohttp_jinja2.render_template(template, request, context)
    response.set_status(status)
    return response


async def read_form(request: web.Request) -> MultiDictProxy[str | bytes | bytearray | FileField]:
    """The posted form, or a 400 if it cannot be read as UTF-8 form data.

    aiohttp raises on undecodable fields, unknown charsets and broken multipart framing; each
    of those is the client's mistake, never a reason for a 500.
    """
    try:
        return await request.post()
    except (ValueError, LookupError, HttpProcessingError):
        raise web.HTTPBadRequest(
            text="The form could not be read: send it as UTF-8 form data."
        ) from None


def _check_csrf(request: web.Request, form: Any) -> None:
    session = request.get(SESSION)
    if session is None:
        raise web.HTTPForbidden(text="log in through the form to post it")
    if not session.csrf_matches(str(form.get("csrf_token", ""))):
        raise web.HTTPForbidden(text="the form is stale or forged (CSRF token mismatch); reload it")


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
    target = safe_next(str(form.get("next", "/")))
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
    if not auth.token_matches(str(form.get("token", ""))):
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
        max_age=SESSION_TTL_S,
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
    _check_csrf(request, await read_form(request))
    await request.app[DB].end_session(request[SESSION].id_hash)
    response = web.HTTPSeeOther(location="/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    batches = await request.app[DB].recent_batches(limit=20)
    return render(
        request,
        "index.html",
        {
            "form": {},
            "problems": [],
            "batches": [batch_json(b) for b in batches],
            "max_batch_size": request.app[SETTINGS].max_batch_size,
        },
    )


@routes.post("/batches")
async def submit_batch(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    _check_csrf(request, form)
    names = ("recipients", "subject", "body", "drafter", "context", "review", "send_at")
    fields = {k: str(form.get(k, "")) for k in names}
    settings = request.app[SETTINGS]
    csv_text = _uploaded_csv(form.get("csv"), settings.max_upload_bytes)
    try:
        # Validation dry-runs the templates, which must not hold up the event loop.
        submission = await in_render_thread(
            from_form, fields, limits=limits(request), csv_text=csv_text
        )
    except InvalidSubmission as exc:
        batches = await request.app[DB].recent_batches(limit=20)
        return render(
            request,
            "index.html",
            {
                "form": fields,
                "problems": exc.problems,
                "total_problems": exc.total,
                "batches": [batch_json(b) for b in batches],
                "max_batch_size": settings.max_batch_size,
            },
            status=422,
        )
    batch_id = await create_batch(request, submission)
    raise web.HTTPSeeOther(location=f"/batches/{batch_id}")


def _uploaded_csv(part: Any, max_bytes: int) -> str | None:
    if not isinstance(part, FileField) or not part.filename:
        return None
    data = part.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise web.HTTPRequestEntityTooLarge(
            max_size=max_bytes,
            actual_size=len(data),
            text=f"The CSV is larger than {max_bytes // (1024 * 1024)} MB: split the list into "
            "several batches.",
        )
    try:
        return str(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise web.HTTPBadRequest(text="The CSV must be UTF-8 text.") from None


@routes.get("/batches/{batch_id}")
async def batch_page(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    db = request.app[DB]
    summary = await db.batch_summary(batch_id)
    if summary is None:
        raise web.HTTPNotFound(text="no such batch")
    status = request.query.get("status") or None
    if status is not None and status not in RECIPIENT_STATUSES:
        raise web.HTTPBadRequest(text=f"status must be one of: {', '.join(RECIPIENT_STATUSES)}")
    recipients = await db.list_recipients(batch_id, status=status, limit=200)
    # A full sending-rate window holds every open batch back; say until when.
    paused = (
        []
        if summary.status == "done"
        else await db.full_windows(sender_limits(request.app[SETTINGS]))
    )
    return render(
        request,
        "batch.html",
        {
            "batch": batch_json(summary),
            "recipients": recipients,
            "filter": status,
            "paused": [
                {"name": limit.name, "max": limit.max_sent, "until": f"{ends:%Y-%m-%d %H:%M:%S}"}
                for limit, ends in paused
            ],
        },
    )


@routes.get("/dead-letters")
async def dead_letters_page(request: web.Request) -> web.Response:
    rows = await request.app[DB].list_dead_letters(limit=500)
    return render(request, "dead_letters.html", {"dead": rows})


@routes.post("/dead-letters")
async def dead_letters_action(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    _check_csrf(request, form)
    action = form.get("action")
    if action not in {"redrive", "discard"}:
        raise web.HTTPBadRequest(text="action must be redrive or discard")
    target = str(form.get("target", ""))
    if target == "all":
        selection = Selection(everything=True)
    else:
        try:
            recipient_id = int(target)
        except ValueError:
            recipient_id = 0
        if not 1 <= recipient_id <= MAX_ID:
            raise web.HTTPBadRequest(text="target must be a recipient id or all")
        selection = Selection(ids=[recipient_id])
    db = request.app[DB]
    await (db.redrive(selection) if action == "redrive" else db.discard(selection))
    raise web.HTTPSeeOther(location="/dead-letters")


@routes.get("/suppressions")
async def suppressions_page(request: web.Request) -> web.Response:
    return await _suppressions(request, {})


async def _suppressions(
    request: web.Request, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    rows = await request.app[DB].list_suppressions(limit=1000)
    context = {"suppressions": rows, "reasons": SUPPRESSION_REASONS, "problems": [], **values}
    return render(request, "suppressions.html", context, status=status)


@routes.post("/suppressions")
async def suppressions_action(request: web.Request) -> web.StreamResponse:
    """Add pasted or uploaded addresses, or remove one, then show the list again."""
    form = await read_form(request)
    _check_csrf(request, form)
    db = request.app[DB]
    if form.get("action") == "remove":
        await db.unsuppress([str(form.get("address", ""))])
        raise web.HTTPSeeOther(location="/suppressions")
    reason = str(form.get("reason", "manual"))
    if reason not in SUPPRESSION_REASONS:
        raise web.HTTPBadRequest(text=f"reason must be one of: {', '.join(SUPPRESSION_REASONS)}")
    text = str(form.get("addresses", ""))
    csv_text = _uploaded_csv(form.get("csv"), request.app[SETTINGS].max_upload_bytes)
    try:
        addresses = addresses_from_form(text, csv_text)
    except InvalidSubmission as exc:
        return await _suppressions(
            request, {"problems": exc.problems, "addresses": text, "reason": reason}, status=422
        )
    await db.suppress(addresses, reason=reason, detail="added by an operator")
    raise web.HTTPSeeOther(location="/suppressions")


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


@routes.post("/batches/{batch_id}/send")
async def send_reviewed_page(request: web.Request) -> web.StreamResponse:
    _check_csrf(request, await read_form(request))
    batch_id = batch_id_of(request)
    await request.app[DB].approve(batch_id)
    raise web.HTTPSeeOther(location=f"/batches/{batch_id}")


@routes.get("/batches/{batch_id}/recipients/{recipient_id}/edit")
async def edit_draft_page(request: web.Request) -> web.Response:
    batch_id = batch_id_of(request)
    draft = await _draft(request, batch_id)
    return render(request, "edit.html", {"batch_id": batch_id, "draft": draft, "error": None})


@routes.post("/batches/{batch_id}/recipients/{recipient_id}/edit")
async def save_draft_page(request: web.Request) -> web.StreamResponse:
    form = await read_form(request)
    _check_csrf(request, form)
    batch_id = batch_id_of(request)
    draft = await _draft(request, batch_id)
    try:
        subject, body = checked_edit({"subject": form.get("subject"), "body": form.get("body")})
    except ValueError as exc:
        values = {**draft, "subject": form.get("subject"), "body": form.get("body")}
        return render(
            request,
            "edit.html",
            {"batch_id": batch_id, "draft": values, "error": str(exc)},
            status=422,
        )
    if not await request.app[DB].edit_draft(batch_id, draft["id"], subject, body):
        raise web.HTTPConflict(text="this draft is no longer waiting for review")
    raise web.HTTPSeeOther(location=f"/batches/{batch_id}")


async def _draft(request: web.Request, batch_id: uuid.UUID) -> dict[str, Any]:
    try:
        recipient_id = int(request.match_info["recipient_id"])
    except ValueError:
        raise web.HTTPNotFound(text="no such recipient") from None
    if not 1 <= recipient_id <= MAX_ID:
        raise web.HTTPNotFound(text="no such recipient")
    rows = await request.app[DB].list_recipients(batch_id, after_id=recipient_id - 1, limit=1)
    if not rows or rows[0]["id"] != recipient_id:
        raise web.HTTPNotFound(text="no such recipient")
    return rows[0]


@routes.post("/batches/{batch_id}/cancel")
async def cancel_batch_page(request: web.Request) -> web.StreamResponse:
    _check_csrf(request, await read_form(request))
    batch_id = batch_id_of(request)
    await request.app[DB].cancel(batch_id)
    raise web.HTTPSeeOther(location=f"/batches/{batch_id}")


@routes.post("/batches/{batch_id}/redrive")
async def redrive_batch_page(request: web.Request) -> web.StreamResponse:
    _check_csrf(request, await read_form(request))
    batch_id = batch_id_of(request)
    await request.app[DB].redrive(Selection(batch_id=batch_id))
    raise web.HTTPSeeOther(location=f"/batches/{batch_id}")
