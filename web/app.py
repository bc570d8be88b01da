"""The web application factory and the ``mailroom web`` runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiohttp_jinja2
import jinja2
import psycopg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from shared.db import Database, make_pool
from shared.metrics import WEB_REGISTRY, PoolCollector, QueueCollector, render
from shared.schema import pending_migrations
from shared.settings import Settings
from web import api, openapi, pages
from web.auth import Authenticator, LoginLimiter, required_role, secret_equal
from web.captured_mail import CapturedMail
from web.errors import api_error
from web.keys import (
    AUTH,
    CAPTURED_MAIL,
    DB,
    LOGIN_LIMITER,
    METRICS_REGISTRY,
    SETTINGS,
    SNS,
    WEBHOOK_LIMITER,
)
from web.middlewares import (
    auth_middleware,
    error_middleware,
    is_public,
    metrics_middleware,
    request_id_middleware,
    security_headers_middleware,
)
from web.webhooks import postmark, sendgrid, ses
from web.webhooks.sns import FETCH_TIMEOUT_SECONDS, SnsClient

log = structlog.get_logger(__name__)

HERE = Path(__file__).parent
# Large enough for a 10,000-recipient JSON batch with a few fields each.
MAX_REQUEST_BYTES = 10 * 1024 * 1024

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up and serving."""
    return web.json_response({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus exposition of the web tier only (a worker serves its own); rendered in a
    thread, as the queue collector queries PostgreSQL."""
    token = request.app[SETTINGS].metrics_token
    if token is not None:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not secret_equal(given, token.get_secret_value().encode()):
            return api_error(
                401, "unauthorized", "send 'Authorization: Bearer <MAILROOM_METRICS_TOKEN>'"
            )
    body = await asyncio.to_thread(render, WEB_REGISTRY, request.app[METRICS_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """The database answers and every migration is applied."""
    try:
        async with request.app[DB].pool.connection(timeout=5) as conn:
            pending = await pending_migrations(conn)
    except (psycopg.Error, TimeoutError) as exc:
        return web.json_response(
            {"status": "unavailable", "reason": f"database: {type(exc).__name__}"}, status=503
        )
    if pending:
        return web.json_response(
            {"status": "unavailable", "reason": "migrations pending", "pending": pending},
            status=503,
        )
    return web.json_response({"status": "ok"})


def create_app(
    settings: Settings,
    *,
    db: Database | None = None,
    captured_mail: CapturedMail | None = None,
    webhook_http: aiohttp.ClientSession | None = None,
) -> web.Application:
    """Build the web application; without ``db`` it opens its own pool from the settings.

    ``webhook_http`` is the HTTP client the SES webhook fetches SNS certificates and confirms
    subscriptions with (the caller closes it); without one the app opens its own.
    """
    settings.require("api_token", "secret_key")
    assert settings.api_token is not None and settings.secret_key is not None
    app = web.Application(
        client_max_size=MAX_REQUEST_BYTES,
        middlewares=[
            metrics_middleware,
            request_id_middleware,
            # Outside the error middleware, so error pages carry the security headers too.
            security_headers_middleware,
            error_middleware,
            auth_middleware,
        ],
    )
    app[SETTINGS] = settings
    app[AUTH] = Authenticator(
        settings.api_token.get_secret_value(), settings.secret_key.get_secret_value()
    )
    app[LOGIN_LIMITER] = LoginLimiter(
        settings.login_attempts_per_minute, trust_proxy=settings.trust_proxy
    )
    # Counted apart from LOGIN_LIMITER: a provider's bad signatures never lock an operator out.
    app[WEBHOOK_LIMITER] = LoginLimiter(
        settings.login_attempts_per_minute, trust_proxy=settings.trust_proxy
    )
    if webhook_http is not None:
        app[SNS] = SnsClient(webhook_http)
    else:
        app.cleanup_ctx.append(_webhook_http_context)
    if captured_mail is not None:
        app[CAPTURED_MAIL] = captured_mail
    # This app's own collectors: its database pool and the queue, read at scrape time.
    registry = CollectorRegistry(auto_describe=True)
    registry.register(PoolCollector(lambda: app[DB].pool if DB in app else None))
    if settings.database_url:
        collector = QueueCollector(
            settings.database_url, stalled_after_seconds=settings.stalled_after_seconds
        )
        registry.register(collector)
        app.on_cleanup.append(lambda _: asyncio.to_thread(collector.close))
    app[METRICS_REGISTRY] = registry
    if db is not None:
        app[DB] = db
    else:
        app.cleanup_ctx.append(_pool_context)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.router.add_routes(routes)
    app.router.add_routes(api.routes)
    app.router.add_routes(openapi.routes)
    app.router.add_routes(pages.routes)
    for provider in (ses, postmark, sendgrid):
        app.router.add_routes(provider.routes)
    app.router.add_static("/static", HERE / "static")
    check_roles(app)
    return app


class RouteWithoutRole(RuntimeError):
    """A route that is not public declares no role (``web.auth.requires``)."""


def check_roles(app: web.Application) -> None:
    """Refuse to build an app with a route that is neither public nor declares its role, so
    no route can be added that anyone logged in may use by accident."""
    missing = [
        f"{route.method} {route.resource.canonical}"
        for route in app.router.routes()
        if route.resource is not None
        and not isinstance(route.resource, web.StaticResource)  # under /static/: public
        and not is_public(route.resource.canonical)
        and required_role(route.handler) is None
    ]
    if missing:
        raise RouteWithoutRole(
            "routes without a role (add @requires(Role...)): " + ", ".join(missing)
        )


async def _pool_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    settings.require("database_url")
    assert settings.database_url is not None
    pool = make_pool(
        settings.database_url,
        max_size=settings.database_pool_size,
        name="mailroom-web",
        transaction_pooling=settings.database_transaction_pooling,
    )
    await pool.open(wait=True, timeout=30)
    app[DB] = Database(pool, chunk_size=settings.chunk_size)
    yield
    await pool.close()


async def _webhook_http_context(app: web.Application) -> AsyncIterator[None]:
    # Nothing from the environment (no proxy settings, no .netrc): only SNS's own hosts are
    # ever asked, and only after the URL is checked.
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS), trust_env=False
    ) as http:
        app[SNS] = SnsClient(http)
        yield


def run_web(settings: Settings) -> None:
    """Serve until SIGTERM or Ctrl-C (aiohttp stops accepting, finishes requests, exits)."""
    app = create_app(settings)
    log.info("web_starting", host=settings.web_host, port=settings.web_port)
    web.run_app(
        app,
        host=settings.web_host,
        port=settings.web_port,
        print=None,
        access_log=None,
        shutdown_timeout=10,
    )
