"""Request middlewares: request ids, one JSON error shape for the API and error pages in the
site's layout for everything else, security headers, auth."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from shared.accounts import BOOTSTRAP, TOKEN_PREFIX, Principal, Role, token_hash
from shared.metrics import HTTP_DURATION, HTTP_REQUESTS
from web.auth import required_role
from web.errors import ApiError, api_error
from web.keys import AUTH, AUTH_KIND, DB, LOGIN_LIMITER, PRINCIPAL, REQUEST_ID, SESSION
from web.pages.html import render

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
# /metrics checks its own token (MAILROOM_METRICS_TOKEN), so Prometheus needs no session.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/login", "/metrics", "/api/openapi.json"})
# Provider webhooks authenticate themselves (a signature, or Postmark's Basic credentials).
PUBLIC_PREFIXES = ("/static/", "/u/", "/webhooks/")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request by route template (never by raw path: ids are unbounded)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        HTTP_REQUESTS.labels(route=route, method=request.method, status=str(status)).inc()
        HTTP_DURATION.labels(route=route, method=request.method).observe(
            time.perf_counter() - started
        )


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else secrets.token_hex(8)
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id):
        response = await handler(request)
    response.headers[REQUEST_ID_HEADER] = request_id
    return response


# Error pages: their title, and what to say when the handler gave no reason of its own.
_ERROR_PAGES = {
    400: ("Bad request", "The request could not be understood."),
    403: ("Not allowed", "You may not do this."),
    404: ("Page not found", "There is nothing at this address."),
    405: ("Method not allowed", "This page does not take that kind of request."),
    409: ("Conflict", "This cannot be done in the state it is in now."),
    413: ("Too large", "What you sent is too large."),
    500: ("Something went wrong", "The server failed to answer this request."),
}
# Headers an error keeps on its page (what it says about retrying, or the methods allowed).
_KEPT_HEADERS = ("Allow", "Retry-After")


def _error_page(request: web.Request, status: int, reason: str | None = None) -> web.Response:
    """An HTML error in the site's layout, with its navigation; never an exception's text."""
    title, default = _ERROR_PAGES.get(status, (f"Error {status}", "The request failed."))
    values = {
        "title": title,
        "message": reason or default,
        "request_id": request.get(REQUEST_ID) if status >= 500 else None,
    }
    try:
        return render(request, "error.html", values, status=status)
    except Exception:  # the page itself failed: say the least that is still true
        log.exception("error_page_failed", status=status)
        return web.Response(status=status, text=f"{title}\n")


def _reason(exc: web.HTTPException) -> str | None:
    """What the handler said, unless it is aiohttp's default ``404: Not Found``."""
    text = exc.text or ""
    return text.strip() if text.strip() and not text.startswith(f"{exc.status}:") else None


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if not is_api(request):
            page = _error_page(request, exc.status, _reason(exc))
            for name in _KEPT_HEADERS:
                if name in exc.headers:
                    page.headers[name] = exc.headers[name]
            return page
        code = {
            400: "bad_request",
            401: "unauthorized",
            403: "forbidden",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
            415: "unsupported_media_type",
        }.get(exc.status, "http_error")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return api_error(exc.status, code, message)
    except Exception:
        log.exception("request_failed", method=request.method, path=request.path)
        if is_api(request):
            return api_error(500, "internal_error", "the server failed; see its log")
        return _error_page(request, 500)


@web.middleware
async def security_headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


def is_public(path: str) -> bool:
    """Whether a path is served to anyone (health, metrics, the document, static files,
    unsubscribe links): everything else needs a credential and a role."""
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every route but the public ones needs a credential and the role the route declares.

    The credential is a Bearer token (``MAILROOM_API_TOKEN``, acting as the admin
    ``api-token``, or a user's personal token, acting as that user) or a session cookie. A
    route that declared no role (``web.auth.requires``) needs an admin; ``create_app`` refuses
    such a route anyway.
    """
    # Unsubscribe links are public: their signed token is the authority (RFC 8058).
    if is_public(request.path):
        return await handler(request)
    auth, limiter = request.app[AUTH], request.app[LOGIN_LIMITER]
    principal: Principal | None = None
    if "Authorization" in request.headers:
        # A wrong token is a guess at a secret: the login form's budget applies.
        client = limiter.client_of(request)
        if limiter.blocked(client):
            return _too_many_attempts(request)
        principal = await _bearer_principal(request)
        if principal is None:
            limiter.failed(client)
        else:
            request[AUTH_KIND] = "token"
    if principal is None:
        session = auth.read_session(request)
        owner = await request.app[DB].session_owner(session.id_hash) if session else None
        if session is not None and owner is not None and session.of_user != owner.is_bootstrap:
            request[AUTH_KIND] = "session"
            request[SESSION] = session
            principal = owner
            if request.method not in {"GET", "HEAD", "OPTIONS"} and is_api(request):
                # Cookie-authenticated API writes must prove they come from our own pages.
                header = request.headers.get("X-CSRF-Token", "")
                if not session.csrf_matches(header):
                    return api_error(403, "csrf_failed", "missing or wrong X-CSRF-Token header")
    if principal is None:
        if is_api(request):
            return api_error(
                401, "unauthorized", "send 'Authorization: Bearer <token>' (or log in)"
            )
        raise web.HTTPSeeOther(
            location=f"/login?next={request.path_qs}" if request.method == "GET" else "/login"
        )
    request[PRINCIPAL] = principal
    # aiohttp's own answers (404, 405) have no handler of ours: they come out as they are.
    if request.match_info.http_exception is None:
        needed = required_role(request.match_info.handler) or Role.ADMIN
        if not principal.role.allows(needed):
            return _forbidden(request, principal, needed)
    return await handler(request)


async def _bearer_principal(request: web.Request) -> Principal | None:
    """Who the request's Bearer token acts for, None if it names no one."""
    auth = request.app[AUTH]
    token = auth.bearer_of(request)
    if token is None:
        return None
    if auth.token_matches(token):
        return BOOTSTRAP
    if token.startswith(TOKEN_PREFIX) and len(token) <= 200:
        return await request.app[DB].token_owner(token_hash(token))
    return None


def _forbidden(request: web.Request, principal: Principal, needed: Role) -> web.Response:
    message = f"this needs the {needed} role; {principal.name} is a {principal.role}"
    if is_api(request):
        return api_error(403, "forbidden", message)
    return _error_page(
        request,
        403,
        f"You may not do this: it needs the {needed} role, and "
        f"you ({principal.name}) are a {principal.role}.",
    )


def _too_many_attempts(request: web.Request) -> web.Response:
    message = "too many wrong tokens or passwords from this address; wait a minute and try again"
    if is_api(request):
        response = api_error(429, "too_many_attempts", message)
    else:
        response = web.Response(status=429, text=message + "\n")
    response.headers["Retry-After"] = "60"
    return response
