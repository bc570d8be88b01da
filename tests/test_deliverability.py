"""Deliverability: one-click unsubscribe, the suppression list and hard bounces.

Every message carries a signed unsubscribe link (List-Unsubscribe, RFC 8058's one-click POST,
a footer); a suppressed address is counted and never sent, whether it was suppressed before
the batch or while it waited; a mailbox the server says does not exist is suppressed too.
"""

from __future__ import annotations

import base64
import io
import os
import re
import string
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import aiohttp
import dkim
import pytest
from aiohttp.test_utils import TestClient
from aiosmtplib.protocol import normalize_message_line_endings
from dkim.util import parse_tag_value

from shared.db import Database
from shared.settings import ConfigError, Settings
from shared.unsubscribe import make_token, read_token
from tests.conftest import AUTH, drain, make_settings, query
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_pages import login
from worker.check import run_checks
from worker.dkim import DkimSigner
from worker.smtp import build_message

PUBLIC_URL = "https://mail.example.org"


@pytest.fixture
def settings(database_url: str, smtp: RecordingSMTPServer) -> Settings:
    return make_settings(
        database_url,
        smtp.port,
        public_url=PUBLIC_URL,
        unsubscribe_mailto="unsubscribe@example.com",
    )


async def _batch(client: TestClient, recipients: list[str]) -> str:
    response = await client.post(
        "/api/batches",
        json={"recipients": recipients, "subject": "Hello", "body": "Hi there."},
        headers=AUTH,
    )
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def _statuses(settings: Settings) -> dict[str, tuple[str, int]]:
    rows = await query(
        settings.database_url or "", "SELECT email, status, attempts FROM recipients"
    )
    return {email: (status, attempts) for email, status, attempts in rows}


async def _suppressed(settings: Settings) -> dict[str, str]:
    rows = await query(settings.database_url or "", "SELECT address, reason FROM suppressions")
    return dict(rows)


def _link(smtp: RecordingSMTPServer, address: str) -> str:
    (received,) = [r for r in smtp.received if address in r.rcpt_tos]
    header = str(received.message["List-Unsubscribe"])
    match = re.search(r"<(https://[^>]+)>", header)
    assert match, header
    return match.group(1).removeprefix(PUBLIC_URL)


