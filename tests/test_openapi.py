"""The API against its own OpenAPI document: schemathesis, with bounded examples.

The web tier runs as a real process (schemathesis calls it synchronously); every generated
request, valid or not, must get a documented response, never a 5xx.

schemathesis generates what the document allows a client to write, as text. Attackers and
broken proxies also send raw bytes: non-ASCII header values, bodies that are not UTF-8, JSON
nested a thousand deep. The tests at the end send those, by hand and by hypothesis, through a
raw client (``tests/raw_http.py``) to every route of the application, pages included, and
allow anything but a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from shared.unsubscribe import make_token
from tests import raw_http
from tests.conftest import API_TOKEN, AUTH, make_settings
from tests.processes import ROOT, environment

pytestmark = pytest.mark.slow

METRICS_TOKEN = "scrape-me"

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def web_base_url(pg_admin_uri: str, template_db: str) -> Iterator[str]:
    from psycopg import connect, sql

    from mailroom.embedded import database_uri

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
    sendgrid_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    # Every webhook on, so the hostile requests below reach their handlers, not a 404.
    webhooks = {
        "MAILROOM_SES_TOPIC_ARNS": "arn:aws:sns:us-east-1:123456789012:ses-feedback",
        "MAILROOM_POSTMARK_WEBHOOK_CREDENTIALS": "postmark:hook-secret",
        "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY": base64.b64encode(
            sendgrid_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        ).decode(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailroom", "web"],
        env={
            **env,
            "MAILROOM_LOG_LEVEL": "WARNING",
            "MAILROOM_METRICS_TOKEN": METRICS_TOKEN,
            # The hostile requests below send many wrong tokens on purpose; a lock-out would
            # turn the rest into 429s and test nothing.
            "MAILROOM_LOGIN_ATTEMPTS_PER_MINUTE": "10000",
            **webhooks,
        },
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


def test_the_document_is_served_to_anyone(web_base_url: str) -> None:
    with urllib.request.urlopen(f"{web_base_url}/api/openapi.json") as response:
        spec = json.load(response)
    assert spec["openapi"].startswith("3.")
    assert spec["paths"]["/api/batches"]["post"]["requestBody"]


def test_the_document_describes_exactly_the_routes_of_the_api() -> None:
    from web.app import create_app
    from web.openapi import document

    app = create_app(make_settings("postgresql://unused/x", 25))
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and (
            route.resource.canonical.startswith("/api/")
            or route.resource.canonical in {"/healthz", "/readyz", "/metrics"}
        )
    }
    documented = {
        (method.upper(), path)
        for path, operations in document()["paths"].items()
        for method in operations
    }
    assert served - documented == set(), "routes missing from the document"
    assert documented - served == set(), "documented operations no route serves"


def test_provider_webhooks_are_served_but_are_not_part_of_the_document() -> None:
    from web.app import create_app
    from web.openapi import document

    app = create_app(make_settings("postgresql://unused/x", 25))
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/webhooks/")
    }
    assert served == {
        ("POST", "/webhooks/ses"),
        ("POST", "/webhooks/postmark"),
        ("POST", "/webhooks/sendgrid"),
    }
    assert not [path for path in document()["paths"] if path.startswith("/webhooks/")]


def test_every_schema_the_document_refers_to_is_in_it() -> None:
    from web.openapi import document

    spec = document()
    referred = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert referred <= set(spec["components"]["schemas"])
    assert "$defs" not in json.dumps(spec)


def test_every_paged_list_has_the_same_envelope() -> None:
    from web.openapi import document

    schemas = document()["components"]["schemas"]
    pages = {name: schema for name, schema in schemas.items() if name.endswith("Page")}
    assert set(pages) == {"RecipientPage", "DeadLetterPage", "SuppressionPage", "AuditEntryPage"}
    for schema in pages.values():
        (items,) = set(schema["properties"]) - {"next_after"}
        assert schema["required"] == [items, "next_after"]
        assert schema["properties"]["next_after"] == {
            "anyOf": [{"type": "integer"}, {"type": "null"}],
            "title": "Next After",
        }


# -- raw bytes, every route -------------------------------------------------------------------

NO_BATCH = "00000000-0000-0000-0000-000000000000"
DEEP_JSON = b"[" * 1000 + b"]" * 1000
HOSTILE_JSON = [
    b"\xff\xfe\x00",
    DEEP_JSON,
    b'{"a":' * 1000 + b"1" + b"}" * 1000,
    b'{"subject": "\\ud800", "body": "\\udfff", "recipients": ["a\\ud800@example.org"],'
    b' "addresses": ["\\udc80@example.org"], "batch_id": "\\ud800", "reason": "\\ud800"}',
    b'{"recipients": [{"email": "a@example.org", "n": NaN}], "subject": "s", "body": "b"}',
    b'{"ids": [1e400], "recipients": [{"email": "a@example.org", "x": 1e999}]}',
    b'{"ids": [' + b"9" * 5000 + b"]}",
    b"\xef\xbb\xbf{}",
    b'{"subject": "\xed\xa0\x80"}',
    b"[]",
    b"null",
]
HOSTILE_FORMS = [
    b"csrf_token=\xff&token=\xff\xfe&next=/\xc3",
    b"csrf_token=%FF&token=%ED%A0%80&next=/%09/evil.example&recipients=%00",
]
HOSTILE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"X-Request-ID", b"\xff\xfe"),
    (b"Idempotency-Key", b"\xff"),
    (b"X-Forwarded-For", b"\xff, \xc3\xa9"),
    (b"X-Forwarded-For", b"[::1"),
    (b"X-Forwarded-Proto", b"\xff"),
    (b"X-CSRF-Token", b"\xff\xfe"),
    (b"Accept", b"\xff/\xfe"),
    (b"Accept-Encoding", b"\xff"),
    (b"Origin", b"http://\xff"),
    (b"Referer", b"\xff"),
    (b"If-Modified-Since", b"\xff"),
    (b"Range", b"bytes=\xff-"),
    (b"\xff-Header", b"value"),
]
HOSTILE_AUTH: list[bytes] = [
    b"Bearer \xff",
    b"\xff\xfe",
    b"Bearer " + API_TOKEN.encode() + b"\xff",
    b"Basic \xc3\xa9",
    b"Bearer " + b"x" * 8000,
]
HOSTILE_COOKIES: list[bytes] = [
    b"mailroom_session=\xff.\xff",
    b"mailroom_session=\xc3\xa9.\xc3\xa9",
    b"mailroom_session=e30.\xff",
    b"\xff=\xff; mailroom_session=\xff",
    b"mailroom_session=" + b"A" * 4000 + b".",
]
HOSTILE_TARGETS = [
    b"/api/batches/%FF",
    b"/api/batches/%ED%A0%80/recipients?status=%FF&limit=%ED%A0%80&after=1e400",
    b"/api/dead-letters?batch_id=%FF&limit=%00",
    b"/api/suppressions?after=%FF",
    b"/u/%FF%FE",
    b"/u/%ED%A0%80.%00",
    b"/dev/mail/%ED%A0%80",
    b"/login?next=%FF%FE",
    b"/login?next=/%09/evil.example",
    b"/batches/%00/recipients/%FF/edit",
    b"/static/%FF",
    b"/static/..%2F..%2Fpyproject.toml",
    b"/metrics?x=%FF",
    b"/webhooks/%FF",
    b"/webhooks/ses?%ED%A0%80",
]


def _app_routes() -> list[tuple[str, str]]:
    """Every (method, path template) the application serves, pages and public routes too."""
    from web.app import create_app

    app = create_app(make_settings("postgresql://unused/x", 25))
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None or route.method in {"HEAD", "*"}:
            continue
        path = resource.canonical
        found.add((route.method, "/static/app.css" if path.startswith("/static") else path))
    return sorted(found)


class Target:
    """A running web process, with the ids and the session that reach deep into handlers."""

    def __init__(self, base_url: str) -> None:
        url = URL(base_url)
        self.host, self.port = str(url.host), int(url.port or 80)
        self.cookie = b""
        self.csrf = ""
        self.ids = {
            "batch_id": NO_BATCH,
            "recipient_id": "1",
            "key": "x",
            "token": "x",
            "token_id": "1",
        }

    async def setup(self) -> None:
        created = await self.send(
            "POST",
            b"/api/batches",
            [
                (b"Authorization", b"Bearer " + API_TOKEN.encode()),
                (b"Content-Type", b"application/json"),
            ],
            json.dumps(
                {"recipients": ["a@example.org"], "subject": "S", "body": "B", "send": False}
            ).encode(),
        )
        assert created.status == 201, created.body
        batch_id = json.loads(created.body)["id"]
        recipients = await self.send(
            "GET",
            f"/api/batches/{batch_id}/recipients".encode(),
            [(b"Authorization", b"Bearer " + API_TOKEN.encode())],
        )
        self.ids["batch_id"] = batch_id
        self.ids["recipient_id"] = str(json.loads(recipients.body)["recipients"][0]["id"])
        self.ids["token"] = make_token("a@example.org", sender="x@example.org", secret=SECRET)
        login = await self.send(
            "POST",
            b"/login",
            [(b"Content-Type", b"application/x-www-form-urlencoded")],
            f"token={API_TOKEN}&next=/".encode(),
        )
        assert login.status == 303, login.body
        cookie = login.header("Set-Cookie") or ""
        self.cookie = cookie.split(";", 1)[0].encode()
        page = await self.send("GET", b"/", [(b"Cookie", self.cookie)])
        match = re.search(rb'name="csrf_token" value="([^"]+)"', page.body)
        assert match, page.body[:500]
        self.csrf = match.group(1).decode()

    def path(self, template: str) -> bytes:
        return re.sub(r"\{([^}]+)\}", lambda m: self.ids[m.group(1)], template).encode()

    async def send(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
    ) -> raw_http.RawResponse:
        return await raw_http.request(self.host, self.port, method, target, headers, body)

    def bearer(self) -> list[tuple[bytes, bytes]]:
        return [(b"Authorization", b"Bearer " + API_TOKEN.encode())]

    def session(self) -> list[tuple[bytes, bytes]]:
        return [(b"Cookie", self.cookie), (b"X-CSRF-Token", self.csrf.encode())]


def _hostile_requests(target: Target) -> list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]]:
    """Every route with every hostile part: headers, credentials, bodies; then odd targets."""
    json_type = [(b"Content-Type", b"application/json")]
    form_type = [(b"Content-Type", b"application/x-www-form-urlencoded")]
    csrf = f"csrf_token={target.csrf}&".encode()
    cases = []
    for method, template in _app_routes():
        path = target.path(template)
        auths = [target.bearer(), target.session()]
        for header in HOSTILE_HEADERS:
            cases += [(method, path, [*auth, header], b"") for auth in auths]
        cases += [(method, path, [(b"Authorization", value)], b"") for value in HOSTILE_AUTH]
        cases += [(method, path, [(b"Cookie", value)], b"") for value in HOSTILE_COOKIES]
        cases += [
            (method, path, [(b"Authorization", b"Bearer " + METRICS_TOKEN.encode() + b"\xff")], b"")
        ]
        if method in {"GET", "DELETE"}:
            continue
        for body in HOSTILE_JSON:
            cases += [(method, path, auth + json_type, body) for auth in auths]
        for body in HOSTILE_FORMS:
            cases.append((method, path, target.session() + form_type, body))
            cases.append((method, path, target.session() + form_type, csrf + body))
        for content_type in [
            b"application/json; charset=\xff",
            b"application/x-www-form-urlencoded; charset=no-such-charset",
            b"multipart/form-data; boundary=\xff",
            b"multipart/form-data",
            b"\xff/\xfe",
        ]:
            cases.append((method, path, [*target.session(), (b"Content-Type", content_type)], csrf))
        multipart = (
            b'--X\r\nContent-Disposition: form-data; name="csrf_token"\r\n\r\n'
            + target.csrf.encode()
            + b'\r\n--X\r\nContent-Disposition: form-data; name="csv"; filename="\xff.csv"\r\n'
            b"Content-Type: text/csv\r\n\r\nemail\r\n\xff\xfe@example.org\r\n"
            b'--X\r\nContent-Disposition: form-data; name="subject"\r\n\r\n\xff\r\n--X--\r\n'
        )
        cases.append(
            (
                method,
                path,
                [*target.session(), (b"Content-Type", b"multipart/form-data; boundary=X")],
                multipart,
            )
        )
    for raw_target in HOSTILE_TARGETS:
        for auth in ([], target.bearer(), target.session()):
            cases.append(("GET", raw_target, auth, b""))
            cases.append(("POST", raw_target, auth + json_type, DEEP_JSON))
    return cases


async def test_no_route_answers_5xx_to_raw_hostile_bytes(web_base_url: str) -> None:
    target = Target(web_base_url)
    await target.setup()
    cases = _hostile_requests(target)
    assert len(cases) > 1000
    # A well-formed logout among them ends the session the others use: send those last.
    cases.sort(key=lambda case: case[1] == b"/logout")
    failures = []
    for method, path, headers, body in cases:
        response = await target.send(method, path, headers, body)
        if response.status >= 500:
            failures.append(
                (method, path, headers, body[:80], response.status, response.body[:200])
            )
    assert not failures, f"{len(failures)} of {len(cases)} requests got a 5xx: {failures[:5]}"


_HEADER_NAMES = [
    b"Authorization",
    b"Cookie",
    b"X-CSRF-Token",
    b"Content-Type",
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Request-ID",
    b"Idempotency-Key",
    b"Accept",
]
_HEADER_VALUE = st.binary(min_size=1, max_size=60).filter(
    lambda b: not (set(b) & {0, 10, 13}) and b[:1] not in (b" ", b"\t")
)


def test_random_header_bytes_and_bodies_never_get_a_5xx(web_base_url: str) -> None:
    target = Target(web_base_url)
    asyncio.run(target.setup())
    routes = _app_routes()

    @given(
        route=st.sampled_from(routes),
        name=st.sampled_from(_HEADER_NAMES),
        value=_HEADER_VALUE,
        with_session=st.booleans(),
        content_type=st.sampled_from(
            [b"application/json", b"application/x-www-form-urlencoded", b"text/plain"]
        ),
        body=st.binary(max_size=200) | st.sampled_from(HOSTILE_JSON),
    )
    @settings(
        max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(
        route: tuple[str, str],
        name: bytes,
        value: bytes,
        with_session: bool,
        content_type: bytes,
        body: bytes,
    ) -> None:
        method, template = route
        auth = target.session() if with_session else target.bearer()
        headers = [h for h in auth if h[0].lower() != name.lower()]
        headers += [(b"Content-Type", content_type), (name, value)]
        if name.lower() == b"content-type":
            headers = [h for h in headers if h != (b"Content-Type", content_type)]
        response = asyncio.run(target.send(method, target.path(template), headers, body))
        assert response.status < 500, (method, template, name, value, body[:80], response.body)

    check()


SECRET = "test-secret-key"  # make_settings' MAILROOM_SECRET_KEY
