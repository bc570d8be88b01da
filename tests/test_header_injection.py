"""Header injection: a character that can end a header line is refused where it comes in.

Recipient data often comes from public web forms, so every recipient field is hostile. The API,
the form (pasted lines and CSV cells), the rendered subject, an edited draft, the worker's
template drafter and the settings all refuse such characters with a message that names the
field and the position; ``build_message`` refusing the message at send time is only the last
line of defence.
"""

from __future__ import annotations

import email
import email.policy
from collections import Counter
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from tests.conftest import AUTH

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
