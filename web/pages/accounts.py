"""The account pages: a user's own (API tokens, password), the users admin page, the audit log.

A new token is shown once, on the page that answers the form (never in a redirect's URL).
Changing the password ends every session of the user, this one too, and logs this browser in
again under a new session.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from yarl import URL

from shared.accounts import (
    ROLES,
    InvalidAccount,
    Role,
    check_name,
    check_password,
    check_role,
    check_token_name,
    hash_password,
    new_api_token,
    token_hash,
    verify_password,
)
from shared.db import MAX_ID, NameTaken
from web.auth import requires
from web.inputs import actor
from web.keys import DB, PRINCIPAL
from web.pages.html import Form, read_checked_form, render, text_field
from web.pages.login import could_be_a_name, start_session

routes = web.RouteTableDef()

AUDIT_PAGE_SIZE = 50


@routes.get("/account")
@requires(Role.VIEWER)
async def account_page(request: web.Request) -> web.Response:
    return await _account(request, {})


async def _account(
    request: web.Request, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    principal = request[PRINCIPAL]
    tokens = (
        await request.app[DB].list_tokens(principal.user_id)
        if principal.user_id is not None
        else []
    )
    context = {"tokens": tokens, "new_token": None, "error": None, **values}
    return render(request, "account.html", context, status=status)


@routes.post("/account")
@requires(Role.VIEWER)
async def account_action(request: web.Request) -> web.StreamResponse:
    """Make or revoke one of the user's own tokens, or change their password."""
    form = await read_checked_form(request)
    principal = request[PRINCIPAL]
    if principal.user_id is None:
        raise web.HTTPConflict(text="MAILROOM_API_TOKEN has no account: log in as a user.")
    action = text_field(form, "action")
    db = request.app[DB]
    if action == "create_token":
        try:
            name = check_token_name(text_field(form, "name"))
        except InvalidAccount as exc:
            return await _account(request, {"error": str(exc)}, status=422)
        token = new_api_token()
        await db.create_token(principal.user_id, name, token_hash(token), actor=actor(request))
        return await _account(request, {"new_token": {"name": name, "token": token}})
    if action == "revoke_token":
        await _revoke(request, form, owner_id=principal.user_id)
        raise web.HTTPSeeOther(location="/account")
    if action == "password":
        return await _change_password(request, form, principal.user_id, principal.name)
    raise web.HTTPBadRequest(text="action must be create_token, revoke_token or password")


async def _revoke(request: web.Request, form: Form, *, owner_id: int | None) -> None:
    text = text_field(form, "token_id")
    token_id = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else 0
    if not 1 <= token_id <= MAX_ID:
        raise web.HTTPBadRequest(text="token_id must be a token's id")
    done = await request.app[DB].revoke_token(token_id, owner_id=owner_id, actor=actor(request))
    if done is None:
        raise web.HTTPNotFound(text="There is no such token.")


async def _change_password(
    request: web.Request, form: Form, user_id: int, name: str
) -> web.StreamResponse:
    db = request.app[DB]
    user = await db.user_by_name(name)
    current = text_field(form, "current")
    stored = user["password_hash"] if user is not None else None
    if not await asyncio.to_thread(verify_password, stored, current):
        return await _account(request, {"error": "The current password is not right."}, status=422)
    new = text_field(form, "new")
    try:
        check_password(new)
    except InvalidAccount as exc:
        return await _account(request, {"error": str(exc).capitalize() + "."}, status=422)
    if new != text_field(form, "confirm"):
        return await _account(request, {"error": "The new passwords differ."}, status=422)
    password_hash = await asyncio.to_thread(hash_password, new)
    await db.set_password(user_id, password_hash, actor=actor(request))
    # Every session of this user ended, this one too: carry on under a new one.
    raise await start_session(request, "/account", user_id=user_id)


# -- users (admins) ---------------------------------------------------------------------------


@routes.get("/users")
@requires(Role.ADMIN)
async def users_page(request: web.Request) -> web.Response:
    return await _users(request, {})


async def _users(
    request: web.Request, values: dict[str, Any], *, status: int = 200
) -> web.Response:
    db = request.app[DB]
    context = {
        "users": await db.list_users(),
        "tokens": await db.list_tokens(),
        "roles": ROLES,
        "error": None,
        "form": {},
        **values,
    }
    return render(request, "users.html", context, status=status)


@routes.post("/users")
@requires(Role.ADMIN)
async def users_action(request: web.Request) -> web.StreamResponse:
    """Add a user, change a user's role, disable a user, or revoke anyone's token."""
    form = await read_checked_form(request)
    action = text_field(form, "action")
    db = request.app[DB]
    name = text_field(form, "name").strip()
    try:
        if action == "add":
            check_name(name)
            role = check_role(text_field(form, "role"))
            password = check_password(text_field(form, "password"))
            password_hash = await asyncio.to_thread(hash_password, password)
            try:
                await db.add_user(name, password_hash, role, actor=actor(request))
            except NameTaken:
                raise InvalidAccount(f"a user {name!r} exists already") from None
        elif action in {"role", "disable"} and not could_be_a_name(name):
            raise web.HTTPNotFound(text="There is no such user.")
        elif action == "role":
            if not await db.set_role(
                name, check_role(text_field(form, "role")), actor=actor(request)
            ):
                raise web.HTTPNotFound(text="There is no such user.")
        elif action == "disable":
            if await db.disable_user(name, actor=actor(request)) is None:
                raise web.HTTPNotFound(text="There is no such user.")
        elif action == "revoke_token":
            await _revoke(request, form, owner_id=None)
        else:
            raise web.HTTPBadRequest(text="action must be add, role, disable or revoke_token")
    except InvalidAccount as exc:
        values = {"error": str(exc), "form": {"name": name, "role": text_field(form, "role")}}
        return await _users(request, values, status=422)
    raise web.HTTPSeeOther(location="/users")


# -- the audit log (admins) -------------------------------------------------------------------


@routes.get("/audit")
@requires(Role.ADMIN)
async def audit_page(request: web.Request) -> web.Response:
    given = request.query.get("after", "")
    after = int(given) if given.isascii() and given.isdigit() and len(given) < 19 else None
    if given and after is None:
        raise web.HTTPBadRequest(text="after must be an entry's id from the previous page")
    rows = await request.app[DB].list_audit(before_id=after or None, limit=AUDIT_PAGE_SIZE)
    older = (
        str(URL("/audit").with_query(after=rows[-1]["id"]))
        if len(rows) == AUDIT_PAGE_SIZE
        else None
    )
    return render(request, "audit.html", {"entries": rows, "older": older, "paged": bool(after)})
