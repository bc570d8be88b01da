"""The message bytes the worker writes itself: well-formed, and what the MIME classes made.

Every message of a table of cases is read back with the stdlib's parser (``policy.default``)
and compared with the builder Mailroom used before (``tests/legacy_message.py``): the same
headers, once each, and parts that decode to the same text. A property test throws arbitrary
subjects and addresses at it: each is either refused or read back exactly.
"""

from __future__ import annotations

import binascii
import email
import email.policy
import re
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.templating import UNSUBSCRIBE_MARKER
from tests.legacy_message import legacy_wire_bytes
from worker.failures import PermanentFailure
from worker.smtp import build_message, text_to_html

URL = "https://mail.example.org/u/" + "QWRhQGV4YW1wbGUub3JnCnNlbmRlckBleGFtcGxlLmNvbQ" + ".x" * 20
MAILTO = "unsubscribe@example.com"
BASE_HEADERS = ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type"]
ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")
QP_LINE = re.compile(rb"(?:[\x21-\x3c\x3e-\x7e \t]|=[0-9A-F]{2})*=?")

CASES: dict[str, dict[str, Any]] = {
    "ascii": {"subject": "Hello", "body": "Hi Ada,\n\nsee you soon.\n"},
    "non-ascii subject and body": {
        "subject": "Grüße aus Köln — 東京 🎉",
        "body": "Grüße, Ada <3\n\n東京 🎉 «ça va» naïve\n",
    },
    "long subject, ascii": {"subject": "word " * 50 + "end", "body": "x"},
    "long subject, non-ascii": {"subject": "Héllo wörld, " + "x" * 240, "body": "x"},
    "long word in the subject": {"subject": "a" * 255, "body": "x"},
    "long lines": {"body": "a long line " * 200 + "\n" + "é" * 300 + "\n" + "x" * 76 + "\n"},
    "lines starting with a dot": {"body": ".\n.hidden\n..\nend\n.\n"},
    "dot alone at the end": {"body": "text\n."},
    "equals signs": {"body": "a = b\n==\n=?utf-8?q?x?=\nend =\n=3D\n"},
    "trailing spaces and tabs": {"body": "spaces   \ntab\t\n \n\t\nlast  "},
    "CRLF input": {"body": "one\r\ntwo\r\n\r\nthree\r\n"},
    "lone CR": {"body": "one\rtwo\r\rthree"},
    "mixed line breaks": {"body": "a\r\nb\nc\rd\n\n\r\ne"},
    "empty body": {"body": ""},
    "whitespace body": {"body": "   \n\n  "},
    "html in the text": {"body": 'Hi <b>"you"</b> & co\n<script>alert(1)</script>\n'},
    "form feed and controls in the body": {"body": "page one\x0cpage two\x00\x1b[0m\x7f\x85"},
    "unsubscribe": {"body": "Hi.\n", "unsubscribe_url": URL, "unsubscribe_mailto": MAILTO},
    "unsubscribe url only": {"body": "Hi.", "unsubscribe_url": URL},
    "unsubscribe mailto only": {"body": "Hi.", "unsubscribe_mailto": MAILTO},
    "marker": {
        "body": f"Hi.\n\nHad enough? {UNSUBSCRIBE_MARKER}\n",
        "unsubscribe_url": URL,
        "unsubscribe_mailto": MAILTO,
    },
    "marker twice, no url": {"body": f"{UNSUBSCRIBE_MARKER} and {UNSUBSCRIBE_MARKER}"},
    "subject that looks encoded": {"subject": "=?utf-8?q?not_encoded?= really", "body": "x"},
    "subject with spaces at the ends": {"subject": "  padded  ", "body": "x"},
    "subject with runs of spaces": {"subject": "a   b" + " " * 80 + "c" * 70 + " d", "body": "x"},
    "empty subject": {"subject": "", "body": "x"},
    "subject with a tab": {"subject": "Hi\tthere", "body": "x"},
}


def _build(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "sender": "sender@example.com",
        "to": "ada@example.org",
        "subject": "Hello",
        "message_id": "<mailroom.b.1@example.com>",
    }
    values.update(overrides)
    return values


