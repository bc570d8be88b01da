"""The bounce mailbox over IMAP (RFC 3501): connect, log in, list, fetch and mark messages.

:class:`ImapSession` wraps the standard library's :mod:`imaplib`, which blocks: the poll
(:mod:`worker.bounce_poll`) calls it from a thread. Every socket operation has the timeout of
``MAILROOM_IMAP_TIMEOUT_SECONDS``; the connection is TLS from the first byte (``tls``),
upgraded with STARTTLS (``starttls``), or plain only when ``MAILROOM_IMAP_SECURITY=none`` says
so. Certificates are verified, against ``MAILROOM_IMAP_CA_FILE`` alone when it is set.

The server is trusted no more than the mail it holds: a literal larger than the poll's budget
is refused before it is read, a reply that does not parse is a :class:`ImapError`, and so is
every other failure, with a ``kind`` (``connect``, ``tls``, ``auth``, ``protocol``) for the
metric and a message that says what to fix and never holds the password.
"""

from __future__ import annotations

import contextlib
import imaplib
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.settings import ImapSecurity, Settings

UIDS_PER_COMMAND = 500
# Room around a message's bytes for the rest of a FETCH response.
_LITERAL_SLACK_BYTES = 64 * 1024
_UID = re.compile(rb"\bUID (\d+)")
_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
# Shown of a server's reply in an error: enough to recognize it, no more.
_SHOWN_REPLY_CHARACTERS = 200


class ImapError(Exception):
    """The bounce mailbox could not be polled; ``kind`` says which step failed."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImapServer:
    """Where the bounce mailbox is and how to reach it (``MAILROOM_IMAP_*``)."""

    host: str
    port: int
    security: ImapSecurity
    username: str
    password: str = field(repr=False)
    mailbox: str = "INBOX"
    processed_mailbox: str | None = None
    ca_file: Path | None = None
    timeout_seconds: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ImapServer | None:
        """The configured server, or None when ``MAILROOM_IMAP_HOST`` is unset."""
        if settings.imap_host is None:
            return None
        assert settings.imap_username is not None and settings.imap_password is not None
        return cls(
            host=settings.imap_host,
            port=settings.imap_port_or_default,
            security=settings.imap_security,
            username=settings.imap_username,
            password=settings.imap_password.get_secret_value(),
            mailbox=settings.imap_mailbox,
            processed_mailbox=settings.imap_processed_mailbox,
            ca_file=settings.imap_ca_file,
            timeout_seconds=settings.imap_timeout_seconds,
        )

    @property
    def key(self) -> str:
        """The mailbox as recorded with the messages read from it."""
        return f"{self.username}@{self.host}:{self.port}/{self.mailbox}"

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"


def _quoted(name: str) -> str:
    # Mailbox names are limited by the settings to characters that need no escaping.
    return '"' + name + '"'


def _shown(reply: Any) -> str:
    """A server's reply for an error message: decoded, one line, cut short."""
    if isinstance(reply, BaseException):  # imaplib's errors carry the reply's bytes
        reply = reply.args[0] if reply.args else type(reply).__name__
    if isinstance(reply, list):
        reply = b" ".join(r if isinstance(r, bytes) else str(r).encode() for r in reply if r)
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text[:_SHOWN_REPLY_CHARACTERS] or "(no text)"


class _BoundedReads:
    """Refuses a literal larger than ``max_literal_bytes`` before reading it: imaplib reads a
    literal whole, whatever size the server announces."""

    max_literal_bytes: int = 0

    def read(self, size: int) -> bytes:
        if size > self.max_literal_bytes:
            raise ImapError(
                "protocol", f"the IMAP server announced a literal of {size} bytes, over the budget"
            )
        return super().read(size)  # type: ignore[misc, no-any-return]


class _Imap(_BoundedReads, imaplib.IMAP4):
    pass


class _ImapSsl(_BoundedReads, imaplib.IMAP4_SSL):
    pass


