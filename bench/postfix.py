"""End to end into a real MTA: Mailroom against aiosmtplib alone, both into a private Postfix.

The SMTP sink of ``bench.e2e`` answers 250 as soon as it has the bytes. A real MTA does more
before it answers: Postfix's cleanup writes the message to its queue and fsyncs it, then its
queue manager hands it to the ``virtual`` agent, which writes (and fsyncs) a file into a
Maildir. This benchmark starts such a Postfix of its own and measures, for each number of
``mailroom worker`` processes (default concurrency 8 each):

- **Mailroom**: the workers are started and idle; one ``POST /api/batches`` of ``--recipients``
  goes to a ``mailroom web``; timed from just before the POST until every recipient is
  ``sent`` in the database (Postfix accepted each message: it answers 250 only once the message
  is in its queue on disk) and until the last message is a file in the Maildir (delivered);
- **aiosmtplib alone** (baseline, same run): the same kind of messages (Mailroom's own
  ``build_message``, about 1 KB) built in advance and sent over the same number of reused
  aiosmtplib connections (workers x concurrency) to the same Postfix, no queue, no database.

Each figure is the median of ``--repeat`` runs, alternating baseline and Mailroom. After each
run the Maildir is checked: exactly one file per recipient, every recipient and every
Message-ID exactly once (for Mailroom, the Message-ID the database recorded for that
recipient), and Postfix's queue empty.

The Postfix instance is private: its own configuration directory, queue and Maildir under a
temporary directory, one SMTP listener on a free port on 127.0.0.1, mail accepted only for
``mailroom-bench.example.org`` and every recipient delivered into one Maildir. It has no
``smtp`` or ``lmtp`` client in its master.cf and ``default_transport = error``, so nothing can
leave the machine; it never reads the system's /etc/postfix/main.cf and is stopped at the end,
on failure and on Ctrl-C too. It needs root (Postfix's master starts as root) and Debian's
package (``apt-get install postfix``); without them the benchmark says so and skips.

    uv run python -m bench.postfix [--recipients 1000] [--processes 1,2] [--repeat 3]
                                   [--concurrency 8]
"""

from __future__ import annotations

import asyncio
import collections
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from email.parser import BytesHeaderParser
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import aiosmtplib
import psycopg

from bench import harness
from tests.processes import free_port
from worker.smtp import build_message

DOMAIN = "mailroom-bench.example.org"
SENDER = "bench@example.com"
SUBJECT = "Hello {{ name }}"
BODY = "Hi {{ name }},\n\nthis message is a benchmark of Mailroom.\n\nRegards,\nThe bench\n"
NOWHERE = "error:this benchmark's Postfix delivers nowhere but its Maildir"

# The whole configuration of the private instance ({base} is its temporary directory). Every
# path Postfix writes is under {base}; meta_directory is the package's own read-only files
# (postfix-files, the scripts), not a configuration.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {base}/postfix.log
maillog_file_prefixes = {base}
myhostname = mta.{domain}
mydomain = {domain}
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_relay_restrictions = reject_unauth_destination
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost =
default_transport = {nowhere}
relay_transport = {nowhere}
local_transport = {nowhere}
notify_classes =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {base}
virtual_mailbox_maps = static:Maildir/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""

# Only the services this needs: one SMTP listener, the queue, the virtual delivery agent.
# No smtp/lmtp client exists here, so no transport could reach another host.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix n - n - 0 cleanup
qmgr      unix n - n 300 1 qmgr
rewrite   unix - - n - - trivial-rewrite
bounce    unix - - n - 0 bounce
defer     unix - - n - 0 bounce
trace     unix - - n - 0 bounce
verify    unix - - n - 1 verify
proxymap  unix - - n - - proxymap
error     unix - - n - - error
retry     unix - - n - - error
discard   unix - - n - - discard
virtual   unix - n n - - virtual
anvil     unix - - n - 1 anvil
scache    unix - - n - 1 scache
showq     unix n - n - - showq
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_binary() -> str | None:
    """The ``postfix`` command, or None when Debian's package is not installed."""
    found = shutil.which("postfix")
    if found:
        return found
    return "/usr/sbin/postfix" if Path("/usr/sbin/postfix").exists() else None


def why_not_runnable() -> str | None:
    """Why this machine cannot run the benchmark, or None when it can."""
    if postfix_binary() is None:
        return (
            "Postfix is not installed: apt-get update && DEBIAN_FRONTEND=noninteractive"
            " apt-get install -y postfix (preseed debconf 'postfix/main_mailer_type select"
            " No configuration' so it asks nothing and configures no system-wide instance)"
        )
    if os.geteuid() != 0:
        return "Postfix's master must be started as root; run this benchmark as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user: install Debian's postfix package"
    return None


