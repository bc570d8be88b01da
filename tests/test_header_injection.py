"""Header injection: a character that can end a header line is refused where it comes in.

Recipient data often comes from public web forms, so every recipient field is hostile. The API,
the form (pasted lines and CSV cells), the rendered subject, an edited draft, the worker's
template drafter and the settings all refuse such characters with a message that names the
field and the position; ``build_message`` refusing the message at send time is only the last
line of defence. The property tests check that, whatever the text, a delivered message
carries no header Mailroom did not write.
"""

from __future__ import annotations

import email
import email.policy
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from shared.db import Database, NewBatch, NewRecipient
from shared.settings import ConfigError, Settings, load_settings
from tests.conftest import AUTH, drain, query
from tests.smtp_server import RecordingSMTPServer
from tests.test_api import _nothing_written
from tests.test_pages import login

# Characters that end a line somewhere (VT, FF, FS, NEL, LS), or are controls (DEL, NUL).
GARBAGE = ["\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\x7f", "\x00"]
ATTACK = "Reply-To : attacker@evil.example"


def code(char: str) -> str:
    return f"U+{ord(char):04X}"


async def post(client: TestClient, payload: dict[str, Any]) -> aiohttp.ClientResponse:
    return await client.post("/api/batches", json=payload, headers=AUTH)


async def problems_of(response: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    assert response.status == 422, await response.text()
    error = (await response.json())["error"]
    assert error["code"] == "invalid_batch"
    return list(error["details"]["problems"])


OUR_HEADERS = Counter(
    ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
)
UNSUBSCRIBE_HEADERS = Counter(["List-Unsubscribe", "List-Unsubscribe-Post"])


def assert_only_our_headers(raw: bytes, *, unsubscribe: bool) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    expected = OUR_HEADERS + (UNSUBSCRIBE_HEADERS if unsubscribe else Counter())
    assert Counter(message.keys()) == expected, raw[:2000]
    for part in message.iter_parts():
        assert set(part.keys()) == {"Content-Type", "Content-Transfer-Encoding"}
    return message


# -- the one definition ---------------------------------------------------------------------------


def test_the_definition_is_every_control_del_the_line_separators_and_surrogates() -> None:
    from shared.headers import describe_character, find_unsafe, header_pattern, unsafe_message
    from worker import smtp

    documented = {*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *range(0xD800, 0xE000)}
    refused = {c for c in range(0x110000) if find_unsafe(chr(c)) is not None}
    assert refused == documented
    in_subject = {c for c in documented if find_unsafe(chr(c), allow_tab=True) is not None}
    assert in_subject == documented - {0x09}
    # The message builder's last check is the same rule.
    assert smtp._UNSAFE_IN_TEXT is header_pattern(allow_tab=True)
    assert smtp._UNSAFE_IN_TOKEN is header_pattern(allow_tab=False)
    assert describe_character("\x0c") == "U+000C (form feed)"
    assert describe_character("\x85") == "U+0085 (next line)"
    assert describe_character("\udc00") == "U+DC00 (lone surrogate)"
    assert unsafe_message("Hi Bob\x0cReply-To: x") == (
        "character U+000C (form feed) at position 7 is not allowed in an email header"
    )
    assert unsafe_message("a\tb") is not None and unsafe_message("a\tb", allow_tab=True) is None


# -- the API --------------------------------------------------------------------------------------


# A lone surrogate never gets this far from JSON: the body reader refuses it, naming the field
# (tests/test_hostile_input.py::test_a_lone_surrogate_is_422_naming_the_field).
@pytest.mark.parametrize("char", GARBAGE)
async def test_a_recipient_field_the_subject_reads_is_refused_by_position(
    client: TestClient, settings: Settings, char: str
) -> None:
    response = await post(
        client,
        {
            "recipients": [
                {"email": "ok@example.org", "name": "Ok"},
                {"email": "a@example.org", "name": f"Bob{char}{ATTACK}"},
            ],
            "subject": "Hi {{ name }}",
            "body": "Hello",
        },
    )
    problems = await problems_of(response)
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem["field"], problem["position"]) == ("recipients", 1)
    assert "field 'name'" in problem["message"]
    assert f"character {code(char)}" in problem["message"]
    assert "at position 4 " in problem["message"]
    assert "attacker" not in problem["message"], "the hostile value is not echoed"
    await _nothing_written(settings)