async def test_every_message_carries_a_one_click_unsubscribe_link_and_a_footer(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _batch(client, ["ada@example.org", "grace@example.org"])
    await drain(settings)
    assert len(smtp.received) == 2
    for received in smtp.received:
        message, (address,) = received.message, received.rcpt_tos
        header = str(message["List-Unsubscribe"]).strip()  # long: folded onto its own line
        assert re.fullmatch(
            rf"<{PUBLIC_URL}/u/[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+>,"
            r" <mailto:unsubscribe@example\.com\?subject=unsubscribe>",
            header,
        ), header
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        url = header[1 : header.index(">")]
        plain, markup = (part.get_content() for part in message.iter_parts())
        assert url in plain and f'href="{url}"' in markup
        token = url.rsplit("/", 1)[1]
        found = read_token(token, secret="test-secret-key")
        assert found is not None and found.address == address
        assert found.sender == "sender@example.com"


async def test_a_body_template_can_place_the_link_itself_instead_of_the_footer(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    response = await client.post(
        "/api/batches",
        json={
            "recipients": ["ada@example.org"],
            "subject": "Hello",
            "body": "Hi {{ email }}.\n\nHad enough? {{ unsubscribe_url }}\n",
        },
        headers=AUTH,
    )
    assert response.status == 201, await response.text()
    await drain(settings)
    (received,) = smtp.received
    url = str(received.message["List-Unsubscribe"]).strip()[1:].split(">")[0]
    plain, markup = (part.get_content() for part in received.message.iter_parts())
    assert f"Had enough? {url}" in plain.replace("\r\n", "\n")
    assert f'Had enough? <a href="{url}">{url}</a>' in markup
    assert "To stop receiving" not in plain and "To stop receiving" not in markup


async def test_one_click_post_unsubscribes_without_a_session_or_csrf_token(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, db: Database
) -> None:
    await _batch(client, ["ada@example.org"])
    await drain(settings)
    path = _link(smtp, "ada@example.org")

    # A GET (a link scanner, or the reader opening it) only asks; nothing changes.
    page = await client.get(path)
    assert page.status == 200 and "ada@example.org" in await page.text()
    assert await _suppressed(settings) == {}

    # What Gmail sends: a POST with this body, no cookie, no CSRF token. Twice is harmless.
    for _ in range(2):
        response = await client.post(path, data="List-Unsubscribe=One-Click")
        assert response.status == 200
        assert "You are unsubscribed" in await response.text()
    assert await _suppressed(settings) == {"ada@example.org": "unsubscribed"}
    # Audited once, as the link's: following it again changed nothing and wrote nothing.
    audit = [e for e in await db.list_audit() if e["action"] == "addresses_suppressed"]
    assert [(e["actor"], e["count"]) for e in audit] == [("link:unsubscribe", 1)]

    # The next batch counts Ada but never sends to her.
    smtp.reset()
    batch_id = await _batch(client, ["ada@example.org", "grace@example.org"])
    await drain(settings)
    assert smtp.to_addresses() == {"grace@example.org": 1}
    counts = (await (await client.get(f"/api/batches/{batch_id}", headers=AUTH)).json())["counts"]
    assert counts["suppressed"] == 1 and counts["sent"] == 1


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # another signature
        lambda t: make_token("eve@example.org", sender="sender@example.com", secret="guess"),
        lambda t: t.split(".")[0],  # no signature at all
        lambda t: "not-a-token",
        lambda t: "%00%0d%0a",
        lambda t: "x" * 5000,
    ],
)
async def test_a_tampered_or_forged_link_is_refused_and_suppresses_nothing(
    client: TestClient, settings: Settings, tamper: Any
) -> None:
    good = make_token("ada@example.org", sender="sender@example.com", secret="test-secret-key")
    for method in ("GET", "POST"):
        response = await client.request(method, f"/u/{tamper(good)}")
        assert response.status == 404
        assert "not valid" in await response.text()
    assert await _suppressed(settings) == {}


def _same_bytes_other_text(part: str) -> str:
    """``part`` with its last character swapped for one that decodes to the same bytes.

    Unpadded base64 of a length that is not a multiple of 3 leaves low bits in its last
    character unused; a lenient decoder ignores them.
    """
    alphabet = string.ascii_letters + string.digits + "-_"
    decoded = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    for c in alphabet:
        other = part[:-1] + c
        if c != part[-1] and base64.urlsafe_b64decode(other + "=" * (-len(other) % 4)) == decoded:
            return other
    raise AssertionError("no spare bits in " + part)


# A lenient decoder skips characters outside the alphabet; four keep the length's padding.
NON_CANONICAL = [
    lambda t: t[:5] + "!!!!" + t[5:],
    lambda t: t[:5] + "~~~~" + t[5:],
    lambda t: t[:5] + "!~" + t[5:9] + "~!" + t[9:],
    lambda t: t[:5] + "%20" * 4 + t[5:],
    lambda t: t[:5] + "%0A" * 4 + t[5:],
    lambda t: t.replace(".", "==."),
    lambda t: t + "=",
    lambda t: t + "==",
    lambda t: t.replace(".", ".!!!!"),
    lambda t: f"{_same_bytes_other_text(t.split('.')[0])}.{t.split('.')[1]}",
    lambda t: f"{t.split('.')[0]}.{_same_bytes_other_text(t.split('.')[1])}",
]


# A link in mail sent before unsubscribe tokens moved to shared.signing, as that code made it
# for ada@example.org from sender@example.com under "test-secret-key".
LINK_OF_THE_EARLIER_FORMAT = (
    "YWRhQGV4YW1wbGUub3JnCnNlbmRlckBleGFtcGxlLmNvbQ.wy3yXpgL8b1y_IDfPpRNotXbZi8__6fjxRWuqcG8KR8"
)


