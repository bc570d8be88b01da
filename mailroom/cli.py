"""The ``mailroom`` command: dev, web, worker, migrate, dead-letters, bounces, check and users.

Each subcommand builds the settings once, configures logging once and hands both down. A
configuration problem prints one line naming the variable and exits with status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import psycopg_pool

from shared.accounts import CLI_ACTOR, ROLES
from shared.logging import configure_logging
from shared.settings import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from shared.db import Database
    from worker.bounce_poll import PollSummary
    from worker.bounces import Finding

EXIT_CONFIG = 2
# Commands an operator runs by hand: with no MAILROOM_DATABASE_URL they use a running
# `mailroom dev` in this directory. The long-running roles never guess their database.
OPERATOR_COMMANDS = frozenset({"dead-letters", "bounces", "check", "users"})

DESCRIPTION = """\
Mailroom sends a batch of emails from a web form through your own SMTP server, durably:
every email is a job in PostgreSQL, sent once by a worker, retried on transient failures.

Configuration comes from MAILROOM_* environment variables (or a .env file); see README.md.
"""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 0..65535")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailroom",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    dev = commands.add_parser(
        "dev",
        help="run everything locally: embedded PostgreSQL, SMTP capture, web and worker",
        description="Run the whole system in one process with nothing to install: an embedded "
        "PostgreSQL under --data-dir, a local SMTP capture that keeps every message, the web "
        "tier and a worker. Prints the URL and the login token. Ctrl-C stops everything.",
    )
    dev.add_argument(
        "--host", default="127.0.0.1", help="web address to bind (default: %(default)s)"
    )
    dev.add_argument("--port", type=_port, default=8080, help="web port (default: %(default)s)")
    dev.add_argument(
        "--smtp-port",
        type=_port,
        default=1025,
        help="port of the local SMTP capture (default: %(default)s)",
    )
    dev.add_argument(
        "--metrics-port",
        type=_port,
        default=9100,
        help="port of the worker's /metrics and /healthz; 0 picks a free one "
        "(default: %(default)s)",
    )
    dev.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".mailroom"),
        help="where the database and captured mail live (default: %(default)s)",
    )

    commands.add_parser(
        "web",
        help="serve the web form and the JSON API",
        description="Serve the web tier on MAILROOM_WEB_HOST:MAILROOM_WEB_PORT. Needs "
        "MAILROOM_DATABASE_URL, MAILROOM_API_TOKEN and MAILROOM_SECRET_KEY.",
    )
    worker = commands.add_parser(
        "worker",
        help="run a worker that drafts and sends queued emails",
        description="Run one long-lived worker process. SIGTERM stops fetching, lets sends in "
        "flight finish within MAILROOM_SHUTDOWN_GRACE_SECONDS, then exits 0. Needs "
        "MAILROOM_DATABASE_URL, MAILROOM_FROM_ADDRESS and the MAILROOM_SMTP_* settings.",
    )
    worker.add_argument(
        "--instance",
        type=_instance,
        default=0,
        help="instance number N when several workers share a host (systemd's %%i): the "
        "worker's metrics port becomes MAILROOM_METRICS_PORT + N (default: %(default)s)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive,
        help="jobs in flight at once (default: MAILROOM_WORKER_CONCURRENCY)",
    )
    _add_dead_letters(commands)
    _add_users(commands)
    bounces = commands.add_parser(
        "bounces",
        help="suppress the addresses named by bounce and complaint reports",
        description="Read delivery status notifications (RFC 3464) and feedback-loop "
        "complaints (ARF, RFC 5965) from a mailbox and suppress the addresses they name: a "
        "permanent failure as a hard bounce, a complaint as a complaint. Other messages and "
        "temporary failures are counted and left alone. Safe to run again on the same mail.",
    )
    bounce_actions = bounces.add_subparsers(dest="action", metavar="ACTION", required=True)
    bounce_actions.add_parser(
        "poll",
        help="read the bounce mailbox over IMAP once, as the worker does on its schedule",
        description="Connect to the bounce mailbox (MAILROOM_IMAP_HOST, _PORT, _SECURITY, "
        "_USERNAME, _PASSWORD, _MAILBOX, _CA_FILE), read the messages that arrived since the "
        "last poll (at most MAILROOM_IMAP_MAX_MESSAGES, each up to "
        "MAILROOM_IMAP_MAX_MESSAGE_BYTES), suppress what their reports name and mark the "
        "reports on the server (flagged \\Seen, or moved to MAILROOM_IMAP_PROCESSED_MAILBOX). "
        "Every message is counted once, however often this runs; a worker polling at the "
        "same time makes this one skip. Prints what it did. Exit status 1 if the server or "
        "the database cannot be reached or the login is refused.",
    )
    process = bounce_actions.add_parser("process", help="read an mbox file of bounce mail")
    process.add_argument("--mbox", type=Path, required=True, help="the mbox file to read")
    process.add_argument(
        "--dry-run", action="store_true", help="print what would be suppressed, change nothing"
    )
    check = commands.add_parser(
        "check",
        help="check the sender's DKIM, SPF and DMARC setup",
        description="Check what mail providers will see of the sender: that the DKIM key "
        "signs and verifies (offline), and the DKIM, SPF and DMARC records of the sender's "
        "domain in DNS. Prints the DKIM record to publish. Exit status 1 if a check fails.",
    )
    check.add_argument(
        "--offline", action="store_true", help="skip the DNS lookups (no network here)"
    )
    migrate = commands.add_parser(
        "migrate",
        help="create or update the database schema (safe to run repeatedly)",
        description="Apply procrastinate's schema, the procrastinate migrations its installed "
        "version ships that the database has not had, and Mailroom's migrations to "
        "MAILROOM_DATABASE_URL. Running it again is a no-op.",
    )
    migrate.add_argument(
        "--pre",
        action="store_true",
        help="stop before procrastinate's first post-migration: for a rolling upgrade, run "
        "this before the new version starts and a plain migrate once the old one is gone",
    )
    return parser


def _instance(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an instance number: {text!r}") from None
    if not 0 <= value <= 999:
        raise argparse.ArgumentTypeError("an instance number is 0..999")
    return value


def _uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a batch id: {text!r}") from None


def _add_dead_letters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dead = commands.add_parser(
        "dead-letters",
        help="list, redrive or discard emails that failed permanently",
        description="Emails that failed permanently or ran out of attempts are dead letters. "
        "List them, redrive them (requeue with a fresh attempt budget, once the cause is "
        "fixed) or discard them (they become cancelled; the evidence stays).",
    )
    actions = dead.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="show dead letters, oldest first")
    listing.add_argument("--batch", type=_uuid, help="only this batch")
    listing.add_argument(
        "--limit", type=_positive, default=100, help="at most this many (default: %(default)s)"
    )
    for name, verb in (("redrive", "requeue"), ("discard", "give up on")):
        action = actions.add_parser(name, help=f"{verb} dead letters")
        target = action.add_mutually_exclusive_group(required=True)
        target.add_argument("ids", nargs="*", type=_positive, default=[], help="recipient ids")
        target.add_argument("--batch", type=_uuid, help=f"{verb} every dead letter of this batch")
        target.add_argument("--all", action="store_true", help=f"{verb} every dead letter")


def _add_users(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = commands.add_parser(
        "users",
        help="add, list or disable the operators who log in to the web tier",
        description="Operators log in with a user name and password, or use personal API "
        "tokens they make on their account page. A role says what they may do: viewer (read "
        "only), sender (create, send, cancel, edit, redrive, discard, suppress) or admin "
        "(also users and the audit log). MAILROOM_API_TOKEN always acts as an admin.",
    )
    actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="add a user (the password is asked for twice, or read from stdin)",
        description="Add a user. The password is never an argument (it would be in the shell "
        "history and the process list): it is asked for twice, or with --password-stdin read "
        "from the first line of standard input.",
        allow_abbrev=False,  # no --password prefix of --password-stdin
    )
    add.add_argument("name", help="1-64 letters, digits and . _ @ -, unique in any case")
    add.add_argument("--role", required=True, help=f"one of: {', '.join(ROLES)}")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input (for scripts)",
    )
    actions.add_parser("list", help="show every user, their role and whether they are disabled")
    disable = actions.add_parser(
        "disable",
        help="disable a user: their sessions end and their tokens are revoked at once",
        description="Disable a user: they can no longer log in, their sessions end and their "
        "personal API tokens are revoked, at once. The user stays in the audit log.",
    )
    disable.add_argument("name", help="the user's name (any case)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mailroom`` console script."""
    args = build_parser().parse_args(argv)
    handlers: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
        "dev": _dev,
        "web": _web,
        "worker": _worker,
        "migrate": _migrate,
        "dead-letters": _dead_letters,
        "check": _check,
        "bounces": _bounces,
        "users": _users,
    }
    try:
        settings = load_settings()
        configure_logging(settings.log_level, settings.log_format)
        if args.command in OPERATOR_COMMANDS:
            settings = _with_running_dev(settings)
        return handlers[args.command](settings, args)
    except ConfigError as exc:
        print(f"mailroom: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _with_running_dev(settings: Settings) -> Settings:
    from mailroom.instance import DEFAULT_DATA_DIR, find_running

    if settings.database_url is not None:
        return settings
    instance = find_running(DEFAULT_DATA_DIR)
    if instance is None:
        return settings
    print(
        f"mailroom: using the database of `mailroom dev` (pid {instance.pid}) in"
        f" {DEFAULT_DATA_DIR.resolve()}",
        file=sys.stderr,
    )
    # Built again, not copied: the file's values are checked like any other setting.
    return load_settings(
        database_url=instance.database_url,
        from_address=settings.from_address or instance.from_address,
    )


def _dev(settings: Settings, args: argparse.Namespace) -> int:
    from mailroom.dev import DevOptions, run_dev

    options = DevOptions(
        host=args.host,
        port=args.port,
        smtp_port=args.smtp_port,
        metrics_port=args.metrics_port,
        data_dir=args.data_dir,
    )
    return asyncio.run(run_dev(settings, options))


def _web(settings: Settings, args: argparse.Namespace) -> int:
    from web.app import run_web

    settings.require("database_url", "api_token", "secret_key")
    run_web(settings)
    return 0


def _worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dkim import DkimSigner
    from worker.main import run_worker

    if args.concurrency:
        settings = settings.model_copy(update={"worker_concurrency": args.concurrency})
    if args.instance and settings.metrics_port:
        port = settings.metrics_port + args.instance
        if port > 65535:
            raise ConfigError(f"MAILROOM_METRICS_PORT + instance {args.instance} exceeds 65535")
        settings = settings.model_copy(update={"metrics_port": port})
    settings.require("database_url", "from_address")
    if settings.public_url is not None or settings.bounce_address is not None:
        settings.require("secret_key")  # signs the unsubscribe links and the VERP tokens
    DkimSigner.from_settings(settings)  # a key that cannot be read stops us here, not later
    try:
        asyncio.run(run_worker(settings, name=f"mailroom-worker-{args.instance}"))
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        print(f"mailroom worker: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(settings: Settings, args: argparse.Namespace) -> int:
    from worker.check import run_checks

    settings.require("from_address")
    return run_checks(settings, online=not args.offline)


def _bounces(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "poll":
        return _poll_bounces(settings)
    from worker.bounces import read_mbox
    from worker.verp import Verp

    if not args.dry_run:
        settings.require("database_url")
    try:
        summary = read_mbox(args.mbox, Verp.from_settings(settings))
    except (OSError, ValueError) as exc:
        print(f"mailroom bounces: cannot read {args.mbox}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for finding in summary.findings:
        print(f"{finding.reason}\t{finding.address}\t{finding.detail}")
    for recipient_id in summary.recipient_ids:
        print(f"hard_bounce\trecipient {recipient_id}\tbounce to the VERP address")
    added = 0
    if not args.dry_run and (summary.findings or summary.recipient_ids):
        try:
            added = asyncio.run(
                _suppress_findings(settings, summary.findings, summary.recipient_ids)
            )
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            print(f"mailroom bounces: cannot reach the database: {exc}", file=sys.stderr)
            return 1
    print(
        f"{summary.messages} message(s): {summary.reports} report(s),"
        + (f" {summary.verp_bounces} VERP bounce(s)," if summary.verp_bounces else "")
        + f" {summary.not_reports} other, {summary.unreadable} unreadable;"
        f" {len(summary.findings) + len(summary.recipient_ids)} address(es) found,"
        + (" nothing changed (--dry-run)" if args.dry_run else f" {added} newly suppressed"),
        file=sys.stderr,
    )
    return 0


@asynccontextmanager
async def _database(settings: Settings, *, connections: int = 1) -> AsyncIterator[Database]:
    """The database an operator command works on, through a pool of its own."""
    from shared.db import Database, make_pool

    assert settings.database_url is not None
    async with make_pool(
        settings.database_url,
        max_size=connections,
        name="mailroom-cli",
        transaction_pooling=settings.database_transaction_pooling,
    ) as pool:
        yield Database(pool, chunk_size=settings.chunk_size)


async def _suppress_findings(
    settings: Settings, findings: Sequence[Finding], recipient_ids: Sequence[int] = ()
) -> int:
    added = 0
    async with _database(settings) as db:
        bounced = [f.address for f in findings if f.reason == "hard_bounce"]
        bounced += (await db.recipient_addresses(recipient_ids)).values()
        for reason, addresses in (
            ("hard_bounce", bounced),
            ("complaint", [f.address for f in findings if f.reason == "complaint"]),
        ):
            if addresses:
                added += await db.suppress(
                    addresses, reason=reason, detail="bounce mailbox", actor=CLI_ACTOR
                )
    return added


def _poll_bounces(settings: Settings) -> int:
    from worker.bounce_poll import PollFailed

    settings.require("database_url", "imap_host")
    try:
        summary = asyncio.run(_run_poll(settings))
    except PollFailed as exc:
        print(f"mailroom bounces poll: {exc}", file=sys.stderr)
        return 1
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        print(f"mailroom bounces poll: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    if summary is None:
        print("mailroom bounces poll: another poll is running; nothing done", file=sys.stderr)
        return 1
    print(summary.line())
    return 0


async def _run_poll(settings: Settings) -> PollSummary | None:
    from worker.bounce_poll import poll_bounce_mailbox
    from worker.imap import ImapServer
    from worker.verp import Verp

    server = ImapServer.from_settings(settings)
    assert server is not None
    # Two connections: one holds the poll's lock while the other records what it reads.
    async with _database(settings, connections=2) as db:
        return await poll_bounce_mailbox(
            server,
            db,
            verp=Verp.from_settings(settings),
            max_messages=settings.imap_max_messages,
            max_message_bytes=settings.imap_max_message_bytes,
        )


def _dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    settings.require("database_url")
    if args.action != "list" and not (args.ids or args.batch or args.all):
        print(
            f"mailroom dead-letters {args.action}: give recipient ids, --batch or --all",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        return asyncio.run(_run_dead_letters(settings, args))
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        print(f"mailroom dead-letters: cannot reach the database: {exc}", file=sys.stderr)
        return 1


async def _run_dead_letters(settings: Settings, args: argparse.Namespace) -> int:
    from shared.db import Selection

    async with _database(settings) as db:
        if args.action == "list":
            rows = await db.list_dead_letters(batch_id=args.batch, limit=args.limit)
            for row in rows:
                print(
                    f"{row['id']}\t{row['batch_id']}\t{row['email']}\t{row['attempts']}\t"
                    f"{row['died_at']:%Y-%m-%d %H:%M:%S}\t{row['last_error'] or ''}"
                )
            print(f"{len(rows)} dead letter(s)", file=sys.stderr)
            return 0
        selection = Selection(ids=args.ids, batch_id=args.batch, everything=args.all)
        if args.action == "redrive":
            print(f"redriven: {await db.redrive(selection, actor=CLI_ACTOR)}")
        else:
            print(f"discarded: {await db.discard(selection, actor=CLI_ACTOR)}")
    return 0


def _users(settings: Settings, args: argparse.Namespace) -> int:
    from shared.accounts import InvalidAccount, check_name, check_role, hash_password

    settings.require("database_url")
    password_hash = None
    if args.action == "add":
        try:
            check_name(args.name)
            check_role(args.role)
            password = _read_password(from_stdin=args.password_stdin)
            password_hash = hash_password(password)
        except InvalidAccount as exc:
            print(f"mailroom users add: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    try:
        return asyncio.run(_users_in_database(settings, args, password_hash))
    except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
        print(f"mailroom users: cannot reach the database: {exc}", file=sys.stderr)
        return 1


def _read_password(*, from_stdin: bool) -> str:
    """The new user's password: the first line of stdin, or typed twice at a prompt."""
    from shared.accounts import InvalidAccount, check_password

    if from_stdin:
        line = sys.stdin.readline()
        return check_password(line.removesuffix("\n").removesuffix("\r"))
    if not sys.stdin.isatty():
        raise InvalidAccount("no terminal to ask for the password: use --password-stdin")
    first = check_password(getpass.getpass("Password: "))
    if getpass.getpass("Again: ") != first:
        raise InvalidAccount("the two passwords differ")
    return first


async def _users_in_database(
    settings: Settings, args: argparse.Namespace, password_hash: str | None
) -> int:
    from shared.accounts import Role
    from shared.db import NameTaken

    async with _database(settings) as db:
        if args.action == "add":
            assert password_hash is not None
            try:
                await db.add_user(args.name, password_hash, Role(args.role), actor=CLI_ACTOR)
            except NameTaken:
                print(f"mailroom users add: a user {args.name!r} exists already", file=sys.stderr)
                return 1
            print(f"added {args.name} ({args.role})")
        elif args.action == "list":
            rows = await db.list_users()
            print(f"{'NAME':<24} {'ROLE':<7} {'TOKENS':>6}  {'CREATED':<16}  DISABLED")
            for row in rows:
                disabled = f"{row['disabled_at']:%Y-%m-%d %H:%M}" if row["disabled_at"] else ""
                print(
                    f"{row['name']:<24} {row['role']:<7} {row['tokens']:>6}  "
                    f"{row['created_at']:%Y-%m-%d %H:%M}  {disabled}".rstrip()
                )
            print(f"{len(rows)} user(s)", file=sys.stderr)
        else:
            ended = await db.disable_user(args.name, actor=CLI_ACTOR)
            if ended is None:
                print(f"mailroom users disable: no user {args.name!r}", file=sys.stderr)
                return 1
            print(
                f"disabled {args.name}: {ended['sessions']} session(s) ended,"
                f" {ended['tokens']} token(s) revoked"
            )
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from shared.schema import SchemaNewerThanCode, migrate

    settings.require("database_url")
    assert settings.database_url is not None
    try:
        applied = asyncio.run(migrate(settings.database_url, pre_only=args.pre))
        left = asyncio.run(_pending_post(settings.database_url)) if args.pre else []
    except psycopg.OperationalError as exc:
        print(f"mailroom migrate: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except SchemaNewerThanCode as exc:
        print(f"mailroom migrate: {exc}", file=sys.stderr)
        return 1
    print(
        f"applied {len(applied)} migration(s): {', '.join(applied)}"
        if applied
        else "schema is up to date"
    )
    if left:
        print(
            f"left for a plain 'mailroom migrate' once the old version is gone: {', '.join(left)}"
        )
    return 0


async def _pending_post(conninfo: str) -> list[str]:
    from shared.schema import pending_migrations

    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        return await pending_migrations(conn, include_post=True)


if __name__ == "__main__":
    sys.exit(main())