class ImapSession:
    """One connection to the bounce mailbox, selected read-write. Blocking: call from a thread.

    ``max_message_bytes`` is the most of one message :meth:`fetch` reads.
    """

    def __init__(self, server: ImapServer, *, max_message_bytes: int) -> None:
        self.server = server
        self.max_message_bytes = max_message_bytes
        self._conn: imaplib.IMAP4 | None = None
        self._capabilities: set[str] = set()

    def open(self) -> int:
        """Connect, log in and select the mailbox; return its UIDVALIDITY."""
        server = self.server
        try:
            conn = self._connect()
        except ImapError:
            raise
        except ssl.SSLCertVerificationError as exc:
            raise ImapError(
                "tls", f"the certificate of {server.where} is not trusted: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise ImapError("tls", f"TLS with {server.where} failed: {exc.reason}") from None
        except TimeoutError:
            raise ImapError(
                "connect", f"{server.where} did not answer within {server.timeout_seconds:g} s"
            ) from None
        except OSError as exc:
            raise ImapError(
                "connect", f"cannot connect to {server.where}: {exc.strerror or exc}"
            ) from None
        except imaplib.IMAP4.error as exc:
            raise ImapError("protocol", f"{server.where}: {_shown(exc)}") from None
        self._conn = conn
        try:
            conn.login(server.username, server.password)
        except imaplib.IMAP4.error as exc:
            raise ImapError(
                "auth",
                f"{server.where} refused the login of {server.username!r}: {_shown(exc)}",
            ) from None
        typ, data = self._call(conn.capability)  # what it offers once logged in (MOVE?)
        words = data[0].split() if typ == "OK" and data and isinstance(data[0], bytes) else []
        self._capabilities = {w.decode("ascii", "replace").upper() for w in words}
        typ, data = self._call(conn.select, _quoted(server.mailbox))
        if typ != "OK":
            raise ImapError("protocol", f"cannot open mailbox {server.mailbox!r}: {_shown(data)}")
        typ, values = conn.response("UIDVALIDITY")
        try:
            uidvalidity = int(values[0]) if values and values[0] is not None else 0
        except (TypeError, ValueError):
            uidvalidity = 0
        if uidvalidity <= 0:
            raise ImapError("protocol", f"{server.where} sent no valid UIDVALIDITY")
        return uidvalidity

    def _connect(self) -> imaplib.IMAP4:
        server = self.server
        context = ssl.create_default_context(cafile=str(server.ca_file) if server.ca_file else None)
        conn: imaplib.IMAP4
        if server.security is ImapSecurity.TLS:
            conn = _ImapSsl(
                server.host, server.port, ssl_context=context, timeout=server.timeout_seconds
            )
        else:
            conn = _Imap(server.host, server.port, timeout=server.timeout_seconds)
        conn.max_literal_bytes = self.max_message_bytes + _LITERAL_SLACK_BYTES  # type: ignore[attr-defined]
        if server.security is ImapSecurity.STARTTLS:
            try:
                conn.starttls(context)
            except imaplib.IMAP4.error as exc:
                conn.shutdown()
                raise ImapError("tls", f"{server.where} refused STARTTLS: {_shown(exc)}") from None
            except BaseException:  # the handshake failed (an untrusted certificate, say)
                with contextlib.suppress(OSError):
                    conn.shutdown()
                raise
        return conn

    def _call(self, method: Any, *args: Any) -> tuple[str, list[Any]]:
        """One command; a dropped connection, a timeout or garbage is an ImapError."""
        try:
            typ, data = method(*args)
        except ImapError:
            raise
        except TimeoutError:
            raise ImapError(
                "connect",
                f"{self.server.where} did not answer within {self.server.timeout_seconds:g} s",
            ) from None
        except (OSError, EOFError) as exc:
            raise ImapError("connect", f"connection to {self.server.where} lost: {exc}") from None
        except (imaplib.IMAP4.error, ValueError, IndexError) as exc:
            raise ImapError("protocol", f"{self.server.where}: {_shown(exc)}") from None
        return str(typ), list(data or [])

    @property
    def _open(self) -> imaplib.IMAP4:
        assert self._conn is not None, "open() first"
        return self._conn

    def uids_after(self, last_uid: int) -> list[int]:
        """The UIDs above ``last_uid`` in the mailbox, ascending."""
        typ, data = self._call(self._open.uid, "SEARCH", "UID", f"{last_uid + 1}:*")
        if typ != "OK":
            raise ImapError("protocol", f"SEARCH refused: {_shown(data)}")
        uids: set[int] = set()
        for line in data:
            if not isinstance(line, bytes):
                continue
            for word in line.split():
                if not word.isdigit():
                    raise ImapError("protocol", f"SEARCH answered {_shown(line)}")
                uids.add(int(word))
        # "n:*" includes the highest UID even when it is below n (RFC 3501 6.4.8).
        return sorted(uid for uid in uids if uid > last_uid)

    def sizes(self, uids: list[int]) -> dict[int, int]:
        """The size in bytes (RFC822.SIZE) of each of ``uids`` still in the mailbox."""
        sizes: dict[int, int] = {}
        for some in _in_commands(uids):
            typ, data = self._call(self._open.uid, "FETCH", some, "(RFC822.SIZE)")
            if typ != "OK":
                raise ImapError("protocol", f"FETCH refused: {_shown(data)}")
            for item in data:
                line = item[0] if isinstance(item, tuple) else item
                if not isinstance(line, bytes):
                    continue
                uid, size = _UID.search(line), _SIZE.search(line)
                if uid and size:
                    sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    def fetch(self, uid: int) -> bytes | None:
        """The message's bytes, at most ``max_message_bytes + 1`` of them (more: it is larger
        than the budget, whatever its size said); None if it is gone. Not marked \\Seen."""
        wanted = f"(BODY.PEEK[]<0.{self.max_message_bytes + 1}>)"
        typ, data = self._call(self._open.uid, "FETCH", str(uid), wanted)
        if typ != "OK":
            raise ImapError("protocol", f"FETCH refused: {_shown(data)}")
        for item in data:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], bytes):
                found = _UID.search(item[0]) if isinstance(item[0], bytes) else None
                if found is None or int(found.group(1)) == uid:
                    return item[1]
        return None

    def mark(self, uids: list[int]) -> None:
        """Mark messages done: moved to the processed mailbox if one is set, else \\Seen."""
        for some in _in_commands(uids):
            self._mark(some)

    def _mark(self, uid_set: str) -> None:
        conn, target = self._open, self.server.processed_mailbox
        if target is None:
            typ, data = self._call(conn.uid, "STORE", uid_set, "+FLAGS.SILENT", r"(\Seen)")
            what = "flag messages \\Seen"
        elif "MOVE" in self._capabilities:
            typ, data = self._call(conn.uid, "MOVE", uid_set, _quoted(target))
            what = f"move messages to {target!r}"
        else:
            # Without MOVE (RFC 6851): copied, then flagged deleted for whoever expunges.
            typ, data = self._call(conn.uid, "COPY", uid_set, _quoted(target))
            if typ == "OK":
                typ, data = self._call(
                    conn.uid, "STORE", uid_set, "+FLAGS.SILENT", r"(\Seen \Deleted)"
                )
            what = f"copy messages to {target!r}"
        if typ != "OK":
            raise ImapError("protocol", f"cannot {what}: {_shown(data)}")

    def close(self) -> None:
        """Log out (or just close the socket, if the connection is broken)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.logout()
        except (OSError, EOFError, imaplib.IMAP4.error, ImapError):
            try:
                conn.shutdown()
            except OSError:
                pass


def _in_commands(uids: list[int]) -> list[str]:
    """``uids`` as UID sets of at most UIDS_PER_COMMAND each: servers limit a command's
    length (Dovecot: 64 KB)."""
    return [
        ",".join(str(uid) for uid in uids[i : i + UIDS_PER_COMMAND])
        for i in range(0, len(uids), UIDS_PER_COMMAND)
    ]
