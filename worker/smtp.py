"""Sending over SMTP: building the message bytes and a small pool of reused connections.

A :class:`Mailer` is anything with ``send(message) -> reply``; :class:`SmtpMailer` is the real
one. Connections are reused (on loopback a new connection per message costs about twice as
much) and replaced after an error, after ``max_messages_per_connection`` sends, or when idle
for longer than ``idle_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import functools
import html
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formatdate
from typing import Protocol

import aiosmtplib
import structlog

from shared.addresses import InvalidAddress
from shared.composition import BODY_FORMATS, checked_reply_to, from_name_problem
from shared.headers import header_pattern
from shared.markdown import render_markdown
from shared.metrics import (
    SMTP_CONCURRENCY_LIMIT,
    SMTP_FAILURES,
    SMTP_RELAY_FAILURES,
    SMTP_RELAY_SENDS,
    SMTP_RELAY_UP,
    SMTP_SEND,
    SMTP_SLOWDOWN_UNTIL,
    SMTP_SLOWED_DOWN,
    SMTP_THROTTLED,
    smtp_reply_class,
)
from shared.ratelimits import Limit, LocalWindow
from shared.settings import DEFAULT_RELAY_NAME, Settings, SmtpRelay, SmtpSecurity
from shared.templating import UNSUBSCRIBE_MARKER
from worker.dkim import DkimSigner
from worker.failures import (
    DeliveryFailure,
    PermanentFailure,
    RateLimited,
    asks_to_slow_down,
    classify_smtp,
    relay_failing,
)

MAX_MESSAGES_PER_CONNECTION = 100
IDLE_TIMEOUT_SECONDS = 30.0
# When the server asks to slow down (worker.failures.asks_to_slow_down), the number of sends in
# flight halves, down to one; below one, sends are paced: PACE_MIN_SECONDS apart at first, twice
# as far apart after each further request, up to PACE_MAX_SECONDS. The cap is low on purpose: the
# jobs queued behind the one slot (up to the worker's concurrency of them) must still finish
# within their time limit, and a server that refuses everything for a while then costs one attempt
# per two seconds (the retries' own backoff spreads them further). Successes undo it step by step,
# see SmtpMailer.
PACE_MIN_SECONDS = 0.25
PACE_MAX_SECONDS = 2.0
# A slow-down also ends by itself this long after the last reply that asked for it: a worker
# that goes quiet (no sends, so no successes to undo it) starts its next batch at full speed,
# and the metric of the slow-down has an end to show.
SLOWDOWN_HOLD_SECONDS = 300.0

# RFC 5322: a line is at most 998 characters and should be at most 78.
_MAX_LINE = 998
_FOLD_AT = 78
# What no header value may carry (shared.headers, the same rule every boundary applies): line
# breaks of any kind, every other C0 and C1 control, DEL, and lone surrogates. A tab is legal
# whitespace in an unstructured header (the subject) and nowhere else Mailroom writes.
_UNSAFE_IN_TEXT = header_pattern(allow_tab=True)
_UNSAFE_IN_TOKEN = header_pattern(allow_tab=False)
_OVERLONG_QP_LINE = re.compile(rb"^(.{74,75})(=09|=20)$", re.MULTILINE)
# The marker as a Markdown link's target ([unsubscribe]({{ unsubscribe_url }})): markdown-it
# percent-encodes the "%" of a URL.
_MARKER_AS_TARGET = UNSUBSCRIBE_MARKER.replace("%", "%25")
_PART_HEADERS = (
    b'Content-Type: text/%s; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n'
)


log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SmtpServer:
    """Where the worker sends and how it connects, built once from the settings."""

    host: str
    port: int
    timeout_seconds: float
    security: SmtpSecurity = SmtpSecurity.NONE
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # What metrics and log lines call it (a relay's name in MAILROOM_SMTP_RELAYS).
    name: str = DEFAULT_RELAY_NAME

    @classmethod
    def from_settings(cls, settings: Settings) -> SmtpServer:
        """The server of ``MAILROOM_SMTP_*`` (each value checked when the settings were read)."""
        return cls.from_relay(settings.smtp_relay())

    @classmethod
    def from_relay(cls, relay: SmtpRelay) -> SmtpServer:
        """The server of one relay of the settings (checked when they were read)."""
        return cls(
            host=relay.host,
            port=relay.port,
            timeout_seconds=relay.timeout_seconds,
            security=relay.security,
            username=relay.username,
            password=relay.password.get_secret_value() if relay.password else None,
            name=relay.name,
        )


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
    from_name: str | None = None,
    reply_to: str | None = None,
    body_format: str = "text",
) -> OutgoingMessage:
    """A multipart/alternative message: the text as written, and the same text as safe HTML.

    With ``body_format="markdown"`` the body is CommonMark instead: its sanitized HTML
    (:func:`shared.markdown.render_markdown`) is the HTML part, and the plain text made from it,
    each link's target written after its text, is the text part. That rendering is linear in
    the body's length; callers run a Markdown message off the event loop.

    ``from_name`` makes ``From: "Name" <sender>`` (RFC 5322 quoting, RFC 2047 encoded words for
    non-ASCII text); ``reply_to`` adds a ``Reply-To`` of that one address. A name or address
    :mod:`shared.composition` refuses is a :class:`PermanentFailure`.

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
        ("Reply-To", reply_to),
    ):
        if value:
            _check_header(name, value, _UNSAFE_IN_TOKEN)
    if body_format not in BODY_FORMATS:
        raise PermanentFailure(f"unknown body format {body_format!r}")
    targets = []
    if unsubscribe_url:
        targets.append(f"<{unsubscribe_url}>")
    if unsubscribe_mailto:
        targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
    boundary = "=_" + os.urandom(12).hex()  # "=_" never occurs in quoted-printable text
    lines = [
        _from(sender, from_name),
        _single_line("To", to),
        _subject(subject),
        "Date: " + formatdate(usegmt=True),
        _single_line("Message-ID", message_id),
    ]
    if reply_to:
        lines.append(_single_line("Reply-To", _reply_to(reply_to)))
    if targets:
        lines.append(_list_header("List-Unsubscribe", targets))
    if unsubscribe_url:
        lines.append("List-Unsubscribe-Post: List-Unsubscribe=One-Click")
    lines += ["MIME-Version: 1.0", f'Content-Type: multipart/alternative; boundary="{boundary}"']

    if body_format == "markdown":
        text, markup, placed = _markdown_parts(body, unsubscribe_url)
    else:
        text, markup, placed = body, text_to_html(body), UNSUBSCRIBE_MARKER in body
    if placed:
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


