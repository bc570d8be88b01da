"""The worker's own HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz`` for probes.

``/healthz`` answers 200 only while this process runs a procrastinate worker whose heartbeat
in PostgreSQL is fresh, so a worker that lost its database or froze fails its health check.
``/metrics`` serves the worker's registry (``shared.metrics.WORKER_REGISTRY``) and its database
pool, nothing of the web tier's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from shared.db import Database
from shared.metrics import WORKER_REGISTRY, PoolCollector, render
from shared.settings import ConfigError, Settings

# Returns the current worker's id and database, or None while none is running.
CurrentWorker = Callable[[], tuple[int, Database] | None]
# Returns the worker's database pool, or None while it has none (reconnecting).
CurrentPool = Callable[[], AsyncConnectionPool | None]
_SETTINGS = web.AppKey("settings", Settings)
_CURRENT: web.AppKey[CurrentWorker] = web.AppKey("current")
_POOL_REGISTRY = web.AppKey("pool_registry", CollectorRegistry)


def _no_pool() -> AsyncConnectionPool | None:
    return None


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(render, WORKER_REGISTRY, request.app[_POOL_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    current = request.app[_CURRENT]()
    if current is None:
        return web.json_response({"status": "starting or reconnecting"}, status=503)
    worker_id, db = current
    try:
        async with asyncio.timeout(3):
            age = await db.heartbeat_age_seconds(worker_id)
    except (psycopg.Error, TimeoutError) as exc:
        return web.json_response(
            {"status": "database unreachable", "error": type(exc).__name__}, status=503
        )
    limit = request.app[_SETTINGS].stalled_after_seconds
    if age is None or age > limit:
        return web.json_response({"status": "heartbeat stale", "age_s": age}, status=503)
    return web.json_response(
        {"status": "ok", "worker_id": worker_id, "heartbeat_age_s": round(age, 1)}
    )


async def serve_health(
    settings: Settings,
    current: CurrentWorker,
    *,
    host: str,
    port: int,
    pool: CurrentPool = _no_pool,
) -> web.AppRunner:
    """Serve /metrics and /healthz on ``host:port`` (0: any free port, see :func:`bound_port`).

    Raises OSError when the address cannot be bound.
    """
    app = web.Application()
    app[_SETTINGS] = settings
    app[_CURRENT] = current
    pool_registry = CollectorRegistry()
    pool_registry.register(PoolCollector(pool))
    app[_POOL_REGISTRY] = pool_registry
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner from :func:`serve_health` listens on."""
    return int(runner.addresses[0][1])


async def start_health_server(
    settings: Settings, current: CurrentWorker, *, pool: CurrentPool = _no_pool
) -> web.AppRunner | None:
    """Serve /metrics and /healthz on ``MAILROOM_METRICS_PORT`` (0 turns it off)."""
    if not settings.metrics_port:
        return None
    try:
        return await serve_health(
            settings, current, host=settings.metrics_host, port=settings.metrics_port, pool=pool
        )
    except OSError as exc:
        raise ConfigError(
            f"MAILROOM_METRICS_PORT: cannot listen on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror}); give each worker on a host its own "
            "port, or 0 to turn the endpoint off"
        ) from None