class Postfix:
    """A private Postfix instance under ``base``, listening on 127.0.0.1:``port``.

    A context manager: it starts on entry and is stopped on exit, whatever happened.
    """

    def __init__(self, base: Path, port: int) -> None:
        binary = postfix_binary()
        assert binary is not None
        self.binary = binary
        self.base = base
        self.port = port
        self.config = base / "conf"
        self.queue = base / "queue"
        self.maildir = base / "Maildir"
        self._master_pid: int | None = None

    def _run(self, *args: str, timeout_seconds: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
        )

    def start(self) -> None:
        owner = pwd.getpwnam("nobody")
        self.base.mkdir(parents=True, exist_ok=True)
        self.base.chmod(0o755)  # the virtual agent delivers as nobody, and must reach the Maildir
        self.config.mkdir()
        self.queue.mkdir(mode=0o755)  # Postfix wants it owned by root; it creates the rest
        for sub in ("", "new", "cur", "tmp"):
            (self.maildir / sub).mkdir(exist_ok=True)
            os.chown(self.maildir / sub, owner.pw_uid, owner.pw_gid)
        values = {
            "base": self.base,
            "domain": DOMAIN,
            "nowhere": NOWHERE,
            "uid": owner.pw_uid,
            "gid": owner.pw_gid,
            "port": self.port,
        }
        (self.config / "main.cf").write_text(MAIN_CF.format(**values))
        (self.config / "master.cf").write_text(MASTER_CF.format(**values))
        for step in ("check", "start"):
            done = self._run(step)
            if done.returncode != 0:
                raise RuntimeError(
                    f"postfix {step} failed: {done.stderr.strip()}\n{self.log_tail()}"
                )
        pid_file = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._master_pid is None:
                    self._master_pid = int(pid_file.read_text().split()[0])
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except (OSError, ValueError, IndexError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Postfix did not start listening\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """``postfix stop``; if the master still runs 10 s later, kill its process group."""
        if self.config.exists():
            try:
                self._run("stop", timeout_seconds=30)
            except subprocess.TimeoutExpired:
                pass
        pid = self._master_pid
        if pid is None:
            return
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            # The master is a session leader: its group is this instance's processes only.
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._master_pid = None

    def version(self) -> str:
        done = subprocess.run(
            ["postconf", "-c", str(self.config), "-h", "mail_version"],
            capture_output=True,
            text=True,
        )
        return done.stdout.strip()

    def log_tail(self, lines: int = 20) -> str:
        log = self.base / "postfix.log"
        if not log.exists():
            return "(no Postfix log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    # -- the Maildir and the queue -----------------------------------------------------------

    def delivered_files(self) -> list[Path]:
        return [p for sub in ("new", "cur") for p in (self.maildir / sub).iterdir()]

    def clear(self) -> None:
        """Remove every delivered message (between runs)."""
        for path in self.delivered_files():
            path.unlink()

    def queued(self) -> int:
        """Messages still in Postfix's queue (not yet delivered, or deferred)."""
        return sum(
            len(files)
            for sub in ("maildrop", "incoming", "active", "deferred", "hold")
            for _, _, files in os.walk(self.queue / sub)
        )

    async def wait_delivered(self, count: int, timeout_seconds: float) -> float:
        """Wait until ``count`` messages are in the Maildir and the queue is empty; return when
        the last one was written (``time.time()``, from the files' modification times)."""
        deadline = time.monotonic() + timeout_seconds
        while len(os.listdir(self.maildir / "new")) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(os.listdir(self.maildir / 'new'))} of {count} messages were"
                    f" delivered in {timeout_seconds} s; {self.queued()} still queued\n"
                    f"{self.log_tail()}"
                )
            await asyncio.sleep(0.01)
        while self.queued():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.queued()} messages stay queued\n{self.log_tail()}")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # a duplicate would arrive now, and be counted below
        return max(p.stat().st_mtime for p in self.delivered_files())

    def check_delivered(self, expected: dict[str, str]) -> None:
        """Every recipient of ``expected`` (address -> Message-ID) exactly once, nothing else."""
        parser = BytesHeaderParser()
        seen: list[tuple[str, str]] = []
        for path in self.delivered_files():
            with path.open("rb") as f:
                headers = parser.parse(f)
            seen.append((str(headers["Delivered-To"]).lower(), str(headers["Message-ID"])))
        problems = []
        if len(seen) != len(expected):
            problems.append(f"{len(seen)} files for {len(expected)} recipients")
        for what, values in (
            ("recipient", [a for a, _ in seen]),
            ("Message-ID", [m for _, m in seen]),
        ):
            repeated = [v for v, n in collections.Counter(values).items() if n > 1]
            if repeated:
                problems.append(f"{len(repeated)} {what}s more than once, e.g. {repeated[0]}")
        wanted = {(a.lower(), m) for a, m in expected.items()}
        missing, unexpected = wanted - set(seen), set(seen) - wanted
        if missing:
            problems.append(f"{len(missing)} not delivered, e.g. {sorted(missing)[0]}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected, e.g. {sorted(unexpected)[0]}")
        if problems:
            raise RuntimeError("Maildir check failed: " + "; ".join(problems))

    def __enter__(self) -> Postfix:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the two sides -----------------------------------------------------------------------------


