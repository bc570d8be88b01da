"""Deployment files: compose, systemd units and the Dockerfile, checked by their own tools,
and the processes the units start, run as written against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import compose
import pytest

from shared.settings import Settings, env_name
from tests.conftest import API_TOKEN
from tests.processes import ROOT, environment, free_port, free_ports, wait_until
from tests.smtp_server import RecordingSMTPServer

UNITS = ROOT / "deploy/systemd"
COMPOSE_BINARY = Path(compose.__file__).parent / "docker-compose"
UNIT_BINARY = "/opt/mailroom/venv/bin/mailroom"


def compose_config(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MAILROOM_", "POSTGRES_", "GRAFANA_"))
    }
    return subprocess.run(
        [
            str(COMPOSE_BINARY),
            "-f",
            str(ROOT / "docker-compose.yml"),
            *args,
            "config",
            "--format",
            "json",
        ],
        env={**base, "MAILROOM_ENV_FILE": str(ROOT / ".env.example"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    result = compose_config("--env-file", str(ROOT / ".env.example"), "--profile", "dev")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)["services"])


def test_compose_has_every_service_with_its_health_check(services: dict[str, Any]) -> None:
    assert set(services) >= {
        "postgres",
        "migrate",
        "web",
        "worker",
        "prometheus",
        "grafana",
        "mailpit",
    }
    for name in ("postgres", "web", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["postgres"]["image"].startswith("postgres:17")
    assert any(
        v["target"] == "/var/lib/postgresql/data" and v["type"] == "volume"
        for v in services["postgres"]["volumes"]
    )
    assert "readyz" in " ".join(services["web"]["healthcheck"]["test"])
    assert services["web"]["ports"]
    assert services["mailpit"]["profiles"] == ["dev"]


def test_compose_orders_start_up_through_a_successful_migration(services: dict[str, Any]) -> None:
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("web", "worker"):
        assert (
            services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        )


def test_compose_workers_are_replicated_and_get_more_time_to_stop_than_their_grace(
    services: dict[str, Any],
) -> None:
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 2
    grace = Settings(_env_file=None).shutdown_grace_seconds  # type: ignore[call-arg]
    assert _seconds(worker["stop_grace_period"]) > grace
    assert worker["stop_signal"] == "SIGTERM"


def test_compose_mounts_the_monitoring_configuration(services: dict[str, Any]) -> None:
    sources = {
        v["source"]
        for s in ("prometheus", "grafana")
        for v in services[s]["volumes"]
        if v["type"] == "bind"
    }
    assert str(ROOT / "deploy/prometheus") in sources
    assert str(ROOT / "deploy/grafana/provisioning") in sources
    assert str(ROOT / "deploy/grafana/dashboards") in sources
    assert (
        services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        == "change-me-grafana-password"
    )


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD"])
def test_compose_refuses_to_run_without_each_password(missing: str, tmp_path: Path) -> None:
    # An env file with every password but one: compose must name the one that is missing.
    given = {"POSTGRES_PASSWORD": "pg-secret", "GRAFANA_ADMIN_PASSWORD": "gf-secret"}
    del given[missing]
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in given.items()))
    result = compose_config("--env-file", str(env_file))
    assert result.returncode != 0
    assert f"required variable {missing} is missing a value" in result.stderr, result.stderr


def test_env_example_documents_every_setting() -> None:
    text = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^#?\s*(MAILROOM_[A-Z0-9_]+)=", text, flags=re.MULTILINE))
    expected = {env_name(field) for field in Settings.model_fields}
    assert expected <= documented, f"undocumented: {sorted(expected - documented)}"
    assert not re.search(r"(?i)password=(?!change-me)\S", text), "no real secrets in the example"


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, text
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


# -- systemd ----------------------------------------------------------------------------------


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's directives (a directive may repeat)."""
    directives: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


