"""Queue throughput: no-op jobs through procrastinate as Mailroom runs it, next to a raw
``FOR UPDATE SKIP LOCKED`` loop at the same concurrency, on the same database.

For each number of processes and concurrency, the queue is filled with ``--jobs`` jobs, the
consumer processes are started and connected, and then told to go at the same moment; the
figure is jobs divided by the time until the last process has emptied the queue (process
start-up is not counted).

- procrastinate: Mailroom's worker (``worker.main.worker_runtime`` and ``worker_options``: the
  pool of autocommit connections, LISTEN/NOTIFY, deleting succeeded jobs, the job-summary
  middleware with its log line per job) running a task that does nothing.
- raw: each of ``concurrency`` connections claims one job with ``UPDATE … WHERE id = (SELECT
  … FOR UPDATE SKIP LOCKED LIMIT 1)`` and marks it done with a second statement, both in
  autocommit, on a table with a partial index on its waiting rows. Its connections commit
  without waiting for the WAL flush, like the worker's pool, so both pay the same for a commit.

    uv run python -m bench.queue [--jobs 3000] [--repeat 3] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import psycopg

from bench import harness
from shared.logging import configure_logging
from shared.queue import EMAIL_QUEUE
from shared.settings import LogFormat

KINDS = ("procrastinate", "raw")
RAW_SCHEMA = """
CREATE TABLE IF NOT EXISTS bench_raw_jobs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    status text NOT NULL DEFAULT 'todo',
    args jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS bench_raw_jobs_todo ON bench_raw_jobs (id) WHERE status = 'todo';
"""
RAW_CLAIM = (
    "UPDATE bench_raw_jobs SET status = 'doing' WHERE id = ("
    " SELECT id FROM bench_raw_jobs WHERE status = 'todo' ORDER BY id"
    " FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id"
)
NOOP_TASK = "bench_noop"


async def fill(url: str, kind: str, jobs: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if kind == "raw":
            await conn.execute(RAW_SCHEMA)
            await conn.execute("TRUNCATE bench_raw_jobs")
            await conn.execute(
                "INSERT INTO bench_raw_jobs (args) SELECT jsonb_build_object('n', g)"
                " FROM generate_series(1, %s) g",
                (jobs,),
            )
        else:
            await conn.execute("DELETE FROM procrastinate_jobs")
            await conn.execute("DELETE FROM procrastinate_workers")
            await conn.execute(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, args)"
                " SELECT %s, %s, '{}' FROM generate_series(1, %s)",
                (EMAIL_QUEUE, NOOP_TASK, jobs),
            )
        await conn.execute("VACUUM ANALYZE")


async def measure(url: str, kind: str, processes: int, concurrency: int, jobs: int) -> float:
    """Jobs per second for one configuration."""
    await fill(url, kind, jobs)
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.queue",
            "--child",
            kind,
            "--database-url",
            url,
            "--concurrency",
            str(concurrency),
            cwd=harness.ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(processes)
    ]
    for child in children:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"a {kind} consumer did not start: {line!r}")
    started = time.perf_counter()
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
    done = 0
    for child in children:
        out, _ = await asyncio.wait_for(child.communicate(), 600)
        done += json.loads(out.decode().strip().splitlines()[-1])["jobs"]
    elapsed = time.perf_counter() - started
    if done != jobs:
        raise RuntimeError(f"{kind}: {done} of {jobs} jobs were processed")
    return jobs / elapsed


async def run(
    url: str, jobs: int, repeat: int, concurrencies: list[int], processes: list[int]
) -> dict[str, Any]:
    rows = []
    for procs in processes:
        for conc in concurrencies:
            rates: dict[str, list[float]] = {kind: [] for kind in KINDS}
            for _ in range(repeat):
                for kind in KINDS:  # alternate, so drift on a noisy machine hits both
                    rates[kind].append(await measure(url, kind, procs, conc, jobs))
            row = {
                "processes": procs,
                "concurrency": conc,
                **{f"{k}_jobs_per_s": round(statistics.median(v)) for k, v in rates.items()},
                "samples": {k: [round(x) for x in v] for k, v in rates.items()},
            }
            rows.append(row)
            print(
                f"  {procs} x {conc}: procrastinate {row['procrastinate_jobs_per_s']}/s,"
                f" raw {row['raw_jobs_per_s']}/s",
                flush=True,
            )
    return {"jobs": jobs, "repeat": repeat, "rows": rows}


def print_table(results: dict[str, Any]) -> None:
    print(f"\nNo-op jobs per second ({results['jobs']:,} jobs, median of {results['repeat']})\n")
    print(f"{'processes x concurrency':>24} {'procrastinate':>14} {'raw':>10} {'raw/procr.':>11}")
    for r in results["rows"]:
        p, raw = r["procrastinate_jobs_per_s"], r["raw_jobs_per_s"]
        print(f"{r['processes']:>12} x {r['concurrency']:<10} {p:>14,} {raw:>16,} {raw / p:>6.2f}x")
    print("\nratio: how many times faster the raw loop was.")


# -- the consumer processes ----------------------------------------------------------------


async def _go() -> None:
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


async def raw_consumer(url: str, concurrency: int) -> int:
    async def consume(conn: psycopg.AsyncConnection) -> int:
        n = 0
        while True:
            cursor = await conn.execute(RAW_CLAIM)
            row = await cursor.fetchone()
            if row is None:
                return n
            await conn.execute("UPDATE bench_raw_jobs SET status = 'done' WHERE id = %s", row)
            n += 1

    conns = [
        await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(concurrency)
    ]
    for conn in conns:
        await conn.execute("SET synchronous_commit = off")  # as the worker's pool does
    await _go()
    counts = await asyncio.gather(*(consume(c) for c in conns))
    for c in conns:
        await c.close()
    return sum(counts)


async def procrastinate_consumer(url: str, concurrency: int) -> int:
    from procrastinate.worker import Worker

    from worker.main import worker_options, worker_runtime

    settings = harness.settings_for(url, worker_concurrency=concurrency)
    done = 0

    async def noop() -> None:
        nonlocal done
        done += 1

    async with worker_runtime(settings) as (app, deps):
        app.task(name=NOOP_TASK, queue=EMAIL_QUEUE)(noop)
        worker = Worker(
            app=app, **worker_options(settings, deps, wait=False, install_signal_handlers=False)
        )
        await _go()
        await worker.run()  # type: ignore[no-untyped-call]
    return done


def child(kind: str, url: str, concurrency: int) -> None:
    consumer = raw_consumer if kind == "raw" else procrastinate_consumer
    with open(os.devnull, "w") as nowhere:
        # The worker's log line per job is part of its cost; it goes nowhere here.
        configure_logging("INFO", LogFormat.JSON, stream=nowhere)
        jobs = asyncio.run(consumer(url, concurrency))
    print(json.dumps({"jobs": jobs}), flush=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    async with harness.database(args.database_url) as url:
        return await run(
            url,
            args.jobs,
            args.repeat,
            [int(c) for c in args.concurrency.split(",")],
            [int(p) for p in args.processes.split(",")],
        )


def main() -> None:
    p = harness.parser("queue", __doc__)
    p.add_argument("--jobs", type=int, default=3000, help="jobs per measurement")
    p.add_argument("--repeat", type=int, default=3, help="measurements per configuration")
    p.add_argument("--concurrency", default="1,8,32", help="concurrency per process")
    p.add_argument("--processes", default="1,2", help="consumer processes")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.database_url, int(args.concurrency))
        return
    results = asyncio.run(main_async(args))
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