# A lone surrogate never gets this far from JSON: the body reader refuses it, naming the field
# (tests/test_hostile_input.py::test_a_lone_surrogate_is_422_naming_the_field).
@pytest.mark.parametrize("char", GARBAGE)
async def test_a_subject_template_with_such_a_character_is_refused(
    client: TestClient, settings: Settings, char: str
) -> None:
    response = await post(
        client, {"recipients": ["a@example.org"], "subject": f"Hi{char}{ATTACK}", "body": "B"}
    )
    problems = await problems_of(response)
    subject = [p for p in problems if p["field"] == "subject"]
    assert subject, problems
    assert f"character {code(char)}" in subject[0]["message"]
    assert "at position 3 " in subject[0]["message"]
    await _nothing_written(settings)


async def test_the_rendered_subject_is_checked_for_every_recipient(
    client: TestClient, settings: Settings
) -> None:
    # Numbers are not text, and both recipients have the same fields: only rendering each
    # recipient's subject shows that the second one's makes a form feed.
    response = await post(
        client,
        {
            "recipients": [
                {"email": "a@example.org", "n": 65},
                {"email": "b@example.org", "n": 12},
                {"email": "c@example.org", "n": 66},
            ],
            "subject": "Code {{ '%c' % n }}",
            "body": "B",
        },
    )
    problems = await problems_of(response)
    assert [(p["field"], p.get("position")) for p in problems] == [("recipients", 1)]
    message = problems[0]["message"]
    assert message.startswith("b@example.org: the rendered subject: character U+000C")
    assert "at position 6 " in message
    await _nothing_written(settings)


async def test_a_template_that_writes_a_control_character_is_refused(
    client: TestClient, settings: Settings
) -> None:
    # No control character in the template's text: the string literal's escape makes one.
    response = await post(
        client,
        {"recipients": ["a@example.org"], "subject": 'Hi {{ "\\x0b" }}Bcc: x', "body": "B"},
    )
    problems = await problems_of(response)
    assert problems[0]["position"] == 0
    assert (
        "the rendered subject: character U+000B (vertical tab) at position 4"
        in (problems[0]["message"])
    )
    await _nothing_written(settings)


@pytest.mark.parametrize("char", GARBAGE)
async def test_an_address_with_such_a_character_inside_is_refused(
    client: TestClient, settings: Settings, char: str
) -> None:
    response = await post(
        client, {"recipients": [f"a{char}b@example.org"], "subject": "S", "body": "B"}
    )
    problems = await problems_of(response)
    assert (problems[0]["field"], problems[0]["position"]) == ("recipients", 0)
    await _nothing_written(settings)


