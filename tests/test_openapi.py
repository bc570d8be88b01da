"""The API against its own OpenAPI document: schemathesis, with bounded examples.

The web tier runs as a real process (schemathesis calls it synchronously); every generated
request, valid or not, must get a documented response, never a 5xx.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import API_TOKEN, AUTH, make_settings
from tests.processes import ROOT, environment

pytestmark = pytest.mark.slow

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def web_base_url(pg_admin_uri: str, template_db: str) -> Iterator[str]:
    from psycopg import connect, sql

    from shared.embedded import database_uri

    name = f"mailroom_openapi_{os.getpid()}"
    with connect(pg_admin_uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = environment(make_settings(database_uri(pg_admin_uri, name), 25, web_port=port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "web"],
        env={**env, "MAILROOM_LOG_LEVEL": "WARNING"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/readyz", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=30)
    with connect(pg_admin_uri, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def test_the_api_answers_every_generated_request_as_documented(web_base_url: str) -> None:
    api = schemathesis.openapi.from_url(f"{web_base_url}/api/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 12
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case: Any) -> None:
            # Valid and invalid inputs alike: a documented status, the documented shape, no 5xx.
            # (Schema-valid data may still break business rules, such as a template that does
            # not parse, so "valid data is accepted" is not one of the checks.)
            case.call_and_validate(base_url=web_base_url, headers=AUTH, checks=CHECKS)

        check()


def test_the_document_is_served_and_covers_every_api_route(web_base_url: str) -> None:
    import json

    with urllib.request.urlopen(
        urllib.request.Request(
            f"{web_base_url}/api/openapi.json", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
    ) as response:
        spec = json.load(response)
    assert spec["openapi"].startswith("3.")
    documented = {path for path in spec["paths"] if path.startswith("/api/")}
    from web.app import create_app

    app = create_app(make_settings("postgresql://unused/x", 25))
    routes = {
        r.resource.canonical
        for r in app.router.routes()
        if r.resource is not None
        and r.resource.canonical.startswith("/api/")
        and r.method != "HEAD"
    }
    undocumented = routes - documented - {"/api/openapi.json", "/api/dev/messages"}
    assert not undocumented, f"routes missing from the OpenAPI document: {undocumented}"
