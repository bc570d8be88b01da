"""End to end: emails per second from submission to SMTP acceptance, next to SMTP alone.

For 1 and 2 ``mailroom worker`` processes (each at the default concurrency of 8, as an operator
would run them), one batch of ``--recipients`` is created with the template drafter and timed
until the SMTP sink has accepted every message. The sink is an aiosmtpd server in a process of
its own that accepts and counts.

Baseline, in the same run: the same number of messages built and sent straight to the same
sink over the same number of reused aiosmtplib connections (Mailroom's SMTP pool), with no
queue and no database: the most the SMTP side allows here.

Latency, from the commit of a one-recipient batch to its acceptance by the sink (an upper bound
of enqueue-to-start, which it includes together with drafting and the send):

- idle: ``--probes`` batches one after another, 20 ms apart, with the workers idle (LISTEN/NOTIFY
  wakes them);
- under load: for every message of the large batch, from the batch's commit to the start of
  its send (``sent_at``): what a recipient in the middle of a backlog waits.

Warm-up: the rate of the first 1,000 emails of the batch (commit to the 1,000th ``sent_at``)
next to the steady rate of the rest, so a slow start after a large enqueue shows. Each
configuration starts on emptied tables whose statistics say so, as a fresh database does, and
nothing analyzes them after a batch is enqueued.

With ``--dkim``, each configuration runs twice, unsigned and with every message DKIM-signed
(a 2048-bit RSA key made for the run), so signing's cost shows as a ratio within the run.

The pickup of a fresh email while 20,000 wait in backoff is ``bench.pickup``.

    uv run python -m bench.e2e [--recipients 10000] [--processes 1,2] [--repeat 3]
                               [--chunk-sizes 50] [--dkim]
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import harness
from shared.db import Database, NewBatch, NewRecipient, make_pool
from shared.settings import Settings
from worker.smtp import SmtpMailer, SmtpServer, build_message

SUBJECT = "Hello {{ name }}"
BODY = "Hi {{ name }},\n\nthis message is a benchmark of Mailroom.\n\nRegards,\nThe bench\n"


def new_batch(count: int, tag: str) -> NewBatch:
    return NewBatch(
        created_by="bench",
        subject_template=SUBJECT,
        body_template=BODY,
        recipients=[
            NewRecipient(f"{tag}{i}@example.org", {"name": f"User {i}"}) for i in range(count)
        ],
    )


async def smtp_only(settings: Settings, sink: harness.SmtpSink, count: int, conns: int) -> float:
    """Messages per second straight to the sink over ``conns`` reused connections."""
    sink.reset()
    mailer = SmtpMailer(SmtpServer.from_settings(settings), size=conns)
    messages = [
        build_message(
            sender="bench@example.com",
            to=f"direct{i}@example.org",
            subject=f"Hello User {i}",
            body=BODY.replace("{{ name }}", f"User {i}"),
            message_id=f"<direct.{uuid.uuid4()}@example.com>",
        )
        for i in range(count)
    ]
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)

    async def sender() -> None:
        while not queue.empty():
            await mailer.send(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(conns)))
    elapsed = time.perf_counter() - started
    await mailer.close()
    return count / elapsed


WARM_UP = 1000


async def through_mailroom(
    db: Database, sink: harness.SmtpSink, count: int, tag: str
) -> tuple[float, list[float], tuple[float, float] | None]:
    """Emails per second for one batch, each message's wait from commit to acceptance, and
    the rates of the first ``WARM_UP`` emails and of the rest (when the batch is larger)."""
    sink.reset()
    started = time.perf_counter()
    await db.create_batch(new_batch(count, tag))
    committed = time.time()
    await sink.wait_for(count, timeout_seconds=600)
    elapsed = time.perf_counter() - started
    async with db.pool.connection() as conn:
        # The sink counts a message before the worker commits it as sent: wait for the commits.
        while True:
            cursor = await conn.execute(
                "SELECT extract(epoch FROM sent_at)::float8 FROM recipients WHERE email LIKE %s",
                (f"{tag}%",),
            )
            sent_at = [row[0] for row in await cursor.fetchall()]
            if None not in sent_at:
                break
            await asyncio.sleep(0.05)
    waits = [(t - committed) * 1000 for t in sent_at]
    warm_up = None
    if count > WARM_UP:
        ordered = sorted(sent_at)
        first = ordered[WARM_UP - 1] - committed
        rest = ordered[-1] - ordered[WARM_UP - 1]
        warm_up = (WARM_UP / first, (count - WARM_UP) / rest if rest > 0 else float("inf"))
    return count / elapsed, waits, warm_up


async def idle_latency(db: Database, sink: harness.SmtpSink, probes: int) -> list[float]:
    samples = []
    for i in range(probes):
        sink.reset()
        await db.create_batch(new_batch(1, f"probe{i}-"))
        committed = time.time()
        accepted = await sink.wait_for(1, timeout_seconds=30)
        samples.append((accepted - committed) * 1000)
        await asyncio.sleep(0.02)
    return samples


async def run(
    url: str,
    recipients: int,
    processes: list[int],
    repeat: int,
    probes: int,
    chunk_sizes: list[int],
    dkim: bool = False,
) -> dict[str, Any]:
    results: dict[str, Any] = {"recipients": recipients, "repeat": repeat, "rows": []}
    with harness.SmtpSink() as sink, tempfile.TemporaryDirectory() as tmp:
        settings = harness.settings_for(url, smtp_port=sink.port)
        signing = [{}, dkim_env(Path(tmp))] if dkim else [{}]
        async with make_pool(url, max_size=2, name="bench") as pool:
            for chunk_size in chunk_sizes:
                db = Database(pool, chunk_size=chunk_size)
                for procs in processes:
                    for env in signing:
                        row = await measure(
                            url, db, sink, settings, procs, recipients, repeat, probes, env
                        )
                        results["rows"].append(row)
                        print(
                            f"  chunk {chunk_size}, {procs} worker(s)"
                            f"{', DKIM' if row['dkim'] else ''}: {row['emails_per_s']} emails/s,"
                            f" SMTP alone {row['smtp_only_per_s']}/s",
                            flush=True,
                        )
                        await harness.empty(url)
    return results


def dkim_env(folder: Path) -> dict[str, str]:
    """Worker settings that DKIM-sign every message with a fresh 2048-bit key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "dkim.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return {"MAILROOM_DKIM_PRIVATE_KEY_PATH": str(path), "MAILROOM_DKIM_SELECTOR": "bench"}