def _from(sender: str, name: str | None) -> str:
    """``From: sender``, or ``From: "Name" <sender>`` with the name quoted or encoded."""
    if not name:
        return _single_line("From", sender)
    problem = from_name_problem(name)
    if problem is not None:
        raise PermanentFailure(f"unsafe header: From (display name: {problem})")
    if name.isascii() and "=?" not in name:
        # A quoted-string (RFC 5322 3.2.4): a backslash and a double quote are escaped.
        phrase = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    else:
        # Encoded words, as for the subject: each one is an atom, so a phrase may hold it.
        phrase = Header(name, "utf-8", header_name="From").encode(linesep="\r\n", maxlinelen=76)
    header = f"From: {phrase} <{sender}>"
    if len(header.rsplit("\r\n", 1)[-1]) > _FOLD_AT:
        header = f"From: {phrase}\r\n <{sender}>"
    if max(len(line) for line in header.split("\r\n")) > _MAX_LINE:
        raise PermanentFailure("header too long: From")
    return header


def _reply_to(address: str) -> str:
    # Checked again here (defence in depth): one address, nothing a list or a name could add.
    try:
        checked_reply_to(address)
    except InvalidAddress:
        raise PermanentFailure("invalid header: Reply-To is not a single address") from None
    return address


def _markdown_parts(body: str, unsubscribe_url: str | None) -> tuple[str, str, bool]:
    """The text and HTML parts of a Markdown body with the recipient's unsubscribe link in
    place of the marker, and whether the marker was there (in the text part, which holds
    every link target: a marker lost in rendering, an unused link reference, gets the footer).

    As a link's target the marker becomes the link; as text, a link to it. Its anchor quotes
    with ``'``, so one that lands inside an attribute (a link's title) stays inside it.
    """
    rendered = render_markdown(body)
    placed = UNSUBSCRIBE_MARKER in rendered.text or _MARKER_AS_TARGET in rendered.text
    link = unsubscribe_url or ""
    shown = html.escape(link)
    anchor = f"<a href='{shown}'>{shown}</a>" if link else ""
    text = rendered.text.replace(_MARKER_AS_TARGET, link).replace(UNSUBSCRIBE_MARKER, link)
    markup = rendered.html.replace(_MARKER_AS_TARGET, shown).replace(UNSUBSCRIBE_MARKER, anchor)
    return text, _html_document(markup), placed


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
    return _html_document(inner)