@pytest.mark.slow
def test_every_unit_passes_systemd_analyze_verify_without_a_word(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing (Debian's systemd package)")
    # verify checks that ExecStart exists: point the units at this checkout's mailroom.
    installed = Path(sys.executable).parent / "mailroom"
    for path in UNITS.glob("*.service"):
        (tmp_path / path.name).write_text(path.read_text().replace(UNIT_BINARY, str(installed)))
    shutil.copy(tmp_path / "mailroom-worker@.service", tmp_path / "mailroom-worker@1.service")
    names = sorted(p.name for p in tmp_path.glob("*.service"))
    assert names == [
        "mailroom-migrate.service",
        "mailroom-web.service",
        "mailroom-worker@.service",
        "mailroom-worker@1.service",
    ]
    result = subprocess.run(
        [analyze, "verify", *(f"./{n}" for n in names)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout + result.stderr
    )


@pytest.mark.parametrize("name", ["mailroom-web.service", "mailroom-worker@.service"])
def test_long_running_units_restart_stop_gracefully_and_are_hardened(name: str) -> None:
    d = unit(name)
    assert d["EnvironmentFile"] == ["/etc/mailroom/mailroom.env"]
    assert d["Restart"] == ["on-failure"] and d["KillSignal"] == ["SIGTERM"]
    assert "mailroom-migrate.service" in " ".join(
        d["After"]
    ) and "network-online.target" in " ".join(d["After"])
    assert d["Environment"] == ["MAILROOM_LOG_FORMAT=json"]
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert d[key] == [value], key
    grace = Settings(_env_file=None).shutdown_grace_seconds  # type: ignore[call-arg]
    assert _seconds(d["TimeoutStopSec"][0]) > grace


def test_the_migration_unit_is_a_oneshot() -> None:
    d = unit("mailroom-migrate.service")
    assert d["Type"] == ["oneshot"] and d["RemainAfterExit"] == ["yes"]
    assert d["ExecStart"] == [f"{UNIT_BINARY} migrate"]


# -- Dockerfile -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_image_is_multi_stage_non_root_and_healthchecked() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.MULTILINE)) == 2
    assert re.search(r"^USER (?!root|0\b)\S+", text, flags=re.MULTILINE)
    assert "HEALTHCHECK" in text and 'ENTRYPOINT ["mailroom"]' in text
    assert "--no-dev" in text  # no test dependencies in the image


def test_the_image_copies_every_package_the_project_ships() -> None:
    text = (ROOT / "Dockerfile").read_text()
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, flags=re.MULTILINE))
    assert copied == set(shipped)


# -- the processes the units start ---------------------------------------------------------------


def exec_start(name: str, instance: str = "") -> list[str]:
    line = unit(name)["ExecStart"][0].replace("%i", instance)
    argv = shlex.split(line)
    assert argv[0] == UNIT_BINARY
    return [sys.executable, "-m", "mailroom", *argv[1:]]


@pytest.mark.slow
async def test_migrate_web_and_three_workers_as_the_units_start_them_deliver_a_batch_once(
    pg_admin_uri: str, smtp: RecordingSMTPServer, tmp_path: Path
) -> None:
    from mailroom.embedded import ensure_database
    from tests.conftest import _drop_database, make_settings

    database = f"deploy_{os.getpid()}_{int(time.time())}"
    url = await asyncio.to_thread(ensure_database, pg_admin_uri, database)
    web_port, first_metrics_port = free_port(), free_ports(3)
    # Instance N listens on MAILROOM_METRICS_PORT + N: three free ports in a row.
    settings = make_settings(url, smtp.port, web_port=web_port, metrics_port=first_metrics_port - 1)
    env = {**environment(settings), "MAILROOM_WEB_HOST": "127.0.0.1"}
    # EnvironmentFile= and Environment= of the units, as systemd would pass them.
    env.update(dict(line.split("=", 1) for line in unit("mailroom-worker@.service")["Environment"]))

    migrate = await asyncio.to_thread(
        subprocess.run,
        exec_start("mailroom-migrate.service"),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stderr
    log = (tmp_path / "services.log").open("wb")
    procs = [
        await asyncio.create_subprocess_exec(
            *exec_start("mailroom-web.service"), env=env, cwd=ROOT, stdout=log, stderr=log
        )
    ]
    for instance in ("1", "2", "3"):
        procs.append(
            await asyncio.create_subprocess_exec(
                *exec_start("mailroom-worker@.service", instance),
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=log,
            )
        )
    recipients = [f"unit{i}@example.org" for i in range(60)]
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{web_port}") as http:
            await wait_until(lambda: _ok(http, "/readyz"), 30)
            for instance in (1, 2, 3):  # each instance on its own metrics port
                port = settings.metrics_port + instance
                async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as worker_http:
                    try:
                        await wait_until(
                            lambda h=worker_http: _ok(h, "/healthz"), 60, f"worker {instance}"
                        )
                    except AssertionError as exc:
                        log.flush()
                        tail = (tmp_path / "services.log").read_text(errors="replace")[-4000:]
                        raise AssertionError(f"{exc}; the services said:\n{tail}") from None
            created = await http.post(
                "/api/batches",
                json={"recipients": recipients, "subject": "Hi", "body": "Sent by three workers"},
                headers={"Authorization": f"Bearer {API_TOKEN}"},
            )
            assert created.status == 201
            status_url = (await created.json())["status_url"]

            async def done() -> bool:
                r = await http.get(status_url, headers={"Authorization": f"Bearer {API_TOKEN}"})
                return bool((await r.json())["counts"]["sent"] == len(recipients))

            await wait_until(done, 60)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 40) for p in procs]
        log.close()
        _drop_database(pg_admin_uri, database)
    assert codes == [0, 0, 0, 0], (tmp_path / "services.log").read_text()[-3000:]
    assert smtp.to_addresses() == {address: 1 for address in recipients}


async def _ok(http: aiohttp.ClientSession, path: str) -> bool:
    try:
        async with http.get(path) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False
