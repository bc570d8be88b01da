"""Asynchronous bounces and complaints: the addresses they name, read from a mailbox.

A server that accepted a message may still fail to deliver it later and send a delivery status
notification (DSN, RFC 3464) to the sender; a mailbox provider's feedback loop sends a complaint
report (ARF, RFC 5965) when a recipient marks a message as spam. ``mailroom bounces process``
reads such messages from an mbox file and suppresses the addresses: a permanent failure
(``Action: failed`` with a 5.x.x status) as a hard bounce, a complaint as a complaint. Delays
and temporary failures (4.x.x) are not bounces and are left alone.
"""

from __future__ import annotations

import mailbox
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser, HeaderParser
from email.policy import compat32
from pathlib import Path

from shared.addresses import InvalidAddress, normalize_address


@dataclass(frozen=True)
class Finding:
    """An address a report asks us to stop sending to, and why."""

    address: str
    reason: str  # "hard_bounce" or "complaint"
    detail: str


@dataclass
class Summary:
    messages: int = 0
    reports: int = 0
    not_reports: int = 0
    unreadable: int = 0
    findings: list[Finding] = field(default_factory=list)


def read_mbox(path: Path) -> Summary:
    """Every finding in the mbox at ``path`` (which must exist), with counts of what was read."""
    if not path.is_file():
        raise FileNotFoundError(f"no such mbox file: {path}")
    summary = Summary()
    box = mailbox.mbox(path, factory=None, create=False)
    try:
        for key in box.iterkeys():
            summary.messages += 1
            try:
                message = BytesParser(policy=compat32).parsebytes(box.get_bytes(key))
                found = list(findings_in(message))
            except (ValueError, LookupError, UnicodeError):
                summary.unreadable += 1
                continue
            if is_report(message):
                summary.reports += 1
                summary.findings += found
            else:
                summary.not_reports += 1
    finally:
        box.close()
    return summary


def is_report(message: Message) -> bool:
    return message.get_content_type() == "multipart/report"


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