def _html_document(inner: str) -> str:
    """The HTML part around the body's markup (the footer goes before ``</body>``)."""
    return f"<!doctype html>\n<html><body>\n{inner}\n</body></html>\n"


class AdaptiveLimiter:
    """At most ``limit`` holders at once, with a limit that can move between 1 and ``size``.

    asyncio.Semaphore's algorithm (a FIFO of waiting futures, a slot handed straight to the
    next waiter) with a ceiling that moves: lowering it lets the holders above it finish and
    admits no one until the count is under it; raising it admits waiters at once. Release is
    synchronous, so no cancellation can lose a slot or a wake-up (an asyncio.Condition needs
    its lock to notify, and on Python 3.11 a waiter cancelled just after being notified
    swallows the notification).
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self.size = size
        self.limit = size
        self.active = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted a slot just as the wait was cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, min(self.size, limit))
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


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
    """Sends through one SMTP server (a relay) with at most ``size`` connections, reused.

    The relay is up until a failure says it is in trouble (:func:`worker.failures.relay_failing`:
    it refused or dropped the connection, timed out, answered 421), then down until a send that
    started after that succeeds or :meth:`probe` connects; each change is logged
    (``smtp_relay_down`` with why, ``smtp_relay_up``) and published as
    ``mailroom_smtp_relay_up``. Being down changes nothing here: :class:`worker.relays.RelayMailer`
    decides where to send. ``rate_limits`` are this relay's own limits, counted in this process
    (:class:`shared.ratelimits.LocalWindow`): a full window raises RateLimited before anything
    is sent.

    How many messages are in flight adapts to the server (additive increase, multiplicative
    decrease, as TCP does): a reply that asks this sender to slow down halves the limit, down to
    one, then paces the sends (PACE_MIN_SECONDS, doubling up to PACE_MAX_SECONDS); every
    ``limit`` successes with no such reply in between undo one step (halve the pace, or add one
    to the limit, up to ``size``), and ``slowdown_hold_seconds`` after the last reply that asked
    for it the slow-down ends whatever happened since. A reply about one recipient (a
    greylisting 451 to RCPT) or any other failure changes nothing. Sends that started before the
    last decrease went out at the old limit: their replies are counted (the metric) but change
    nothing, so a burst of refusals from the sends in flight halves the limit once, and their
    successes do not undo it.
    """

    def __init__(
        self,
        server: SmtpServer,
        *,
        size: int,
        max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
        idle_timeout_seconds: float = IDLE_TIMEOUT_SECONDS,
        signer: DkimSigner | None = None,
        slowdown_hold_seconds: float = SLOWDOWN_HOLD_SECONDS,
        rate_limits: Sequence[Limit] = (),
    ) -> None:
        self._server = server
        self.name = server.name
        self._windows = [LocalWindow(limit) for limit in rate_limits]
        self._sends_metric = SMTP_RELAY_SENDS.labels(relay=server.name)
        self._failures_metric = SMTP_RELAY_FAILURES.labels(relay=server.name)
        self._up_metric = SMTP_RELAY_UP.labels(relay=server.name)
        self._up_metric.set(1)
        self._down_since: float | None = None  # time.monotonic() when marked down; None: up
        self._health_epoch = 0  # one more at each mark down
        # Called whenever the concurrency limit moves; a RelayMailer publishes the sum instead.
        self.on_limit_change: Callable[[], None] = self._publish_limit
        self._signer = signer
        self._limiter = AdaptiveLimiter(size)
        self._epoch = 0  # one more at each decrease
        self._successes = 0  # in this epoch, since the last change
        self._pace_seconds = 0.0
        self._next_send_at = 0.0
        self._idle: list[_Connection] = []
        self._max_messages = max_messages_per_connection
        self._idle_timeout_seconds = idle_timeout_seconds
        self._hold_seconds = slowdown_hold_seconds
        self._slowed_until = 0.0  # time.monotonic() when the slow-down ends; 0: none
        self.on_limit_change()
        # Read at scrape time, so an idle worker's slow-down shows as over once its time is up.
        # A worker process has one mailer (a RelayMailer replaces these with its relays' sum).
        SMTP_SLOWED_DOWN.set_function(lambda: float(self.slowed_down))
        SMTP_SLOWDOWN_UNTIL.set_function(self.slowdown_until_unix)

    @property
    def is_up(self) -> bool:
        """Whether the relay counts as up (no failure of its own since it last worked)."""
        return self._down_since is None

    @property
    def concurrency_limit(self) -> int:
        """How many messages may be in flight now (``size`` unless the server throttled)."""
        return self._limiter.limit

    @property
    def pace_seconds(self) -> float:
        """The least time between two sends now (0: not paced)."""
        return self._pace_seconds

    @property
    def slowed_down(self) -> bool:
        """Whether this mailer sends slower than it may because the server asked it to."""
        slower = bool(self._pace_seconds) or self._limiter.limit < self._limiter.size
        return slower and self._slowed_until > time.monotonic()

    def slowdown_until_unix(self) -> float:
        """Unix time the slow-down ends at the latest (0 when not slowed down)."""
        if not self.slowed_down:
            return 0.0
        return time.time() + (self._slowed_until - time.monotonic())

    async def send(self, message: OutgoingMessage) -> str:
        """Send ``message``; return the server's reply or raise a DeliveryFailure (or
        RateLimited when one of the relay's own windows is full)."""
        for window in self._windows:
            resume_at = window.take()
            if resume_at is not None:
                raise RateLimited(window.limit, resume_at)
        self._end_slowdown_if_over()
        async with self._limiter:
            self._end_slowdown_if_over()  # it may have ended while this send waited
            if self._pace_seconds:
                # Paced only at a limit of one: the holders of the one slot take turns here.
                await asyncio.sleep(max(0.0, self._next_send_at - time.monotonic()))
                self._next_send_at = time.monotonic() + self._pace_seconds
            epoch, health_epoch = self._epoch, self._health_epoch
            try:
                reply = await self._send(message)
            except DeliveryFailure as failure:
                if failure.stage is not None:  # a failed exchange, not a message we withheld
                    SMTP_FAILURES.labels(reply=smtp_reply_class(failure.smtp_code)).inc()
                    self._failures_metric.inc()
                if asks_to_slow_down(failure):
                    self._slow_down(failure, epoch)
                if relay_failing(failure):
                    self._mark_down(failure)
                raise
            self._sends_metric.inc()
            if self._down_since is not None and health_epoch == self._health_epoch:
                self._mark_up("send")  # started after the relay was marked down, and worked
            self._succeeded(epoch)
            return reply

    async def probe(self) -> None:
        """Connect (greeting, TLS, AUTH) and keep the connection for the next send; a relay
        that was down is up again. Raises the DeliveryFailure of a failed connection."""
        conn = await self._connect()
        self._idle.append(conn)
        if self._down_since is not None:
            self._mark_up("probe")

    def _mark_down(self, failure: DeliveryFailure) -> None:
        self._health_epoch += 1  # sends that started before this say nothing of the relay now
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        self._up_metric.set(0)
        log.warning(
            "smtp_relay_down",
            relay=self.name,
            reason=failure.message,
            stage=failure.stage,
            smtp_code=failure.smtp_code,
        )

    def _mark_up(self, via: str) -> None:
        down_since, self._down_since = self._down_since, None
        self._up_metric.set(1)
        down_for = time.monotonic() - down_since if down_since is not None else 0.0
        log.info("smtp_relay_up", relay=self.name, via=via, down_for_s=round(down_for, 3))

    def _publish_limit(self) -> None:
        SMTP_CONCURRENCY_LIMIT.set(self._limiter.limit)

    def _slow_down(self, failure: DeliveryFailure, epoch: int) -> None:
        SMTP_THROTTLED.inc()
        self._slowed_until = time.monotonic() + self._hold_seconds
        if epoch != self._epoch:
            return  # started before the last decrease, which already answered this burst
        self._epoch += 1
        self._successes = 0
        old_limit, old_pace = self._limiter.limit, self._pace_seconds
        if old_limit > 1:
            self._limiter.set_limit(old_limit // 2)
        else:
            self._pace_seconds = min(PACE_MAX_SECONDS, max(PACE_MIN_SECONDS, old_pace * 2))
            self._next_send_at = time.monotonic() + self._pace_seconds
        self.on_limit_change()
        log.warning(
            "smtp_throttled",
            smtp_code=failure.smtp_code,
            stage=failure.stage,
            old_limit=old_limit,
            new_limit=self._limiter.limit,
            old_pace_s=old_pace,
            pace_s=self._pace_seconds,
        )

    def _succeeded(self, epoch: int) -> None:
        if epoch != self._epoch:
            return  # sent at the limit before the last decrease: says nothing of the new one
        limit, pace = self._limiter.limit, self._pace_seconds
        if not pace and limit >= self._limiter.size:
            return
        self._successes += 1
        if self._successes < limit:
            return
        self._successes = 0
        if pace:
            self._pace_seconds = pace / 2 if pace / 2 >= PACE_MIN_SECONDS else 0.0
        else:
            self._limiter.set_limit(limit + 1)
            self.on_limit_change()
        if not self._pace_seconds and self._limiter.limit >= self._limiter.size:
            self._slowed_until = 0.0
        log.info(
            "smtp_recovered",
            old_limit=limit,
            new_limit=self._limiter.limit,
            old_pace_s=pace,
            pace_s=self._pace_seconds,
        )

    def _end_slowdown_if_over(self) -> None:
        if not self._slowed_until or time.monotonic() < self._slowed_until:
            return
        self._slowed_until = 0.0
        if not self._pace_seconds and self._limiter.limit >= self._limiter.size:
            return
        old_limit, old_pace = self._limiter.limit, self._pace_seconds
        self._epoch += 1  # replies to sends started while slowed down change nothing now
        self._successes = 0
        self._pace_seconds = 0.0
        self._limiter.set_limit(self._limiter.size)
        self.on_limit_change()
        log.info(
            "smtp_slowdown_ended",
            old_limit=old_limit,
            new_limit=self._limiter.limit,
            old_pace_s=old_pace,
            held_s=self._hold_seconds,
        )

    async def _send(self, message: OutgoingMessage) -> str:
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
            except BaseException as exc:
                await self._drop(conn, exc)
                raise
        except BaseException as exc:
            await self._drop(conn, exc)
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
            if conn.client.is_connected and now - conn.last_used < self._idle_timeout_seconds:
                return conn, True
            await self._discard(conn)
        return await self._connect(), False

    async def _connect(self) -> _Connection:
        server = self._server
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            timeout=server.timeout_seconds,
            use_tls=server.security is SmtpSecurity.TLS,
            start_tls=server.security is SmtpSecurity.STARTTLS,
            username=server.username,
            password=server.password,
        )
        try:
            await client.connect()
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise classify_smtp(exc, stage="connect") from exc
        return _Connection(client=client, last_used=time.monotonic())

    async def _drop(self, conn: _Connection, exc: BaseException) -> None:
        """Get rid of a connection a send failed on.

        Cut off mid-command (the job cancelled at the end of a shutdown's grace, or no reply in
        time), the connection is closed at once: a QUIT would first wait for the reply still
        owed, up to its own timeout, and hold the shutdown. Otherwise it is closed politely.
        """
        if isinstance(exc, asyncio.CancelledError | TimeoutError) or isinstance(
            exc.__cause__, aiosmtplib.SMTPTimeoutError
        ):
            conn.client.close()
        else:
            await self._discard(conn)

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