def _parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _raw_headers(data: bytes) -> list[tuple[str, str]]:
    """The header fields as written, unfolded (CRLF removed), in order."""
    block = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    fields: list[tuple[str, str]] = []
    for line in block.split("\r\n"):
        if line[:1] in (" ", "\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    return fields


def _parts(message: EmailMessage) -> list[str]:
    return [str(part.get_content()).replace("\r\n", "\n") for part in message.iter_parts()]


def _expected_parts(values: dict[str, Any]) -> tuple[str, str]:
    """What the reader must see, written out from the rules (not from either builder); the
    footer's markup is checked on its own."""
    body, url = values["body"], values.get("unsubscribe_url")
    text, markup = body, text_to_html(body)
    if UNSUBSCRIBE_MARKER in body:
        anchor = f'<a href="{url}">{url}</a>' if url else ""
        text, markup = (
            text.replace(UNSUBSCRIBE_MARKER, url or ""),
            markup.replace(UNSUBSCRIBE_MARKER, anchor),
        )
    elif url:
        text += f"\n\n--\nTo stop receiving these emails: {url}\n"
    # Any line break of the text reaches the reader as one: CRLF, LF and a lone CR alike.
    return text.replace("\r\n", "\n").replace("\r", "\n"), markup.replace("\r", "\n")


def assert_well_formed(data: bytes) -> None:
    """CRLF only, RFC 5322 line lengths, valid quoted-printable parts, short encoded words."""
    assert b"\n" not in data.replace(b"\r\n", b""), "a bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "a bare CR"
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    head, _, body = data.partition(b"\r\n\r\n")
    for word in ENCODED_WORD.findall(head.decode("utf-8")):
        assert len(word) <= 75, word
    boundary = re.search(rb'boundary="([^"]+)"', head)
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.group(1)
    preamble, *parts, epilogue = (b"\r\n" + body).split(delimiter)
    assert preamble == b"" and epilogue == b"--\r\n" and len(parts) == 2
    for part in parts:
        part_head, _, payload = part.partition(b"\r\n\r\n")
        assert b"Content-Transfer-Encoding: quoted-printable" in part_head
        for line in payload.split(b"\r\n"):
            assert len(line) <= 76, line
            assert QP_LINE.fullmatch(line), line
            assert not line.endswith((b" ", b"\t")), line
            assert line != b".", "a lone dot ends DATA unless the SMTP client stuffs it"


@pytest.mark.parametrize("case", list(CASES))
def test_each_message_parses_back_to_what_the_mime_classes_made(case: str) -> None:
    values = _build(**CASES[case])
    data = build_message(**values).data
    assert_well_formed(data)
    new, old = _parse(data), _parse(legacy_wire_bytes(**values))
    expected_names = list(BASE_HEADERS)
    if values.get("unsubscribe_url") or values.get("unsubscribe_mailto"):
        expected_names.append("List-Unsubscribe")
    if values.get("unsubscribe_url"):
        expected_names.append("List-Unsubscribe-Post")
    assert sorted(new.keys()) == sorted(expected_names), "each header exactly once"
    assert sorted(new.keys()) == sorted(old.keys())
    for name in expected_names:
        if name in ("Date", "Content-Type", "Subject"):
            continue  # the clock, the boundary; the subject is checked against the input
        assert str(new[name]).strip() == str(old[name]).strip(), name
    # Exactly as given: the MIME classes' plain ASCII did not always read back (a subject that
    # looks encoded, "=?…?=", is decoded by readers; leading spaces are stripped; a single
    # 255-character word came back with a space in front).
    assert new["Subject"] == values["subject"]
    assert new["Date"].datetime is not None
    assert new.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in new.iter_parts()] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in new.iter_parts())
    assert _parts(new) == _parts(old)
    plain, markup = _parts(new)
    assert plain == _expected_parts(values)[0]
    if values.get("unsubscribe_url") and UNSUBSCRIBE_MARKER not in values["body"]:
        assert f'<a href="{URL}">unsubscribe</a>.</p>\n</body></html>' in markup
    else:
        assert markup == _expected_parts(values)[1]


def test_a_subject_that_plain_text_would_lose_is_sent_as_encoded_words() -> None:
    for subject in ("=?utf-8?q?x?=", " leading", "trailing\t", "a" * 995, "ü"):
        header = dict(_raw_headers(build_message(**_build(subject=subject, body="x")).data))
        assert header["Subject"].lstrip().startswith("=?utf-8?"), subject
    header = dict(_raw_headers(build_message(**_build(subject="plain words", body="x")).data))
    assert header["Subject"] == " plain words"


def test_an_address_with_non_ascii_characters_is_written_as_utf8() -> None:
    # RFC 6532: in a message sent with SMTPUTF8 an address is UTF-8 as it is; an encoded
    # word (what the MIME classes wrote) is not allowed in an address.
    data = build_message(**_build(to="用户@例子.中国", body="x")).data
    assert_well_formed(data)
    assert "To: 用户@例子.中国\r\n".encode() in data
    assert _parse(data)["To"] == "用户@例子.中国"


def test_the_html_part_is_escaped_exactly_as_before() -> None:
    body = "<b>&amp;</b> \"q\" 'a'\n\npara < 2"
    new = _parse(build_message(**_build(body=body)).data)
    assert _parts(new)[1] == text_to_html(body)
    assert "&lt;b&gt;&amp;amp;&lt;/b&gt; &quot;q&quot; &#x27;a&#x27;" in _parts(new)[1]


