"""The message builder Mailroom used before it wrote the bytes itself (``email.mime``).

Kept as the reference the new builder is compared with (``test_message_bytes.py``) and as the
baseline of ``bench.build``: the same headers, and parts that decode to the same text.
"""

from __future__ import annotations

import html
from email.charset import QP, Charset
from email.header import Header
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formatdate

from shared.templating import UNSUBSCRIBE_MARKER
from worker.smtp import text_to_html

_WIRE_POLICY = compat32.clone(linesep="\r\n")
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


def legacy_wire_bytes(
    *,
    sender: str,
    to: str,
    subject: str,
    body: str,
    message_id: str,
    unsubscribe_url: str | None = None,
    unsubscribe_mailto: str | None = None,
) -> bytes:
    message = MIMEMultipart("alternative")
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject if subject.isascii() else Header(subject, "utf-8")  # type: ignore[assignment]
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = message_id
    targets = []
    if unsubscribe_url:
        targets.append(f"<{unsubscribe_url}>")
    if unsubscribe_mailto:
        targets.append(f"<mailto:{unsubscribe_mailto}?subject=unsubscribe>")
    if targets:
        message["List-Unsubscribe"] = ", ".join(targets)
    if unsubscribe_url:
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    text, markup = body, text_to_html(body)
    if UNSUBSCRIBE_MARKER in body:
        link = unsubscribe_url or ""
        anchor = f'<a href="{html.escape(link)}">{html.escape(link)}</a>' if link else ""
        text = text.replace(UNSUBSCRIBE_MARKER, link)
        markup = markup.replace(UNSUBSCRIBE_MARKER, anchor)
    elif unsubscribe_url:
        text += f"\n\n--\nTo stop receiving these emails: {unsubscribe_url}\n"
        footer = (
            '<p style="color:#666;font-size:12px">To stop receiving these emails, '
            f'<a href="{html.escape(unsubscribe_url)}">unsubscribe</a>.</p>\n'
        )
        markup = markup.replace("</body></html>", footer + "</body></html>")
    message.attach(MIMEText(text, "plain", _UTF8_QP))  # type: ignore[arg-type]
    message.attach(MIMEText(markup, "html", _UTF8_QP))  # type: ignore[arg-type]
    return message.as_bytes(policy=_WIRE_POLICY)