async def test_a_link_made_in_the_earlier_format_still_unsubscribes(
    client: TestClient, settings: Settings
) -> None:
    assert (await client.get(f"/u/{LINK_OF_THE_EARLIER_FORMAT}")).status == 200
    assert await _suppressed(settings) == {}
    response = await client.post(
        f"/u/{LINK_OF_THE_EARLIER_FORMAT}", data="List-Unsubscribe=One-Click"
    )
    assert response.status == 200
    assert await _suppressed(settings) == {"ada@example.org": "unsubscribed"}


async def test_a_session_cookie_is_refused_as_an_unsubscribe_token(
    client: TestClient, settings: Settings
) -> None:
    await login(client)
    jar = client.session.cookie_jar.filter_cookies(client.make_url("/"))
    cookie = jar["mailroom_session"].value
    for method in ("GET", "POST"):
        assert (await client.request(method, f"/u/{cookie}")).status == 404
    assert read_token(cookie, secret="test-secret-key") is None
    assert await _suppressed(settings) == {}


@pytest.mark.parametrize(
    ("good", "address"),
    [
        # An address whose payload does not fill whole base64 groups, so there are spare bits.
        (
            make_token("adah@example.org", sender="sender@example.com", secret="test-secret-key"),
            "adah@example.org",
        ),
        (LINK_OF_THE_EARLIER_FORMAT, "ada@example.org"),
    ],
    ids=["now", "earlier-format"],
)
@pytest.mark.parametrize(
    "variant",
    NON_CANONICAL,
    ids=[
        "bangs",
        "tildes",
        "mixed",
        "spaces",
        "newlines",
        "padding-inside",
        "padding-1",
        "padding-2",
        "bangs-in-mac",
        "spare-bits-payload",
        "spare-bits-mac",
    ],
)
async def test_only_the_canonical_spelling_of_a_link_unsubscribes(
    client: TestClient, settings: Settings, variant: Any, good: str, address: str
) -> None:
    assert len(good.split(".")[0]) % 4 and len(good.split(".")[1]) % 4
    bad = variant(good)
    assert bad != good
    for method in ("GET", "POST"):
        response = await client.request(method, f"/u/{bad}")
        assert response.status == 404, (bad, method)
    assert read_token(urllib.parse.unquote(bad), secret="test-secret-key") is None
    assert await _suppressed(settings) == {}
    # The link as it was sent keeps working.
    assert (await client.post(f"/u/{good}")).status == 200
    assert await _suppressed(settings) == {address: "unsubscribed"}


