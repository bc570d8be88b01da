"""Metrics, dashboards, alerts and logs, checked against the live exporters."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from shared.db import Database
from shared.metrics import WORKER_REGISTRY, render
from shared.settings import Settings
from tests.conftest import API_TOKEN, AUTH, drain, make_settings, query, retries_due
from tests.processes import free_port, prometheus_binary
from tests.smtp_server import RecordingSMTPServer, Rule
from worker.health import start_health_server

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy/prometheus/alerts.yml"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(
    scrape: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scrape.items() if n == name and wanted <= ls)


async def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The web tier's /metrics."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples(await response.text())


def worker_scrape() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """What this process's worker health server serves (its registry; the pool aside)."""
    return samples(render(WORKER_REGISTRY).decode())


async def test_metrics_move_as_a_batch_with_faults_goes_through(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    good = [f"ok{i}@example.org" for i in range(8)]
    smtp.rules["bounce@example.org"] = Rule("550 5.1.1 no such user")
    smtp.rules["slow@example.org"] = Rule("451 4.3.0 later", times=1)
    before = await scrape(client) | worker_scrape()
    response = await client.post(
        "/api/batches",
        json={
            "recipients": [*good, "bounce@example.org", "slow@example.org"],
            "subject": "S",
            "body": "B",
        },
        headers=AUTH,
    )
    assert response.status == 201
    queued = await scrape(client)
    # One chunk job carries the ten recipients.
    assert value(queued, "mailroom_queue_jobs", queue="emails", status="todo_ready") == 1
    assert value(queued, "mailroom_recipients", status="queued") == 10
    assert value(queued, "mailroom_oldest_ready_job_age_seconds", queue="emails") >= 0

    await drain(settings)
    await retries_due(settings.database_url or "")
    await drain(settings)
    after = await scrape(client) | worker_scrape()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mailroom_batches_created_total") == 1
    assert delta("mailroom_recipients_enqueued_total") == 10
    assert delta("mailroom_emails_sent_total") == 9
    assert delta("mailroom_email_failures_total", kind="permanent") == 1
    assert delta("mailroom_email_failures_total", kind="transient") == 1
    assert delta("mailroom_dead_letters_total", reason="permanent") == 1
    assert delta("mailroom_dead_letters_total", reason="attempts_exhausted") == 0
    assert delta("mailroom_smtp_failures_total", reply="550") == 1
    assert delta("mailroom_smtp_failures_total", reply="451") == 1
    assert delta("mailroom_job_retries_total") == 1
    # The chunk recorded every outcome (so it succeeded); the 451 went on in a job of its own.
    assert delta("mailroom_job_duration_seconds_count", task="send_chunk", outcome="succeeded") == 1
    assert delta("mailroom_job_duration_seconds_count", task="send_email", outcome="succeeded") == 1
    assert delta("mailroom_job_queue_wait_seconds_count") == 11
    assert delta("mailroom_smtp_send_seconds_count") == 9
    assert (
        delta("mailroom_http_requests_total", route="/api/batches", method="POST", status="201")
        == 1
    )
    assert value(after, "mailroom_queue_jobs", queue="emails", status="todo_ready") == 0
    assert value(after, "mailroom_queue_jobs", queue="emails", status="doing") == 0
    assert value(after, "mailroom_recipients", status="dead") == 1
    assert value(after, "mailroom_recipients", status="queued") == 0
    assert value(after, "mailroom_collector_up") == 1
    assert value(after, "mailroom_build_info") == 1


async def test_http_metrics_use_route_templates_not_raw_paths(client: TestClient) -> None:
    await client.get("/api/batches/00000000-0000-0000-0000-000000000001", headers=AUTH)
    await client.get("/no/such/page", headers=AUTH)
    text = await (await client.get("/metrics")).text()
    assert 'route="/api/batches/{batch_id}"' in text
    assert 'route="unmatched"' in text
    assert "00000000-0000-0000-0000-000000000001" not in text


async def test_the_collector_reports_down_instead_of_failing_the_scrape(
    client: TestClient, settings: Settings
) -> None:
    from shared.metrics import QueueCollector

    broken = QueueCollector(settings.database_url + "_nope", stalled_after_seconds=30)  # type: ignore[operator]
    families = {f.name: f for f in broken.collect()}
    assert set(families) == {"mailroom_collector_up"}
    assert families["mailroom_collector_up"].samples[0].value == 0
    # Registering describes without querying: a dead database cannot break start-up.
    assert {f.name for f in broken.describe()} >= {"mailroom_queue_jobs", "mailroom_workers_alive"}


async def test_a_metrics_token_guards_the_endpoint(settings: Settings, db: Database) -> None:
    from aiohttp.test_utils import TestServer

    from web.app import create_app

    guarded = make_settings(
        settings.database_url or "", settings.smtp_port, metrics_token="scrape-me"
    )
    async with TestClient(TestServer(create_app(guarded, db=db))) as c:
        assert (await c.get("/metrics")).status == 401
        assert (await c.get("/metrics", headers={"Authorization": "Bearer wrong"})).status == 401
        assert (
            await c.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        ).status == 200


async def test_the_worker_health_check_follows_its_heartbeat(
    settings: Settings, db: Database
) -> None:
    rows = await query(
        settings.database_url or "", "INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id"
    )
    worker_id = rows[0][0]
    current: list[tuple[int, Database] | None] = [None]
    port = free_port()
    health = await start_health_server(
        settings.model_copy(update={"metrics_port": port}), lambda: current[0]
    )
    assert health is not None
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status == 503  # no worker running yet
            current[0] = (worker_id, db)
            ok = await http.get("/healthz")
            assert ok.status == 200 and (await ok.json())["worker_id"] == worker_id
            await query(
                settings.database_url or "",
                "UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'",
            )
            stale = await http.get("/healthz")
            assert stale.status == 503 and (await stale.json())["status"] == "heartbeat stale"
            metrics_text = await (await http.get("/metrics")).text()
            assert "mailroom_worker_up" in metrics_text
    finally:
        await health.cleanup()


async def test_a_taken_metrics_port_is_a_clear_configuration_error(settings: Settings) -> None:
    from shared.settings import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match="MAILROOM_METRICS_PORT"):
            await start_health_server(
                settings.model_copy(update={"metrics_port": port}), lambda: None
            )


