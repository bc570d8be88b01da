"""What every benchmark needs: a database, an SMTP sink in its own process, real Mailroom
processes, summaries and a results file.

Benchmarks start an embedded PostgreSQL of their own (durable defaults, as in production) unless
``--database-url`` names a server; every figure they print is measured in that one run, next to
its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from typing import Any

from mailroom.embedded import EmbeddedPostgres, ensure_database
from shared.schema import migrate
from shared.settings import Settings
from tests.processes import environment, free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark takes."""
    p = argparse.ArgumentParser(
        prog=f"python -m bench.{name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--database-url",
        help="a PostgreSQL server to use (its database is emptied first); default: an"
        " embedded PostgreSQL started for this run",
    )
    p.add_argument("--json", type=Path, default=RESULTS / f"{name}.json", help="results file")
    return p


@asynccontextmanager
async def database(url: str | None = None) -> AsyncIterator[str]:
    """A migrated, empty Mailroom database: ``url``'s, or a fresh embedded server's."""
    if url is not None:
        await migrate(url)
        await empty(url)
        yield url
        return
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        admin = await asyncio.to_thread(pg.start)
        url = await asyncio.to_thread(ensure_database, admin, "bench")
        await migrate(url)
        yield url


async def empty(url: str) -> None:
    """Remove every batch, recipient and job (between measurements, and before a run)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "TRUNCATE batches, recipients, processed_jobs, api_idempotency_keys,"
            " procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers CASCADE"
        )
        await conn.execute("DELETE FROM procrastinate_workers")
        await conn.execute("VACUUM ANALYZE")


def settings_for(url: str, **values: Any) -> Settings:
    """Settings for the processes a benchmark starts (no ``.env`` is read)."""
    base: dict[str, Any] = {
        "database_url": url,
        "from_address": "bench@example.com",
        "api_token": "bench-token",
        "secret_key": "bench-secret-key-bench-secret-key",
        "metrics_port": 0,
        "smtp_host": "127.0.0.1",
    }
    return Settings(_env_file=None, **{**base, **values})  # type: ignore[call-arg]


async def start_mailroom(
    settings: Settings, *args: str, **extra_env: str
) -> asyncio.subprocess.Process:
    """``mailroom ARGS`` as an operator would run it; its logs are discarded.

    Logs stay at INFO (the worker writes its line per job, as in production) but go nowhere,
    so the terminal is not what is measured.
    """
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        *args,
        env=environment(settings, **extra_env),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def stop(procs: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM each process and wait for it (SIGKILL after 30 s)."""
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def wait_for_http(url: str, timeout_seconds: float = 30.0) -> None:
    """Poll ``url`` until it answers 200."""
    import aiohttp

    deadline = time.monotonic() + timeout_seconds
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout_seconds} s")
            await asyncio.sleep(0.1)


async def wait_for_workers(url: str, count: int, timeout_seconds: float = 60.0) -> None:
    """Until ``count`` workers have registered with procrastinate (they listen for jobs)."""
    import psycopg

    deadline = time.monotonic() + timeout_seconds
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute("SELECT count(*) FROM procrastinate_workers")
            row = await cursor.fetchone()
            if row and row[0] >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{count} worker(s) did not register within {timeout_seconds} s")
            await asyncio.sleep(0.1)


async def post_batch(
    session: Any, base: str, payload: dict[str, Any], token: str = "bench-token"
) -> dict[str, Any]:
    """``POST /api/batches`` to a ``mailroom web`` at ``base``; its 201 answer (else raise).

    ``session`` is an ``aiohttp.ClientSession``; ``token`` is :func:`settings_for`'s.
    """
    async with session.post(
        f"{base}/api/batches",
        data=json.dumps(payload).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as response:
        answer: dict[str, Any] = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /api/batches answered {response.status}: {answer}")
    return answer


# -- the SMTP sink -----------------------------------------------------------------------------


def _sink_main(port: int, count: Synchronized[int], last: Synchronized[float]) -> None:
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Counting:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            with count.get_lock():
                count.value += len(envelope.rcpt_tos)
            last.value = time.time()
            return "250 OK"

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Counting()), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


class SmtpSink:
    """An aiosmtpd server in a process of its own that accepts and counts every message.

    In its own process it does not compete with the measured code for the event loop; it still
    shares the machine's two cores, as a local MTA would.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.port = free_port()
        self._count: Synchronized[int] = ctx.Value("q", 0)
        self._last: Synchronized[float] = ctx.Value("d", 0.0)
        self._process = ctx.Process(
            target=_sink_main, args=(self.port, self._count, self._last), daemon=True
        )

    @property
    def accepted(self) -> int:
        """Messages accepted so far (one per recipient)."""
        return int(self._count.value)

    @property
    def last_accepted_at(self) -> float:
        """``time.time()`` of the latest acceptance."""
        return float(self._last.value)

    def reset(self) -> None:
        with self._count.get_lock():
            self._count.value = 0

    async def wait_for(self, n: int, timeout_seconds: float) -> float:
        """Wait until ``n`` messages were accepted; return when the last one was (time.time())."""
        deadline = time.monotonic() + timeout_seconds
        while self.accepted < n:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {self.accepted} of {n} messages arrived in {timeout_seconds} s"
                )
            await asyncio.sleep(0.01)
        return self.last_accepted_at

    def __enter__(self) -> SmtpSink:
        self._process.start()
        deadline = time.monotonic() + 20
        import socket

        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the SMTP sink did not start")

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(5)


# -- figures -----------------------------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 to 100), nearest rank."""
    ordered = sorted(samples)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))]


def summary_ms(samples: Sequence[float]) -> dict[str, float]:
    """Median and p99 of samples given in milliseconds."""
    return {
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(percentile(samples, 99), 3),
        "n": len(samples),
    }


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    import procrastinate

    return {
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "procrastinate": procrastinate.__version__,
    }


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2, default=str))
    print(f"\nwrote {path}")
