"""Schema management: procrastinate's schema and migrations, then Mailroom's numbered SQL files.

A fresh database gets procrastinate's ``schema.sql`` (the baseline), then Mailroom's own files.
An existing one gets the procrastinate migration files its installed version ships that the
database has not had yet, in procrastinate's order, then Mailroom's files it has not had.

Every step is recorded in ``mailroom_migrations``, so running :func:`migrate` twice is a no-op:
``0000_procrastinate`` for the baseline, ``procrastinate/<file>`` for each procrastinate
migration file the database's schema includes (the baseline includes every file shipped with
the version that applied it), and ``NNNN_<name>`` for Mailroom's own. Concurrent runs (two
hosts starting at once) serialize on an advisory lock.

procrastinate names its files ``xx.yy.zz_ab_{pre|post}_description.sql``: ``xx.yy.zz`` is the
release that ships it, ``ab`` orders the files of a release, ``pre`` files are safe to apply
while the previous release still runs and ``post`` files only once it no longer does (a file
that says neither is a post file). ``migrate(pre_only=True)`` stops before the first post file,
for a rolling upgrade; a plain :func:`migrate` applies them all.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import psycopg
import structlog
from procrastinate.schema import SchemaManager

log = structlog.get_logger(__name__)

PROCRASTINATE_STEP = "0000_procrastinate"
PROCRASTINATE_PREFIX = "procrastinate/"
# Databases migrated before Mailroom recorded procrastinate's files have only the baseline row.
# Those releases required procrastinate >=3.10 and 3.10.0 was the newest 3.x, so their
# baseline is 3.10's schema: every file numbered up to 03.10.00.
LEGACY_BASELINE_VERSION = (3, 10, 0)
# Any constant works; it only has to be the same for every Mailroom process.
_MIGRATION_LOCK_ID = 0x6D61696C726F6F6D  # "mailroom"
_PROCRASTINATE_FILE = re.compile(r"^(\d{2})\.(\d{2})\.(\d{2})_(\d{2})_(.+)$")
# Statements PostgreSQL refuses inside a transaction block, as they appear in migration files.
_NON_TRANSACTIONAL = re.compile(
    r"\b(CONCURRENTLY|VACUUM|ALTER\s+SYSTEM|(CREATE|DROP)\s+DATABASE)\b", re.IGNORECASE
)


class SchemaNewerThanCode(RuntimeError):
    """The database records procrastinate migrations this installation does not ship."""


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


@dataclass(frozen=True)
class ProcrastinateMigration:
    """One of procrastinate's migration files; ``name`` is the file name without ``.sql``."""

    name: str
    version: tuple[int, int, int]
    post: bool
    sql: str

    @property
    def step(self) -> str:
        """The name recorded in ``mailroom_migrations``."""
        return PROCRASTINATE_PREFIX + self.name

    @property
    def transactional(self) -> bool:
        """Whether the whole file can run in one transaction (every file procrastinate 3.10
        ships can); one that cannot runs statement by statement."""
        return _NON_TRANSACTIONAL.search(_strip_comments(self.sql)) is None


def procrastinate_version() -> str:
    """The installed procrastinate's version."""
    return metadata.version("procrastinate")


def parse_procrastinate_migration(name: str, sql: str) -> ProcrastinateMigration:
    """A migration from its file name (``03.04.00_01_pre_add_thing``, no ``.sql``) and text."""
    match = _PROCRASTINATE_FILE.match(name)
    if match is None:
        raise ValueError(f"not a procrastinate migration file name: {name!r}")
    major, minor, patch, _serial, rest = match.groups()
    return ProcrastinateMigration(
        name=name,
        version=(int(major), int(minor), int(patch)),
        post=not rest.startswith("pre_"),
        sql=sql,
    )


@functools.cache
def procrastinate_migrations() -> tuple[ProcrastinateMigration, ...]:
    """The migration files the installed procrastinate ships, in the order they apply (read
    once per process: ``/readyz`` asks on every probe).

    Their names sort in that order: zero-padded version, then serial (pre files are numbered
    from 01, post files from 50).
    """
    folder = Path(SchemaManager.get_migrations_path())
    return tuple(
        parse_procrastinate_migration(path.stem, path.read_text("utf-8"))
        for path in sorted(folder.glob("*.sql"), key=lambda p: p.name)
    )


def mailroom_migrations() -> list[Migration]:
    """Mailroom's migrations in the order they apply (by file name)."""
    folder = resources.files("shared") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(name=f.name.removesuffix(".sql"), sql=f.read_text("utf-8")) for f in files]