def addresses(count: int, tag: str) -> list[str]:
    return [f"{tag}{i}@{DOMAIN}" for i in range(count)]


async def aiosmtplib_alone(postfix: Postfix, count: int, conns: int, tag: str) -> dict[str, float]:
    """``count`` prebuilt messages over ``conns`` reused connections; emails/s accepted and
    delivered."""
    postfix.clear()
    expected: dict[str, str] = {}
    todo: collections.deque[tuple[str, bytes]] = collections.deque()
    for i, to in enumerate(addresses(count, tag)):
        message_id = f"<direct.{uuid.uuid4()}@example.com>"
        expected[to] = message_id
        body = BODY.replace("{{ name }}", f"User {i}")
        message = build_message(
            sender=SENDER, to=to, subject=f"Hello User {i}", body=body, message_id=message_id
        )
        todo.append((to, message.data))

    async def sender() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=postfix.port, timeout=30)
        await client.connect()
        try:
            while todo:
                to, payload = todo.popleft()
                await client.sendmail(SENDER, [to], payload)
        finally:
            await client.quit()

    started_wall, started = time.time(), time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(conns)))
    accepted_seconds = time.perf_counter() - started
    delivered_seconds = await postfix.wait_delivered(count, timeout_seconds=300) - started_wall
    postfix.check_delivered(expected)
    return {
        "accepted_per_s": count / accepted_seconds,
        "delivered_per_s": count / delivered_seconds,
    }


async def through_mailroom(
    session: aiohttp.ClientSession, base: str, url: str, postfix: Postfix, count: int, tag: str
) -> dict[str, float]:
    """One ``POST /api/batches`` of ``count``; emails/s until all are sent, and delivered."""
    postfix.clear()
    payload = {
        "recipients": [
            {"email": to, "name": f"User {i}"} for i, to in enumerate(addresses(count, tag))
        ],
        "subject": SUBJECT,
        "body": BODY,
        "drafter": "template",
    }
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started_wall, started = time.time(), time.perf_counter()
        answer = await harness.post_batch(session, base, payload)
        posted_seconds = time.perf_counter() - started
        deadline = time.monotonic() + 300
        while True:
            cursor = await conn.execute(
                "SELECT count(*) FILTER (WHERE status <> 'sent'),"
                " count(*) FILTER (WHERE status IN ('retrying', 'dead', 'suppressed')),"
                " max(last_error) FROM recipients WHERE batch_id = %s",
                (answer["id"],),
            )
            row = await cursor.fetchone()
            assert row is not None
            not_sent, failed, error = row
            if not_sent == 0:
                break
            if failed or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{not_sent} of {count} not sent ({failed} failed: {error})\n"
                    + postfix.log_tail()
                )
            await asyncio.sleep(0.02)
        accepted_seconds = time.perf_counter() - started
        cursor = await conn.execute(
            "SELECT email, message_id FROM recipients WHERE batch_id = %s", (answer["id"],)
        )
        expected = {email: message_id for email, message_id in await cursor.fetchall()}
    delivered_seconds = await postfix.wait_delivered(count, timeout_seconds=300) - started_wall
    postfix.check_delivered(expected)
    return {
        "accepted_per_s": count / accepted_seconds,
        "delivered_per_s": count / delivered_seconds,
        "post_ms": posted_seconds * 1000,
    }


