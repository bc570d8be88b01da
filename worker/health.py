"""The worker's own HTTP endpoint: ``/metrics`` for Prometheus and ``/healthz`` for probes.

``/healthz`` answers 200 only while this process runs a procrastinate worker whose heartbeat
in PostgreSQL is fresh, so a worker that lost its database or froze fails its health check.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from shared.db import Database
from shared.metrics import render
from shared.settings import ConfigError, Settings

# Returns the current worker's id and database, or None while none is running.
CurrentWorker = Callable[[], tuple[int, Database] | None]
_SETTINGS = web.AppKey("settings", Settings)
_CURRENT: web.AppKey[CurrentWorker] = web.AppKey("current")


async def metrics(request: web.Request) -> web.Response:
    body = await asyncio.to_thread(render)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    current = request.app[_CURRENT]()
    if current is None:
        return web.json_response({"status": "starting or reconnecting"}, status=503)
    worker_id, db = current
    try:
        async with asyncio.timeout(3):
            age = await db.heartbeat_age_s(worker_id)
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


async def start_health_server(settings: Settings, current: CurrentWorker) -> web.AppRunner | None:
    """Serve /metrics and /healthz on ``MAILROOM_METRICS_PORT`` (0 turns it off)."""
    if not settings.metrics_port:
        return None
    app = web.Application()
    app[_SETTINGS] = settings
    app[_CURRENT] = current
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.metrics_host, settings.metrics_port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"MAILROOM_METRICS_PORT: cannot listen on {settings.metrics_host}:"
            f"{settings.metrics_port} ({exc.strerror}); give each worker on a host its own "
            "port, or 0 to turn the endpoint off"
        ) from None
    return runner
