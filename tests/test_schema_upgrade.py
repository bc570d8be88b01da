"""``mailroom migrate`` brings a database left behind by an older procrastinate up to date.

The old database is built from procrastinate's own files, the way procrastinate's migration
tests build theirs: its first migration (``00.00.00_01_initial``) and every file up to the
release wanted, each in a transaction. That gives the schema the release's ``schema.sql`` had
(procrastinate checks in its CI that the files add up to its ``schema.sql``), with no copy of
an old package kept here; subtracting files from today's ``schema.sql`` is not possible.

The oldest schema is procrastinate 3.0.0's, the first of the 3.x line: seven files (3.1 to
3.4, pre and post) separate it from today's, the most any supported upgrade applies. A
database migrated by the Mailroom before procrastinate's files were recorded (3.10's schema,
only the baseline row) is covered too.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import psycopg
import pytest

from mailroom.embedded import database_uri
from shared.db import Database, NewBatch, NewRecipient, make_pool
from shared.schema import (
    PROCRASTINATE_PREFIX,
    PROCRASTINATE_STEP,
    SchemaNewerThanCode,
    _apply_procrastinate,
    mailroom_migrations,
    migrate,
    parse_procrastinate_migration,
    pending_migrations,
    procrastinate_migrations,
    split_statements,
)
from tests.conftest import _create_database, _drop_database, drain, make_settings, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_cli import mailroom

OLDEST = (3, 0, 0)


@pytest.fixture
def empty_database_url(pg_admin_uri: str) -> Iterator[str]:
    """A database with nothing in it."""
    name = f"mailroom_old_{secrets.token_hex(6)}"
    _create_database(pg_admin_uri, name)
    yield database_uri(pg_admin_uri, name)
    _drop_database(pg_admin_uri, name)


async def _build_old_database(url: str, version: tuple[int, int, int] = OLDEST) -> list[str]:
    """Make ``url`` what a Mailroom on procrastinate ``version`` left: that release's schema
    from procrastinate's files, recorded as its baseline, and Mailroom's own migrations.
    Returns the procrastinate files still to apply."""
    older = [m for m in procrastinate_migrations() if m.version <= version]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for migration in older:
            async with conn.transaction():
                await conn.execute(migration.sql.encode())
        await conn.execute(
            "CREATE TABLE mailroom_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for own in mailroom_migrations():
            async with conn.transaction():
                await conn.execute(own.sql.encode())
        async with conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO mailroom_migrations (name) VALUES (%s)",
                [(PROCRASTINATE_STEP,)]
                + [(m.step,) for m in older]
                + [(own.name,) for own in mailroom_migrations()],
            )
    return [m.step for m in procrastinate_migrations() if m.version > version]


async def _procrastinate_schema(url: str) -> dict[str, list[tuple[str, ...]]]:
    """procrastinate's objects in ``url``: what two equal schemas have alike."""
    queries = {
        "columns": "SELECT table_name, column_name, data_type, is_nullable,"
        " coalesce(column_default, '') FROM information_schema.columns"
        " WHERE table_schema = 'public' AND table_name LIKE 'procrastinate%'",
        "functions": "SELECT p.proname, pg_get_function_identity_arguments(p.oid),"
        " pg_get_function_result(p.oid) FROM pg_proc p"
        " WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'procrastinate%'",
        "indexes": "SELECT indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'public' AND tablename LIKE 'procrastinate%'",
        "triggers": "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE NOT tgisinternal AND tgname LIKE 'procrastinate%'",
        "constraints": "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE connamespace = 'public'::regnamespace AND conname LIKE 'procrastinate%'",
        "types": "SELECT t.typname, coalesce(string_agg(e.enumlabel, ',' ORDER BY"
        " e.enumsortorder), '') FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid"
        " WHERE t.typnamespace = 'public'::regnamespace AND t.typname LIKE 'procrastinate%'"
        " GROUP BY t.typname",
    }
    return {
        kind: sorted(tuple(str(v) for v in row) for row in await query(url, text))
        for kind, text in queries.items()
    }


async def _recorded(url: str) -> list[str]:
    return [name for (name,) in await query(url, "SELECT name FROM mailroom_migrations")]