async def test_fields_the_subject_does_not_read_may_hold_any_text(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    # Only the body uses "address": it is quoted-printable in a MIME part, never a header.
    response = await post(
        client,
        {
            "recipients": [{"email": "a@example.org", "address": "1 Main St\x0cFloor 2\x85"}],
            "subject": "Hi",
            "body": "Your address: {{ address }}",
        },
    )
    assert response.status == 201, await response.text()
    await drain(settings)
    assert len(smtp.received) == 1
    assert_only_our_headers(smtp.received[0].raw, unsubscribe=False)


# -- the form: pasted lines and CSV cells ---------------------------------------------------------


@pytest.mark.parametrize("char", GARBAGE)
async def test_the_form_refuses_a_pasted_address_with_such_a_character(
    client: TestClient, settings: Settings, char: str
) -> None:
    csrf = await login(client)
    response = await client.post(
        "/batches",
        data={
            "csrf_token": csrf,
            "recipients": f"bad{char}one@example.org\nbroken\nfine@example.org",
            "subject": "S",
            "body": "B",
        },
    )
    assert response.status == 422
    page = await response.text()
    # Lines are counted as the browser shows them: the character does not start a new one.
    assert "Recipients, line 1:" in page and "Recipients, line 2:" in page
    assert "Recipients, line 3:" not in page
    await _nothing_written(settings)


@pytest.mark.parametrize("char", GARBAGE)
async def test_the_form_refuses_a_subject_with_such_a_character(
    client: TestClient, settings: Settings, char: str
) -> None:
    csrf = await login(client)
    response = await client.post(
        "/batches",
        data={
            "csrf_token": csrf,
            "recipients": "a@example.org",
            "subject": f"Hi{char}{ATTACK}",
            "body": "B",
        },
    )
    assert response.status == 422
    page = await response.text()
    assert f"character {code(char)}" in page and "at position 3 " in page
    await _nothing_written(settings)


@pytest.mark.parametrize("char", GARBAGE)
async def test_a_csv_cell_the_subject_reads_is_refused_by_line(
    client: TestClient, settings: Settings, char: str
) -> None:
    csrf = await login(client)
    data = aiohttp.FormData()
    for name, value in {
        "csrf_token": csrf,
        "recipients": "",
        "subject": "Hello {{ name }}",
        "body": "Hi {{ name }}",
    }.items():
        data.add_field(name, value)
    cells = f"email,name\nok@example.org,Ok\nbob@example.org,Bob{char}{ATTACK}\n"
    data.add_field(
        "csv", io.BytesIO(cells.encode()), filename="people.csv", content_type="text/csv"
    )
    response = await client.post("/batches", data=data)
    assert response.status == 422
    page = await response.text()
    assert "CSV file, line 3:" in page and "CSV file, line 2:" not in page
    assert "field &#39;name&#39;" in page
    assert f"character {code(char)}" in page and "at position 4 " in page
    await _nothing_written(settings)


# -- an edited draft ------------------------------------------------------------------------------


async def _drafted(client: TestClient, settings: Settings) -> tuple[str, int]:
    response = await post(
        client,
        {"recipients": ["a@example.org"], "subject": "Original", "body": "B", "send": False},
    )
    assert response.status == 201, await response.text()
    batch_id = (await response.json())["id"]
    await drain(settings)
    rows = await query(settings.database_url or "", "SELECT id, status FROM recipients")
    assert rows[0][1] == "drafted"
    return batch_id, rows[0][0]


# A lone surrogate never gets this far from JSON: the body reader refuses it, naming the field
# (tests/test_hostile_input.py::test_a_lone_surrogate_is_422_naming_the_field).
@pytest.mark.parametrize("char", GARBAGE)
async def test_an_edited_subject_with_such_a_character_is_refused(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, char: str
) -> None:
    batch_id, recipient_id = await _drafted(client, settings)
    response = await client.patch(
        f"/api/batches/{batch_id}/recipients/{recipient_id}",
        json={"subject": f"Hi Bob{char}{ATTACK}", "body": "Edited"},
        headers=AUTH,
    )
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "invalid_draft"
    assert error["message"].startswith(f"subject: character {code(char)}")
    assert "at position 7 " in error["message"]
    draft = await query(settings.database_url or "", "SELECT subject, body FROM recipients")
    assert draft == [("Original", "B")]
    sent = await client.post(f"/api/batches/{batch_id}/send", headers=AUTH)
    assert sent.status == 200
    await drain(settings)
    assert [r.message["Subject"] for r in smtp.received] == ["Original"]


async def test_an_edited_body_that_is_not_valid_unicode_is_refused(
    client: TestClient, settings: Settings
) -> None:
    batch_id, recipient_id = await _drafted(client, settings)
    response = await client.patch(
        f"/api/batches/{batch_id}/recipients/{recipient_id}",
        json={"subject": "Fine", "body": "half a pair: \udc00"},
        headers=AUTH,
    )
    assert response.status == 422
    message = (await response.json())["error"]["message"]
    assert message.startswith("body: contains a lone surrogate")
    draft = await query(settings.database_url or "", "SELECT subject, body FROM recipients")
    assert draft == [("Original", "B")]


@pytest.mark.parametrize("char", GARBAGE)
async def test_the_edit_page_refuses_such_a_subject(
    client: TestClient, settings: Settings, char: str
) -> None:
    batch_id, recipient_id = await _drafted(client, settings)
    csrf = await login(client)
    response = await client.post(
        f"/batches/{batch_id}/recipients/{recipient_id}/edit",
        data={"csrf_token": csrf, "subject": f"Hi Bob{char}{ATTACK}", "body": "Edited"},
    )
    assert response.status == 422
    page = await response.text()
    assert f"subject: character {code(char)}" in page and "at position 7 " in page
    draft = await query(settings.database_url or "", "SELECT subject, body FROM recipients")
    assert draft == [("Original", "B")]


# -- the worker's template drafter ----------------------------------------------------------------


@pytest.mark.parametrize("char", GARBAGE)
async def test_the_template_drafter_refuses_a_subject_naming_the_character(
    db: Database, settings: Settings, smtp: RecordingSMTPServer, char: str
) -> None:
    # Written straight to the database, as an older web tier (or a bug) could have. PostgreSQL
    # cannot store a NUL in a field, so that one comes from an escape in the template.
    if char == "\x00":
        subject, fields = 'Hi Bob{{ "\\u0000" }}x', {}
    else:
        subject, fields = "Hi {{ name }}", {"name": f"Bob{char}{ATTACK}"}
    await db.create_batch(
        NewBatch(
            created_by="t",
            subject_template=subject,
            body_template="B",
            recipients=[NewRecipient("x@example.org", fields)],
        )
    )
    await drain(settings)
    rows = await query(settings.database_url or "", "SELECT status, last_error FROM recipients")
    assert rows[0][0] == "dead"
    assert rows[0][1].startswith(f"drafted subject: character {code(char)}")
    assert "at position 7 " in rows[0][1]
    assert smtp.received == []


# -- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("from_address", "sender@example.org{}"),
        ("unsubscribe_mailto", "unsubscribe@example.org{}"),
        ("smtp_host", "smtp.example.org{}Bcc: x"),
        ("smtp_username", "user{}name"),
        ("public_url", "https://mail.example.org/{}x"),
        ("groq_base_url", "https://api.example.org/{}x"),
        ("bounce_address", "bounces@example.org{}"),
        ("imap_host", "imap.example.org{}x"),
        ("imap_username", "user{}name"),
    ],
)
@pytest.mark.parametrize("char", [*GARBAGE, "\t"])
def test_a_setting_with_such_a_character_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, field: str, value: str, char: str
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env file
    with pytest.raises(ConfigError) as refused:
        load_settings(**{field: value.format(char)})
    message = str(refused.value)
    assert message.startswith(f"MAILROOM_{field.upper()}: ")
    assert f"character {code(char)}" in message
    position = value.index("{}") + 1
    assert f"at position {position} " in message


