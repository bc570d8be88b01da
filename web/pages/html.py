"""What every page shares: rendering a template with the session's CSRF token, reading a
posted form (and its CSRF token, and an uploaded CSV) without ever answering 5xx."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import FileField
from multidict import MultiDictProxy

from shared.accounts import Role
from web.keys import CAPTURED_MAIL, PRINCIPAL, SESSION
from web.pages.feedback import notice_lines

Form = MultiDictProxy[str | bytes | bytearray | FileField]


def render(
    request: web.Request, template: str, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    """Render a page with what every page needs (the CSRF token, whether this is dev mode,
    the notice a form's redirect brought, who is logged in and what their role lets them do:
    a page shows no button its viewer may not press)."""
    session = request.get(SESSION)
    principal = request.get(PRINCIPAL)
    context = {
        "csrf_token": session.csrf_token if session else "",
        "user": principal,
        "can_send": principal is not None and principal.role.allows(Role.SENDER),
        "is_admin": principal is not None and principal.role.allows(Role.ADMIN),
        "dev_mode": CAPTURED_MAIL in request.app,
        "notices": notice_lines(request),
        **values,
    }
    response = aiohttp_jinja2.render_template(template, request, context)
    response.set_status(status)
    return response


async def read_form(request: web.Request) -> Form:
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


async def read_checked_form(request: web.Request) -> Form:
    """The posted form of a logged-in operator whose CSRF token matches, or a 403."""
    form = await read_form(request)
    session = request.get(SESSION)
    if session is None:
        raise web.HTTPForbidden(text="log in through the form to post it")
    if not session.csrf_matches(str(form.get("csrf_token", ""))):
        raise web.HTTPForbidden(text="the form is stale or forged (CSRF token mismatch); reload it")
    return form


def text_field(form: Form, name: str) -> str:
    """A form field as text; a missing field, or a file sent in its place, is empty."""
    value = form.get(name, "")
    return value if isinstance(value, str) else ""


def uploaded_csv(part: Any, max_bytes: int) -> str | None:
    """An uploaded CSV file's text (UTF-8), ``None`` if none was chosen; 413 above
    ``max_bytes``, 400 if it is not UTF-8."""
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