async def test_a_database_at_the_oldest_procrastinate_schema_is_upgraded_and_sends_a_batch(
    empty_database_url: str, database_url: str, smtp: RecordingSMTPServer
) -> None:
    url = empty_database_url
    to_apply = await _build_old_database(url)
    assert [s.removeprefix(PROCRASTINATE_PREFIX) for s in to_apply] == [
        "03.01.00_01_pre_add_heartbeat",
        "03.01.00_50_post_add_heartbeat",
        "03.02.00_01_pre_batch_defer_jobs",
        "03.02.00_50_post_batch_defer_jobs",
        "03.03.00_01_pre_priority_lock_fetch_job",
        "03.04.00_01_pre_add_retry_failed_job_procedure",
        "03.04.00_50_post_add_retry_failed_job_procedure",
    ]
    # Mailroom's enqueue cannot work on it yet: its batch defer came with procrastinate 3.2.
    functions = await query(url, "SELECT to_regproc('procrastinate_defer_jobs_v1')::text")
    assert functions == [(None,)]

    assert await migrate(url) == to_apply
    # The same schema as a database migrated fresh (the template of every test database).
    assert await _procrastinate_schema(url) == await _procrastinate_schema(database_url)
    assert sorted(await _recorded(url)) == sorted(await _recorded(database_url))

    settings = make_settings(url, smtp.port)
    addresses = [f"user{i}@example.org" for i in range(60)]  # two chunk jobs
    async with make_pool(url, max_size=2, name="test") as pool:
        await Database(pool, chunk_size=50).create_batch(
            NewBatch(
                created_by="test",
                subject_template="Hello {{ email }}",
                body_template="Body",
                recipients=[NewRecipient(a) for a in addresses],
            )
        )
    await drain(settings)
    assert smtp.to_addresses() == dict.fromkeys(addresses, 1)
    assert await query(url, "SELECT DISTINCT status FROM recipients") == [("sent",)]


async def test_migrate_is_idempotent_and_records_every_procrastinate_file(
    database_url: str,
) -> None:
    before = sorted(await _recorded(database_url))
    assert await migrate(database_url) == []
    assert sorted(await _recorded(database_url)) == before
    shipped = {m.step for m in procrastinate_migrations()}
    assert {n for n in before if n.startswith(PROCRASTINATE_PREFIX)} == shipped
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await pending_migrations(conn, include_post=True) == []


async def test_a_database_migrated_before_procrastinate_files_were_recorded_gets_its_baseline(
    database_url: str,
) -> None:
    # What a Mailroom without this record left: procrastinate 3.10's schema, the baseline row.
    await query(database_url, "DELETE FROM mailroom_migrations WHERE name LIKE 'procrastinate/%'")
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await pending_migrations(conn, include_post=True) == []
    assert await migrate(database_url) == []
    recorded = {n for n in await _recorded(database_url) if n.startswith(PROCRASTINATE_PREFIX)}
    assert recorded == {m.step for m in procrastinate_migrations()}


async def test_a_recorded_migration_this_procrastinate_does_not_ship_is_refused(
    database_url: str,
) -> None:
    future = PROCRASTINATE_PREFIX + "03.99.00_01_pre_something_new"
    await query(database_url, "INSERT INTO mailroom_migrations (name) VALUES (%s)", future)
    # Left out, so a run that went ahead would apply it again.
    await query(
        database_url, "DELETE FROM mailroom_migrations WHERE name = '0010_batch_cancelled_at'"
    )
    before = sorted(await _recorded(database_url))
    with pytest.raises(SchemaNewerThanCode, match=r"03\.99\.00_01_pre_something_new.*newer"):
        await migrate(database_url)
    assert sorted(await _recorded(database_url)) == before


@pytest.mark.slow
async def test_the_command_names_the_unknown_migration_and_exits_1(database_url: str) -> None:
    future = PROCRASTINATE_PREFIX + "03.99.00_01_pre_something_new"
    await query(database_url, "INSERT INTO mailroom_migrations (name) VALUES (%s)", future)
    result = await asyncio.to_thread(
        mailroom, "migrate", env={"MAILROOM_DATABASE_URL": database_url}
    )
    assert result.returncode == 1
    assert "03.99.00_01_pre_something_new" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
async def test_the_command_with_pre_says_what_it_left(empty_database_url: str) -> None:
    to_apply = await _build_old_database(empty_database_url, version=(3, 3, 0))
    env = {"MAILROOM_DATABASE_URL": empty_database_url}
    result = await asyncio.to_thread(mailroom, "migrate", "--pre", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"applied 1 migration(s): {to_apply[0]}",
        f"left for a plain 'mailroom migrate' once the old version is gone: {to_apply[1]}",
    ]
    result = await asyncio.to_thread(mailroom, "migrate", env=env)
    assert result.stdout.strip() == f"applied 1 migration(s): {to_apply[1]}"


