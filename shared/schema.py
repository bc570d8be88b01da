"""Schema management: procrastinate's schema, then Mailroom's numbered SQL migrations.

procrastinate's ``apply_schema_async`` is not idempotent, so every step applied is recorded in
``mailroom_migrations``; running :func:`migrate` twice is a no-op. Concurrent runs (two hosts
starting at once) serialize on an advisory lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import psycopg
import structlog
from procrastinate.schema import SchemaManager

log = structlog.get_logger(__name__)

PROCRASTINATE_STEP = "0000_procrastinate"
# Any constant works; it only has to be the same for every Mailroom process.
_MIGRATION_LOCK_ID = 0x6D61696C726F6F6D  # "mailroom"


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


def mailroom_migrations() -> list[Migration]:
    """Mailroom's migrations in the order they apply (by file name)."""
    folder = resources.files("shared") / "migrations"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".sql")),
        key=lambda entry: entry.name,
    )
    return [Migration(name=f.name.removesuffix(".sql"), sql=f.read_text("utf-8")) for f in files]


def all_migrations() -> list[Migration]:
    """procrastinate's schema first, then Mailroom's own files."""
    return [Migration(PROCRASTINATE_STEP, SchemaManager.get_schema()), *mailroom_migrations()]


async def migrate(conninfo: str) -> list[str]:
    """Apply what is missing; return the names applied (empty when up to date)."""
    applied_now: list[str] = []
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK_ID,))
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS mailroom_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = await _applied(conn)
            for migration in all_migrations():
                if migration.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.sql.encode())
                    await conn.execute(
                        "INSERT INTO mailroom_migrations (name) VALUES (%s)", (migration.name,)
                    )
                log.info("migration_applied", migration=migration.name)
                applied_now.append(migration.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK_ID,))
    return applied_now


async def pending_migrations(conn: psycopg.AsyncConnection) -> list[str]:
    """Names of migrations not yet applied on this database (for readiness checks)."""
    exists = await conn.execute("SELECT to_regclass('mailroom_migrations') IS NOT NULL")
    row = await exists.fetchone()
    done = await _applied(conn) if row and row[0] else set()
    return [m.name for m in all_migrations() if m.name not in done]


async def _applied(conn: psycopg.AsyncConnection) -> set[str]:
    cursor = await conn.execute("SELECT name FROM mailroom_migrations")
    return {name for (name,) in await cursor.fetchall()}
