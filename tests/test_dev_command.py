"""``mailroom dev`` as a user runs it: a real process, a real batch, a real SIGTERM."""

from __future__ import annotations

import asyncio
import json
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

from tests.processes import free_port, wait_until

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
async def running_dev(
    data_dir: Path, cwd: Path = ROOT, **settings: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, str, str]]:
    """Start ``mailroom dev`` (with ``settings``, MAILROOM_* variables, in its environment);
    once it says it is running, yield (process, base URL, token, the worker's base URL as
    printed: its metrics port is picked by the process)."""
    port, smtp_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")} | settings
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        "dev",
        "--port",
        str(port),
        "--smtp-port",
        str(smtp_port),
        "--metrics-port",
        "0",
        "--data-dir",
        str(data_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        env=env,
    )
    assert proc.stdout is not None
    output = []
    try:
        async with asyncio.timeout(60):
            while not output or "Press Ctrl-C" not in output[-1]:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError("mailroom dev exited early:\n" + "".join(output))
                output.append(line)
        banner = "".join(output)
        token = re.search(r"Log in with the token\s+(\S+)", banner)
        worker = re.search(r"worker (http://127\.0\.0\.1:\d+)/metrics", banner)
        assert token and worker, banner
        drain_output = asyncio.create_task(proc.stdout.read())
        yield proc, f"http://127.0.0.1:{port}", token.group(1), worker.group(1)
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
    # Relays configured for production are not used: nothing leaves the machine.
    production = json.dumps([{"name": "production", "host": "127.0.0.1", "port": free_port()}])
    async with running_dev(data_dir, MAILROOM_SMTP_RELAYS=production) as (proc, base, token, _):
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
    async with running_dev(data_dir) as (proc, base, token_again, _):
        assert token_again == token
        async with aiohttp.ClientSession(base) as http:
            status = await (await http.get(f"/api/batches/{batch_id}", headers=auth)).json()
            assert status["counts"]["sent"] == len(recipients)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
    assert postgres_processes(data_dir) == []


async def test_dev_serves_each_tier_s_metrics_on_its_own_printed_port(tmp_path: Path) -> None:
    async with running_dev(tmp_path / "data") as (proc, base, token, worker_base):
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as http:
            created = await http.post(
                f"{base}/api/batches",
                json={
                    "recipients": ["m1@example.org", "m2@example.org"],
                    "subject": "S",
                    "body": "B",
                },
                headers=auth,
            )
            assert created.status == 201

            async def both_sent() -> bool:
                text = await (await http.get(f"{worker_base}/metrics")).text()
                return "mailroom_emails_sent_total 2.0" in text

            await wait_until(both_sent, 30, "the worker's /metrics to count both sent")
            text = await (await http.get(f"{worker_base}/metrics")).text()
            assert "mailroom_worker_up 1.0" in text
            assert re.search(r"^mailroom_worker_concurrency [1-9]", text, re.MULTILINE)
            assert 'mailroom_db_pool_connections{state="in_use"}' in text
            assert "mailroom_http_requests_total" not in text  # the web tier's, not here
            assert "mailroom_queue_jobs" not in text

            health = await http.get(f"{worker_base}/healthz")
            assert health.status == 200 and (await health.json())["status"] == "ok"

            web_text = await (await http.get(f"{base}/metrics")).text()
            assert "mailroom_batches_created_total 1.0" in web_text
            assert 'mailroom_queue_jobs{queue="maintenance",status="todo_ready"}' in web_text
            for worker_series in ("mailroom_worker_up", "mailroom_emails_sent", "mailroom_smtp_"):
                assert worker_series not in web_text
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0


async def _operator(cwd: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailroom",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_operator_commands_find_a_running_dev_in_their_directory(tmp_path: Path) -> None:
    data_dir = tmp_path / ".mailroom"
    async with running_dev(data_dir, cwd=tmp_path) as (proc, base, token, _):
        async with aiohttp.ClientSession(base) as http:
            created = await http.post(
                "/api/batches",
                json={
                    "recipients": ["ok@example.org", "gone+bounce@example.org"],
                    "subject": "S",
                    "body": "B",
                },
                headers={"Authorization": f"Bearer {token}"},
            )
            assert created.status == 201
        async with asyncio.timeout(30):
            while True:
                status, out, err = await _operator(tmp_path, "dead-letters", "list")
                if "gone+bounce@example.org" in out:
                    break
                assert status == 0, err
                await asyncio.sleep(0.3)
        assert "using the database of `mailroom dev`" in err
        status, out, err = await _operator(tmp_path, "check", "--offline")
        assert status == 0, out + err  # the dev sender stands in for MAILROOM_FROM_ADDRESS
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0

    # Stopped, it is not found: the command asks for a database again.
    assert not (data_dir / "instance.json").exists()
    status, _, err = await _operator(tmp_path, "dead-letters", "list")
    assert status == 2 and "MAILROOM_DATABASE_URL" in err
    status, _, err = await _operator(tmp_path, "check", "--offline")
    assert status == 2 and "MAILROOM_FROM_ADDRESS" in err
