"""Reading a Maildir of captured mail: what the dev mail pages and ``/api/dev/messages`` show.

The web tier only reads; whatever fills the Maildir (``mailroom dev``'s SMTP capture, or any
other delivery agent) is not its concern. Everything here treats a message as a sender's text:
nothing in it may raise, and nothing shown from it is trusted.
"""

from __future__ import annotations

import email.policy
import mailbox
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser
from email.utils import getaddresses
from html.parser import HTMLParser
from pathlib import Path

# Searching reads the headers of every message it looks at: it looks at the newest ones only.
MAX_SEARCHED = 20_000
MAX_LINKS = 200


@dataclass(frozen=True)
class CapturedMessage:
    key: str | None  # None when the file name cannot be part of a link
    message_id: str
    to: list[str]
    subject: str
    received_at: datetime


@dataclass(frozen=True)
class MailPage:
    """One page of the messages that match a search, newest first."""

    messages: list[CapturedMessage]
    total: int  # messages that match (among the newest MAX_SEARCHED when searching)
    offset: int
    limit: int

    @property
    def next_offset(self) -> int | None:
        """Where the page after this one starts, or ``None`` on the last page."""
        following = self.offset + self.limit
        return following if following < self.total else None


@dataclass(frozen=True)
class MessageView:
    """A captured message taken apart for reading: decoded, never trusted."""

    summary: CapturedMessage
    headers: list[tuple[str, str]]
    text: str | None
    html: str | None
    links: list[str] = field(default_factory=list)
    attachments: list[str] = field(default_factory=list)

    def text_parts(self) -> list[tuple[str, str | None]]:
        """The text part cut into ``(text, href)`` pieces: ``href`` is set on a link of
        :attr:`links` (http, https or mailto) and ``None`` on the text between links."""
        return linked_text(self.text or "", set(self.links))


class CapturedMail:
    """The messages in the Maildir at ``directory``, newest first."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._maildir = mailbox.Maildir(directory, create=True)

    def messages(self, limit: int = 500) -> list[CapturedMessage]:
        """The newest ``limit`` messages, newest first (headers only)."""
        return self.page(limit=limit).messages

    def page(self, query: str = "", *, offset: int = 0, limit: int = 50) -> MailPage:
        """The messages whose recipients or subject contain ``query`` (any case), paged.

        Any file in the Maildir is listed, whatever it holds: a capture keeps what a sender
        wrote, and one malformed message must not hide the others.
        """
        offset, limit = max(0, offset), max(1, limit)
        files = self._files()
        needle = query.strip().casefold()
        if not needle:
            chosen = files[offset : offset + limit]
            found = [self._summary(key, path, mtime) for mtime, key, path in chosen]
            return MailPage([m for m in found if m is not None], len(files), offset, limit)
        matches = []
        for mtime, key, path in files[:MAX_SEARCHED]:
            summary = self._summary(key, path, mtime)
            if summary is not None and _matches(summary, needle):
                matches.append(summary)
        return MailPage(matches[offset : offset + limit], len(matches), offset, limit)

    def view(self, key: str) -> MessageView | None:
        """The message under ``key`` decoded for reading, or ``None`` if there is none."""
        if not _LINKABLE_KEY.fullmatch(key):
            return None
        raw = self.raw(key)
        summary = self._summary_of(key)
        if raw is None or summary is None:
            return None
        try:
            message = BytesParser(policy=email.policy.default).parsebytes(raw)
        except Exception:  # the parser is lenient; this is a sender's text all the same
            return MessageView(summary, [], _decoded(raw), None)
        headers = [
            (display_text(name), display_text(str(value))) for name, value in _raw_items(message)
        ]
        text = _part_text(message, "plain")
        html = _part_text(message, "html")
        attachments = [
            display_text(part.get_filename() or "(unnamed)")
            for part in message.walk()
            if part.get_content_disposition() == "attachment"
        ]
        unsubscribe = [value for name, value in headers if name.lower() == "list-unsubscribe"]
        links = _links(text, html, unsubscribe)
        return MessageView(summary, headers, text, html, links, attachments)

    def delete_all(self) -> int:
        """Remove every captured message; return how many there were."""
        removed = 0
        for _, _, path in self._files():
            try:
                path.unlink()
                removed += 1
            except OSError:  # removed meanwhile
                continue
        return removed

    def _files(self) -> list[tuple[float, str, Path]]:
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
        return found

    def raw(self, key: str) -> bytes | None:
        """The whole message as received, or ``None`` if there is no such (readable) key."""
        if not _LINKABLE_KEY.fullmatch(key):
            return None
        try:
            return self._maildir.get_bytes(key)
        except (KeyError, OSError):
            return None

    def _summary_of(self, key: str) -> CapturedMessage | None:
        new = self.directory / "new" / key
        candidates = [new] if new.is_file() else []
        try:
            candidates += [
                p for p in (self.directory / "cur").iterdir() if p.name.split(":", 1)[0] == key
            ]
        except OSError:
            pass
        for path in candidates:
            try:
                return self._summary(key, path, path.stat().st_mtime)
            except OSError:
                continue
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
            key=key if _LINKABLE_KEY.fullmatch(key) else None,
            message_id=display_text(raw.get("message-id", "")),
            to=_addresses(to),
            subject=display_text(raw.get("subject", "")),
            received_at=received_at,
        )


# The file names a link (and the API's ``{key}``) may carry: nothing that is a path.
KEY_PATTERN = r"^[A-Za-z0-9._,=+-]{1,255}$"
_LINKABLE_KEY = re.compile(KEY_PATTERN)
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


def _matches(summary: CapturedMessage, needle: str) -> bool:
    return needle in summary.subject.casefold() or any(
        needle in address.casefold() for address in summary.to
    )


def _raw_items(message: Message) -> list[tuple[str, str]]:
    # The header's text as written: the default policy's parsed values can raise on access.
    try:
        return [(name, str(value)) for name, value in message.raw_items()]  # type: ignore[attr-defined]
    except Exception:
        return []


def _part_text(message: EmailMessage, subtype: str) -> str | None:
    """The decoded text of the message's ``text/<subtype>`` body part, if it has one."""
    try:
        part = message.get_body(preferencelist=(subtype,))
    except Exception:
        return None
    if part is None or part.get_content_subtype() != subtype:
        return None
    try:
        content = part.get_content()
    except Exception:  # an unknown charset or a broken transfer encoding: show what decodes
        payload = part.get_payload(decode=True)
        return _decoded(payload) if isinstance(payload, bytes) else None
    return _SURROGATES.sub("\ufffd", content) if isinstance(content, str) else None