# -- dashboards and alerts against what the exporters publish -----------------------------------


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


# -- promtool and a real Prometheus ---------------------------------------------------------------


@pytest.fixture
def promtool() -> str:
    return prometheus_binary("promtool")


@pytest.mark.slow
def test_promtool_accepts_the_rules_and_the_config(promtool: str) -> None:
    for args in (
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(ROOT / "deploy/prometheus/prometheus.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
async def test_prometheus_scrapes_the_live_exporters_and_answers_the_main_queries(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, tmp_path: Path
) -> None:
    binary = prometheus_binary("prometheus")
    worker_port = free_port()
    health = await start_health_server(
        settings.model_copy(update={"metrics_port": worker_port}), lambda: None
    )
    prom_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "mailroom-web",
                "static_configs": [{"targets": [f"127.0.0.1:{client.port}"]}],
            },
            {
                "job_name": "mailroom-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await client.post(
            "/api/batches",
            json={"recipients": ["a@example.org", "b@example.org"], "subject": "S", "body": "B"},
            headers=AUTH,
        )
        await drain(settings)
        queries = [
            'sum by (status) (mailroom_queue_jobs{queue="emails"})',
            'max(mailroom_oldest_ready_job_age_seconds{queue="emails"})',
            "max(mailroom_workers_alive)",
            'sum(mailroom_recipients{status="dead"})',
            "sum(rate(mailroom_emails_sent_total[1m])) * 60",
            "sum by (route) (rate(mailroom_http_requests_total[1m]))",
        ]
        async with aiohttp.ClientSession(f"http://127.0.0.1:{prom_port}") as http:
            answers: dict[str, list[Any]] = {}
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and len(answers) < len(queries):
                await asyncio.sleep(1)
                for q in queries:
                    try:
                        r = await http.get("/api/v1/query", params={"query": q})
                        result = (await r.json())["data"]["result"]
                    except (aiohttp.ClientError, KeyError, ValueError):
                        continue
                    if result:
                        answers[q] = result
            assert set(answers) == set(queries), f"no answer for {set(queries) - set(answers)}"
            rules = await (await http.get("/api/v1/rules")).json()
            assert len(rules["data"]["groups"][0]["rules"]) == len(alert_exprs())
    finally:
        proc.terminate()
        await proc.wait()
        if health is not None:
            await health.cleanup()


# -- logs -----------------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every log line of the test, as the JSON a production process writes."""
    from shared.logging import configure_logging
    from shared.settings import LogFormat

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    buffer = io.StringIO()
    configure_logging("INFO", LogFormat.JSON, stream=buffer)
    yield buffer
    root.handlers, root.level = saved[0], saved[1]


async def test_job_log_lines_carry_their_ids_and_no_bodies_secrets_or_addresses(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, log_lines: io.StringIO
) -> None:
    smtp.rules["gone@example.org"] = Rule("550 5.1.1 <gone@example.org>: no such user")
    response = await client.post(
        "/api/batches",
        json={
            "recipients": ["ada.lovelace@example.org", "gone@example.org"],
            "subject": "Quarterly numbers",
            "body": "BODY-MARKER-7f3a the figures are attached",
        },
        headers={**AUTH, "X-Request-ID": "req-observability-1"},
    )
    assert response.status == 201
    batch_id = (await response.json())["id"]
    await drain(settings)
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines() if line.strip()]
    finished = [line for line in lines if line.get("event") == "email_finished"]
    assert len(finished) == 2
    for line in finished:
        assert {
            "job_id",
            "task",
            "attempt",
            "batch_id",
            "recipient_id",
            "request_id",
            "outcome",
            "duration_s",
        } <= set(line)
        assert line["batch_id"] == batch_id and line["request_id"] == "req-observability-1"
    assert sorted(line["outcome"] for line in finished) == ["dead", "sent"]
    chunks = [line for line in lines if line.get("event") == "job_finished"]
    assert [line["result"] for line in chunks if line["task"] == "send_chunk"] == ["dead=1 sent=1"]
    created = [line for line in lines if line.get("event") == "batch_created"]
    assert created and created[0]["request_id"] == "req-observability-1"
    text = log_lines.getvalue()
    assert "BODY-MARKER-7f3a" not in text
    assert "Quarterly numbers" not in text
    assert API_TOKEN not in text and "test-secret-key" not in text
    assert "ada.lovelace@example.org" not in text and "gone@example.org" not in text
    assert "g***@example.org" in text  # the SMTP error is logged, with the address masked


