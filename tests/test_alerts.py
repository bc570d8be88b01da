"""The alert rules: their promtool unit tests, their runbook entries and links, and a real
Prometheus that sees them fire from real events in real processes."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from procrastinate.worker import Worker
from prometheus_client.parser import text_string_to_metric_families

from shared.metrics import WORKER_REGISTRY, render
from shared.settings import Settings
from tests.conftest import AUTH, drain, make_settings
from tests.processes import free_port, free_ports, prometheus_binary, start, wait_until
from tests.smtp_server import RecordingSMTPServer, Rule
from worker.main import worker_options, worker_runtime

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RUNBOOK = ROOT / "docs/runbook.md"
DASHBOARD = ROOT / "deploy/grafana/dashboards/mailroom.json"
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
PROBES = ("/metrics", "/healthz", "/readyz")
# Alerts that fire on the count of recent heartbeats, which lags a death by
# MAILROOM_STALLED_AFTER_SECONDS (30 s) before their for: starts.
HEARTBEAT_ALERTS = {"MailroomNoLiveWorker", "MailroomWorkerNotHeartbeating"}
RUNBOOK_URL = "{{ with $externalLabels.runbook_base }}{{ . }}/{{ end }}docs/runbook.md#"


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmailroom_[a-z0-9_]+\b", expr))


def published(text: str) -> set[str]:
    """Metric names in an exposition text, with each histogram's base name too."""
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return names | {n[: -len(s)] for n in names for s in HISTOGRAM_SUFFIXES if n.endswith(s)}


# -- the rules and their unit tests ----------------------------------------------------------------