async def test_an_address_suppressed_while_it_waits_is_not_sent(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    await _batch(client, ["ada@example.org", "Grace@Example.org"])
    response = await client.post(
        "/api/suppressions", json={"addresses": ["grace@EXAMPLE.org"]}, headers=AUTH
    )
    assert await response.json() == {"added": 1, "already_suppressed": 0}
    await drain(settings)
    assert smtp.to_addresses() == {"ada@example.org": 1}
    statuses = await _statuses(settings)
    assert statuses["Grace@example.org"] == ("suppressed", 0), "no attempt was spent"


async def test_a_mailbox_the_server_refuses_is_suppressed_as_a_hard_bounce(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["gone@example.org"] = Rule("550 5.1.1 no such user")
    smtp.rules["spammy@example.org"] = Rule("554 5.7.1 message refused", at_data=True)
    await _batch(client, ["gone@example.org", "spammy@example.org", "ok@example.org"])
    await drain(settings)
    statuses = await _statuses(settings)
    assert statuses["gone@example.org"][0] == "dead"
    assert statuses["spammy@example.org"][0] == "dead"
    # Only the mailbox refusal names the address; a refused message says nothing about it.
    assert await _suppressed(settings) == {"gone@example.org": "hard_bounce"}

    smtp.reset()
    await _batch(client, ["gone@example.org", "spammy@example.org"])
    await drain(settings)
    assert smtp.to_addresses() == {"spammy@example.org": 1}


async def test_a_redrive_lifts_a_hard_bounce_but_never_an_unsubscription(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer
) -> None:
    smtp.rules["gone@example.org"] = Rule("550 5.1.1 no such user", times=1)
    smtp.rules["left@example.org"] = Rule("550 5.1.1 no such user", times=1)
    await _batch(client, ["gone@example.org", "left@example.org"])
    await drain(settings)
    # Meanwhile one of them unsubscribes through a link of an earlier message.
    token = make_token("left@example.org", sender="sender@example.com", secret="test-secret-key")
    await client.post(f"/u/{token}")
    response = await client.post("/api/dead-letters/redrive", json={"all": True}, headers=AUTH)
    assert (await response.json())["redriven"] == 2
    await drain(settings)
    assert smtp.to_addresses() == {"gone@example.org": 1}
    assert await _suppressed(settings) == {"left@example.org": "unsubscribed"}
    assert (await _statuses(settings))["left@example.org"] == ("suppressed", 0)


async def test_operators_list_add_and_remove_suppressions(client: TestClient) -> None:
    added = await client.post(
        "/api/suppressions",
        json={
            "addresses": ["a@example.org", "A@example.org", "b@example.org"],
            "reason": "complaint",
        },
        headers=AUTH,
    )
    assert await added.json() == {"added": 2, "already_suppressed": 0}
    again = await client.post(
        "/api/suppressions", json={"addresses": ["b@example.org"]}, headers=AUTH
    )
    assert await again.json() == {"added": 0, "already_suppressed": 1}
    page = await (await client.get("/api/suppressions?limit=1", headers=AUTH)).json()
    assert [s["address"] for s in page["suppressions"]] == ["a@example.org"]
    assert page["suppressions"][0]["reason"] == "complaint"
    rest = await (
        await client.get(f"/api/suppressions?after={page['next_after']}", headers=AUTH)
    ).json()
    assert [s["address"] for s in rest["suppressions"]] == ["b@example.org"]
    removed = await client.post(
        "/api/suppressions/remove",
        json={"addresses": ["B@EXAMPLE.ORG", "c@example.org"]},
        headers=AUTH,
    )
    assert await removed.json() == {"removed": 1}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"addresses": "a@example.org"}, 422, "list of 1 to"),
        ({"addresses": []}, 422, "list of 1 to"),
        ({"addresses": ["ok@example.org", "nope", 7]}, 422, "2 address(es)"),
        ({"addresses": ["a@example.org"], "reason": "because"}, 422, "reason: must be one of"),
        ({"addresses": ["a@example.org"], "extra": 1}, 422, "unknown field"),
        (["a@example.org"], 422, "must be a JSON object"),
    ],
)
async def test_bad_suppression_requests_are_refused_clearly(
    client: TestClient, settings: Settings, body: Any, status: int, fragment: str
) -> None:
    response = await client.post("/api/suppressions", json=body, headers=AUTH)
    assert response.status == status
    error = (await response.json())["error"]
    assert fragment in error["message"]
    if "address(es)" in fragment:
        assert [p["position"] for p in error["details"]["problems"]] == [1, 2]
    assert await _suppressed(settings) == {}


async def test_malformed_suppression_bodies_get_400_and_415(client: TestClient) -> None:
    bad_json = await client.post(
        "/api/suppressions",
        data=b"{nope",
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert bad_json.status == 400
    form = await client.post("/api/suppressions", data={"addresses": "x"}, headers=AUTH)
    assert form.status == 415


# -- DKIM -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def dkim_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dkim") / "mailroom.pem"
    subprocess.run(
        ["openssl", "genrsa", "-traditional", "-out", str(path), "2048"],
        check=True,
        capture_output=True,
    )
    return path


async def test_every_message_is_dkim_signed_and_verifies_against_the_published_key(
    client: TestClient, settings: Settings, smtp: RecordingSMTPServer, dkim_key: Path
) -> None:
    signing = settings.model_copy(
        update={"dkim_private_key_path": dkim_key, "dkim_selector": "mr2026"}
    )
    signer = DkimSigner.from_settings(signing)
    assert signer is not None and signer.record_name == "mr2026._domainkey.example.com"
    record = signer.public_record().encode()
    seen: list[str] = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        seen.append(name.decode())
        return record

    await _batch(client, ["ada@example.org"])
    await drain(signing)
    (received,) = smtp.received
    wire = received.raw
    assert wire.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert dkim.verify(wire, dnsfunc=dns)
    assert seen == ["mr2026._domainkey.example.com."]
    tampered = wire.replace(b"Hi there.", b"Hi thar.")
    assert tampered != wire and not dkim.verify(tampered, dnsfunc=dns)


def _signer(key: Path) -> DkimSigner:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        from_address="news@example.org",
        dkim_private_key_path=key,
        dkim_selector="mr",
    )
    signer = DkimSigner.from_settings(settings)
    assert signer is not None
    return signer


