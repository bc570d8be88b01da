"""Starting real ``mailroom`` processes from tests, configured like an operator would."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

_EXPORTED = (
    "database_url",
    "database_transaction_pooling",
    "smtp_host",
    "smtp_port",
    "smtp_timeout_seconds",
    "from_address",
    "worker_concurrency",
    "retry_base_seconds",
    "retry_cap_seconds",
    "retry_max_attempts",
    "shutdown_grace_seconds",
    "job_timeout_seconds",
    "stalled_after_seconds",
    "sweep_interval_seconds",
    "api_token",
    "secret_key",
    "web_port",
    "metrics_port",
    "rate_per_second",
    "rate_per_hour",
    "rate_per_day",
    "rate_per_domain_per_minute",
)


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    """The process environment that gives a subprocess exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    for name in _EXPORTED:
        value = getattr(settings, name)
        if value is None:
            continue
        text = value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
        env[f"MAILROOM_{name.upper()}"] = text
    env["MAILROOM_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


async def start(
    settings: Settings, *args: str, log_path: Path | None = None
) -> asyncio.subprocess.Process:
    """Start ``mailroom ARGS`` with ``settings``; its output goes to ``log_path`` (or nowhere)."""
    output = log_path.open("ab") if log_path else asyncio.subprocess.DEVNULL
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailroom",
            *args,
            env=environment(settings),
            cwd=ROOT,
            stdout=output,
            stderr=output,
        )
    finally:
        if log_path:
            output.close()  # type: ignore[union-attr]


@asynccontextmanager
async def worker_process(
    settings: Settings, log_path: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A ``mailroom worker`` that is killed on the way out if the test left it running."""
    proc = await start(settings, "worker", log_path=log_path)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def stop(proc: asyncio.subprocess.Process, *, grace_seconds: float = 10) -> None:
    """Ask ``proc`` to stop (SIGTERM), and kill it if it has not within ``grace_seconds``."""
    if proc.returncode is not None:
        return
    proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace_seconds)
    except TimeoutError:
        proc.kill()
        await proc.wait()


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """A port ``p`` such that ``p`` to ``p + count - 1`` are all free on loopback right now
    (for processes that each take the next port, like ``mailroom worker --instance N``)."""
    for _ in range(100):
        base = free_port()
        if base + count <= 65536 and all(_free(base + i) for i in range(1, count)):
            return base
    raise RuntimeError(f"no {count} free ports in a row on loopback")


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_seconds: float, what: str = "the condition"
) -> None:
    """Poll ``check`` every 0.1 s until it is true; fail after ``timeout_seconds``."""
    deadline = time.monotonic() + timeout_seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds} s waiting for {what}")
        await asyncio.sleep(0.1)


def prometheus_binary(name: str) -> str:
    """Debian's ``prometheus`` or ``promtool``: CI installs them, elsewhere a missing one skips."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path
