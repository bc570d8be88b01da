"""Permanent failures and exhausted retries become dead letters; redrive sends them once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import AUTH, drain, query, retries_due
from tests.smtp_server import RecordingSMTPServer, Rule

GOOD = [f"ok{i}@example.org" for i in range(4)]
BAD = ["nobody@example.org", "gone@example.org"]


async def _batch(client: TestClient, recipients: list[str]) -> str:
    response = await client.post(
        "/api/batches", json={"recipients": recipients, "subject": "S", "body": "B"}, headers=AUTH
    )
    assert response.status == 201
    return str((await response.json())["id"])


async def _drain_until_settled(settings: Settings) -> None:
    # Drain, wait out the backoff the worker chose, and again until nothing is pending.
    for _ in range(20):
        await drain(settings)
        pending = await query(
            settings.database_url or "",
            "SELECT count(*) FROM recipients WHERE status IN ('queued', 'retrying', 'sending')",
        )
        if pending == [(0,)]:
            return
        await retries_due(settings.database_url or "")
    raise AssertionError("recipients still pending")


async def test_a_550_is_dead_at_the_first_attempt_and_the_rest_is_sent(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    for address in BAD:
        smtp.rules[address] = Rule("550 5.1.1 user unknown")
    batch_id = await _batch(client, GOOD + BAD)
    await drain(settings)
    rows = await query(
        settings.database_url or "",
        "SELECT email, status, attempts, last_error FROM recipients ORDER BY id",
    )
    assert [(e, s, a) for e, s, a, _ in rows] == [(e, "sent", 1) for e in GOOD] + [
        (e, "dead", 1) for e in BAD
    ]
    assert all(
        "550" in (err or "") and "user unknown" in err for _, s, _, err in rows if s == "dead"
    )
    assert sorted(smtp.to_addresses()) == sorted(GOOD)
    status = await (await client.get(f"/api/batches/{batch_id}", headers=AUTH)).json()
    assert status["status"] == "done_with_failures" and status["counts"]["dead"] == 2
    # The evidence is on each recipient's row; the chunk job itself succeeded (it recorded
    # every outcome) and is gone.
    jobs = await query(
        settings.database_url or "",
        "SELECT status::text FROM procrastinate_jobs WHERE queue_name = 'emails'",
    )
    assert jobs == []


async def test_a_5xx_after_data_is_permanent_too(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["spam@example.org"] = Rule("554 5.7.1 message rejected", at_data=True)
    await _batch(client, ["spam@example.org"])
    await drain(settings)
    assert await query(settings.database_url or "", "SELECT status, attempts FROM recipients") == [
        ("dead", 1)
    ]


async def test_transient_failures_that_never_stop_exhaust_the_budget(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["busy@example.org"] = Rule("451 4.3.0 try later")
    await _batch(client, ["busy@example.org"])
    await _drain_until_settled(settings)
    row = await query(
        settings.database_url or "", "SELECT status, attempts, last_error FROM recipients"
    )
    assert row[0][:2] == ("dead", settings.retry_max_attempts)
    assert "451" in row[0][2]
    assert smtp.rules["busy@example.org"].seen == settings.retry_max_attempts


async def test_dead_letters_are_listed_across_batches(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules[BAD[0]] = Rule("550 no")
    smtp.rules[BAD[1]] = Rule("550 no")
    first = await _batch(client, [BAD[0], GOOD[0]])
    second = await _batch(client, [BAD[1]])
    await drain(settings)
    listing = await (await client.get("/api/dead-letters", headers=AUTH)).json()
    assert [(d["email"], d["batch_id"]) for d in listing["dead_letters"]] == [
        (BAD[0], first),
        (BAD[1], second),
    ]
    only_second = await (
        await client.get(f"/api/dead-letters?batch_id={second}", headers=AUTH)
    ).json()
    assert [d["email"] for d in only_second["dead_letters"]] == [BAD[1]]
    by_status = await (
        await client.get(f"/api/batches/{first}/recipients?status=dead", headers=AUTH)
    ).json()
    assert [r["email"] for r in by_status["recipients"]] == [BAD[0]]


@pytest.mark.parametrize("selection", ["ids", "batch", "all"])
async def test_redrive_after_fixing_the_cause_delivers_each_dead_letter_exactly_once(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, selection: str
) -> None:
    for address in BAD:
        smtp.rules[address] = Rule("550 5.1.1 user unknown")
    batch_id = await _batch(client, GOOD + BAD)
    await drain(settings)
    dead_ids = [
        d["id"]
        for d in (await (await client.get("/api/dead-letters", headers=AUTH)).json())[
            "dead_letters"
        ]
    ]
    smtp.rules.clear()  # the mailbox exists now

    body: dict[str, Any] = {
        "ids": {"ids": dead_ids},
        "batch": {"batch_id": batch_id},
        "all": {"all": True},
    }[selection]
    response = await client.post("/api/dead-letters/redrive", json=body, headers=AUTH)
    assert response.status == 200
    assert (await response.json())["redriven"] == 2
    assert await query(
        settings.database_url or "",
        "SELECT status, attempts FROM recipients WHERE status <> 'sent'",
    ) == [("queued", 0), ("queued", 0)]
    await drain(settings)
    assert smtp.to_addresses() == {address: 1 for address in GOOD + BAD}
    # A second redrive finds nothing dead and sends nothing more.
    again = await client.post("/api/dead-letters/redrive", json={"all": True}, headers=AUTH)
    assert (await again.json())["redriven"] == 0
    await drain(settings)
    assert sum(smtp.to_addresses().values()) == len(GOOD + BAD)


async def test_redrive_never_touches_a_sent_recipient(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _batch(client, GOOD[:1])
    await drain(settings)
    sent_id = (await query(settings.database_url or "", "SELECT id FROM recipients"))[0][0]
    response = await client.post("/api/dead-letters/redrive", json={"ids": [sent_id]}, headers=AUTH)
    assert (await response.json())["redriven"] == 0
    await drain(settings)
    assert len(smtp.received) == 1


async def test_discard_keeps_the_evidence(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules[BAD[0]] = Rule("550 no such user")
    await _batch(client, [BAD[0]])
    await drain(settings)
    response = await client.post("/api/dead-letters/discard", json={"all": True}, headers=AUTH)
    assert (await response.json())["discarded"] == 1
    row = await query(settings.database_url or "", "SELECT status, last_error FROM recipients")
    assert row[0][0] == "cancelled" and "550" in row[0][1]
    assert (await (await client.get("/api/dead-letters", headers=AUTH)).json())[
        "dead_letters"
    ] == []


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({}, 422),
        ({"ids": [1], "all": True}, 422),
        ({"ids": []}, 422),
        ({"ids": ["1"]}, 422),
        ({"ids": [True]}, 422),
        ({"ids": [-3]}, 422),
        ({"ids": [2**64]}, 422),
        ({"ids": 5}, 422),
        ({"all": "yes"}, 422),
        ({"batch_id": "nope"}, 422),
        ({"everything": True}, 422),
        ([1, 2], 422),
        (None, 400),
    ],
)
async def test_garbage_selections_are_refused(client: TestClient, body: Any, status: int) -> None:
    for action in ("redrive", "discard"):
        if body is None:
            response = await client.post(
                f"/api/dead-letters/{action}",
                data=b"{not json",
                headers={**AUTH, "Content-Type": "application/json"},
            )
        else:
            response = await client.post(f"/api/dead-letters/{action}", json=body, headers=AUTH)
        assert response.status == status
        assert "error" in await response.json()


@pytest.mark.parametrize(
    "query_string", ["limit=0", "after=x", "batch_id=nope", "limit=501", f"after={2**64}"]
)
async def test_bad_dead_letter_queries_are_422(client: TestClient, query_string: str) -> None:
    response = await client.get(f"/api/dead-letters?{query_string}", headers=AUTH)
    assert response.status == 422


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    env["MAILROOM_DATABASE_URL"] = settings.database_url or ""
    return subprocess.run(
        [sys.executable, "-m", "mailroom", "dead-letters", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.slow
async def test_the_cli_lists_redrives_and_discards(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    for address in BAD:
        smtp.rules[address] = Rule("550 unknown")
    batch_id = await _batch(client, BAD)
    await drain(settings)
    listed = await asyncio.to_thread(_cli, settings, "list")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[2] for line in listed.stdout.splitlines()] == BAD
    assert "SMTP 550 during rcpt: unknown" in listed.stdout
    first_id = listed.stdout.split("\t", 1)[0]

    smtp.rules.clear()
    redriven = await asyncio.to_thread(_cli, settings, "redrive", first_id)
    assert redriven.stdout.strip() == "redriven: 1"
    discarded = await asyncio.to_thread(_cli, settings, "discard", "--batch", batch_id)
    assert discarded.stdout.strip() == "discarded: 1"
    await drain(settings)
    assert smtp.to_addresses() == {BAD[0]: 1}

    for bad in (
        ["redrive"],
        ["redrive", "--batch", "nope"],
        ["redrive", "x"],
        ["frobnicate"],
        ["redrive", "1", "--all"],
    ):
        result = await asyncio.to_thread(_cli, settings, *bad)
        assert result.returncode == 2, (bad, result.stderr)
        assert "Traceback" not in result.stderr