def _built(subject: str, body: str, **composition: str) -> bytes:
    message = build_message(
        sender="news@example.org",
        to="ada@example.com",
        subject=subject,
        body=body,
        message_id="<mailroom.1.2@example.org>",
        unsubscribe_url=PUBLIC_URL + "/u/token",
        **composition,
    )
    return message.data


def _raw(*lines: str, body: bytes = b"Hello.\r\n") -> bytes:
    return "".join(line + "\r\n" for line in lines).encode() + b"\r\n" + body


_HEADERS = ("From: News <news@example.org>", "To: ada@example.com", "Subject: Hello")

# Messages a signer must get exactly right: what build_message makes, and the odd shapes a
# canonicalization bug would show on (RFC 6376 3.4.2 for headers, 3.4.4 for the body).
DKIM_MESSAGES = {
    "non-ASCII subject, QP body": _built("Nouvelles — décembre", "Café crème à 8 h.\n\nÀ bientôt"),
    "long encoded subject": _built("Überschrift " * 12, "Zeile " * 60 + "\n" + "x" * 300),
    "empty built body": _built("Hello", ""),
    "Markdown, a sender name and Reply-To": _built(
        "Nouvelles",
        "**Café** crème, [le menu](https://example.org/menu?a=1&b=2).\n\n- un\n- deux",
        body_format="markdown",
        from_name='Zoë "Café" de la Gare, ' + "Société anonyme " * 4 + "SA",
        reply_to="replies@example.org",
    ),
    "folded headers": _raw(
        "From: News <news@example.org>",
        "To: ada@example.com,\r\n\tgrace@example.com,\r\n   linus@example.com",
        "Subject: a subject\r\n folded\r\n\tthree times",
        "Content-Type: text/plain;\r\n charset=utf-8",
    ),
    "whitespace in headers": _raw(
        "From:news@example.org", "To:  ada@example.com  \t", "Subject: \t lots   of \t space  "
    ),
    "odd header name case": _raw("fROM: news@example.org", "SUBJECT: Hi", "Message-Id: <a@b>"),
    "a header twice": _raw(*_HEADERS, "Subject: again", "Cc: one@example.com", "Cc: two@x.org"),
    "From twice": _raw(*_HEADERS, "From: other@example.org"),
    "unsigned headers too": _raw(
        "Received: from a by b", *_HEADERS, "X-Mailer: mailroom", "Bcc: hidden@example.org"
    ),
    "empty body": _raw(*_HEADERS, body=b""),
    "headers only": "\r\n".join(_HEADERS).encode() + b"\r\n",
    "only blank lines": _raw(*_HEADERS, body=b"\r\n\r\n  \r\n\t\r\n"),
    "trailing blank lines": _raw(*_HEADERS, body=b"text\r\n\r\n\r\n\r\n"),
    "whitespace at line ends": _raw(*_HEADERS, body=b"a  \r\nb\t\r\n c \t d \r\n\r\n e"),
    "no final line break": _raw(*_HEADERS, body=b"last line"),
    "long lines": _raw(*_HEADERS, "Subject: " + "s" * 900, body=b"y" * 5000 + b"\r\n"),
    "dots and 8-bit bytes": _raw(*_HEADERS, body=b".\r\n..x\r\ncaf\xe9 \xff\r\n"),
    "bare LF line ends": b"From: news@example.org\nSubject: Hi\n\nline one\nline two \n\n",
    "a lone CR": _raw(*_HEADERS, body=b"one\rtwo \r\n"),
}