@pytest.mark.slow
def test_the_promtool_unit_tests_pass() -> None:
    result = subprocess.run(
        [prometheus_binary("promtool"), "test", "rules", str(ALERTS_TEST)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet_and_on_missing_input_where_it_uses_absent() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    fires_without: dict[str, set[str]] = {}  # alert -> metric names of a firing case's input
    for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        inputs = {re.split(r"[{ ]", s["series"], maxsplit=1)[0] for s in group["input_series"]}
        for case in group["alert_rule_test"]:
            name = case["alertname"]
            if case.get("exp_alerts"):
                fires.add(name)
                assert all(a.get("exp_annotations") for a in case["exp_alerts"]), (
                    f"{name}: a firing case checks every annotation, so the summary is tested"
                )
                fires_without.setdefault(name, set()).update(inputs)
            else:
                quiet.add(name)
    alerts = {r["alert"] for r in rules()}
    assert len(alerts) == len(rules()), "alert names are unique"
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"
    for rule in rules():
        for metric in re.findall(r"absent\((\w+)", rule["expr"]):
            firing_inputs = [
                {re.split(r"[{ ]", s["series"], maxsplit=1)[0] for s in group["input_series"]}
                for group in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
                if any(
                    c["alertname"] == rule["alert"] and c.get("exp_alerts")
                    for c in group["alert_rule_test"]
                )
            ]
            assert any(metric not in inputs for inputs in firing_inputs), (
                f"{rule['alert']} uses absent({metric}) but no firing case lacks {metric}"
            )


def test_every_alert_has_a_runbook_entry_and_a_link_on_the_configurable_base() -> None:
    runbook = RUNBOOK.read_text()
    headings = re.findall(r"^## (\w+)$", runbook, flags=re.MULTILINE)
    assert headings == [r["alert"] for r in rules()], "one runbook entry per alert, in order"
    for rule in rules():
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["summary"].strip() and annotations["description"].strip()
        assert annotations["runbook_url"] == RUNBOOK_URL + rule["alert"].lower()
        assert rule["labels"]["severity"] in {"warning", "critical"}


def test_every_summary_names_the_delay_it_really_has() -> None:
    """A summary says the rule's ``for:`` and, where the input is a heartbeat, its staleness."""
    for rule in rules():
        summary = rule["annotations"]["summary"]
        wait = rule["for"]
        assert wait.endswith("m"), f"{rule['alert']}: for: in whole minutes"
        minutes = int(wait[:-1])
        spoken = f"{minutes} minute" + ("s" if minutes != 1 else "")
        assert spoken in summary, f"{rule['alert']}: summary does not say {spoken!r}: {summary}"
        if rule["alert"] in HEARTBEAT_ALERTS:
            assert "mailroom_workers_alive" in rule["expr"]
            assert "30 s" in summary, f"{rule['alert']}: heartbeat staleness not in the summary"


@pytest.mark.slow
def test_the_scrape_config_sets_the_runbook_base_and_passes_promtool() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    base = config["global"]["external_labels"]["runbook_base"]
    assert base.startswith("https://") and not base.endswith("/")
    assert config["rule_files"] == ["alerts.yml"]
    result = subprocess.run(
        [prometheus_binary("promtool"), "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_the_web_error_ratio_leaves_out_probes_and_scrapes_as_the_route_label_spells_them(
    client: TestClient,
) -> None:
    for path in PROBES:
        await client.get(path)
    text = await (await client.get("/metrics")).text()
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mailroom_http_requests_total"
    }
    assert set(PROBES) <= routes, routes
    (rule,) = [r for r in rules() if r["alert"] == "MailroomWebErrors"]
    selectors = re.findall(r"mailroom_http_requests_total\{([^}]*)\}", rule["expr"])
    assert len(selectors) == 2
    for selector in selectors:
        (pattern,) = re.findall(r'route!~"([^"]+)"', selector)
        assert set(pattern.split("|")) == set(PROBES), selector


async def test_every_alert_and_dashboard_query_uses_published_metrics(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await client.post(
        "/api/batches",
        json={"recipients": ["a@example.org"], "subject": "S", "body": "B"},
        headers=AUTH,
    )
    await drain(settings)
    # The test process runs the web app and a worker: what each tier's /metrics serves (the
    # pool series, which both publish, come with the web tier's). Per-worker series need a
    # registered worker, so one runs while the web tier is scraped.
    async with worker_runtime(settings) as (app, deps):
        worker = Worker(app=app, **worker_options(settings, deps, install_signal_handlers=False))
        running = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]
        try:
            await wait_until(
                lambda: asyncio.sleep(0, worker.worker_id is not None), 10, "the worker to register"
            )
            web_text = await (await client.get("/metrics")).text()
        finally:
            worker.stop()  # type: ignore[no-untyped-call]
            await running
    names = published(web_text) | published(render(WORKER_REGISTRY).decode())
    exprs = [r["expr"] for r in rules()] + dashboard_exprs()
    for expr in exprs:
        used = metric_names(expr)
        assert used or "up{" in expr, f"no Mailroom metric in {expr!r}"
        unknown = used - names
        assert not unknown, f"{expr!r} uses metrics nobody publishes: {unknown}"


# -- a real Prometheus against real processes ------------------------------------------------------


class Prometheus:
    """The HTTP API of a running Prometheus, as the test needs it."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self.http = http

    async def query(self, expr: str) -> list[dict[str, Any]]:
        async with self.http.get("/api/v1/query", params={"query": expr}) as response:
            body = await response.json()
        assert body["status"] == "success", f"{expr!r}: {body}"
        return list(body["data"]["result"])

    async def holds(self, expr: str) -> bool:
        """Whether ``expr`` has a result now (False while Prometheus is not up yet)."""
        try:
            return bool(await self.query(expr))
        except aiohttp.ClientError:
            return False

    async def firing(self) -> dict[str, list[dict[str, Any]]]:
        try:
            async with self.http.get("/api/v1/alerts") as response:
                alerts = (await response.json())["data"]["alerts"]
        except aiohttp.ClientError:
            return {}
        out: dict[str, list[dict[str, Any]]] = {}
        for alert in alerts:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert)
        return out

    async def wait_firing(self, name: str, timeout_seconds: float) -> list[dict[str, Any]]:
        async def fires() -> bool:
            return name in await self.firing()

        await wait_until(fires, timeout_seconds, f"{name} to fire")
        return (await self.firing())[name]

    async def metric_names(self) -> set[str]:
        async with self.http.get("/api/v1/label/__name__/values") as response:
            return set((await response.json())["data"])


def fast_rules(path: Path) -> Path:
    """alerts.yml with every ``for:`` cut to 1 s, so a test sees in seconds what takes
    minutes in production; the expressions are the real ones."""
    data = yaml.safe_load(ALERTS.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            rule["for"] = "1s"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def grafana_expr(expr: str) -> str:
    """A panel's query as Grafana sends it for a short range scraped every 2 s (a rate window
    of several scrapes, so one slow scrape does not empty it)."""
    for variable, value in (("$__rate_interval", "30s"), ("$__interval", "2s"), ("$__range", "1m")):
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.slow
async def test_a_real_prometheus_fires_the_alerts_from_real_failures_and_killed_workers(
    database_url: str, smtp: RecordingSMTPServer, tmp_path: Path
) -> None:
    """``mailroom web`` and two ``mailroom worker`` processes, scraped every 2 s by Debian's
    Prometheus with the real rules (``for:`` cut to 1 s, evaluated every second) and a worker
    presumed dead after 2 s of silence (MAILROOM_STALLED_AFTER_SECONDS, the minimum). Half of a
    batch is refused with 550, then one worker and the other are SIGKILLed."""
    prometheus_path = prometheus_binary("prometheus")
    web_port, first_worker_port = free_port(), free_ports(2)
    worker_ports = (first_worker_port, first_worker_port + 1)  # instance N: base port + N
    settings = make_settings(
        database_url,
        smtp.port,
        web_port=web_port,
        metrics_port=first_worker_port - 1,
        stalled_after_seconds=2,
        sweep_interval_seconds=1,
    )
    good = [f"good{i}@example.org" for i in range(20)]
    bad = [f"bad{i}@example.org" for i in range(20)]
    for address in bad:
        smtp.rules[address] = Rule("550 5.1.1 no such user")

    prom_port = free_port()
    config = {
        "global": {
            # A scrape gets 2 s: on a loaded machine the web tier's queue queries can take
            # longer than 1 s, and a timed-out scrape reads as a target down.
            "scrape_interval": "2s",
            "scrape_timeout": "2s",
            "evaluation_interval": "1s",
            "external_labels": {"runbook_base": "https://runbooks.test/mailroom"},
        },
        "rule_files": [str(fast_rules(tmp_path / "alerts.yml"))],
        "scrape_configs": [
            {
                "job_name": "mailroom-web",
                "static_configs": [{"targets": [f"127.0.0.1:{web_port}"]}],
            },
            {
                "job_name": "mailroom-worker",
                "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in worker_ports]}],
            },
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "processes.log"
    procs = [
        await start(settings, "web", log_path=log),
        await start(settings, "worker", "--instance", "1", log_path=log),
        await start(settings, "worker", "--instance", "2", log_path=log),
    ]
    worker1, worker2 = procs[1:]
    prom = await asyncio.create_subprocess_exec(
        prometheus_path,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with (
            aiohttp.ClientSession(f"http://127.0.0.1:{prom_port}") as prom_http,
            aiohttp.ClientSession(f"http://127.0.0.1:{web_port}") as web_http,
        ):
            p = Prometheus(prom_http)
            # Both workers scraped and heartbeating, their counters seen at 0 before any send.
            for ready in (
                'count(up{job="mailroom-worker"} == 1) == 2',
                "max(mailroom_workers_alive) == 2",
                'count(mailroom_emails_sent_total{job="mailroom-worker"}) == 2',
            ):
                await wait_until(lambda q=ready: p.holds(q), 60, ready)
            worker_alerts = {
                "MailroomWorkerDown",
                "MailroomWorkerNotHeartbeating",
                "MailroomNoLiveWorker",
                "MailroomHighFailureRatio",
                "MailroomDeadLetters",
            }

            async def healthy() -> bool:
                return not worker_alerts & set(await p.firing())

            await wait_until(healthy, 15, "no worker or failure alert while all is well")

            created = await web_http.post(
                "/api/batches",
                json={"recipients": good + bad, "subject": "Hi", "body": "Half bounce"},
                headers=AUTH,
            )
            assert created.status == 201, await created.text()
            (ratio,) = await p.wait_firing("MailroomHighFailureRatio", 30)
            assert ratio["annotations"]["description"] == (
                "50% of attempts failed in the last 5 minutes."
            )
            assert ratio["annotations"]["runbook_url"] == (
                "https://runbooks.test/mailroom/docs/runbook.md#mailroomhighfailureratio"
            )
            await p.wait_firing("MailroomDeadLetters", 30)

            # Every panel's query parses and, where its metrics exist, shows a value.
            panels = json.loads(DASHBOARD.read_text())["panels"]
            needed = {
                n for panel in panels for t in panel["targets"] for n in metric_names(t["expr"])
            }

            async def all_scraped() -> bool:
                return needed <= await p.metric_names()

            # On a loaded machine a scrape can time out: give every series a few scrapes.
            await wait_until(all_scraped, 30, "every metric a panel reads to be scraped")
            for panel in panels:
                for target in panel["targets"]:
                    expr = grafana_expr(target["expr"])
                    # A rate needs two scrapes of a series that may have just appeared.
                    await wait_until(
                        functools.partial(p.holds, expr), 20, f"{panel['title']!r} to show data"
                    )
            async with prom_http.get("/api/v1/rules") as response:
                (group,) = (await response.json())["data"]["groups"]
            assert len(group["rules"]) == len(rules())
            for rule in group["rules"]:
                assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

            worker1.send_signal(signal.SIGKILL)
            await worker1.wait()
            (down,) = await p.wait_firing("MailroomWorkerDown", 30)
            assert down["labels"]["instance"] == f"127.0.0.1:{worker_ports[0]}"
            assert down["annotations"]["runbook_url"] == (
                "https://runbooks.test/mailroom/docs/runbook.md#mailroomworkerdown"
            )
            firing = set(await p.firing())
            assert "MailroomNoLiveWorker" not in firing and (
                "MailroomWorkerNotHeartbeating" not in firing
            ), "a killed worker is MailroomWorkerDown's alone while another lives"

            worker2.send_signal(signal.SIGKILL)
            await worker2.wait()
            await p.wait_firing("MailroomNoLiveWorker", 30)
            assert len((await p.firing())["MailroomWorkerDown"]) == 2
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        prom.terminate()
        await prom.wait()