# -- the property: no delivered message has a header Mailroom did not write -----------------------

# Any code point (surrogates too, which JSON can carry), with the characters that matter often.
_ANY_CHARACTER = st.characters(exclude_categories=())
_INTERESTING = st.sampled_from(
    [*GARBAGE, "\ud800", "\udfff", "\t", "\r", "\n", "\r\n", " ", ":", "=?", "?=", "\x1f", "\x9f"]
)
_PRINTABLE = st.characters(categories=("L", "N", "P", "S", "Zs"))
# Half the time printable text (which gets past validation, to test what happens next), half
# the time anything at all.
HOSTILE = st.one_of(
    st.text(_PRINTABLE, max_size=30),
    st.lists(st.one_of(_PRINTABLE, _ANY_CHARACTER, _INTERESTING), max_size=30).map("".join),
)


@hypothesis_settings(deadline=None, max_examples=200)
@given(name=HOSTILE, subject=HOSTILE, edited_subject=HOSTILE, edited_body=HOSTILE)
async def test_accepted_text_never_makes_a_header_of_its_own(
    name: str, subject: str, edited_subject: str, edited_body: str
) -> None:
    """The boundary checks against what the worker then does with the text, for any text."""
    import uuid
    from datetime import UTC, datetime

    from shared.db import RecipientForSend
    from web.contract import DraftEdit
    from web.validation import InvalidSubmission, Limits, from_json
    from worker.drafting import TemplateDrafter
    from worker.failures import PermanentFailure
    from worker.smtp import build_message

    def deliverable(subject: str, body: str) -> None:
        for text in (subject, body):
            text.encode("utf-8")  # PostgreSQL can store it
            assert "\0" not in text
        message = build_message(
            sender="sender@example.com",
            to="a@example.org",
            subject=subject,
            body=body,
            message_id="<m.1@example.com>",
            unsubscribe_url="https://mail.example.com/u/token",
            unsubscribe_mailto="unsubscribe@example.com",
        )
        assert_only_our_headers(message.data, unsubscribe=True)

    payload = {
        "recipients": [{"email": "a@example.org", "name": name}],
        "subject": f"{subject} {{{{ name }}}}",
        "body": "Dear {{ name }}",
    }
    try:
        submission = from_json(payload, limits=Limits(max_batch_size=10))
    except InvalidSubmission:
        event("batch refused")
    else:
        event("batch accepted")
        (recipient,) = submission.recipients
        for value in recipient.fields.values():
            value.encode("utf-8")
        for_send = RecipientForSend(
            id=1,
            batch_id=uuid.uuid4(),
            email=recipient.email,
            fields=recipient.fields,
            status="sending",
            attempts=1,
            subject=None,
            body=None,
            drafter="template",
            subject_template=submission.subject,
            body_template=submission.body,
            enqueued_at=datetime.now(UTC),
            request_id=None,
        )
        try:
            draft = await TemplateDrafter().draft(for_send)
        except PermanentFailure as refused:
            # Accepted by the web tier: only an empty or over-long subject may fail here.
            assert refused.message.startswith("drafted subject "), refused.message
            assert "character" not in refused.message, refused.message
        else:
            deliverable(draft.subject, draft.body)
    try:
        edited = DraftEdit.model_validate({"subject": edited_subject, "body": edited_body or "x"})
    except ValueError:
        event("edit refused")
    else:
        event("edit accepted")
        deliverable(edited.subject, edited.body)


