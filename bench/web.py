"""The web tier under load: ``POST /api/batches`` of 100 recipients from concurrent clients.

A ``mailroom web`` process (the default pool of 10 connections) is loaded by ``--clients``
concurrent aiohttp clients for ``--seconds`` each; every request creates a real batch of 100
recipients and 100 jobs in one transaction. The baseline in the same run is ``GET /healthz`` at
the same concurrency: what aiohttp and this load generator reach with no work behind the
request. The load generator runs in this process and shares the two cores with the server and
PostgreSQL, as wrk would.

    uv run python -m bench.web [--clients 1,10,50] [--seconds 5]
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from bench import harness

AUTH = {"Authorization": "Bearer bench-token", "Content-Type": "application/json"}


def batch_body(n: int) -> bytes:
    return json.dumps(
        {
            "recipients": [
                {"email": f"user{n}-{i}@example.org", "name": f"U{i}"} for i in range(100)
            ],
            "subject": "Hello {{ name }}",
            "body": "Hi {{ name }},\n\nthis is a benchmark.\n",
        }
    ).encode()


async def load(base: str, clients: int, seconds: float, *, post: bool) -> tuple[float, list[float]]:
    """Requests per second and latencies (ms) for ``clients`` concurrent clients."""
    bodies = iter(range(10**9))
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                if post:
                    request = session.post(
                        f"{base}/api/batches", data=batch_body(next(bodies)), headers=AUTH
                    )
                else:
                    request = session.get(f"{base}/healthz")
                async with request as response:
                    await response.read()
                    if response.status not in (200, 201):
                        raise RuntimeError(f"answered {response.status}")
                latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, latencies


async def run(url: str, clients: list[int], seconds: float) -> dict[str, Any]:
    settings = harness.settings_for(url, web_port=harness.free_port())
    web = await harness.start_mailroom(settings, "web", MAILROOM_LOG_LEVEL="WARNING")
    base = f"http://127.0.0.1:{settings.web_port}"
    rows = []
    try:
        await harness.wait_for_http(f"{base}/readyz")
        for n in clients:
            rate, lat = await load(base, n, seconds, post=True)
            floor, floor_lat = await load(base, n, seconds, post=False)
            rows.append(
                {
                    "clients": n,
                    "post_per_s": round(rate, 1),
                    "post": harness.summary_ms(lat),
                    "healthz_per_s": round(floor, 1),
                    "healthz": harness.summary_ms(floor_lat),
                }
            )
            print(f"  {n} clients: {rate:.0f} batches/s, /healthz {floor:.0f}/s", flush=True)
            await harness.empty(url)
    finally:
        await harness.stop([web])
    return {"seconds": seconds, "rows": rows}


def print_table(results: dict[str, Any]) -> None:
    print(f"\nPOST /api/batches, 100 recipients each ({results['seconds']:g} s per level)\n")
    print(
        f"{'clients':>7} {'batches/s':>10} {'p50':>8} {'p99':>8} {'emails/s':>9}"
        f" {'/healthz/s':>11} {'p50':>7} {'p99':>7}"
    )
    for r in results["rows"]:
        p, h = r["post"], r["healthz"]
        print(
            f"{r['clients']:>7} {r['post_per_s']:>10,.0f}"
            f" {p['p50_ms']:>6.1f}ms {p['p99_ms']:>6.1f}ms"
            f" {r['post_per_s'] * 100:>9,.0f} {r['healthz_per_s']:>11,.0f}"
            f" {h['p50_ms']:>5.1f}ms {h['p99_ms']:>5.1f}ms"
        )
    print("\n/healthz: the same server and clients with no work behind the request.")


async def main_async(url: str | None, clients: list[int], seconds: float) -> dict[str, Any]:
    async with harness.database(url) as db_url:
        return await run(db_url, clients, seconds)


def main() -> None:
    p = harness.parser("web", __doc__)
    p.add_argument("--clients", default="1,10,50", help="concurrent clients, comma-separated")
    p.add_argument("--seconds", type=float, default=5.0, help="load per level")
    args = p.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    results = asyncio.run(main_async(args.database_url, clients, args.seconds))
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