def test_a_header_too_long_for_one_line_is_refused() -> None:
    with pytest.raises(PermanentFailure, match="header too long: To"):
        build_message(**_build(to="a" * 1000 + "@example.org", body="x"))
    with pytest.raises(PermanentFailure, match="header too long: List-Unsubscribe"):
        build_message(**_build(unsubscribe_url="https://x.org/" + "a" * 1000, body="x"))


def test_the_parts_decode_as_quoted_printable_to_the_utf8_text() -> None:
    body = "é=\t \n" + "x" * 200 + "\n."
    data = build_message(**_build(body=body)).data
    payload = data.split(b"quoted-printable\r\n\r\n")[1].split(b"\r\n--=_")[0]
    assert binascii.a2b_qp(payload).replace(b"\r\n", b"\n") == body.encode()


# -- arbitrary subjects and addresses ----------------------------------------------------------


def _unsafe(text: str, *, tab_allowed: bool) -> bool:
    """Independent of the builder's pattern: what RFC 5322 leaves out of a header value."""
    return any(
        (ord(c) < 0x20 and not (tab_allowed and c == "\t"))
        or 0x7F <= ord(c) <= 0x9F
        or c in "\u2028\u2029"
        or 0xD800 <= ord(c) <= 0xDFFF
        for c in text
    )


_NASTY = st.sampled_from(
    ["=?", "?=", "=?utf-8?b?QQ==?=", " ", "  ", "\t", "\r\n", "\n", "\x0b", "\x85", "\u2028", "é"]
)
_SUBJECTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.one_of(_NASTY, st.text(max_size=8)), max_size=60).map("".join),
    st.lists(st.sampled_from(["word", " ", "a" * 80, "ü"]), max_size=40).map("".join),
)
_LOCAL_PARTS = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"), st.sampled_from("aZ09.+_-!#'\"()<>,;: \\\t\r\n\x00")
    ),
    min_size=1,
    max_size=64,
)


@settings(max_examples=400, deadline=None)
@given(subject=_SUBJECTS, local=_LOCAL_PARTS)
@example(subject="x " * 127 + "y", local="ada")
@example(subject="é" * 255, local="ada")
@example(subject="a\t b", local="ada")
def test_any_subject_and_address_is_refused_or_read_back_exactly(subject: str, local: str) -> None:
    to = f"{local}@example.org"
    try:
        data = build_message(**_build(subject=subject, to=to, body="x")).data
    except PermanentFailure as refused:
        assert refused.message in ("unsafe header: Subject", "unsafe header: To")
        field = refused.message.removeprefix("unsafe header: ")
        assert _unsafe(subject if field == "Subject" else to, tab_allowed=field == "Subject")
        return
    assert not _unsafe(subject, tab_allowed=True) and not _unsafe(to, tab_allowed=False)
    assert_well_formed(data)
    raw = _raw_headers(data)
    assert [name for name, _ in raw] == [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
    ]
    assert dict(raw)["To"] == " " + to
    message = _parse(data)
    assert sorted(message.keys()) == sorted(BASE_HEADERS)
    assert message["Subject"] == subject
    assert _parts(message)[0] == "x"


_BODIES = st.one_of(
    st.text(max_size=2000),
    # Runs of one character around the 76-column limit, line ends and soft breaks.
    st.lists(
        st.sampled_from(
            ["a", "a" * 70, " ", "\t", "\n", "\r\n", "\r", "=", ".", "é", "🎉", "\x00"]
        ),
        max_size=300,
    ).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(body=_BODIES.filter(lambda b: not _unsafe_for_utf8(b)))
@example(body="a" * 75 + " \n")
@example(body="a" * 74 + "\t\n" + "b" * 75 + " ")
@example(body="a" * 75 + "\n.\n." + "\r\n.")
def test_any_body_is_well_formed_quoted_printable_that_decodes_to_the_text(body: str) -> None:
    values = _build(body=body, unsubscribe_url=URL)
    data = build_message(**values).data
    assert_well_formed(data)
    plain, markup = _parts(_parse(data))
    expected_plain, _ = _expected_parts(values)
    assert plain == expected_plain
    assert markup.startswith("<!doctype html>") and markup.endswith("</body></html>\n")
    assert [plain, markup] == _parts(_parse(legacy_wire_bytes(**values)))


def _unsafe_for_utf8(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def test_a_body_that_is_not_valid_unicode_is_refused() -> None:
    with pytest.raises(PermanentFailure, match="not valid Unicode"):
        build_message(**_build(body="half a pair \ud800"))
