"""Sending over SMTP: building the message bytes and a small pool of reused connections.

A :class:`Mailer` is anything with ``send(message) -> reply``; :class:`SmtpMailer` is the real
one. Connections are reused (on loopback a new connection per message costs about twice as
much) and replaced after an error, after ``max_messages_per_connection`` sends, or when idle
for longer than ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import html
import os
import re
import time
from dataclasses import dataclass
from email.header import Header
from email.utils import formatdate
from typing import Protocol

import aiosmtplib
import structlog

from shared.metrics import SMTP_SEND
from shared.settings import Settings, SmtpSecurity
from shared.templating import UNSUBSCRIBE_MARKER
from worker.dkim import DkimSigner
from worker.failures import DeliveryFailure, PermanentFailure, classify_smtp

MAX_MESSAGES_PER_CONNECTION = 100
IDLE_TIMEOUT_S = 30.0
# "421 slow down" and "451 try again later" (greylisting, a rate limit of the server's): for a
# while after one, this worker sends one message at a time, at most one per interval.
SLOW_DOWN_CODES = frozenset({421, 451})
SLOW_DOWN_S = 300.0
SLOW_DOWN_INTERVAL_S = 1.0

# RFC 5322: a line is at most 998 characters and should be at most 78.
_MAX_LINE = 998
_FOLD_AT = 78
# What no header value may carry: line breaks of any kind (CR, LF, VT, FF, the file, group and
# record separators, NEL, U+2028/U+2029: str.splitlines() breaks at all of them, and so may
# something down the line), every other C0 and C1 control, DEL, and lone surrogates (not
# encodable). A tab is legal whitespace in an unstructured header (the subject) and nowhere
# else Mailroom writes.
_UNSAFE_IN_TEXT = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_IN_TOKEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_OVERLONG_QP_LINE = re.compile(rb"^(.{74,75})(=09|=20)$", re.MULTILINE)
_PART_HEADERS = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
)


log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """A message ready for SMTP: the envelope and the exact bytes of DATA (CRLF lines)."""

    sender: str
    recipient: str
    message_id: str
    data: bytes


class Mailer(Protocol):
    """Something that delivers a built message (the real one speaks SMTP)."""

    async def send(self, message: OutgoingMessage) -> str: ...

    async def close(self) -> None: ...


def message_id_for(recipient_id: int, batch_id: object, domain: str) -> str:
    """A stable Message-ID: every attempt for one recipient carries the same one."""
    return f"<mailroom.{batch_id}.{recipient_id}@{domain}>"


def sender_domain(address: str) -> str:
    return address.rsplit("@", 1)[-1]


def build_message(
    *,
    sender: str,
    to: str,
    subject: str,
    body: str,
    message_id: str,
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
) -> OutgoingMessage:
    """A multipart/alternative message: the text as written, and the same text as safe HTML.

    Both parts are UTF-8 in quoted-printable; a non-ASCII subject is RFC 2047 encoded (an
    address with non-ASCII characters is written as UTF-8, RFC 6532: the mailer then needs the
    server's SMTPUTF8). A header value with a line break or any other control character is
    refused with a :class:`PermanentFailure` (``unsafe header: <name>``): nothing can add a
    header, and such a message is never sent.

    With ``unsubscribe_url`` (an https link, or http in development) the message carries
    ``List-Unsubscribe`` and RFC 8058's ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``,
    and both parts end with a footer holding the link, unless the body placed the link itself
    (its template used ``{{ unsubscribe_url }}``, which drafts as ``UNSUBSCRIBE_MARKER``);
    ``unsubscribe_mailto`` is offered in ``List-Unsubscribe`` too.

    The bytes are written directly rather than through :mod:`email.mime`: the structure is
    fixed, so none of that machinery is needed, and it was the largest CPU cost of a send
    (``bench.build`` compares the two). Quoted-printable comes from :func:`binascii.b2a_qp`,
    encoded words from :class:`email.header.Header`.
    """
    _check_header("Subject", subject, _UNSAFE_IN_TEXT)
    for name, value in (
        ("From", sender),
        ("To", to),
        ("Message-ID", message_id),
        ("List-Unsubscribe", unsubscribe_url),
        ("List-Unsubscribe", unsubscribe_mailto),
    ):
        if value:
            _check_header(name, value, _UNSAFE_IN_TOKEN)
    targets = []
    if unsubscribe_url:
        targets.append(f"<{unsubscribe_url}>")
    if unsubscribe_mailto:
        targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
    boundary = "=_" + os.urandom(12).hex()  # "=_" never occurs in quoted-printable text
    lines = [
        _single_line("From", sender),
        _single_line("To", to),
        _subject(subject),
        "Date: " + formatdate(usegmt=True),
        _single_line("Message-ID", message_id),
    ]
    if targets:
        lines.append(_list_header("List-Unsubscribe", targets))
    if unsubscribe_url:
        lines.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    lines += ["MIME-Version: 1.0", f'Content-Type: multipart/alternative; boundary="{boundary}"']

    text, markup = body, text_to_html(body)
    if UNSUBSCRIBE_MARKER in body:
        # The body placed the link itself ({{ unsubscribe_url }}): no footer of ours.
        link = unsubscribe_url or ""
        anchor = f'<a href="{html.escape(link)}">{html.escape(link)}</a>' if link else ""
        text = text.replace(UNSUBSCRIBE_MARKER, link)
        markup = markup.replace(UNSUBSCRIBE_MARKER, anchor)
    elif unsubscribe_url:
        text += f"\n\n--\nTo stop receiving these emails: {unsubscribe_url}\n"
        footer = (
            '<p style="color:#666;font-size:12px">To stop receiving these emails, '
            f'<a href="{html.escape(unsubscribe_url)}">unsubscribe</a>.</p>\n'
        )
        markup = markup.replace("</body></html>", footer + "</body></html>")

    delimiter = b"\r\n--" + boundary.encode("ascii")
    data = b"".join(
        (
            "\r\n".join(lines).encode("utf-8"),
            b"\r\n",  # the blank line after the headers follows from the first delimiter's CRLF
            delimiter,
            b"\r\n",
            _PART_HEADERS % b"plain",
            _quoted_printable(text),
            delimiter,
            b"\r\n",
            _PART_HEADERS % b"html",
            _quoted_printable(markup),
            delimiter,
            b"--\r\n",
        )
    )
    return OutgoingMessage(sender=sender, recipient=to, message_id=message_id, data=data)


def _check_header(name: str, value: str, unsafe: re.Pattern[str]) -> None:
    if unsafe.search(value):
        raise PermanentFailure(f"unsafe header: {name}")


def _single_line(name: str, value: str) -> str:
    # An address or a Message-ID has no place to fold: it must fit one line.
    line = f"{name}: {value}"
    if len(line) > _MAX_LINE:
        raise PermanentFailure(f"header too long: {name}")
    return line


@functools.lru_cache(maxsize=1024)  # a batch's subject is often the same for every recipient
def _subject(subject: str) -> str:
    """The Subject header, folded; RFC 2047 encoded words when plain text would not survive.

    Plain ASCII is written as it is, folded at spaces. Encoded words (each at most 75
    characters, on lines of at most 76) carry non-ASCII text, text a reader would take for an
    encoded word itself (``=?``), whitespace at either end (a parser strips it) and a word too
    long to fit a line.
    """
    if (
        subject.isascii()
        and "=?" not in subject
        and subject == subject.strip(" \t")
        and (folded := _fold("Subject", subject)) is not None
    ):
        return folded
    # Header folds to 78 columns by default, which lets a word on a continuation line reach 77
    # characters; 76 keeps every word within RFC 2047's 75.
    encoded = Header(subject, "utf-8", header_name="Subject").encode(linesep="\r\n", maxlinelen=76)
    return "Subject: " + encoded


def _fold(name: str, value: str) -> str | None:
    """``name: value`` folded at single spaces into lines of at most 78 characters where the
    words allow (``None`` if a word cannot fit even a 998-character line)."""
    first = f"{name}: {value}"
    if len(first) <= _FOLD_AT:
        return first
    words = value.split(" ")
    lines, line = [], f"{name}: {words[0]}"
    for word in words[1:]:
        # Fold only before a space followed by a word: a line of whitespace alone is not
        # allowed, and unfolding (removing the CRLF) gives back the space.
        if word and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    if max(map(len, lines)) > _MAX_LINE:
        return None
    return "\r\n".join(lines)


def _list_header(name: str, items: list[str]) -> str:
    """A comma-separated header; when long, each item on a line of its own."""
    line = f"{name}: {', '.join(items)}"
    if len(line) <= _FOLD_AT:
        return line
    if max(len(item) for item in items) + 2 > _MAX_LINE:
        raise PermanentFailure(f"header too long: {name}")
    return f"{name}:\r\n " + ",\r\n ".join(items)


def _quoted_printable(text: str) -> bytes:
    """UTF-8 quoted-printable with CRLF line breaks, lines of at most 76 characters.

    Any line break of the text (CRLF, LF or a lone CR) becomes CRLF, as the MIME classes
    did. ``b2a_qp`` encodes ``=``, controls, 8-bit bytes, whitespace at the end of a line and a
    lone ``.`` on a line; SMTP's dot-stuffing takes care of any other line that starts with one.
    """
    normalized = text.replace("\r\n", "\n").replace("\r", "\n")
    try:
        raw = normalized.encode("utf-8")
    except UnicodeEncodeError:
        raise PermanentFailure("message text is not valid Unicode") from None
    encoded = binascii.b2a_qp(raw, istext=True)
    # b2a_qp encodes a space or tab at the end of a line after it has measured the line, so a
    # line of 75 or 76 characters can come out at 77 or 78: break it softly before the escape.
    encoded = _OVERLONG_QP_LINE.sub(rb"\1=\n\2", encoded)
    # LF in, CRLF out: b2a_qp writes its soft breaks with the line ending it detects first,
    # and text with no line break at all would get LF ones.
    return encoded.replace(b"\n", b"\r\n")


def text_to_html(body: str) -> str:
    """Escape everything; blank lines become paragraphs and newlines line breaks."""
    paragraphs = [p for p in body.replace("\r\n", "\n").split("\n\n") if p.strip()]
    inner = "\n".join(
        "<p>" + "<br>\n".join(html.escape(line) for line in p.split("\n")) + "</p>"
        for p in paragraphs
    )
    return f"<!doctype html>\n<html><body>\n{inner}\n</body></html>\n"


class _StaleConnection(Exception):
    """The server closed the connection before our first command of a transaction."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0
    last_used: float = 0.0


class SmtpMailer:
    """Sends through one SMTP server with at most ``size`` connections, reused."""

    def __init__(
        self,
        settings: Settings,
        *,
        size: int,
        max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        signer: DkimSigner | None = None,
        slow_down_s: float = SLOW_DOWN_S,
        slow_down_interval_s: float = SLOW_DOWN_INTERVAL_S,
    ) -> None:
        self._settings = settings
        self._signer = signer
        self._slow_down_s = slow_down_s
        self._slow_down_interval_s = slow_down_interval_s
        self._slow_until = 0.0
        self._paced = asyncio.Lock()
        self._next_paced_send = 0.0
        self._slots = asyncio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._max_messages = max_messages_per_connection
        self._idle_timeout_s = idle_timeout_s

    @property
    def slowed_down(self) -> bool:
        """Whether the server recently asked us to slow down (421/451)."""
        return time.monotonic() < self._slow_until

    async def send(self, message: OutgoingMessage) -> str:
        """Send ``message``; return the server's reply or raise a DeliveryFailure."""
        try:
            if not self.slowed_down:
                return await self._send(message)
            async with self._paced:
                await asyncio.sleep(max(0.0, self._next_paced_send - time.monotonic()))
                self._next_paced_send = time.monotonic() + self._slow_down_interval_s
                return await self._send(message)
        except DeliveryFailure as failure:
            if failure.smtp_code in SLOW_DOWN_CODES:
                if not self.slowed_down:
                    log.warning(
                        "smtp_slow_down",
                        smtp_code=failure.smtp_code,
                        for_s=self._slow_down_s,
                        interval_s=self._slow_down_interval_s,
                    )
                self._slow_until = time.monotonic() + self._slow_down_s
            raise

    async def _send(self, message: OutgoingMessage) -> str:
        async with self._slots:
            started = time.perf_counter()
            conn, reused = await self._checkout()
            try:
                reply = await self._transmit(conn, message)
            except _StaleConnection as stale:
                await self._discard(conn)
                if not reused:
                    raise classify_smtp(stale.cause, stage="mail") from stale.cause
                # The server had closed this idle connection before our MAIL command: nothing
                # was accepted on it, so one attempt on a fresh connection cannot duplicate.
                conn, _ = await self._checkout(fresh=True)
                try:
                    reply = await self._transmit(conn, message)
                except _StaleConnection as again:
                    await self._discard(conn)
                    raise classify_smtp(again.cause, stage="mail") from again.cause
                except BaseException:
                    await self._discard(conn)
                    raise
            except BaseException:
                await self._discard(conn)
                raise
            SMTP_SEND.observe(time.perf_counter() - started)
            if conn.sent >= self._max_messages:
                await self._discard(conn)
            else:
                self._idle.append(conn)
            return reply

    async def _transmit(self, conn: _Connection, message: OutgoingMessage) -> str:
        sender, to, payload = message.sender, message.recipient, message.data
        if self._signer is not None:
            payload = self._signer.sign(payload)
        client = conn.client
        stage = "mail"
        try:
            # UTF-8 in the envelope or in a header (an internationalized address, RFC 6532).
            options = [] if (sender + to).isascii() and payload.isascii() else ["SMTPUTF8"]
            if options and not client.supports_extension("smtputf8"):
                raise PermanentFailure("address needs SMTPUTF8, which the server does not offer")
            await client.mail(sender, options=options)
            stage = "rcpt"
            await client.rcpt(to)
            stage = "data"
            response = await client.data(payload)
        except aiosmtplib.SMTPServerDisconnected as exc:
            if stage == "mail":
                raise _StaleConnection(exc) from exc
            raise classify_smtp(exc, stage=stage) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise classify_smtp(exc, stage=stage) from exc
        conn.sent += 1
        conn.last_used = time.monotonic()
        return f"{response.code} {response.message}"

    async def _checkout(self, *, fresh: bool = False) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.client.is_connected and now - conn.last_used < self._idle_timeout_s:
                return conn, True
            await self._discard(conn)
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        s = self._settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            timeout=s.smtp_timeout_seconds,
            use_tls=s.smtp_security is SmtpSecurity.TLS,
            start_tls=s.smtp_security is SmtpSecurity.STARTTLS,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise classify_smtp(exc, stage="connect") from exc
        return _Connection(client=client, last_used=time.monotonic())

    async def _discard(self, conn: _Connection) -> None:
        try:
            if conn.client.is_connected:
                await asyncio.wait_for(conn.client.quit(), timeout=2)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            conn.client.close()

    async def close(self) -> None:
        """Say QUIT on every idle connection."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._discard(c) for c in idle))