def _decoded(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


_URL = re.compile(r"https?://[^\s<>\"'()]+", re.IGNORECASE)
_MAILTO = re.compile(r"mailto:[^\s<>\"'()]+", re.IGNORECASE)
_ANGLED = re.compile(r"<([^<>\s]+)>")
_TRAILING = ".,;:!?"


def safe_link(link: str) -> str | None:
    """``link`` if it is an http, https or mailto URL, stripped; else ``None``."""
    link = link.strip()
    if _URL.fullmatch(link) or _MAILTO.fullmatch(link):
        return link
    return None


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.found.extend(value for name, value in attrs if name == "href" and value)


def _links(text: str | None, html: str | None, unsubscribe: list[str] | None = None) -> list[str]:
    """The links in the text and HTML parts and in ``List-Unsubscribe``, each once, in order,
    made safe to show.

    Only http, https and mailto links are kept: a ``javascript:`` or ``data:`` href is never
    shown as a link, whatever the message says.
    """
    found = [link.rstrip(_TRAILING) for link in _URL.findall(text or "")]
    if html:
        hrefs = _Hrefs()
        try:
            hrefs.feed(html)
            hrefs.close()
        except Exception:
            pass
        found += [link for link in map(safe_link, hrefs.found) if link]
    for value in unsubscribe or []:
        found += [link for link in map(safe_link, _ANGLED.findall(value)) if link]
    unique = list(dict.fromkeys(link for link in found if link))
    # A link longer than a header may be shown is not offered at all: cut short, it would
    # lead somewhere else.
    return [link for link in unique if len(link) <= MAX_SHOWN_CHARS][:MAX_LINKS]


def linked_text(text: str, links: set[str]) -> list[tuple[str, str | None]]:
    """``text`` cut into ``(text, href)`` pieces, ``href`` set on each URL found in ``links``."""
    parts: list[tuple[str, str | None]] = []
    done = 0
    for match in _URL.finditer(text):
        link = match.group(0).rstrip(_TRAILING)
        if link not in links:
            continue
        if match.start() > done:
            parts.append((text[done : match.start()], None))
        parts.append((link, link))
        done = match.start() + len(link)
    if done < len(text) or not parts:
        parts.append((text[done:], None))
    return parts
