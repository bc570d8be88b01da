"""Accounts in the API: a user's personal tokens (make, list, revoke) and the audit log."""

from __future__ import annotations

import structlog
from aiohttp import web

from shared.accounts import Principal, Role, new_api_token, token_hash
from web.auth import requires
from web.contract import (
    AuditEntryPage,
    AuditQuery,
    NewToken,
    TokenCreated,
    TokenInfo,
    TokenList,
    TokenRevoked,
    TokensQuery,
    respond,
)
from web.errors import ApiError
from web.inputs import read_body, read_query
from web.keys import DB, PRINCIPAL

log = structlog.get_logger(__name__)
routes = web.RouteTableDef()


def _user_of(principal: Principal) -> int:
    """The user id tokens are made for; the bootstrap token has none."""
    if principal.user_id is None:
        raise ApiError(
            409, "no_account", "MAILROOM_API_TOKEN has no account: use a user's login or token"
        )
    return principal.user_id


@routes.get("/api/tokens")
@requires(Role.VIEWER)
async def list_tokens(request: web.Request) -> web.Response:
    """The caller's own tokens, newest first (an admin's ``?all=true``: everyone's)."""
    principal = request[PRINCIPAL]
    query = read_query(request, TokensQuery)
    everyone = query.all and principal.role.allows(Role.ADMIN)
    if everyone:
        rows = await request.app[DB].list_tokens()
    elif principal.user_id is None:
        rows = []
    else:
        rows = await request.app[DB].list_tokens(principal.user_id)
    return respond(TokenList(tokens=[TokenInfo.model_validate(row) for row in rows]))


@routes.post("/api/tokens")
@requires(Role.VIEWER)
async def create_token(request: web.Request) -> web.Response:
    """A new personal token for the caller: shown in this answer only."""
    principal = request[PRINCIPAL]
    given = await read_body(request, NewToken, invalid_code="invalid_token")
    user_id = _user_of(principal)
    token = new_api_token()
    row = await request.app[DB].create_token(
        user_id, given.name, token_hash(token), actor=principal.name
    )
    log.info("api_token_created", user=principal.name, token_id=row["id"])
    return respond(TokenCreated(**row, user_name=principal.name, token=token), status=201)


@routes.delete("/api/tokens/{token_id}")
@requires(Role.VIEWER)
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke one of the caller's tokens (an admin: anyone's); refused from the next request."""
    principal = request[PRINCIPAL]
    text = request.match_info["token_id"]
    token_id = int(text) if text.isascii() and text.isdigit() and len(text) < 19 else 0
    owner = None if principal.role.allows(Role.ADMIN) else _user_of(principal)
    revoked = (
        await request.app[DB].revoke_token(token_id, owner_id=owner, actor=principal.name)
        if token_id
        else None
    )
    if revoked is None:
        raise ApiError(404, "not_found", "no such token")
    return respond(TokenRevoked(id=token_id, revoked=True))


@routes.get("/api/audit")
@requires(Role.ADMIN)
async def audit_log(request: web.Request) -> web.Response:
    """Who did what, newest first; ``next_after`` is where the next (older) page starts."""
    query = read_query(request, AuditQuery)
    rows = await request.app[DB].list_audit(before_id=query.after or None, limit=query.limit)
    return respond(AuditEntryPage.of(rows, query.limit))