@pytest.mark.parametrize("message", DKIM_MESSAGES.values(), ids=DKIM_MESSAGES.keys())
def test_dkim_signatures_verify_with_dkimpy(dkim_key: Path, message: bytes) -> None:
    signer = _signer(dkim_key)
    record = signer.public_record().encode()
    signed = signer.sign(message)
    # What aiosmtplib would send: verifiers see CRLF line ends and a final CRLF, so the signer
    # signs (and returns) those.
    assert signed.endswith(normalize_message_line_endings(message))
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: record)
    tampered = signed.replace(b"news@example.org", b"news@example.net")
    assert tampered != signed and not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: record)


def test_dkim_signs_the_headers_and_tags_dkimpy_signs(dkim_key: Path) -> None:
    """The same h= list (RFC 6376's recommended fields, From once more) and tags as before."""
    signer = _signer(dkim_key)
    for message in DKIM_MESSAGES.values():
        ours = _signature_tags(signer.sign(message))
        sent = normalize_message_line_endings(message)
        theirs = _signature_tags(
            dkim.sign(
                sent, b"mr", b"example.org", dkim_key.read_bytes(), canonicalize=(b"relaxed",) * 2
            )
            + sent
        )
        assert ours.keys() == theirs.keys()
        for tag in (b"v", b"a", b"c", b"d", b"i", b"q", b"s", b"bh"):
            assert ours[tag] == theirs[tag], tag
        assert re.split(rb"\s*:\s*", ours[b"h"]) == re.split(rb"\s*:\s*", theirs[b"h"])
        assert abs(int(ours[b"t"]) - int(theirs[b"t"])) <= 5


def _signature_tags(signed: bytes) -> dict[bytes, bytes]:
    header = re.match(rb"DKIM-Signature:(.*?)\r?\n(?![ \t])", signed, re.DOTALL)
    assert header is not None
    return dict(parse_tag_value(header.group(1)))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("openssl", "message"),
    [
        (None, "cannot read"),
        (["genrsa", "-aes256", "-passout", "pass:secret"], "is encrypted"),
        (["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"], "the key is EC"),
        (["genpkey", "-algorithm", "ed25519"], "the key is Ed25519"),
    ],
    ids=["missing", "encrypted", "EC", "Ed25519"],
)
def test_dkim_keys_it_cannot_sign_with_are_config_errors(
    tmp_path: Path, openssl: list[str] | None, message: str
) -> None:
    key = tmp_path / "dkim.pem"
    if openssl is not None:
        subprocess.run(["openssl", *openssl, "-out", str(key)], check=True, capture_output=True)
    with pytest.raises(ConfigError) as raised:
        _signer(key)
    assert str(raised.value).startswith("MAILROOM_DKIM_PRIVATE_KEY_PATH: ")
    assert message in str(raised.value)
    if openssl is not None:
        assert f"{key} is not a PEM RSA private key (" in str(raised.value)


def test_a_dkim_signature_survives_a_relay_refolding_headers(dkim_key: Path) -> None:
    """Relaxed canonicalization: re-folded headers and re-spaced values still verify."""
    signer = _signer(dkim_key)
    record = signer.public_record().encode()
    signed = signer.sign(_built("A subject that is long enough to fold, " * 3, "Hi."))
    head, body = signed.split(b"\r\n\r\n", 1)
    refolded = (
        re.sub(rb"\r\n[ \t]+", b" ", head)  # every folded header on one line
        .replace(b"To: ada@example.com", b"To:\r\n\t ada@example.com  ")
        .replace(b"Subject: ", b"Subject:\t\t")
        .replace(b"; boundary=", b";\r\n      boundary=")
    )
    assert refolded != head
    relayed = b"Received: by relay.example.net\r\n" + refolded + b"\r\n\r\n" + body
    assert dkim.verify(relayed, dnsfunc=lambda name, timeout=5: record)
    reworded = relayed.replace(b"To:\r\n\t ada@", b"To:\r\n\t bob@")
    assert reworded != relayed and not dkim.verify(reworded, dnsfunc=lambda name, timeout=5: record)


