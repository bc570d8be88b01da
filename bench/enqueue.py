"""How long does creating a batch take, through the real API, next to raw SQL?

For each size, ``POST /api/batches`` to a ``mailroom web`` process (validation, JSON, the one
transaction that writes the batch, its recipients and their chunk jobs) is timed from the
client, then the baseline: the same batch row and recipient rows written by one SQL statement
on a direct connection, with no jobs at all, no validation and no HTTP. The ratio is what the
queue, the checks and the API cost on top of storing the recipients. Each is repeated and the
median kept; the database is emptied between measurements so every batch lands in the same
state.

    uv run python -m bench.enqueue [--sizes 10,1000,10000,100000] [--repeat 3]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import aiohttp
import psycopg
from psycopg.types.json import Jsonb

from bench import harness

RAW_BATCH = """
WITH b AS (
    INSERT INTO batches (id, created_by, drafter, subject_template, body_template, total)
    VALUES (%(id)s, 'bench', 'template', %(subject)s, %(body)s, %(total)s)
    RETURNING id
)
INSERT INTO recipients (batch_id, email, fields)
SELECT (SELECT id FROM b), e, f FROM unnest(%(emails)s::text[], %(fields)s::jsonb[]) AS t(e, f)
"""
SUBJECT = "Hello {{ name | default(email) }}"
BODY = "Hi {{ name | default('there') }},\n\nthis is a benchmark.\n"


def recipients(size: int) -> list[dict[str, str]]:
    return [{"email": f"user{i}@example.org", "name": f"User {i}"} for i in range(size)]


def batch_body(size: int) -> bytes:
    return json.dumps(
        {"recipients": recipients(size), "subject": SUBJECT, "body": BODY, "drafter": "template"}
    ).encode()


async def through_api(session: aiohttp.ClientSession, base: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(
        f"{base}/api/batches",
        data=body,
        headers={"Authorization": "Bearer bench-token", "Content-Type": "application/json"},
    ) as response:
        answer = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /api/batches answered {response.status}: {answer}")
    return (time.perf_counter() - started) * 1000


async def raw_sql(url: str, size: int) -> float:
    rows = recipients(size)
    emails = [r.pop("email") for r in rows]
    fields = [Jsonb(r) for r in rows]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        await conn.execute(
            RAW_BATCH,
            {
                "id": uuid.uuid4(),
                "subject": SUBJECT,
                "body": BODY,
                "total": size,
                "emails": emails,
                "fields": fields,
            },
        )
        return (time.perf_counter() - started) * 1000


async def run(url: str, sizes: list[int], repeat: int) -> dict[str, Any]:
    settings = harness.settings_for(url, web_port=harness.free_port())
    web = await harness.start_mailroom(
        settings, "web", MAILROOM_MAX_BATCH_SIZE=str(max(sizes)), MAILROOM_LOG_LEVEL="WARNING"
    )
    base = f"http://127.0.0.1:{settings.web_port}"
    results: dict[str, Any] = {"repeat": repeat, "sizes": {}}
    try:
        await harness.wait_for_http(f"{base}/readyz")
        async with aiohttp.ClientSession() as session:
            for size in sizes:
                body = batch_body(size)
                api, raw = [], []
                for _ in range(repeat):
                    await harness.empty(url)
                    api.append(await through_api(session, base, body))
                    await harness.empty(url)
                    raw.append(await raw_sql(url, size))
                results["sizes"][size] = {
                    "api_ms": round(statistics.median(api), 1),
                    "raw_sql_ms": round(statistics.median(raw), 1),
                    "api_samples_ms": [round(x, 1) for x in api],
                    "raw_samples_ms": [round(x, 1) for x in raw],
                    "request_bytes": len(body),
                }
    finally:
        await harness.stop([web])
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"\nCreating one batch (median of {results['repeat']})\n")
    print(f"{'recipients':>10} {'API':>10} {'raw SQL':>10} {'API/raw':>8} {'recipients/s':>13}")
    for size, r in results["sizes"].items():
        rate = int(size) / (r["api_ms"] / 1000)
        print(
            f"{int(size):>10,} {r['api_ms']:>8.1f}ms {r['raw_sql_ms']:>8.1f}ms"
            f" {r['api_ms'] / r['raw_sql_ms']:>7.2f}x {rate:>13,.0f}"
        )
    print("\nAPI: POST /api/batches to `mailroom web`, timed by the client (validation, JSON,")
    print("one transaction with the jobs). raw SQL: the batch and recipient rows alone in one")
    print("statement: no jobs, no validation.")


async def main_async(url: str | None, sizes: list[int], repeat: int) -> dict[str, Any]:
    async with harness.database(url) as db_url:
        return await run(db_url, sizes, repeat)


def main() -> None:
    p = harness.parser("enqueue", __doc__)
    p.add_argument("--sizes", default="10,1000,10000,100000", help="batch sizes, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="measurements per size")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = asyncio.run(main_async(args.database_url, sizes, args.repeat))
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
