"""Asynchronous bounces and complaints: the addresses they name, read from a mailbox.

A server that accepted a message may still fail to deliver it later and send a delivery status
notification (DSN, RFC 3464) to the sender; a mailbox provider's feedback loop sends a complaint
report (ARF, RFC 5965) when a recipient marks a message as spam. ``mailroom bounces process``
reads such messages from an mbox file, and the worker's IMAP poll (:mod:`worker.bounce_poll`)
from a mailbox, and suppresses the addresses: a permanent failure (``Action: failed`` with a
5.x.x status) as a hard bounce, a complaint as a complaint. Delays and temporary failures
(4.x.x) are not bounces and are left alone.

A bounce without a usable DSN (plain text, or a DSN whose recipient is not an address) still
names its recipient when it came back to a VERP envelope sender (:mod:`worker.verp`). Such a
message counts as a hard bounce of that recipient only if it is clearly a failure report
(:func:`is_failure_notice`): a DSN saying a delivery failed permanently, or a message from
``MAILER-DAEMON`` or ``postmaster`` whose subject says the mail could not be delivered. An
out-of-office reply, a delay warning, a read receipt or a person's answer is none of these,
even when it was sent to the envelope sender.
"""

from __future__ import annotations

import mailbox
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from email.utils import parseaddr
from pathlib import Path

from shared.addresses import InvalidAddress, normalize_address
from worker.verp import Verp

