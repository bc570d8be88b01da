"""How a batch's messages are written: a sender name, a Reply-To, and a Markdown body.

The message bytes are read back with the stdlib's parser; hostile names and addresses are
refused where they come in (the API, the form, the settings) and again by ``build_message``.
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import re
from email.message import EmailMessage
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.settings import Settings
from shared.templating import UNSUBSCRIBE_MARKER
from tests.conftest import AUTH, drain, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_markdown import _tags
from tests.test_message_bytes import assert_well_formed
from tests.test_pages import login
from worker.failures import PermanentFailure
from worker.smtp import build_message

SENDER = "news@example.org"
URL = "https://mail.example.org/u/QWRh_QGV4-YW1wbGUub3Jn.x"
MARKDOWN = (
    "Dear **Ada**,\n\nread [the report](https://example.org/r?a=1&b=2) or https://example.org/b."
)


def _message(**overrides: Any) -> EmailMessage:
    values: dict[str, Any] = {
        "sender": SENDER,
        "to": "ada@example.com",
        "subject": "Hello",
        "body": "Hi.\n",
        "message_id": "<mailroom.b.1@example.org>",
    }
    values.update(overrides)
    data = build_message(**values).data
    assert_well_formed(data)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _from(message: EmailMessage) -> tuple[str, str]:
    """The From header's display name as RFC 2047 decodes it, and its address.

    The stdlib's structured parser puts a space between two encoded words of one display name
    (RFC 2047 6.2 says whitespace between them is ignored), so the name is decoded from the
    raw header here; the address and the header's shape come from that parser.
    """
    (address,) = message["From"].addresses
    raw = "".join(_raw_from(message).split("\r\n"))
    phrase, _, _ = raw.rpartition(" <")
    if phrase.startswith('"'):
        name = email.utils.parseaddr(raw)[0]
    else:
        name = str(email.header.make_header(email.header.decode_header(phrase)))
    return name, address.addr_spec


def _raw_from(message: EmailMessage) -> str:
    for key, value in message.raw_items():
        if key == "From":
            return str(value).strip()
    raise AssertionError("no From header")


def _parts(message: EmailMessage) -> tuple[str, str]:
    text, markup = (str(part.get_content()).replace("\r\n", "\n") for part in message.iter_parts())
    return text, markup


# -- the From header ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "Mailroom News",
        'Ann "the" O\'Brien, Ltd.',
        "Back\\slash; <angle> (comment) @ here",
        "Zoë Café — 東京 🎉",
        "=?utf-8?q?looks_encoded?=",
        "runs   of  spaces",
        "n" * 100,
        "é" * 100,
    ],
)
def test_a_sender_name_reads_back_exactly_with_the_address(name: str) -> None:
    assert _from(_message(from_name=name)) == (name, SENDER)


def test_an_ascii_name_is_a_quoted_string_and_a_non_ascii_one_encoded_words() -> None:
    plain = build_message(
        sender=SENDER, to="a@example.com", subject="S", body="", message_id="<a@b>",
        from_name='Ann "A", Ltd',
    ).data  # fmt: skip
    assert b'\r\nFrom: "Ann \\"A\\", Ltd" <news@example.org>\r\n' in b"\r\n" + plain
    encoded = build_message(
        sender=SENDER, to="a@example.com", subject="S", body="", message_id="<a@b>",
        from_name="Zoë",
    ).data  # fmt: skip
    assert encoded.startswith(b"From: =?utf-8?q?Zo=C3=AB?= <news@example.org>\r\n")


def test_without_a_name_the_from_header_is_the_address_alone() -> None:
    message = _message()
    assert message["From"] == SENDER
    assert "Reply-To" not in message


_NAME_TEXT = st.text(st.characters(codec="utf-8"), max_size=120)


@given(_NAME_TEXT)
@example("Ann\r\nBcc: victim@example.org")
@example("ltr\u202emoc.elgoog")
@settings(max_examples=300, deadline=None)
def test_any_name_is_refused_or_read_back_exactly(name: str) -> None:
    try:
        message = _message(from_name=name)
    except PermanentFailure as exc:
        assert str(exc).startswith("unsafe header: From")
        return
    if name:
        assert _from(message) == (name, SENDER)
    else:
        assert message["From"] == SENDER
    assert set(message.keys()) == {"From", "To", "Subject", "Date", "Message-ID"} | {
        "MIME-Version",
        "Content-Type",
    }


@pytest.mark.parametrize(
    ("name", "character"),
    [
        ("Ann\r\nBcc: victim@example.org", "U+000D"),
        ("Ann\nBcc: victim@example.org", "U+000A"),
        ("Ann\0", "U+0000"),
        ("Ann\tTab", "U+0009"),
        ("Ann\x85", "U+0085"),
        ("Ann\u2028", "U+2028"),
        ("gro.elpmaxe@\u202enna", "U+202E"),
        ("Ann\u2066isolated\u2069", "U+2066"),
    ],
)
def test_build_message_refuses_a_name_that_could_add_a_header_or_disguise_itself(
    name: str, character: str
) -> None:
    with pytest.raises(PermanentFailure, match=rf"unsafe header: From .*{re.escape(character)}"):
        _message(from_name=name)


def test_build_message_refuses_a_name_too_long_blank_or_padded() -> None:
    with pytest.raises(PermanentFailure, match="at most 100 characters"):
        _message(from_name="n" * 101)
    with pytest.raises(PermanentFailure, match="must not be blank"):
        _message(from_name="   ")
    with pytest.raises(PermanentFailure, match="must not start or end with a space"):
        _message(from_name=" News")


# -- Reply-To -----------------------------------------------------------------------------------


def test_reply_to_is_one_address_the_parser_reads_back() -> None:
    message = _message(from_name="News", reply_to="replies@example.org")
    (address,) = message["Reply-To"].addresses
    assert address.addr_spec == "replies@example.org" and not address.display_name


@pytest.mark.parametrize(
    ("reply_to", "error"),
    [
        ("a@example.org\r\nBcc: victim@example.org", "unsafe header: Reply-To"),
        ("a@example.org\u2028", "unsafe header: Reply-To"),
        ("a@example.org, b@example.org", "Reply-To is not a single address"),
        ("Ann <a@example.org>", "Reply-To is not a single address"),
        ("not an address", "Reply-To is not a single address"),
    ],
)
def test_build_message_refuses_a_reply_to_that_is_not_one_address(
    reply_to: str, error: str
) -> None:
    with pytest.raises(PermanentFailure, match=error):
        _message(reply_to=reply_to)


# -- Markdown bodies ----------------------------------------------------------------------------


def test_a_markdown_body_makes_html_with_markup_and_text_with_each_link_after_its_text() -> None:
    text, markup = _parts(_message(body=MARKDOWN, body_format="markdown"))
    assert "<strong>Ada</strong>" in markup
    assert '<a href="https://example.org/r?a=1&amp;b=2"' in markup
    assert '<a href="https://example.org/b"' in markup
    assert markup.startswith("<!doctype html>\n<html><body>\n")
    assert text == (
        "Dear Ada,\n\nread the report (https://example.org/r?a=1&b=2) or https://example.org/b.\n"
    )


def test_a_plain_text_body_stays_as_written() -> None:
    text, markup = _parts(_message(body=MARKDOWN))
    assert text == MARKDOWN
    assert "<strong>" not in markup and "**Ada**" in markup


def test_a_markdown_body_gets_the_unsubscribe_footer_in_both_parts() -> None:
    message = _message(body=MARKDOWN, body_format="markdown", unsubscribe_url=URL)
    text, markup = _parts(message)
    assert text.endswith(f"\n\n--\nTo stop receiving these emails: {URL}\n")
    assert f'<a href="{URL}">unsubscribe</a>.</p>\n</body></html>' in markup
    assert message["List-Unsubscribe"] == f"<{URL}>"


def test_a_markdown_link_to_the_unsubscribe_url_is_the_recipients_link_and_no_footer() -> None:
    body = f"[Unsubscribe]({UNSUBSCRIBE_MARKER}) or paste {UNSUBSCRIBE_MARKER}"
    text, markup = _parts(_message(body=body, body_format="markdown", unsubscribe_url=URL))
    assert text == f"Unsubscribe ({URL}) or paste {URL}\n"
    assert f'<a href="{URL}" rel="noopener noreferrer">Unsubscribe</a>' in markup
    assert f"or paste <a href='{URL}'>{URL}</a>" in markup
    assert "To stop receiving" not in text + markup and "%" not in text + markup


def test_a_markdown_body_that_loses_the_link_in_rendering_gets_the_footer() -> None:
    body = f"Hi.\n\n[unused]: {UNSUBSCRIBE_MARKER}\n"
    text, markup = _parts(_message(body=body, body_format="markdown", unsubscribe_url=URL))
    assert text.endswith(f"To stop receiving these emails: {URL}\n")
    assert f'<a href="{URL}">unsubscribe</a>' in markup


def test_recipient_markup_in_a_markdown_body_is_shown_never_run() -> None:
    body = "Hi <script>alert(1)</script> [x](javascript:alert(1)) <img src=x onerror=alert(1)>"
    _, markup = _parts(_message(body=body, body_format="markdown"))
    assert {tag for tag, _ in _tags(markup)} == {"html", "body", "p"}
    assert "&lt;script&gt;" in markup and "&lt;img" in markup


def test_an_unknown_body_format_is_refused() -> None:
    with pytest.raises(PermanentFailure, match="unknown body format"):
        _message(body_format="html")


# -- the API and the form -----------------------------------------------------------------------


async def _post(client: TestClient, **fields: Any) -> Any:
    payload = {"recipients": ["ada@example.org"], "subject": "Hi", "body": "**Hi**", **fields}
    return await client.post("/api/batches", json=payload, headers=AUTH)


async def test_the_api_stores_the_format_name_and_reply_to_on_the_batch(
    client: TestClient, settings: Settings
) -> None:
    response = await _post(
        client, body_format="markdown", from_name=" Zoë's News ", reply_to="Replies@Example.ORG"
    )
    assert response.status == 201, await response.text()
    rows = await query(
        settings.database_url or "", "SELECT body_format, from_name, reply_to FROM batches"
    )
    assert rows == [("markdown", "Zoë's News", "Replies@example.org")]
    created = await response.json()
    shown = await (await client.get(created["status_url"], headers=AUTH)).json()
    assert (shown["body_format"], shown["from_name"], shown["reply_to"]) == (
        "markdown",
        "Zoë's News",
        "Replies@example.org",
    )
    await _post(client, from_name="", reply_to="")
    rows = await query(
        settings.database_url or "",
        "SELECT body_format, from_name, reply_to FROM batches ORDER BY created_at DESC LIMIT 1",
    )
    assert rows == [("text", None, None)]


@pytest.mark.parametrize(
    ("fields", "field", "fragment"),
    [
        ({"from_name": "News\r\nBcc: victim@example.org"}, "from_name", "U+000D"),
        ({"from_name": "News\n"}, "from_name", "U+000A (line feed)"),
        ({"from_name": "News\0"}, "from_name", "U+0000 (NUL)"),
        ({"from_name": "gro.elpmaxe\u202e"}, "from_name", "U+202E (right-to-left override)"),
        ({"from_name": "n" * 101}, "from_name", "at most 100"),
        ({"from_name": 7}, "from_name", "string"),
        ({"reply_to": "a@example.org, b@example.org"}, "reply_to", "one email address"),
        ({"reply_to": "Ann <a@example.org>"}, "reply_to", "one email address"),
        ({"reply_to": "a@example.org\r\nBcc: b@example.org"}, "reply_to", "U+000D"),
        ({"body_format": "html"}, "body_format", "markdown"),
    ],
)
async def test_the_api_refuses_a_hostile_name_or_reply_to_naming_the_field(
    client: TestClient, settings: Settings, fields: dict[str, Any], field: str, fragment: str
) -> None:
    response = await _post(client, **fields)
    assert response.status == 422, await response.text()
    problems = (await response.json())["error"]["details"]["problems"]
    assert [p["field"] for p in problems] == [field]
    assert fragment in problems[0]["message"]
    assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [(0,)]


async def test_the_form_offers_the_format_and_sends_name_and_reply_to(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    page = await (await client.get("/")).text()
    assert 'name="body_format" value="markdown"' in page
    assert 'name="from_name"' in page and 'name="reply_to"' in page
    form = {
        "csrf_token": csrf,
        "recipients": "ada@example.org",
        "subject": "Hi",
        "body": "**Hi**",
        "body_format": "markdown",
        "from_name": "News\u202e",
        "reply_to": "a@example.org, b@example.org",
    }
    refused = await client.post("/batches", data=form, allow_redirects=False)
    assert refused.status == 422
    text = await refused.text()
    assert "U+202E (right-to-left override)" in text and "one email address" in text
    assert 'value="markdown" checked' in text  # the choice survives the error
    form.update(from_name="News", reply_to="replies@example.org")
    created = await client.post("/batches", data=form, allow_redirects=False)
    assert created.status == 303, await created.text()
    rows = await query(
        settings.database_url or "", "SELECT body_format, from_name, reply_to FROM batches"
    )
    assert rows == [("markdown", "News", "replies@example.org")]


# -- through a real worker ----------------------------------------------------------------------


async def test_a_markdown_batch_arrives_with_its_sender_name_and_reply_to(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    response = await _post(
        client,
        recipients=[{"email": "ada@example.org", "name": "Ada <b>"}],
        subject="News for {{ name }}",
        body="Dear **{{ name }}**,\n\nsee [the report](https://example.org/r).",
        body_format="markdown",
        from_name='Zoë "News", Ltd',
        reply_to="replies@example.org",
    )
    assert response.status == 201, await response.text()
    # The settings' name and Reply-To are the defaults; the batch's own win.
    await drain(
        settings.model_copy(update={"from_name": "Setting", "reply_to": "setting@example.org"})
    )
    (received,) = smtp.received
    message = received.message
    assert received.mail_from == "sender@example.com"
    (sender,) = message["From"].addresses
    assert (sender.display_name, sender.addr_spec) == ('Zoë "News", Ltd', "sender@example.com")
    assert message["Reply-To"] == "replies@example.org"
    text, markup = _parts(message)
    assert text.startswith("Dear Ada <b>,\n\nsee the report (https://example.org/r).\n")
    assert "<strong>Ada &lt;b&gt;</strong>" in markup
    assert '<a href="https://example.org/r" rel="noopener noreferrer">the report</a>' in markup
    assert "<b>" not in markup


async def test_a_batch_without_a_name_or_reply_to_uses_the_settings(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    assert (await _post(client)).status == 201
    await drain(
        settings.model_copy(update={"from_name": "Mailroom", "reply_to": "setting@example.org"})
    )
    (received,) = smtp.received
    assert received.message["From"] == "Mailroom <sender@example.com>"
    assert received.message["Reply-To"] == "setting@example.org"
    text, _ = _parts(received.message)
    assert text.startswith("**Hi**")  # plain text unless the batch asks for Markdown