class _CrashingDrafter:
    """A bug whose exception text quotes the recipient's address and the batch's subject."""

    async def draft(self, recipient: Any) -> Any:
        raise RuntimeError(
            f"cannot draft {recipient.subject_template!r} for {recipient.email}"
            f" ({recipient.fields})"
        )


async def test_a_crash_logs_its_traceback_without_the_address_or_the_subject(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, log_lines: io.StringIO
) -> None:
    response = await client.post(
        "/api/batches",
        json={
            "recipients": [{"email": "ada.lovelace@example.org", "name": "NAME-MARKER-19c2"}],
            "subject": "Quarterly numbers",
            "body": "BODY-MARKER-7f3a",
        },
        headers=AUTH,
    )
    assert response.status == 201
    await drain(settings, drafters={"template": _CrashingDrafter()})
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines() if line.strip()]
    crashed = [line for line in lines if line.get("event") == "send_email_crashed"]
    assert len(crashed) == 1
    traceback = crashed[0]["exception"]
    assert "Traceback (most recent call last)" in traceback and "in draft" in traceback
    assert "RuntimeError: (message withheld" in traceback
    text = log_lines.getvalue()
    for secret in ("ada.lovelace@example.org", "Quarterly numbers", "NAME-MARKER-19c2"):
        assert secret not in text
    failed = [line for line in lines if line.get("event") == "email_attempt_failed"]
    assert failed[0]["error"].startswith("internal error: RuntimeError")
    assert smtp.received == []


def test_tracebacks_mask_addresses_and_show_messages_only_at_debug() -> None:
    from shared.logging import configure_logging
    from shared.settings import LogFormat

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        for level in ("INFO", "DEBUG"):
            buffer = io.StringIO()
            configure_logging(level, LogFormat.JSON, stream=buffer)
            # The data comes from variables: a traceback shows the source line that raised.
            address, subject = "ada@example.org", "Quarterly numbers"
            other = "grace.hopper@example.org"
            try:
                try:
                    raise KeyError(other)
                except KeyError as cause:
                    raise ValueError(f"subject {subject!r} for {address}") from cause
            except ValueError:
                logging.getLogger("mailroom.test").exception("stdlib_crash")
                structlog.get_logger("mailroom.test").exception("structlog_crash")
            lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
            assert [line["event"] for line in lines] == ["stdlib_crash", "structlog_crash"]
            for line in lines:
                traceback = line["exception"]
                assert "grace.hopper@" not in traceback and "ada@" not in traceback
                assert "direct cause" in traceback and "test_observability.py" in traceback
                if level == "DEBUG":
                    assert (
                        "ValueError: subject 'Quarterly numbers' for a***@example.org" in traceback
                    )
                    assert "KeyError: 'g***@example.org'" in traceback
                else:
                    assert "Quarterly numbers" not in traceback
                    assert "ValueError: (message withheld" in traceback
                    assert "KeyError: (message withheld" in traceback
    finally:
        root.handlers, root.level = saved[0], saved[1]