async def test_pre_only_stops_before_the_first_post_migration_and_a_plain_run_finishes(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    to_apply = await _build_old_database(url, version=(3, 0, 0))
    assert await migrate(url, pre_only=True) == to_apply[:1]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        # The next release's pre file is still missing: not ready for its code yet.
        assert await pending_migrations(conn) == [to_apply[2], to_apply[4], to_apply[5]]
        assert await pending_migrations(conn, include_post=True) == to_apply[1:]
    assert await migrate(url) == to_apply[1:]


async def test_a_database_at_the_last_pre_file_is_ready_for_the_new_code(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await _build_old_database(url, version=(3, 3, 0))
    applied = await migrate(url, pre_only=True)
    assert applied == [PROCRASTINATE_PREFIX + "03.04.00_01_pre_add_retry_failed_job_procedure"]
    async with await psycopg.AsyncConnection.connect(url) as conn:
        assert await pending_migrations(conn) == []  # /readyz says ready
        assert await pending_migrations(conn, include_post=True) == [
            PROCRASTINATE_PREFIX + "03.04.00_50_post_add_retry_failed_job_procedure"
        ]


async def test_concurrent_upgrades_apply_each_file_once(empty_database_url: str) -> None:
    url = empty_database_url
    to_apply = await _build_old_database(url)
    first, second = await asyncio.gather(migrate(url), migrate(url))
    assert sorted([first, second], key=len) == [[], to_apply]


async def test_concurrent_runs_on_an_empty_database_apply_the_schema_once(
    empty_database_url: str,
) -> None:
    runs = await asyncio.gather(*(migrate(empty_database_url) for _ in range(3)))
    assert sorted(len(r) for r in runs)[:2] == [0, 0]
    assert max(runs, key=len)[0] == PROCRASTINATE_STEP


async def test_a_file_that_cannot_run_in_a_transaction_runs_statement_by_statement(
    database_url: str,
) -> None:
    migration = parse_procrastinate_migration(
        "03.99.00_01_pre_add_index",
        "-- A comment; with a semicolon.\n"
        "CREATE INDEX CONCURRENTLY procrastinate_test_idx ON procrastinate_jobs (task_name);\n"
        "COMMENT ON INDEX procrastinate_test_idx IS 'a; b';\n",
    )
    assert not migration.transactional
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await _apply_procrastinate(conn, migration)
    assert await query(
        database_url, "SELECT obj_description('procrastinate_test_idx'::regclass)"
    ) == [("a; b",)]
    assert migration.step in await _recorded(database_url)


def test_every_shipped_file_is_named_as_procrastinate_documents_and_runs_in_a_transaction() -> None:
    shipped = procrastinate_migrations()
    assert shipped[0].name == "00.00.00_01_initial"
    assert [m.name for m in shipped] == sorted(m.name for m in shipped)
    assert all(m.transactional for m in shipped)
    pre = [m.name for m in shipped if not m.post]
    assert pre and all("_pre_" in name for name in pre)


def test_parse_procrastinate_migration() -> None:
    pre = parse_procrastinate_migration("03.04.00_01_pre_add_retry_failed_job_procedure", "")
    assert (pre.version, pre.post) == ((3, 4, 0), False)
    post = parse_procrastinate_migration("03.04.00_50_post_add_retry_failed_job_procedure", "")
    assert (post.version, post.post) == ((3, 4, 0), True)
    # An old file that says neither is a post file, as procrastinate's documentation says.
    assert parse_procrastinate_migration("02.06.00_01_add_cancel_states", "").post
    with pytest.raises(ValueError, match="not a procrastinate migration"):
        parse_procrastinate_migration("3.4_add_thing", "")


def test_split_statements_keeps_strings_bodies_and_comments_whole() -> None:
    script = (
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END; $$;\n"
        "-- not a statement; at all\n"
        "/* nor; this */ SELECT 'it''s; one';\n"
        'SELECT 1 AS "a;b"  ;;\n'
    )
    assert split_statements(script) == [
        "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END; $$",
        "-- not a statement; at all\n/* nor; this */ SELECT 'it''s; one'",
        'SELECT 1 AS "a;b"',
    ]
