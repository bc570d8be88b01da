"""Resident memory of ``mailroom web`` and ``mailroom worker``, idle and at full load.

Starts a web process and a worker at ``--concurrency`` (32 by default), reads their RSS once
they are up and idle, then submits ``--recipients`` through the API and samples both every
50 ms until the SMTP sink has every message; the peak is reported. The baseline in the same run
is a bare Python interpreter (``python -c``) on the same machine.

    uv run python -m bench.memory [--concurrency 32] [--recipients 10000]
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp

from bench import harness
from bench.e2e import wait_for_workers


async def bare_interpreter_mb() -> float:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(2)")
    await asyncio.sleep(1)
    try:
        return harness.rss_mb(proc.pid)
    finally:
        await proc.wait()


async def run(url: str, concurrency: int, recipients: int) -> dict[str, Any]:
    baseline = await bare_interpreter_mb()
    with harness.SmtpSink() as sink:
        settings = harness.settings_for(
            url, smtp_port=sink.port, web_port=harness.free_port(), worker_concurrency=concurrency
        )
        web = await harness.start_mailroom(settings, "web")
        worker = await harness.start_mailroom(settings, "worker")
        base = f"http://127.0.0.1:{settings.web_port}"
        try:
            await harness.wait_for_http(f"{base}/readyz")
            await wait_for_workers(url, 1)
            await asyncio.sleep(2)  # let start-up settle
            idle = {"web": harness.rss_mb(web.pid), "worker": harness.rss_mb(worker.pid)}
            peak = dict(idle)
            body = json.dumps(
                {
                    "recipients": [
                        {"email": f"user{i}@example.org", "name": f"U{i}"}
                        for i in range(recipients)
                    ],
                    "subject": "Hello {{ name }}",
                    "body": "Hi {{ name }},\n\nthis is a benchmark of memory.\n",
                }
            ).encode()
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{base}/api/batches",
                    data=body,
                    headers={
                        "Authorization": "Bearer bench-token",
                        "Content-Type": "application/json",
                    },
                ) as response:
                    if response.status != 201:
                        raise RuntimeError(f"POST /api/batches answered {response.status}")
                peak["web"] = max(peak["web"], harness.rss_mb(web.pid))
            while sink.accepted < recipients:
                peak["worker"] = max(peak["worker"], harness.rss_mb(worker.pid))
                peak["web"] = max(peak["web"], harness.rss_mb(web.pid))
                await asyncio.sleep(0.05)
        finally:
            await harness.stop([web, worker])
    return {
        "concurrency": concurrency,
        "recipients": recipients,
        "bare_python_mb": round(baseline, 1),
        "idle_mb": {k: round(v, 1) for k, v in idle.items()},
        "peak_mb": {k: round(v, 1) for k, v in peak.items()},
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nResident memory (MiB): worker at concurrency {results['concurrency']},"
        f" {results['recipients']:,} emails\n"
    )
    print(f"{'process':>8} {'idle':>8} {'peak under load':>16}")
    for name in ("web", "worker"):
        print(f"{name:>8} {results['idle_mb'][name]:>8.1f} {results['peak_mb'][name]:>16.1f}")
    print(f"\nbaseline: a bare Python interpreter, {results['bare_python_mb']:.1f} MiB")


async def main_async(url: str | None, concurrency: int, recipients: int) -> dict[str, Any]:
    async with harness.database(url) as db_url:
        return await run(db_url, concurrency, recipients)


def main() -> None:
    p = harness.parser("memory", __doc__)
    p.add_argument("--concurrency", type=int, default=32, help="the worker's concurrency")
    p.add_argument("--recipients", type=int, default=10_000, help="emails sent under load")
    args = p.parse_args()
    results = asyncio.run(main_async(args.database_url, args.concurrency, args.recipients))
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
