"""How fast is a fresh email picked up while thousands of others wait in backoff?

procrastinate's fetch walks its ``(priority DESC, id ASC)`` index of ``todo`` jobs and filters
out the ones scheduled in the future, so every job waiting in backoff with a lower id is read
before a fresh one. Mailroom requeues retries at priority -1 so that fresh jobs come first.

Measured in one run, on an embedded PostgreSQL started here:

1. the fetch itself (``procrastinate_fetch_job_v2``) with no job waiting (the floor), with
   20,000 waiting at priority 0 (stock procrastinate retries) and at priority -1 (Mailroom);
2. end to end: a one-recipient batch created with ``Database.create_batch`` until the SMTP
   server accepts the message, through a real Mailroom worker, in the same three states.

    uv run python -m bench.pickup [--waiting 20000] [--samples 300] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from aiosmtpd.smtp import SMTP, Envelope, Session
from procrastinate.worker import Worker

from bench import harness
from mailroom.embedded import EmbeddedPostgres, ensure_database
from shared.db import Database, NewBatch, NewRecipient, make_pool
from shared.schema import migrate
from shared.settings import Settings
from worker.main import worker_options, worker_runtime

STATES = {
    "empty": None,
    "waiting at priority 0 (stock)": 0,
    "waiting at priority -1 (Mailroom)": -1,
}


@dataclass
class StampingSMTP:
    """Accepts everything and notes when each recipient's message arrived."""

    accepted: dict[str, float] = field(default_factory=dict)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.perf_counter()
        for address in envelope.rcpt_tos:
            self.accepted[address] = now
        return "250 OK"


async def fill_backoff(conn: psycopg.AsyncConnection, waiting: int, priority: int | None) -> None:
    await conn.execute("DELETE FROM procrastinate_jobs")
    if priority is not None:
        # Scheduled one to two hours ahead: none becomes due during the run.
        await conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at, attempts,"
            " priority) SELECT 'emails', 'send_email', jsonb_build_object('recipient_id', -g),"
            " now() + interval '1 hour' + random() * interval '1 hour', 1, %s"
            " FROM generate_series(1, %s) AS g",
            (priority, waiting),
        )
    await conn.execute("VACUUM ANALYZE procrastinate_jobs")


async def fetch_latency(conn: psycopg.AsyncConnection, samples: int) -> list[float]:
    cursor = await conn.execute("INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id")
    worker_id = (await cursor.fetchone() or [0])[0]
    timings = []
    for _ in range(samples):
        await conn.execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
            " VALUES ('emails', 'send_email', '{}')"
        )
        started = time.perf_counter()
        cursor = await conn.execute(
            "SELECT id FROM procrastinate_fetch_job_v2(ARRAY['emails']::varchar[], %s)",
            (worker_id,),
        )
        row = await cursor.fetchone()
        timings.append((time.perf_counter() - started) * 1000)
        assert row is not None and row[0] is not None
        await conn.execute("DELETE FROM procrastinate_jobs WHERE id = %s", (row[0],))
    await conn.execute("DELETE FROM procrastinate_workers WHERE id = %s", (worker_id,))
    return timings


async def end_to_end(
    settings: Settings, db: Database, smtp: StampingSMTP, samples: int, tag: str
) -> list[float]:
    submitted: dict[str, float] = {}
    async with worker_runtime(settings) as (app, deps):
        worker = Worker(app=app, **worker_options(settings, deps, install_signal_handlers=False))
        running = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # let it register and start listening
        for i in range(samples):
            address = f"{tag}{i}@example.org"
            submitted[address] = time.perf_counter()
            await db.create_batch(
                NewBatch(
                    created_by="bench",
                    subject_template="S",
                    body_template="B",
                    recipients=[NewRecipient(address)],
                )
            )
            await asyncio.sleep(0.02)  # an idle-ish queue: one new email every 20 ms
        deadline = time.monotonic() + 60
        # A bounded poll: the SMTP handler has no one to notify.
        while not all(a in smtp.accepted for a in submitted) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        worker.stop()
        await running
    return [(smtp.accepted[a] - t) * 1000 for a, t in submitted.items() if a in smtp.accepted]


async def run(waiting: int, samples: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "waiting": waiting,
        "samples": samples,
        "fetch": {},
        "end_to_end": {},
    }
    smtp = StampingSMTP()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(smtp), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        url = await asyncio.to_thread(ensure_database, await asyncio.to_thread(pg.start), "bench")
        await migrate(url)
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=url,
            smtp_host="127.0.0.1",
            smtp_port=port,
            from_address="bench@example.com",
            worker_concurrency=8,
        )
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for label, priority in STATES.items():
                await fill_backoff(conn, waiting, priority)
                results["fetch"][label] = harness.summary_ms(await fetch_latency(conn, samples))
        async with make_pool(url, max_size=2, name="bench") as pool:
            db = Database(pool)
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                for n, (label, priority) in enumerate(STATES.items()):
                    await fill_backoff(conn, waiting, priority)
                    latencies = await end_to_end(settings, db, smtp, min(samples, 200), f"s{n}-")
                    results["end_to_end"][label] = harness.summary_ms(latencies)
    server.close()
    return results


def print_table(results: dict[str, Any]) -> None:
    floor = results["fetch"]["empty"]["p50_ms"]
    print(f"\nPickup of a fresh job with {results['waiting']:,} jobs waiting in backoff\n")
    print(
        f"{'state':36} {'fetch p50':>10} {'fetch p99':>10} {'x empty':>8}"
        f" {'e2e p50':>9} {'e2e p99':>9}"
    )
    for label in STATES:
        f, e = results["fetch"][label], results["end_to_end"][label]
        print(
            f"{label:36} {f['p50_ms']:>8.3f}ms {f['p99_ms']:>8.3f}ms {f['p50_ms'] / floor:>7.1f}x"
            f" {e['p50_ms']:>7.1f}ms {e['p99_ms']:>7.1f}ms"
        )
    print("\nfetch: procrastinate_fetch_job_v2 alone; e2e: create_batch() to SMTP acceptance,")
    print("real worker at concurrency 8 (LISTEN/NOTIFY), one new email every 20 ms.")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pickup",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--waiting", type=int, default=20_000, help="jobs in backoff (default: %(default)s)"
    )
    parser.add_argument(
        "--samples", type=int, default=300, help="fetches per state (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/results/pickup.json"))
    args = parser.parse_args()
    results = asyncio.run(run(args.waiting, args.samples))
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
