"""The development SMTP capture: an aiosmtpd server that keeps every message in a Maildir.

``mailroom dev`` points the worker at it, so nothing leaves the machine; the web tier reads the
same Maildir (``web.captured_mail``) and any mail client can open it too.

So that retries, dead letters and bounces can be seen without a mail server of one's own, an
address tag picks how the capture answers (``ann+bounce@example.com``):

- ``+bounce``: 550 to RCPT (the mailbox does not exist: a hard bounce, the address is
  suppressed);
- ``+tempfail``: 451 to RCPT on the first try for that address, accepted after (a retry);
- ``+slow``: no answer to RCPT until after the sender's SMTP timeout, then 451 (every
  attempt times out: a dead letter once the attempts are used up);
- ``+reject``: 554 to DATA (the message is refused: a dead letter, the address is not
  suppressed).

Any other address is accepted. Which addresses have had their first ``+tempfail`` is kept in
memory, so it starts again when the capture does.
"""

from __future__ import annotations

import asyncio
import enum
import mailbox
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_BYTES = 10 * 1024 * 1024


class Behaviour(enum.Enum):
    """How the capture answers for an address, picked by its tag."""

    ACCEPT = "accept"
    BOUNCE = "bounce"
    TEMPFAIL = "tempfail"
    SLOW = "slow"
    REJECT = "reject"


def behaviour_for(address: str) -> Behaviour:
    """The behaviour an address asks for: its last ``+tag`` before the ``@`` (any case)."""
    local = address.rpartition("@")[0] if "@" in address else address
    if "+" not in local:
        return Behaviour.ACCEPT
    tag = local.rpartition("+")[2].lower()
    try:
        behaviour = Behaviour(tag)
    except ValueError:
        return Behaviour.ACCEPT
    return behaviour


class MailCapture:
    """Accepts every message on a loopback port and files it in ``directory`` (a Maildir)."""

    def __init__(self, directory: Path, *, slow_reply_seconds: float = 35.0) -> None:
        self.directory = directory
        # Longer than the sender's SMTP timeout, so that ``+slow`` times out every attempt.
        self.slow_reply_seconds = slow_reply_seconds
        self._maildir = mailbox.Maildir(directory, create=True)
        self._server: asyncio.AbstractServer | None = None
        self._tempfailed: set[str] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0 picks one); return the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname="mailroom-capture", data_size_limit=MAX_MESSAGE_BYTES),
            host=host,
            port=port,
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        behaviour = behaviour_for(address)
        if behaviour is Behaviour.BOUNCE:
            return "550 5.1.1 No such mailbox here (+bounce)"
        if behaviour is Behaviour.TEMPFAIL and address.lower() not in self._tempfailed:
            self._tempfailed.add(address.lower())
            return "451 4.7.1 Try again later (+tempfail, first try)"
        if behaviour is Behaviour.SLOW:
            await asyncio.sleep(self.slow_reply_seconds)
            return "451 4.4.2 Too slow to answer (+slow)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if any(behaviour_for(a) is Behaviour.REJECT for a in envelope.rcpt_tos):
            return "554 5.7.1 Message refused (+reject)"
        content = envelope.original_content or b""
        await asyncio.to_thread(self._maildir.add, content)
        return "250 Message accepted for delivery"
