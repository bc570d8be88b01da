"""The development SMTP capture: an aiosmtpd server that keeps every message in a Maildir.

``mailroom dev`` points the worker at it, so nothing leaves the machine; the web tier lists
what arrived (``GET /api/dev/messages``) and any mail client can open the Maildir too.
"""

from __future__ import annotations

import asyncio
import email.policy
import mailbox
from dataclasses import dataclass
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

MAX_MESSAGE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class CapturedMessage:
    key: str
    message_id: str
    to: list[str]
    subject: str
    received_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "to": self.to,
            "subject": self.subject,
            "received_at": self.received_at.isoformat(),
        }


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

    def messages(self, limit: int = 500) -> list[CapturedMessage]:
        """The newest ``limit`` messages, newest first (headers only)."""
        found = []
        for folder in ("new", "cur"):
            for path in (self.directory / folder).iterdir():
                if not path.name.startswith("."):
                    # A Maildir key is the file name up to its ":2,FLAGS" info part.
                    found.append((path.stat().st_mtime, path.name.split(":", 1)[0], path))
        found.sort(reverse=True)
        return [self._summary(key, path, mtime) for mtime, key, path in found[:limit]]

    def raw(self, key: str) -> bytes | None:
        """The whole message as received, or ``None`` if there is no such key."""
        try:
            return self._maildir.get_bytes(key)
        except KeyError:
            return None

    @staticmethod
    def _summary(key: str, path: Path, mtime: float) -> CapturedMessage:
        with path.open("rb") as handle:
            headers = BytesHeaderParser(policy=email.policy.default).parse(handle)
        return CapturedMessage(
            key=key,
            message_id=str(headers.get("Message-ID", "")),
            to=[addr for _, addr in getaddresses([str(h) for h in headers.get_all("To", [])])],
            subject=str(headers.get("Subject", "")),
            received_at=datetime.fromtimestamp(mtime, tz=UTC),
        )
