"""Reading captured mail: decoded parts, links that survive soft line breaks, search, paging."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from web.captured_mail import MAX_LINKS, CapturedMail
from worker.smtp import build_message

UNSUBSCRIBE = "https://mail.example.com/unsubscribe/" + "t" * 120


def _file(mail: CapturedMail, name: str, content: bytes, mtime: float) -> None:
    path = mail.directory / "new" / name
    path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def _worker_message(to: str, subject: str, body: str) -> bytes:
    return build_message(
        sender="sender@example.com",
        to=to,
        subject=subject,
        body=body,
        message_id="<1.abc@example.com>",
        unsubscribe_url=UNSUBSCRIBE,
    ).data


@pytest.fixture
def mail(tmp_path: Path) -> CapturedMail:
    return CapturedMail(tmp_path / "mail")


def test_a_quoted_printable_message_reads_as_its_text_with_its_links_whole(
    mail: CapturedMail,
) -> None:
    body = "Ünïcödé greetings. Read https://example.org/a/very/long/path/" + "x" * 90 + " today."
    _file(mail, "1.M1.host", _worker_message("ann@example.org", "Grüße", body), 1_700_000_000)

    view = mail.view("1.M1.host")

    assert view is not None
    assert view.summary.subject == "Grüße"
    assert view.text is not None and "Ünïcödé greetings." in view.text
    assert "=C3" not in view.text  # decoded, not quoted-printable
    assert view.html is not None and "Ünïcödé" in view.html
    # Quoted-printable splits long lines with soft breaks; the links come out whole.
    assert "https://example.org/a/very/long/path/" + "x" * 90 in view.links
    assert UNSUBSCRIBE in view.links
    assert ("Subject", "Grüße") in view.headers


def test_only_http_links_are_offered_whatever_the_html_says(mail: CapturedMail) -> None:
    message = (
        b"Subject: links\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        b'<a href="javascript:alert(1)">x</a><a href="data:text/html,hi">y</a>'
        b'<a href=" https://ok.example/path ">z</a><a href="HTTP://UPPER.example/">u</a>'
        + b"".join(b'<a href="https://e.example/%d">n</a>' % i for i in range(MAX_LINKS + 50))
    )
    _file(mail, "2.M1.host", message, 1_700_000_000)

    view = mail.view("2.M1.host")

    assert view is not None and view.text is None
    assert view.links[:2] == ["https://ok.example/path", "HTTP://UPPER.example/"]
    assert not any(link.lower().startswith(("javascript:", "data:")) for link in view.links)
    assert len(view.links) == MAX_LINKS


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\xff\xfe\x00garbage",
        b"Subject: x\r\nContent-Type: text/plain; charset=no-such-charset\r\n\r\nhello\r\n",
        b"Subject: x\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n",
        b"Content-Type: multipart/alternative; boundary=\r\n\r\n--\r\n",
        b"Subject: =?utf-8?b?////?=\r\nTo: <@>\r\n\r\n\xc3(",
    ],
)
def test_a_message_that_is_garbage_is_still_shown(mail: CapturedMail, content: bytes) -> None:
    _file(mail, "3.M1.host", content, 1_700_000_000)

    view = mail.view("3.M1.host")

    assert view is not None
    assert mail.page().total == 1


def test_a_key_that_is_not_a_plain_name_is_not_read(mail: CapturedMail, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(b"Subject: outside\r\n\r\n")
    assert mail.view("../../secret") is None
    assert mail.view("no-such-key") is None


def test_search_pages_and_deletes(mail: CapturedMail) -> None:
    for i in range(30):
        to = f"user{i}@{'example.org' if i % 3 else 'other.net'}"
        _file(mail, f"{i}.M1.host", _worker_message(to, f"Issue {i}", "b"), 1_700_000_000 + i)

    first = mail.page(limit=10)
    assert first.total == 30 and [m.subject for m in first.messages][:2] == ["Issue 29", "Issue 28"]
    last = mail.page(offset=25, limit=10)
    assert len(last.messages) == 5 and last.messages[-1].subject == "Issue 0"

    other = mail.page("OTHER.NET", limit=4)
    assert other.total == 10 and len(other.messages) == 4
    assert all(m.to[0].endswith("@other.net") for m in other.messages)
    assert mail.page("issue 7").total == 1
    assert mail.page("nothing like it").total == 0

    assert mail.delete_all() == 30
    assert mail.page().total == 0


def test_mailto_and_list_unsubscribe_links_are_offered_and_linked_in_the_text(
    mail: CapturedMail,
) -> None:
    message = build_message(
        sender="sender@example.com",
        to="ann@example.org",
        subject="Hi",
        body="Write to us, or see https://ok.example/a.",
        message_id="<4.abc@example.com>",
        unsubscribe_url=UNSUBSCRIBE,
        unsubscribe_mailto="leave@example.com",
    ).data
    _file(mail, "4.M1.host", message, 1_700_000_000)

    view = mail.view("4.M1.host")

    assert view is not None
    assert view.links[:1] == ["https://ok.example/a"]
    assert {UNSUBSCRIBE, "mailto:leave@example.com?subject=unsubscribe"} <= set(view.links)
    parts = view.text_parts()
    assert ("https://ok.example/a", "https://ok.example/a") in parts
    assert (".", None) not in parts[:1] and "".join(p for p, _ in parts) == view.text