# The senders of failure notices (RFC 5321 4.5.5: a bounce has a null reverse-path, and the
# servers that write one sign it as one of these).
_DAEMONS = frozenset({"mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon"})
# Subjects of the failure notices of Postfix, Exim, Sendmail, qmail, Exchange and the large
# providers; delay warnings ("Delayed Mail", "Delivery Status Notification (Delay)") do not match.
_FAILURE_SUBJECT = re.compile(
    r"undeliver(ed|able)|returned mail|failure notice|could not be delivered"
    r"|delivery (status notification \(failure\)|has failed|failure|failed)"
    r"|mail delivery (failed|failure|system)|non-?delivery|delivery report",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    """An address a report asks us to stop sending to, and why."""

    address: str
    reason: str  # "hard_bounce" or "complaint"
    detail: str


@dataclass(frozen=True)
class Examined:
    """What one message is: ``report`` (a DSN, an ARF report or another multipart/report),
    ``verp_bounce`` (a failure notice naming its recipient only by the VERP address it came
    back to), or ``not_report``; with the findings, or the recipients of a VERP bounce."""

    outcome: str
    findings: list[Finding] = field(default_factory=list)
    recipient_ids: list[int] = field(default_factory=list)


@dataclass
class Summary:
    messages: int = 0
    reports: int = 0
    verp_bounces: int = 0
    not_reports: int = 0
    unreadable: int = 0
    findings: list[Finding] = field(default_factory=list)
    # Recipients of VERP bounces: their addresses are suppressed as hard bounces.
    recipient_ids: list[int] = field(default_factory=list)


def read_mbox(path: Path, verp: Verp | None = None) -> Summary:
    """Every finding in the mbox at ``path`` (which must exist), with counts of what was read."""
    if not path.is_file():
        raise FileNotFoundError(f"no such mbox file: {path}")
    summary = Summary()
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        for key in box.iterkeys():
            summary.messages += 1
            try:
                examined = examine_bytes(box.get_bytes(key), verp)
            except UnreadableMessage:
                summary.unreadable += 1
                continue
            if examined.outcome == "report":
                summary.reports += 1
            elif examined.outcome == "verp_bounce":
                summary.verp_bounces += 1
            else:
                summary.not_reports += 1
            summary.findings += examined.findings
            summary.recipient_ids += examined.recipient_ids
    finally:
        box.close()
    return summary


class UnreadableMessage(Exception):
    """A message the parser could not make sense of."""


def examine_bytes(raw: bytes, verp: Verp | None = None) -> Examined:
    """:func:`examine` of a message's bytes; :class:`UnreadableMessage` if they cannot be read.

    The cost is linear in the size of ``raw``, which the caller bounds; mail is hostile, so
    anything the parser or a malformed structure raises is an unreadable message, never a
    crash of the caller.
    """
    try:
        return examine(BytesParser(policy=compat32).parsebytes(raw), verp)
    except Exception as exc:  # RecursionError included: a MIME structure nested too deep
        raise UnreadableMessage(type(exc).__name__) from exc


def examine(message: Message, verp: Verp | None = None) -> Examined:
    """What ``message`` is and what it names (see :class:`Examined`)."""
    findings = list(findings_in(message))
    if findings:
        return Examined("report", findings)
    if verp is not None and is_failure_notice(message):
        recipients = verp.recipients_in(message)
        if recipients:
            return Examined("verp_bounce", recipient_ids=recipients)
    return Examined("report" if is_report(message) else "not_report")


def is_report(message: Message) -> bool:
    return message.get_content_type() == "multipart/report"


def is_failure_notice(message: Message) -> bool:
    """Whether ``message`` clearly reports a permanent delivery failure, DSN or not.

    A DSN (multipart/report, report-type delivery-status) is one when one of its recipients
    failed with a 5.x.x status. Any other message is one when it comes from ``MAILER-DAEMON``
    or ``postmaster`` and its subject says the mail was not delivered. Everything else
    (auto-replies, delay warnings, people) is not.
    """
    if is_report(message):
        if str(message.get_param("report-type") or "").lower() != "delivery-status":
            return False
        return any(
            (block.get("Action") or "").strip().lower() == "failed"
            and (block.get("Status") or "").strip().startswith("5.")
            for part in message.walk()
            if part.get_content_type() == "message/delivery-status"
            for block in _blocks(part)
        )
    sender = parseaddr(str(message.get("From") or ""))[1]
    local = sender.rsplit("@", 1)[0].strip().lower()
    subject = _decoded(message.get("Subject"))
    return local in _DAEMONS and _FAILURE_SUBJECT.search(subject) is not None


def _decoded(value: object) -> str:
    """A header's text with RFC 2047 encoded words decoded (as it is, if they are broken)."""
    text = str(value or "")
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


def findings_in(message: Message) -> Iterator[Finding]:
    """The addresses a DSN or an ARF report names; nothing for any other message."""
    if not is_report(message):
        return
    report_type = str(message.get_param("report-type") or "").lower()
    for part in message.walk():
        kind = part.get_content_type()
        if report_type == "delivery-status" and kind == "message/delivery-status":
            yield from _dsn(part)
        elif report_type == "feedback-report" and kind == "message/feedback-report":
            yield from _arf(part, message)


def _blocks(part: Message) -> list[Message]:
    """The header blocks of a report part (the per-message block, then one per recipient)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the parser already split the blocks into messages
        return [p for p in payload if isinstance(p, Message)]
    text = payload if isinstance(payload, str) else ""
    return [HeaderParser().parsestr(block) for block in text.replace("\r\n", "\n").split("\n\n")]


def _dsn(part: Message) -> Iterable[Finding]:
    for block in _blocks(part):
        action = (block.get("Action") or "").strip().lower()
        status = (block.get("Status") or "").strip()
        if action != "failed" or not status.startswith("5."):
            continue
        address = _address(block.get("Final-Recipient") or block.get("Original-Recipient"))
        if address:
            diagnostic = " ".join((block.get("Diagnostic-Code") or "").split())
            yield Finding(address, "hard_bounce", f"DSN {status} {diagnostic}".strip()[:500])


def _arf(part: Message, report: Message) -> Iterable[Finding]:
    for block in _blocks(part):
        feedback = (block.get("Feedback-Type") or "abuse").strip().lower()
        address = _address(block.get("Original-Rcpt-To"))
        if address is None:
            address = _original_recipient(report)
        if address:
            yield Finding(address, "complaint", f"ARF {feedback} report")
        return


def _original_recipient(report: Message) -> str | None:
    # Without Original-Rcpt-To, the complaint is about the message attached to the report.
    for part in report.walk():
        if part.get_content_type() in {"message/rfc822", "text/rfc822-headers"}:
            payload = part.get_payload()
            original = payload[0] if isinstance(payload, list) and payload else None
            if isinstance(original, Message):
                return _address(original.get("To"))
            if isinstance(payload, str):
                return _address(HeaderParser().parsestr(payload).get("To"))
    return None


def _address(field: str | None) -> str | None:
    """``rfc822; ada@example.org`` (or a bare address) as a normalized address, else None."""
    if not field:
        return None
    text = str(field).split(";", 1)[-1].strip().strip("<>")
    try:
        return normalize_address(text)
    except InvalidAddress:
        return None