async def _empty(settings: Settings, smtp: RecordingSMTPServer) -> None:
    await query(
        settings.database_url or "",
        "TRUNCATE recipients, batches, processed_jobs, procrastinate_jobs CASCADE",
    )
    smtp.received.clear()


@hypothesis_settings(
    deadline=None,
    max_examples=20,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=HOSTILE, subject=HOSTILE, edited_subject=HOSTILE)
async def test_through_the_api_and_a_real_worker_no_message_gets_a_foreign_header(
    client: TestClient,
    settings: Settings,
    smtp: RecordingSMTPServer,
    name: str,
    subject: str,
    edited_subject: str,
) -> None:
    await _empty(settings, smtp)
    url = settings.database_url or ""
    response = await post(
        client,
        {
            "recipients": [
                {"email": "a@example.org", "name": name},
                {"email": "b@example.org", "name": "Plain"},
            ],
            "subject": f"{subject} {{{{ name }}}}",
            "body": "Dear {{ name }}",
            "send": False,
        },
    )
    assert response.status in (201, 422), await response.text()
    if response.status == 422:
        event("batch refused")
        assert await query(url, "SELECT count(*) FROM batches") == [(0,)]
        return
    event("batch accepted")
    batch_id = (await response.json())["id"]
    await drain(settings)
    drafted = await query(url, "SELECT id FROM recipients WHERE status = 'drafted' ORDER BY id")
    if drafted:
        edit = await client.patch(
            f"/api/batches/{batch_id}/recipients/{drafted[0][0]}",
            json={"subject": edited_subject, "body": f"Edited {edited_subject}"},
            headers=AUTH,
        )
        assert edit.status in (200, 422), await edit.text()
    assert (await client.post(f"/api/batches/{batch_id}/send", headers=AUTH)).status == 200
    await drain(settings)
    rows = await query(url, "SELECT status, last_error FROM recipients ORDER BY id")
    sent = [r for r in rows if r[0] == "sent"]
    assert len(smtp.received) == len(sent)
    for received in smtp.received:
        assert_only_our_headers(received.raw, unsubscribe=False)
    for status, error in rows:
        assert status in ("sent", "dead"), rows
        if status == "dead":
            # Refused at drafting (an empty subject, say), never by build_message's last check.
            assert "unsafe header" not in error, rows
            assert re.match(r"drafted subject |template: ", error), rows
