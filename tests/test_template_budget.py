"""A hostile template costs its own request or its own recipient, and nobody else anything.

While the web tier dry-runs a hostile template it keeps answering ``/healthz`` at once, stays
small, and refuses the batch with a 422 that says the template is too expensive. A template
that only one recipient's fields make expensive gets past validation (which renders one
sample of each set of fields), and that recipient becomes a dead letter while the rest of the
batch is sent.
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import AUTH, drain, query
from tests.memory import peak_rss
from tests.smtp_server import RecordingSMTPServer

EXPENSIVE = "template too expensive"
HOSTILE_BODIES = {
    "nested range loops": (
        "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
        EXPENSIVE,
    ),
    "center 10**9": ('{{ ("a"|center(10**9))|length }}', EXPENSIVE),
    "long string repeat": ('{{ "a" * 10000 * 10000 }}', EXPENSIVE),
    "recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", EXPENSIVE),
    "fan-out macro": (
        "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
        "{{ f(40) }}",
        EXPENSIVE,
    ),
    "range 10**6": ("{% for x in range(10**6) %}{{ x }}{% endfor %}", EXPENSIVE),
    "format width": ('{{ "%999999999s"|format("a") }}', EXPENSIVE),
    "wordwrap 10**9": ('{{ "a"*10000|wordwrap(10**9) }}', EXPENSIVE),
    "doubling": (
        '{% set ns = namespace(s="ab") %}{% for i in range(40) %}'
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        EXPENSIVE,
    ),
    "slow steps until the time limit": (
        '{% set s = "ab " * 600 %}{% for c in s %}{% for d in s %}'
        "{% set n = s|unique|list|length %}{% endfor %}{% endfor %}",
        "took longer than 1 s",
    ),
    "output too long": (
        '{% for i in range(10000) %}{{ "x" * 10000 }}{% endfor %}',
        "rendered text longer than 100000 characters",
    ),
}


class _HealthPoller:
    """Polls ``/healthz`` back to back and keeps how long each answer took.

    The test process's heap (pytest, every library the suite imports) is frozen meanwhile: a
    full garbage collection over it takes about 100 ms here and can fall on any allocation,
    whatever the template; what is measured is what rendering costs the event loop.
    """

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.latencies: list[float] = []
        self._stop = asyncio.Event()
        self._answered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _HealthPoller:
        gc.collect()
        gc.freeze()
        self._task = asyncio.create_task(self._poll())
        await self._answered.wait()  # polling before the batch arrives
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task
        gc.unfreeze()

    async def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            async with self.client.get("/healthz") as response:
                assert response.status == 200
                await response.read()
            self.latencies.append(time.perf_counter() - started)
            self._answered.set()
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(("body", "fragment"), HOSTILE_BODIES.values(), ids=HOSTILE_BODIES)
async def test_a_hostile_template_is_refused_while_the_web_tier_keeps_answering(
    client: TestClient, body: str, fragment: str
) -> None:
    payload = {"recipients": ["a@example.org"], "subject": "Hello", "body": body}
    async with _HealthPoller(client) as health:
        with peak_rss() as memory:
            started = time.perf_counter()
            response = await client.post("/api/batches", json=payload, headers=AUTH)
            answered = await response.json()
            elapsed = time.perf_counter() - started
    assert response.status == 422, answered
    problems = answered["error"]["details"]["problems"]
    assert any(fragment in p["message"] for p in problems), problems
    assert elapsed < 2.5, elapsed
    assert max(health.latencies) < 0.1, sorted(health.latencies)[-5:]
    # The process's RSS stays small (under 200 MB when it starts well under): the render
    # never builds anything large.
    assert memory.growth_mb < 50, f"the web tier grew by {memory.growth_mb:.0f} MB"
    assert memory.peak_mb < max(200, memory.start_mb + 50)


async def test_an_expensive_template_is_refused_on_its_own_field(client: TestClient) -> None:
    body = HOSTILE_BODIES["center 10**9"][0]
    payload = {"recipients": ["a@example.org", "b@example.org"], "subject": "Hi", "body": body}
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_batch"
    assert error["details"]["problems"] == [
        {
            "field": "body",
            "message": "template too expensive: center width 1000000000 is more than 100000"
            " (with the fields of a@example.org)",
        }
    ]


async def test_the_dry_run_of_a_whole_batch_is_bounded(client: TestClient) -> None:
    # Every recipient has fields of its own, so each needs a dry run of its own: each render is
    # cheap, but 10,000 of them would not be.
    recipients: list[Any] = [
        {"email": f"user{i}@example.org", f"field{i}": "x"} for i in range(10_000)
    ]
    body = "{% for c in email %}{% for d in email %}{{ d|upper }}{% endfor %}{% endfor %}"
    payload = {"recipients": recipients, "subject": "Hi", "body": body}
    async with _HealthPoller(client) as health:
        started = time.perf_counter()
        response = await client.post("/api/batches", json=payload, headers=AUTH)
        elapsed = time.perf_counter() - started
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    assert problems == [
        {
            "field": "body",
            "message": "template too expensive: rendering it for 10000 different sets of"
            " recipient fields took longer than 2 s",
        }
    ]
    assert elapsed < 4, elapsed
    assert max(health.latencies) < 0.1, sorted(health.latencies)[-5:]


async def test_checking_every_recipients_subject_is_bounded_too(client: TestClient) -> None:
    # Each subject is rendered to check what it becomes in a header; with loops over a field
    # each render stays within its own budget, but 5,000 of them would not.
    name = "n" * 60
    recipients: list[Any] = [
        {"email": f"user{i}@example.org", "name": f"{name}{i}"} for i in range(5_000)
    ]
    subject = "{% for c in name %}{% for d in name %}{% endfor %}{% endfor %}Hi"
    payload = {"recipients": recipients, "subject": subject, "body": "B"}
    async with _HealthPoller(client) as health:
        started = time.perf_counter()
        response = await client.post("/api/batches", json=payload, headers=AUTH)
        elapsed = time.perf_counter() - started
    assert response.status == 422
    problems = (await response.json())["error"]["details"]["problems"]
    assert problems == [
        {
            "field": "subject",
            "message": "template too expensive: rendering it for each of 5000 recipients"
            " took longer than 2 s",
        }
    ]
    assert elapsed < 5, elapsed
    assert max(health.latencies) < 0.1, sorted(health.latencies)[-5:]


# A template cheap for a short name and expensive for a long one: validation renders the
# first recipient's fields (Ada's), the worker renders everyone's.
LOOPS_OVER_THE_NAME = (
    "{% for a in name %}{% for b in name %}{% for c in name %}{% endfor %}{% endfor %}"
    "{% endfor %}Hi {{ name }}"
)
SLOW_STEPS_OVER_THE_NAME = (
    "{% for c in name %}{% for d in name %}{% set n = name|unique|list|length %}"
    "{% endfor %}{% endfor %}Hi {{ name[:10] }}"
)


async def _send(client: TestClient, body: str, long_name: str) -> None:
    recipients = [
        {"email": "ada@example.org", "name": "Ada"},
        {"email": "long@example.org", "name": long_name},
        {"email": "bob@example.org", "name": "Bob"},
    ]
    payload = {"recipients": recipients, "subject": "Hello {{ name[:10] }}", "body": body}
    response = await client.post("/api/batches", json=payload, headers=AUTH)
    assert response.status == 201, await response.text()


async def _outcomes(settings: Settings) -> dict[str, tuple[str, int, str | None]]:
    rows = await query(
        settings.database_url or "", "SELECT email, status, attempts, last_error FROM recipients"
    )
    return {email: (status, attempts, error) for email, status, attempts, error in rows}


async def test_a_template_too_expensive_for_one_recipient_makes_only_it_a_dead_letter(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _send(client, LOOPS_OVER_THE_NAME, "x" * 2000)
    await drain(settings)
    outcomes = await _outcomes(settings)
    assert outcomes["ada@example.org"][:2] == ("sent", 1)
    assert outcomes["bob@example.org"][:2] == ("sent", 1)
    status, attempts, error = outcomes["long@example.org"]
    assert (status, attempts) == ("dead", 1)
    assert error == (
        "template: template too expensive: more than 100000 loop iterations, calls and filters"
    )
    assert sorted(smtp.to_addresses()) == ["ada@example.org", "bob@example.org"]


async def test_the_job_time_limit_stops_a_render(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # Each step of this render is slow, so it is its time that runs out: half the attempt's
    # limit, so the render stops (a dead letter, the cause named) before the attempt times out.
    await _send(client, SLOW_STEPS_OVER_THE_NAME, "ab " * 600)
    started = time.perf_counter()
    await drain(settings.model_copy(update={"job_timeout_seconds": 1.0}))
    elapsed = time.perf_counter() - started
    outcomes = await _outcomes(settings)
    assert outcomes["long@example.org"] == (
        "dead",
        1,
        "template: template too expensive: rendering took longer than 0.5 s",
    )
    assert outcomes["ada@example.org"][0] == outcomes["bob@example.org"][0] == "sent"
    assert elapsed < 10, elapsed
