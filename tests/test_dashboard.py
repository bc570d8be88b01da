"""The Grafana dashboard, checked as JSON: Grafana itself is not installed here, so its layout,
datasource, units and expressions are held to rules a reader can check (the live test in
tests/test_alerts.py evaluates every expression against a real Prometheus)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/dashboards/mailroom.json"
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml"
SCHEMA_VERSION = 39  # what Grafana 10.4 and 11.0 write; deploy/README.md says so
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
UNITS = {"short", "none", "s", "percentunit", "reqps", "cps"}
# Series the web tier's collector emits on every scrape that reaches PostgreSQL (at 0 when
# there is nothing to count): an empty sum of these means "not collected", not 0.
COLLECTOR_METRICS = {
    "mailroom_queue_jobs",
    "mailroom_oldest_ready_job_age_seconds",
    "mailroom_recipients",
    "mailroom_workers_alive",
    "mailroom_jobs_orphaned",
    "mailroom_worker_heartbeat_age_seconds",
    "mailroom_maintenance_last_success_timestamp_seconds",
}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def targets() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in dashboard()["panels"] for t in p["targets"]]


def test_queue_depth_comes_first_for_both_queues() -> None:
    first, second = dashboard()["panels"][:2]
    for panel, queue in ((first, "emails"), (second, "maintenance")):
        assert panel["gridPos"]["y"] == 0
        (target,) = panel["targets"]
        assert target["expr"] == f'sum by (status) (mailroom_queue_jobs{{queue="{queue}"}})'


def test_the_layout_is_well_formed() -> None:
    data = dashboard()
    assert data["schemaVersion"] == SCHEMA_VERSION
    assert data["uid"] == "mailroom"
    panels = data["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "panel titles are unique (the runbook names them)"
    occupied: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in {"timeseries", "stat"}, p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]


def test_every_panel_reads_the_provisioned_datasource_through_the_variable() -> None:
    data = dashboard()
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert [d["type"] for d in provisioned] == ["prometheus"], "the variable finds exactly it"
    for panel, target in targets():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert target["datasource"] == DATASOURCE, panel["title"]
        assert target["expr"].strip() and target["legendFormat"], panel["title"]


def test_every_unit_fits_what_the_panel_shows() -> None:
    for panel in dashboard()["panels"]:
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert unit in UNITS, f"{panel['title']}: unit {unit!r}"
        exprs = [t["expr"] for t in panel["targets"]]
        if any("histogram_quantile" in e or "_seconds" in e for e in exprs):
            expected = "s"
        elif any(" / " in e for e in exprs):
            expected = "percentunit"
        elif all("rate(mailroom_http_requests_total" in e for e in exprs):
            expected = "reqps"
        elif all(re.search(r"\brate\(", e) for e in exprs):
            expected = "cps"
        elif "collector_up" in exprs[0]:
            expected = "none"
        else:
            expected = "short"
        assert unit == expected, f"{panel['title']}: unit {unit!r}, expected {expected!r}"


def test_a_sum_that_can_be_empty_shows_zero_instead_of_no_data() -> None:
    """One series summed over every target (or counted) is empty when no target has the series
    yet (no worker scraped, a counter never moved): ``or vector(0)`` makes that a 0. The
    collector's series are the exception: empty means not collected, and 0 would lie."""
    for panel, target in targets():
        expr = target["expr"]
        single = re.match(r"(sum|count|max)\((?!.*\bby\b)", expr) and "histogram" not in expr
        names = set(re.findall(r"mailroom_[a-z_]+", expr))
        from_collector = bool(names) and names <= COLLECTOR_METRICS
        if single and not from_collector:
            assert expr.endswith(" or vector(0)"), f"{panel['title']}: {expr}"


def test_the_dashboard_shows_every_series_on_call_needs() -> None:
    covered = " ".join(t["expr"] for _, t in targets())
    for needed in (
        'queue="emails"',
        'queue="maintenance"',
        "mailroom_oldest_ready_job_age_seconds",
        "mailroom_recipients_enqueued_total",
        "mailroom_emails_sent_total",
        "mailroom_email_failures_total",
        "mailroom_smtp_failures_total",
        "mailroom_dead_letters_total",
        "mailroom_job_retries_total",
        "mailroom_job_queue_wait_seconds_bucket",
        "mailroom_smtp_send_seconds_bucket",
        "mailroom_http_request_duration_seconds_bucket",
        "mailroom_llm_request_seconds_bucket",
        "mailroom_llm_tokens_total",
        "mailroom_workers_alive",
        'up{job="mailroom-worker"}',
        "mailroom_worker_concurrency",
        "mailroom_worker_busy_slots",
        "mailroom_smtp_slowed_down",
        "mailroom_smtp_concurrency_limit",
        "mailroom_db_pool_connections",
        "mailroom_db_pool_max_connections",
        "mailroom_jobs_orphaned",
        "mailroom_worker_heartbeat_age_seconds",
        "mailroom_maintenance_last_success_timestamp_seconds",
        "mailroom_collector_up",
        "mailroom_http_requests_total",
        "mailroom_smtp_relay_up",
        "mailroom_bounce_findings_total",
        "mailroom_bounce_poll_failures_total",
        "mailroom_webhook_events_total",
        "mailroom_webhook_requests_total",
    ):
        assert needed in covered, f"the dashboard shows nothing of {needed}"
    (latency,) = [p for p in dashboard()["panels"] if p["title"] == "HTTP latency"]
    assert [t["legendFormat"] for t in latency["targets"]] == ["p50", "p95", "p99"]


def test_every_panel_the_runbook_names_exists() -> None:
    """The runbook names a panel as ``the *Title* panel``; no other mention of a panel."""
    runbook = (ROOT / "docs/runbook.md").read_text()
    titles = {p["title"] for p in dashboard()["panels"]}
    named = [" ".join(n.split()) for n in re.findall(r"\*([^*]+)\*\s+panel", runbook)]
    assert len(named) > 10
    assert set(named) - titles == set(), "the runbook names panels the dashboard lacks"
    mentions = len(re.findall(r"\bpanels?\b", runbook))
    assert mentions == len(named), "every mention of a panel names it as *Title* panel"


def test_the_deployment_guide_names_the_grafana_versions_of_the_schema() -> None:
    guide = " ".join((ROOT / "deploy/README.md").read_text().replace("**", "").split())
    assert f"schemaVersion {SCHEMA_VERSION}" in guide
