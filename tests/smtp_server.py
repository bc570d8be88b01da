"""A real SMTP server on loopback (aiosmtpd) that records what it accepts.

It can be told to misbehave per address: reply with a given code for the first ``k`` attempts,
or always, to RCPT (the recipient's address), to DATA, or to MAIL (the sender's address: every
message from it); delay before answering DATA. Everything it receives is kept in order, so tests can
count deliveries per Message-ID. ``stop(close_sessions=True)`` shuts down as a real server does:
no new connection, and each open one closed once the message in it (if any) has its reply.
"""

from __future__ import annotations

import asyncio
import email.policy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes = b""  # the DATA exactly as it arrived (what a DKIM verifier reads)
    received_at: float = 0.0  # time.time() when the message was accepted

    @property
    def message_id(self) -> str:
        return str(self.message["Message-ID"])


@dataclass
class Rule:
    """Reply ``reply`` to RCPT (or DATA when ``at_data``, MAIL when ``at_mail``) for the first
    ``times`` attempts; at RCPT, ``delay_seconds`` after the command."""

    reply: str
    times: int | None = None  # None: always
    at_data: bool = False
    at_mail: bool = False  # keyed by the sender's address
    delay_seconds: float = 0.0
    seen: int = 0

    def fires(self) -> bool:
        self.seen += 1
        return self.times is None or self.seen <= self.times


@dataclass
class RecordingSMTPServer:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    rules: dict[str, Rule] = field(default_factory=dict)
    data_delay_seconds: float = 0.0
    connections: int = 0
    # Messages whose DATA has arrived and whose reply is not sent yet: sends truly in flight.
    data_in_progress: int = 0
    _server: asyncio.AbstractServer | None = None
    # Called after each message is accepted (before its reply), with the server.
    on_message: Callable[[RecordingSMTPServer], None] | None = None
    _sessions: set[SMTP] = field(default_factory=set)
    _busy: set[SMTP] = field(default_factory=set)  # between MAIL and the reply to DATA
    _closing: bool = False

    async def start(self) -> None:
        self._closing = False
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=self.host, port=self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> SMTP:
        self.connections += 1
        session = SMTP(self, hostname="test-smtp")
        self._sessions = {s for s in self._sessions if s.transport and not s.transport.is_closing()}
        self._sessions.add(session)
        return session

    async def stop(self, *, close_sessions: bool = False) -> None:
        """Stop listening; with ``close_sessions``, also close every open connection, each as
        soon as the message it carries (if any) has been answered."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if close_sessions:
            self._closing = True
            for session in self._sessions - self._busy:
                if session.transport is not None:
                    session.transport.close()
            self._sessions &= self._busy
        if server is not None:
            await server.wait_closed()

    def reset(self) -> None:
        self.received.clear()
        self.rules.clear()
        self.data_delay_seconds = 0.0
        self.connections = 0
        self.data_in_progress = 0
        self.on_message = None

    # -- aiosmtpd hooks --------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self._closing:  # shutting down: a real server refuses the transaction and hangs up
            self._close_after_reply(server)
            return "421 4.3.2 shutting down"
        rule = self.rules.get(address.lower())
        if rule is not None and rule.at_mail and rule.fires():
            return rule.reply
        self._busy.add(server)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rule = self.rules.get(address.lower())
        if rule is not None and not (rule.at_data or rule.at_mail) and rule.fires():
            await asyncio.sleep(rule.delay_seconds)
            return rule.reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_in_progress += 1
        try:
            return await self._answer_data(envelope)
        finally:
            self.data_in_progress -= 1
            self._busy.discard(server)
            if self._closing:
                self._close_after_reply(server)

    def _close_after_reply(self, session: SMTP) -> None:
        # aiosmtpd writes the reply as soon as the hook returns, before it next yields.
        if session.transport is not None:
            asyncio.get_running_loop().call_soon(session.transport.close)

    async def _answer_data(self, envelope: Envelope) -> str:
        if self.data_delay_seconds:
            await asyncio.sleep(self.data_delay_seconds)
        for address in envelope.rcpt_tos:
            rule = self.rules.get(address.lower())
            if rule is not None and rule.at_data and rule.fires():
                return rule.reply
        message = BytesParser(policy=email.policy.default).parsebytes(
            envelope.original_content or b""
        )
        assert isinstance(message, EmailMessage)
        self.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                message=message,
                raw=envelope.original_content or b"",
                received_at=time.time(),
            )
        )
        if self.on_message is not None:
            self.on_message(self)
        return "250 Message accepted"

    # -- what tests ask --------------------------------------------------------------------

    def message_ids(self) -> Counter[str]:
        return Counter(r.message_id for r in self.received)

    def to_addresses(self) -> Counter[str]:
        return Counter(addr for r in self.received for addr in r.rcpt_tos)
