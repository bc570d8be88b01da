"""Sending over SMTP: building the MIME message and a small pool of reused connections.

A :class:`Mailer` is anything with ``send(message) -> reply``; :class:`SmtpMailer` is the real
one. Connections are reused (on loopback a new connection per message costs about twice as
much) and replaced after an error, after ``max_messages_per_connection`` sends, or when idle
for longer than ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import html
import time
from dataclasses import dataclass
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
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
# The stdlib's legacy MIME classes and policy: the same RFC 5322 output as the newer API for
# what Mailroom sends, at a third of the CPU (that API parses every header it stores and
# refolds it on output: the largest cost of a send in the worker's profile).
_WIRE_POLICY = compat32.clone(linesep="\r\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


log = structlog.get_logger(__name__)


class Mailer(Protocol):
    """Something that delivers a built message (the real one speaks SMTP)."""

    async def send(self, message: Message) -> str: ...

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
) -> Message:
    """A multipart/alternative message: the text as written, and the same text as safe HTML.

    Both parts are UTF-8 in quoted-printable; a non-ASCII subject is RFC 2047 encoded. A line
    break in any header value is refused (ValueError): nothing can add a header.

    With ``unsubscribe_url`` (an https link, or http in development) the message carries
    ``List-Unsubscribe`` and RFC 8058's ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``,
    and both parts end with a footer holding the link, unless the body placed the link itself
    (its template used ``{{ unsubscribe_url }}``, which drafts as ``UNSUBSCRIBE_MARKER``);
    ``unsubscribe_mailto`` is offered in ``List-Unsubscribe`` too.
    """
    headers = {
        "From": sender,
        "To": to,
        "Subject": subject,
        "Message-ID": message_id,
        "List-Unsubscribe": unsubscribe_url or "",
        "mailto": unsubscribe_mailto or "",
    }
    for name, value in headers.items():
        if "\r" in value or "\n" in value:
            raise ValueError(f"the {name} header must not contain a line break")
    message = MIMEMultipart("alternative")
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    targets = []
    if unsubscribe_url:
        targets.append(f"<{unsubscribe_url}>")
    if unsubscribe_mailto:
        targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
    if targets:
        message["List-Unsubscribe"] = ", ".join(targets)
    if unsubscribe_url:
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
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
    message.attach(MIMEText(text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    message.attach(MIMEText(markup, "html", _UTF8_QP))  # type: ignore[arg-type]
    return message


def wire_bytes(message: Message) -> bytes:
    """The message as sent over SMTP (CRLF line endings)."""
    return message.as_bytes(policy=_WIRE_POLICY)


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

    async def send(self, message: Message) -> str:
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

    async def _send(self, message: Message) -> str:
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

    async def _transmit(self, conn: _Connection, message: Message) -> str:
        sender, to = str(message["From"]), str(message["To"])
        payload = wire_bytes(message)
        if self._signer is not None:
            payload = self._signer.sign(payload)
        client = conn.client
        stage = "mail"
        try:
            options = [] if (sender + to).isascii() else ["SMTPUTF8"]
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