async def run(
    url: str,
    postfix: Postfix,
    recipients: int,
    processes: list[int],
    repeat: int,
    concurrency: int | None = None,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "recipients": recipients,
        "repeat": repeat,
        "postfix": postfix.version(),
        "rows": [],
    }
    settings = harness.settings_for(
        url,
        smtp_port=postfix.port,
        web_port=free_port(),
        from_address=SENDER,
        **({"worker_concurrency": concurrency} if concurrency else {}),
    )
    web = await harness.start_mailroom(
        settings,
        "web",
        MAILROOM_MAX_BATCH_SIZE=str(max(recipients, settings.max_batch_size)),
        MAILROOM_LOG_LEVEL="WARNING",
    )
    base = f"http://127.0.0.1:{settings.web_port}"
    try:
        await harness.wait_for_http(f"{base}/readyz")
        async with aiohttp.ClientSession() as session:
            for procs in processes:
                conns = procs * settings.worker_concurrency
                workers = [await harness.start_mailroom(settings, "worker") for _ in range(procs)]
                try:
                    await harness.wait_for_workers(url, procs)
                    await asyncio.sleep(1.0)  # past their start-up: idle, listening
                    alone, mailroom = [], []
                    for n in range(repeat):
                        alone.append(
                            await aiosmtplib_alone(postfix, recipients, conns, f"a{procs}r{n}-")
                        )
                        mailroom.append(
                            await through_mailroom(
                                session, base, url, postfix, recipients, f"m{procs}r{n}-"
                            )
                        )
                finally:
                    await harness.stop(workers)
                row = {
                    "processes": procs,
                    "concurrency": settings.worker_concurrency,
                    **{
                        f"{side}_{key}": round(statistics.median(r[key] for r in runs), 1)
                        for side, runs in (("mailroom", mailroom), ("alone", alone))
                        for key in ("accepted_per_s", "delivered_per_s")
                    },
                    "mailroom_post_ms": round(statistics.median(r["post_ms"] for r in mailroom), 1),
                    "samples": {"mailroom": mailroom, "alone": alone},
                }
                results["rows"].append(row)
                print(
                    f"  {procs} worker(s): Mailroom {row['mailroom_accepted_per_s']:,.0f}/s,"
                    f" aiosmtplib alone {row['alone_accepted_per_s']:,.0f}/s (accepted)",
                    flush=True,
                )
                await harness.empty(url)
    finally:
        await harness.stop([web])
    return results


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nOne batch of {results['recipients']:,} emails into Postfix {results['postfix']}"
        f" (Maildir, queue fsync'd), emails/s, median of {results['repeat']}\n"
    )
    print(
        f"{'workers x conc.':>16} {'Mailroom':>9} {'alone':>7} {'ratio':>6}"
        f"   {'Mailroom':>9} {'alone':>7} {'ratio':>6}   {'POST':>7}"
    )
    print(f"{'':>16} {'accepted (SMTP 250)':^24}   {'delivered (in the Maildir)':^24}")
    for r in results["rows"]:
        print(
            f"{r['processes']:>8} x {r['concurrency']:<5}"
            f" {r['mailroom_accepted_per_s']:>9,.0f} {r['alone_accepted_per_s']:>7,.0f}"
            f" {r['mailroom_accepted_per_s'] / r['alone_accepted_per_s']:>6.0%}"
            f"   {r['mailroom_delivered_per_s']:>9,.0f} {r['alone_delivered_per_s']:>7,.0f}"
            f" {r['mailroom_delivered_per_s'] / r['alone_delivered_per_s']:>6.0%}"
            f"   {r['mailroom_post_ms']:>5.0f}ms"
        )
    print(
        "\nMailroom: from just before POST /api/batches to the last recipient recorded as sent"
        "\n(accepted) and to the last message written into the Maildir (delivered)."
        "\nalone: the same kind of messages, prebuilt, over workers x concurrency reused"
        "\naiosmtplib connections to the same Postfix; no queue, no database."
        "\nratio: Mailroom / alone. Every run was checked: each recipient and Message-ID exactly"
        "\nonce in the Maildir."
    )


async def main_async(url: str | None, postfix: Postfix, **options: Any) -> dict[str, Any]:
    async with harness.database(url) as db_url:
        return await run(db_url, postfix, **options)


def main() -> None:
    p = harness.parser("postfix", __doc__)
    p.add_argument("--recipients", type=int, default=1_000, help="emails in each batch")
    p.add_argument("--processes", default="1,2", help="worker processes, comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="runs per configuration")
    p.add_argument(
        "--concurrency",
        type=int,
        help="each worker's concurrency, and so the baseline's connections per worker"
        " (default: Mailroom's default, 8)",
    )
    args = p.parse_args()
    reason = why_not_runnable()
    if reason is not None:
        print(f"bench.postfix skipped: {reason}")
        return
    # A SIGTERM unwinds like Ctrl-C, so the workers, the web and Postfix are stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="mailroom-postfix-") as tmp,
            Postfix(Path(tmp), free_port()) as postfix,
        ):
            results = asyncio.run(
                main_async(
                    args.database_url,
                    postfix,
                    recipients=args.recipients,
                    processes=[int(x) for x in args.processes.split(",")],
                    repeat=args.repeat,
                    concurrency=args.concurrency,
                )
            )
    except KeyboardInterrupt:
        print("\nbench.postfix interrupted: Postfix and the Mailroom processes were stopped")
        raise SystemExit(130) from None
    print_table(results)
    harness.write(args.json, results)


if __name__ == "__main__":
    main()
