"""Reading a Maildir of captured mail: what the dev mail pages and ``/api/dev/messages`` show.

The web tier only reads; whatever fills the Maildir (``mailroom dev``'s SMTP capture, or any
other delivery agent) is not its concern. Everything here treats a message as a sender's text:
nothing in it may raise, and nothing shown from it is trusted.
"""

from __future__ import annotations

import email.policy
import mailbox
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from pathlib import Path


@dataclass(frozen=True)
class CapturedMessage:
    key: str | None  # None when the file name cannot be part of a link
    message_id: str
    to: list[str]
    subject: str
    received_at: datetime


class CapturedMail:
    """The messages in the Maildir at ``directory``, newest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maildir = mailbox.Maildir(directory, create=True)

    def messages(self, limit: int = 500) -> list[CapturedMessage]:
        """The newest ``limit`` messages, newest first (headers only).

        Any file in the Maildir is listed, whatever it holds: a capture keeps what a sender
        wrote, and one malformed message must not hide the others.
        """
        found = []
        for folder in ("new", "cur"):
            try:
                entries = list((self.directory / folder).iterdir())
            except OSError:
                continue
            for path in entries:
                if path.name.startswith("."):
                    continue
                try:
                    if not path.is_file():
                        continue
                    mtime = path.stat().st_mtime
                except OSError:  # removed while we looked, or a dangling link
                    continue
                # A Maildir key is the file name up to its ":2,FLAGS" info part.
                found.append((mtime, path.name.split(":", 1)[0], path))
        found.sort(reverse=True)
        summaries = (self._summary(key, path, mtime) for mtime, key, path in found[:limit])
        return [summary for summary in summaries if summary is not None]

    def raw(self, key: str) -> bytes | None:
        """The whole message as received, or ``None`` if there is no such (readable) key."""
        try:
            return self._maildir.get_bytes(key)
        except (KeyError, OSError):
            return None

    @staticmethod
    def _summary(key: str, path: Path, mtime: float) -> CapturedMessage | None:
        try:
            with path.open("rb") as handle:
                # compat32 keeps each header's raw text; the default policy parses structured
                # headers on access and raises on some malformed ones (``Message-ID: <@>``).
                headers = BytesHeaderParser(policy=email.policy.compat32).parse(handle)
            received_at = datetime.fromtimestamp(mtime, tz=UTC)
        except (OSError, ValueError, OverflowError):
            return None
        items = list(headers.raw_items())
        raw = {name.lower(): value for name, value in reversed(items)}  # the first one wins
        to = [display_text(value) for name, value in items if name.lower() == "to"]
        return CapturedMessage(
            key=key if _LINKABLE_KEY.match(key) else None,
            message_id=display_text(raw.get("message-id", "")),
            to=_addresses(to),
            subject=display_text(raw.get("subject", "")),
            received_at=received_at,
        )


_LINKABLE_KEY = re.compile(r"^[A-Za-z0-9._,=+-]{1,255}$")
_FOLDING = re.compile(r"\r?\n[ \t]*|[\r\n]")
_SURROGATES = re.compile("[\ud800-\udfff]")
MAX_SHOWN_CHARS = 1000


def display_text(raw: str) -> str:
    """A header's raw text as something safe to show: decoded where it can be, never raising.

    Raw 8-bit bytes are read as UTF-8, RFC 2047 encoded words are decoded when they can be
    (left as written when not), folding is undone, and nothing that cannot be encoded as UTF-8
    (a lone surrogate) is left in.
    """
    text = _FOLDING.sub(" ", _SURROGATES.sub("\ufffd", _as_utf8(raw))).strip()
    if "=?" in text:
        try:
            text = str(make_header(decode_header(text)))
        except Exception:  # any charset, any base64: a sender's mistake, shown as written
            pass
    return _SURROGATES.sub("\ufffd", text)[:MAX_SHOWN_CHARS]


def _as_utf8(raw: str) -> str:
    try:
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return raw


def _addresses(values: list[str]) -> list[str]:
    try:
        found = [address for _, address in getaddresses(values) if address]
    except Exception:  # the address parser is lenient, but this is a sender's text
        found = []
    return found or [v for v in values if v]