async def measure(
    url: str,
    db: Database,
    sink: harness.SmtpSink,
    settings: Settings,
    procs: int,
    recipients: int,
    repeat: int,
    probes: int,
    worker_env: dict[str, str],
) -> dict[str, Any]:
    """One configuration: ``repeat`` batches next to SMTP alone, then the idle latency."""
    conns = procs * settings.worker_concurrency
    workers = [await harness.start_mailroom(settings, "worker", **worker_env) for _ in range(procs)]
    try:
        await wait_for_workers(url, procs)
        rates, direct, waits, warm = [], [], [], []
        for n in range(repeat):
            direct.append(await smtp_only(settings, sink, recipients, conns))
            rate, w, warm_up = await through_mailroom(db, sink, recipients, f"p{procs}r{n}-")
            rates.append(rate)
            waits += w
            if warm_up is not None:
                warm.append(warm_up)
        idle = await idle_latency(db, sink, probes)
    finally:
        await harness.stop(workers)
    return {
        "chunk_size": db.chunk_size,
        "dkim": bool(worker_env),
        "processes": procs,
        "concurrency": settings.worker_concurrency,
        "emails_per_s": round(statistics.median(rates)),
        "smtp_only_per_s": round(statistics.median(direct)),
        "first_1000_per_s": round(statistics.median(f for f, _ in warm)) if warm else None,
        "rest_per_s": round(statistics.median(r for _, r in warm)) if warm else None,
        "samples": {
            "mailroom": [round(r) for r in rates],
            "smtp": [round(d) for d in direct],
            "warm_up": [(round(f), round(r)) for f, r in warm],
        },
        "idle_commit_to_accepted": harness.summary_ms(idle),
        "loaded_commit_to_accepted": harness.summary_ms(waits),
    }


async def wait_for_workers(url: str, count: int) -> None:
    """Until ``count`` workers have registered (they are listening for jobs)."""
    deadline = time.monotonic() + 60
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            cursor = await conn.execute("SELECT count(*) FROM procrastinate_workers")
            row = await cursor.fetchone()
            if row and row[0] >= count:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            await asyncio.sleep(0.1)


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nOne batch of {results['recipients']:,} emails, submission to SMTP acceptance"
        f" (median of {results['repeat']})\n"
    )
    print(
        f"{'chunk':>5} {'DKIM':>4} {'workers x conc.':>16} {'emails/s':>9} {'SMTP alone':>11}"
        f" {'share':>6}"
        f" {'first 1k/s':>10} {'rest/s':>7}"
        f" {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} {'loaded p99':>11}"
    )
    for r in results["rows"]:
        idle, loaded = r["idle_commit_to_accepted"], r["loaded_commit_to_accepted"]
        print(
            f"{r['chunk_size']:>5} {'yes' if r['dkim'] else 'no':>4}"
            f" {r['processes']:>8} x {r['concurrency']:<5}"
            f" {r['emails_per_s']:>9,}"
            f" {r['smtp_only_per_s']:>11,} {r['emails_per_s'] / r['smtp_only_per_s']:>5.0%}"
            f" {r['first_1000_per_s'] or '-':>10} {r['rest_per_s'] or '-':>7}"
            f" {idle['p50_ms']:>7.1f}ms {idle['p99_ms']:>7.1f}ms"
            f" {loaded['p50_ms']:>9.0f}ms {loaded['p99_ms']:>9.0f}ms"
        )
    print("\nSMTP alone: the same messages over the same number of reused connections, no queue.")
    print("idle / loaded: commit of the batch to the sink's acceptance of a message.")


async def main_async(url: str | None, **options: Any) -> dict[str, Any]:
    async with harness.database(url) as db_url:
        return await run(db_url, **options)


def main() -> None:
    p = harness.parser("e2e", __doc__)
    p.add_argument("--recipients", type=int, default=10_000, help="emails in the batch")
    p.add_argument("--processes", default="1,2", help="worker processes, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="batches per configuration")
    p.add_argument("--probes", type=int, default=100, help="one-email batches for idle latency")
    p.add_argument("--chunk-sizes", default="50", help="recipients per job, comma-separated")
    p.add_argument("--dkim", action="store_true", help="also measure with DKIM signing")
    args = p.parse_args()
    results = asyncio.run(
        main_async(
            args.database_url,
            recipients=args.recipients,
            processes=[int(x) for x in args.processes.split(",")],
            repeat=args.repeat,
            probes=args.probes,
            chunk_sizes=[int(x) for x in args.chunk_sizes.split(",")],
            dkim=args.dkim,
        )
    )
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
