"""The SQL Mailroom runs against procrastinate stays true to the procrastinate it runs on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from shared import procrastinate_sql
from shared.db import Database
from shared.queue import EMAIL_QUEUE
from shared.schema import procrastinate_version
from tests.conftest import query

ROOT = Path(__file__).resolve().parent.parent


def _named_objects() -> set[str]:
    texts = [v for k, v in vars(procrastinate_sql).items() if k.isupper() and isinstance(v, str)]
    return {name for text in texts for name in re.findall(r"\bprocrastinate_\w+", text)}


def test_the_sql_was_checked_against_the_installed_minor_and_pyproject_allows_only_it() -> None:
    checked = Version(procrastinate_sql.CHECKED_AGAINST)
    installed = Version(procrastinate_version())
    assert (installed.major, installed.minor) == (checked.major, checked.minor)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    (spec,) = [
        Requirement(d).specifier
        for d in pyproject["project"]["dependencies"]
        if Requirement(d).name == "procrastinate"
    ]
    # Nothing past the checked minor: a newer one gets its SQL read again, then allowed.
    assert Version(f"{checked.major}.{checked.minor}.999") in spec
    assert Version(f"{checked.major}.{checked.minor + 1}.0") not in spec


async def test_every_procrastinate_object_it_names_exists_in_a_migrated_database(
    database_url: str,
) -> None:
    names = _named_objects()
    assert {"procrastinate_jobs", "procrastinate_defer_jobs_v1"} <= names
    rows = await query(
        database_url,
        "SELECT n FROM unnest(%s::text[]) AS n"
        " WHERE to_regclass(n) IS NULL AND to_regtype(n) IS NULL"
        " AND NOT EXISTS (SELECT 1 FROM pg_proc WHERE proname = n)",
        sorted(names),
    )
    assert rows == []
    columns = await query(
        database_url,
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
        procrastinate_sql.JOBS_TABLE,
    )
    assert set(procrastinate_sql.JOBS_PLANNED_COLUMNS) <= {c for (c,) in columns}


async def test_pruning_deletes_failed_email_jobs_past_retention_in_bounded_rounds(
    db: Database, database_url: str
) -> None:
    ids = [
        row[0]
        for row in await query(
            database_url,
            "SELECT unnest(procrastinate_defer_jobs_v1(ARRAY["
            " ROW(%s, 'send_email', 0, NULL, NULL, '{}'::jsonb, NULL),"
            " ROW(%s, 'send_email', 0, NULL, NULL, '{}'::jsonb, NULL),"
            " ROW(%s, 'send_email', 0, NULL, NULL, '{}'::jsonb, NULL),"
            " ROW(%s, 'send_email', 0, NULL, NULL, '{}'::jsonb, NULL),"
            " ROW('other', 'send_email', 0, NULL, NULL, '{}'::jsonb, NULL)"
            "]::procrastinate_job_to_defer_v1[]))",
            EMAIL_QUEUE,
            EMAIL_QUEUE,
            EMAIL_QUEUE,
            EMAIL_QUEUE,
        )
    ]
    old, older, recent, waiting, other_queue = ids
    await query(
        database_url,
        "UPDATE procrastinate_jobs SET status = 'failed' WHERE id = ANY(%s)",
        [old, older, recent, other_queue],
    )
    await query(
        database_url,
        "UPDATE procrastinate_events SET at = now() - interval '40 days' WHERE job_id = ANY(%s)",
        [old, older, waiting, other_queue],
    )
    assert await db.prune_finished_jobs(retention_days=30, limit=1) == 1
    assert await db.prune_finished_jobs(retention_days=30, limit=1) == 1
    assert await db.prune_finished_jobs(retention_days=30, limit=1) == 0
    left = await query(database_url, "SELECT id FROM procrastinate_jobs ORDER BY id")
    assert [i for (i,) in left] == [recent, waiting, other_queue]
