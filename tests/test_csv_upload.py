"""Uploading recipients as a CSV through the form."""

from __future__ import annotations

import io

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from shared.settings import Settings
from tests.conftest import drain, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_pages import login


def form(csrf: str, csv_bytes: bytes, **fields: str) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("csrf_token", csrf)
    for name, value in {
        "recipients": "",
        "subject": "Hello {{ name }}",
        "body": "Hi {{ name }} at {{ company }}",
        **fields,
    }.items():
        data.add_field(name, value)
    data.add_field("csv", io.BytesIO(csv_bytes), filename="people.csv", content_type="text/csv")
    return data


async def test_a_csv_with_a_header_row_becomes_recipients_with_fields(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    csrf = await login(client)
    csv_bytes = (
        b"\xef\xbb\xbfEmail,name,company\n"
        b"ada@example.org,Ada,Analytical Engines\n"
        b"\n"
        b'"grace@example.org","Grace, RDML",Navy\n'
    )
    response = await client.post("/batches", data=form(csrf, csv_bytes), allow_redirects=False)
    assert response.status == 303, await response.text()
    await drain(settings)
    subjects = sorted(r.message["Subject"] for r in smtp.received)
    assert subjects == ["Hello Ada", "Hello Grace, RDML"]
    body = next(r for r in smtp.received if r.rcpt_tos == ["ada@example.org"]).message.get_body(
        ("plain",)
    )
    assert "Hi Ada at Analytical Engines" in body.get_content()  # type: ignore[union-attr]


async def test_bad_csv_lines_are_named_by_line_and_nothing_is_written(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    csv_bytes = (
        b"email,name,company\n"
        b"ok@example.org,Ok,Co\n"
        b"not-an-address,Bad,Co\n"
        b"short@example.org,Short\n"
        b"<script>alert(1)</script>@x,Evil,<img src=x onerror=alert(1)>\n"
    )
    response = await client.post("/batches", data=form(csrf, csv_bytes))
    assert response.status == 422
    page = await response.text()
    assert all(f"CSV file, line {n}:" in page for n in (3, 4, 5))
    assert "CSV file, line 2:" not in page
    assert "<script>alert(1)</script>" not in page and "<img src=x" not in page
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


@pytest.mark.parametrize(
    ("csv_bytes", "fragment"),
    [
        (b"", "the file is empty"),
        (b"name,company\nAda,Co\n", "needs an &#34;email&#34; column"),
        (b"email,first name\na@example.org,Ada\n", "column names must be"),
        (b"email,name,Name\na@example.org,A,B\n", "column names repeat"),
    ],
)
async def test_a_bad_header_is_refused_clearly(
    client: TestClient, settings: Settings, csv_bytes: bytes, fragment: str
) -> None:
    csrf = await login(client)
    response = await client.post("/batches", data=form(csrf, csv_bytes, subject="S", body="B"))
    assert response.status == 422
    assert fragment in await response.text()
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_an_oversized_csv_is_a_clear_413(client: TestClient, settings: Settings) -> None:
    csrf = await login(client)
    big = b"email\n" + b"x@example.org\n" * (settings.max_upload_bytes // 14 + 10)
    response = await client.post("/batches", data=form(csrf, big, subject="S", body="B"))
    assert response.status == 413
    assert "larger than 5 MB" in await response.text()
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_a_csv_that_is_not_utf8_is_refused(client: TestClient) -> None:
    csrf = await login(client)
    response = await client.post(
        "/batches", data=form(csrf, b"email\n\xff\xfe@example.org\n", subject="S", body="B")
    )
    assert response.status == 400
    assert "UTF-8" in await response.text()
