"""A real SMTP server on loopback (aiosmtpd) that records what it accepts.

It can be told to misbehave per address: reply with a given code for the first ``k`` attempts,
or always, to RCPT (the recipient's address), to DATA, or to MAIL (the sender's address: every
message from it); delay before answering DATA. Everything it receives is kept in order, so tests can
count deliveries per Message-ID.
"""

from __future__ import annotations

import asyncio
import email.policy
import time
from collections import Counter
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

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host=self.host, port=self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> SMTP:
        self.connections += 1
        return SMTP(self, hostname="test-smtp")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def reset(self) -> None:
        self.received.clear()
        self.rules.clear()
        self.data_delay_seconds = 0.0
        self.connections = 0
        self.data_in_progress = 0

    # -- aiosmtpd hooks --------------------------------------------------------------------

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        rule = self.rules.get(address.lower())
        if rule is not None and rule.at_mail and rule.fires():
            return rule.reply
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
        return "250 Message accepted"

    # -- what tests ask --------------------------------------------------------------------

    def message_ids(self) -> Counter[str]:
        return Counter(r.message_id for r in self.received)

    def to_addresses(self) -> Counter[str]:
        return Counter(addr for r in self.received for addr in r.rcpt_tos)
