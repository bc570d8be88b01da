"""The development SMTP capture: an aiosmtpd server that keeps every message in a Maildir.

``mailroom dev`` points the worker at it, so nothing leaves the machine; the web tier reads the
same Maildir (``web.captured_mail``) and any mail client can open it too.
"""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_BYTES = 10 * 1024 * 1024


class MailCapture:
    """Accepts every message on a loopback port and files it in ``directory`` (a Maildir)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maildir = mailbox.Maildir(directory, create=True)
        self._server: asyncio.AbstractServer | None = None

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

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        await asyncio.to_thread(self._maildir.add, content)
        return "250 Message accepted for delivery"