async def migrate(conninfo: str, *, pre_only: bool = False) -> list[str]:
    """Apply what is missing; return the names applied (empty when up to date).

    ``pre_only`` (default False) leaves procrastinate's post-migration files, and any file of
    procrastinate's after the first of them, for a later run. Raises
    :class:`SchemaNewerThanCode`, before applying anything, when the database has had
    procrastinate migrations that the installed procrastinate does not ship.
    """
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS mailroom_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await _applied(conn)
            shipped = procrastinate_migrations()
            if PROCRASTINATE_STEP not in done:
                await _apply_baseline(conn, shipped)
                applied_now.append(PROCRASTINATE_STEP)
            else:
                if not _recorded_procrastinate(done):
                    await _record_legacy_baseline(conn, shipped)
                    done = await _applied(conn)
                _refuse_unknown(done, shipped)
                for migration in shipped:
                    if migration.step in done:
                        continue
                    if pre_only and migration.post:
                        break
                    await _apply_procrastinate(conn, migration)
                    applied_now.append(migration.step)
            for own in mailroom_migrations():
                if own.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(own.sql.encode())
                    await _record(conn, own.name)
                log.info("migration_applied", migration=own.name)
                applied_now.append(own.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
    return applied_now


async def pending_migrations(
    conn: psycopg.AsyncConnection, *, include_post: bool = False
) -> list[str]:
    """Names of migrations not yet applied on this database (for readiness checks).

    procrastinate's post-migration files are left out unless ``include_post``: the code of the
    version that ships them runs without them (they are for after the old version is gone).
    """
    exists = await conn.execute("SELECT to_regclass('mailroom_migrations') IS NOT NULL")
    row = await exists.fetchone()
    done = await _applied(conn) if row and row[0] else set()
    if PROCRASTINATE_STEP not in done:
        return [PROCRASTINATE_STEP, *(m.name for m in mailroom_migrations() if m.name not in done)]
    shipped = procrastinate_migrations()
    recorded = _recorded_procrastinate(done) or {
        m.step for m in shipped if m.version <= LEGACY_BASELINE_VERSION
    }
    return [
        *(m.step for m in shipped if m.step not in recorded and (include_post or not m.post)),
        *(m.name for m in mailroom_migrations() if m.name not in done),
    ]


async def _apply_baseline(
    conn: psycopg.AsyncConnection, shipped: Sequence[ProcrastinateMigration]
) -> None:
    # schema.sql is what every migration file shipped with it adds up to: record them all.
    async with conn.transaction():
        await conn.execute(SchemaManager.get_schema().encode())
        await _record(conn, PROCRASTINATE_STEP, *(m.step for m in shipped))
    log.info(
        "migration_applied", migration=PROCRASTINATE_STEP, procrastinate=procrastinate_version()
    )


async def _record_legacy_baseline(
    conn: psycopg.AsyncConnection, shipped: Sequence[ProcrastinateMigration]
) -> None:
    covered = [m.step for m in shipped if m.version <= LEGACY_BASELINE_VERSION]
    async with conn.transaction():
        await _record(conn, *covered)
    log.info(
        "procrastinate_baseline_recorded",
        version=".".join(map(str, LEGACY_BASELINE_VERSION)),
        files=len(covered),
    )


def _refuse_unknown(done: set[str], shipped: Sequence[ProcrastinateMigration]) -> None:
    unknown = sorted(_recorded_procrastinate(done) - {m.step for m in shipped})
    if unknown:
        newest = unknown[-1].removeprefix(PROCRASTINATE_PREFIX)
        raise SchemaNewerThanCode(
            f"the database has {len(unknown)} procrastinate migration(s), up to {newest},"
            f" that procrastinate {procrastinate_version()} does not ship: it was migrated by a"
            " newer Mailroom. Run that version (or newer), not this one."
        )


async def _apply_procrastinate(
    conn: psycopg.AsyncConnection, migration: ProcrastinateMigration
) -> None:
    if migration.transactional:
        async with conn.transaction():
            await conn.execute(migration.sql.encode())
            await _record(conn, migration.step)
    else:
        # Statement by statement in autocommit: a failure part-way leaves the file unrecorded,
        # and the next run starts it again (such files are written to be run again).
        for statement in split_statements(migration.sql):
            await conn.execute(statement.encode())
        await _record(conn, migration.step)
    log.info(
        "migration_applied",
        migration=migration.step,
        post=migration.post,
        transactional=migration.transactional,
    )


async def _record(conn: psycopg.AsyncConnection, *names: str) -> None:
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO mailroom_migrations (name) VALUES (%s)", [(n,) for n in names]
        )


def _recorded_procrastinate(done: set[str]) -> set[str]:
    return {name for name in done if name.startswith(PROCRASTINATE_PREFIX)}


async def _applied(conn: psycopg.AsyncConnection) -> set[str]:
    cursor = await conn.execute("SELECT name FROM mailroom_migrations")
    return {name for (name,) in await cursor.fetchall()}


# -- SQL text ---------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"--[^\n]*"  # line comment
    r"|/\*.*?\*/"  # block comment (procrastinate's files do not nest them)
    r"|'(?:[^']|'')*'"  # string
    r'|"(?:[^"]|"")*"'  # quoted identifier
    r"|(\$[A-Za-z_0-9]*\$).*?\1"  # dollar-quoted body
    r"|;",
    re.DOTALL,
)


def split_statements(sql: str) -> list[str]:
    """The statements of a SQL script, split on the semicolons outside strings, quoted
    identifiers, dollar-quoted bodies and comments; empty statements dropped."""
    statements: list[str] = []
    start = 0
    for match in _TOKEN.finditer(sql):
        if match.group() == ";":
            statements.append(sql[start : match.start()])
            start = match.end()
    statements.append(sql[start:])
    return [s.strip() for s in statements if _strip_comments(s).strip()]


def _strip_comments(sql: str) -> str:
    """``sql`` with its comments removed (strings and bodies kept as they are)."""
    return _TOKEN.sub(
        lambda m: "" if m.group().startswith(("--", "/*")) else m.group(),
        sql,
    )