@pytest.mark.slow
def test_mailroom_check_verifies_the_key_offline_and_prints_the_record(dkim_key: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")},
        "MAILROOM_FROM_ADDRESS": "news@example.org",
        "MAILROOM_DKIM_PRIVATE_KEY_PATH": str(dkim_key),
        "MAILROOM_DKIM_SELECTOR": "mr",
    }
    result = subprocess.run(
        [sys.executable, "-m", "mailroom", "check", "--offline"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok  DKIM: the key signs as mr._domainkey.example.org" in result.stdout
    assert 'mr._domainkey.example.org TXT "v=DKIM1; k=rsa; p=MIIB' in result.stdout
    broken = {**env, "MAILROOM_DKIM_PRIVATE_KEY_PATH": str(dkim_key.parent / "missing.pem")}
    result = subprocess.run(
        [sys.executable, "-m", "mailroom", "check", "--offline"],
        env=broken,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "FAIL  DKIM: MAILROOM_DKIM_PRIVATE_KEY_PATH: cannot read" in result.stdout


@pytest.mark.parametrize(
    ("records", "status", "lines"),
    [
        ("published", 0, ["ok  DKIM record", "ok  SPF", "ok  DMARC"]),
        ("other key", 1, ["FAIL  DKIM record", "ok  SPF", "ok  DMARC"]),
        ("none", 1, ["FAIL  DKIM record", "FAIL  SPF", "FAIL  DMARC"]),
        ("no network", 0, ["warn  DKIM record", "warn  SPF", "warn  DMARC"]),
    ],
)
def test_mailroom_check_reads_the_sender_domains_records(
    dkim_key: Path, records: str, status: int, lines: list[str]
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        from_address="news@example.org",
        dkim_private_key_path=dkim_key,
        dkim_selector="mr",
    )
    signer = DkimSigner.from_settings(settings)
    assert signer is not None
    zone = {
        "published": {
            "mr._domainkey.example.org": [signer.public_record()],
            "example.org": ["v=spf1 mx -all"],
            "_dmarc.example.org": ["v=DMARC1; p=quarantine"],
        },
        "other key": {
            "mr._domainkey.example.org": ["v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0B"],
            "example.org": ["google-site-verification=x", "v=spf1 -all"],
            "_dmarc.example.org": ["v=DMARC1; p=none"],
        },
        "none": {},
    }
    out = io.StringIO()

    def lookup(name: str) -> list[str] | None:
        return None if records == "no network" else zone[records].get(name, [])

    assert run_checks(settings, online=True, out=out, lookup=lookup) == status
    printed = out.getvalue()
    for line in lines:
        assert line in printed, printed


# -- the operators' page --------------------------------------------------------------------


async def test_operators_suppress_by_paste_or_csv_and_remove_on_the_page(
    client: TestClient, settings: Settings
) -> None:
    csrf = await login(client)
    form = aiohttp.FormData()
    form.add_field("csrf_token", csrf)
    form.add_field("addresses", "ada@example.org\ngrace@example.org, nope")
    form.add_field("reason", "manual")
    bad = await client.post("/suppressions", data=form)
    assert bad.status == 422
    page = await bad.text()
    assert "line 2: &#39;nope&#39;" in page and "grace@example.org, nope" in page
    assert await _suppressed(settings) == {}, "nothing is written when a line is bad"

    form = aiohttp.FormData()
    form.add_field("csrf_token", csrf)
    form.add_field("addresses", "ada@example.org")
    form.add_field("reason", "complaint")
    form.add_field(
        "csv",
        b"name,Email\nLinus,linus@example.org\n",
        filename="list.csv",
        content_type="text/csv",
    )
    added = await client.post("/suppressions", data=form, allow_redirects=False)
    assert added.status == 303
    assert await _suppressed(settings) == {
        "ada@example.org": "complaint",
        "linus@example.org": "complaint",
    }
    listing = await (await client.get("/suppressions")).text()
    assert "linus@example.org" in listing and "complaint" in listing

    removed = await client.post(
        "/suppressions",
        data={"csrf_token": csrf, "action": "remove", "address": "ada@example.org"},
        allow_redirects=False,
    )
    assert removed.status == 303
    assert await _suppressed(settings) == {"linus@example.org": "complaint"}

    forged = await client.post(
        "/suppressions", data={"csrf_token": "forged", "action": "remove", "address": "x"}
    )
    assert forged.status == 403
