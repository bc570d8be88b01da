"""``mailroom dev`` as a user runs it: a real process, a real batch, a real SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.processes import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "postgres" in (proc.info["name"] or "") and str(data_dir) in cmdline:
            found.append(proc)
    return found


@asynccontextmanager
async def running_dev(data_dir: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str]]:
    """Start ``mailroom dev``; yield (process, base URL, token) once it says it is running."""
    port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        "dev",
        "--port",
        str(port),
        "--smtp-port",
        str(smtp_port),
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    output = []
    token = None
    try:
        async with asyncio.timeout(60):
            while token is None:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError("mailroom dev exited early:\n" + "".join(output))
                output.append(line)
                match = re.search(r"Log in with the token\s+(\S+)", line)
                token = match.group(1) if match else None
        drain_output = asyncio.create_task(proc.stdout.read())
        yield proc, f"http://127.0.0.1:{port}", token
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    await drain_output


async def test_dev_delivers_a_batch_to_its_capture_and_stops_cleanly_on_sigterm(
    pg_data_parent: Path,
) -> None:
    data_dir = pg_data_parent / "data"  # holds the embedded PostgreSQL's data directory
    recipients = [f"dev{i}@example.org" for i in range(5)]
    async with running_dev(data_dir) as (proc, base, token):
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(base) as http:
            created = await http.post(
                "/api/batches",
                json={"recipients": recipients, "subject": "Hi {{ email }}", "body": "Hello"},
                headers=auth,
            )
            assert created.status == 201
            batch_id = (await created.json())["id"]
            messages: list[dict[str, object]] = []
            async with asyncio.timeout(30):
                while len(messages) < len(recipients):
                    await asyncio.sleep(0.2)
                    messages = (await (await http.get("/api/dev/messages", headers=auth)).json())[
                        "messages"
                    ]
            assert sorted(m["to"][0] for m in messages) == recipients  # type: ignore[index]
            assert (data_dir / "mail" / "new").is_dir()

        assert postgres_processes(data_dir)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    assert postgres_processes(data_dir) == []

    # The data survives a restart, and so does the login token.
    async with running_dev(data_dir) as (proc, base, token_again):
        assert token_again == token
        async with aiohttp.ClientSession(base) as http:
            status = await (await http.get(f"/api/batches/{batch_id}", headers=auth)).json()
            assert status["counts"]["sent"] == len(recipients)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    assert postgres_processes(data_dir) == []
