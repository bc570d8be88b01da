"""What went wrong in a delivery attempt, and whether trying again can help.

Every error the worker can meet is turned into a :class:`TransientFailure` (retry with backoff)
or a :class:`PermanentFailure` (dead letter at once) here, so call sites never match strings.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl

import aiosmtplib

from shared.ratelimits import Limit

HARD_BOUNCE_CODES = frozenset({550, 551, 553})


class DeliveryFailure(Exception):
    """A failed attempt; ``message`` is safe to store and show (no secrets, no body)."""

    permanent = False
    # So a traceback in the log keeps this message (shared.logging withholds the others').
    message_is_loggable = True

    def __init__(
        self,
        message: str,
        *,
        smtp_code: int | None = None,
        retry_after_seconds: float | None = None,
        attempt: int | None = None,
        mailbox_unknown: bool = False,
        stage: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.smtp_code = smtp_code
        # How long the far side asked us to wait, if it said (an HTTP Retry-After, say).
        self.retry_after_seconds = retry_after_seconds
        # Which attempt of the recipient this was (1-based), given by the task
        # (``at_attempt``): the retry policy counts the recipient's attempts, not the job's.
        self.attempt = attempt
        # The server refused the recipient's mailbox itself (a hard bounce): never send there
        # again.
        self.mailbox_unknown = mailbox_unknown
        # Where in the SMTP exchange it happened (connect, mail, rcpt, data), if it did.
        self.stage = stage

    def at_attempt(self, attempt: int) -> DeliveryFailure:
        """The same failure, as attempt number ``attempt`` of its recipient (a new object: the
        one raised deep in a send stays as it was, and the task raises this one from it)."""
        return type(self)(
            self.message,
            smtp_code=self.smtp_code,
            retry_after_seconds=self.retry_after_seconds,
            attempt=attempt,
            mailbox_unknown=self.mailbox_unknown,
            stage=self.stage,
        )


class TransientFailure(DeliveryFailure):
    """Worth another attempt later (4xx replies, timeouts, refused connections)."""


class InfrastructureFailure(TransientFailure):
    """Our own side failed (the database went away): retried without limit.

    It says nothing about the email, and while the database is gone the recipient cannot even
    be marked dead; giving up would strand it. Backoff still applies, up to its cap.
    """

    @classmethod
    def database_unavailable(cls, exc: BaseException) -> InfrastructureFailure:
        """The database went away mid-attempt: nothing was recorded as sent, so trying again
        later is safe. The error's type only: a database error's text can quote the row."""
        return cls(f"database unavailable: {type(exc).__name__}")


class PermanentFailure(DeliveryFailure):
    """Trying again cannot help (5xx replies, a template that cannot render)."""

    permanent = True

    @classmethod
    def internal_error(cls, exc: BaseException) -> PermanentFailure:
        """A bug in the worker, not the far side: a dead letter an operator can see and redrive,
        rather than a recipient stuck in "sending" forever.

        The exception's text can hold the address, the subject or a field: the failure's
        message (stored, shown and logged at INFO) names only its type.
        """
        return cls(
            f"internal error: {type(exc).__name__} (see send_email_crashed in the worker log)"
        )


class Interrupted(Exception):
    """The worker is stopping: a chunk hands back the recipients it has not started.

    Not a failure: the chunk goes back to the queue at once, attempts given back, and runs
    again on whichever worker takes it (what it already sent is skipped then).
    """


class RateLimited(Exception):
    """A sending-rate limit's window is full: not a failure, the job waits for ``resume_at``."""

    def __init__(self, limit: Limit, resume_at: datetime.datetime) -> None:
        super().__init__(f"the {limit.name} limit ({limit.max_sent}) is reached")
        self.limit = limit
        self.resume_at = resume_at

    @property
    def note(self) -> str:
        """What the recipient's row says while it waits."""
        return (
            f"waiting for the {self.limit.name} sending limit ({self.limit.max_sent});"
            f" resumes at {self.resume_at:%Y-%m-%d %H:%M:%S} UTC"
        )


def classify_smtp(exc: BaseException, *, stage: str) -> DeliveryFailure:
    """Map an aiosmtplib or network error at ``stage`` (connect, mail, rcpt, data) to a failure."""
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        refusal = exc.recipients[0] if exc.recipients else None
        if refusal is not None:
            return _by_code(refusal.code, refusal.message, stage="rcpt")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _by_code(exc.code, exc.message, stage=stage)
    if isinstance(exc, aiosmtplib.SMTPTimeoutError | asyncio.TimeoutError | TimeoutError):
        return TransientFailure(f"SMTP timeout during {stage}", stage=stage)
    if isinstance(
        exc, ssl.SSLError | aiosmtplib.SMTPConnectError | aiosmtplib.SMTPServerDisconnected
    ):
        return TransientFailure(f"SMTP connection failed during {stage}: {exc}", stage=stage)
    if isinstance(exc, ConnectionError | OSError):
        return TransientFailure(f"SMTP connection failed during {stage}: {exc}", stage=stage)
    if isinstance(exc, aiosmtplib.SMTPException):
        return TransientFailure(f"SMTP error during {stage}: {exc}", stage=stage)
    raise TypeError(f"not an SMTP error: {exc!r}") from exc


def _by_code(code: int, message: str, *, stage: str) -> DeliveryFailure:
    text = f"SMTP {code} during {stage}: {message.strip()}"[:500]
    # 5xx to MAIL, RCPT or DATA means the server will not take this message: retrying only
    # risks the sender's reputation. 4xx (and anything unexpected) may succeed later.
    if 500 <= code < 600 and stage in {"mail", "rcpt", "data"}:
        # 550, 551 and 553 to RCPT name the mailbox; a 554 or a refusal at DATA may be about
        # the content or the sender, which suppressing the address would not fix.
        return PermanentFailure(
            text,
            smtp_code=code,
            stage=stage,
            mailbox_unknown=stage == "rcpt" and code in HARD_BOUNCE_CODES,
        )
    return TransientFailure(text, smtp_code=code, stage=stage)


def asks_to_slow_down(failure: DeliveryFailure) -> bool:
    """Whether a reply is about the connection or the sender, so sending slower can help.

    421 at any stage closes the connection ("service not available": too many connections,
    too fast), and a 4xx to the greeting, to MAIL or to DATA (451 "rate limited", 452 at MAIL
    "too many messages") concerns everything this sender sends. A 4xx to RCPT (450, 451, 452:
    greylisting, a full or busy mailbox) concerns that one recipient: the others go on at full
    speed while it waits for its retry.
    """
    code = failure.smtp_code
    if code is None or not 400 <= code < 500:
        return False
    return code == 421 or failure.stage in {"connect", "mail", "data"}


def relay_unavailable(failure: DeliveryFailure) -> bool:
    """Whether the relay could not take the message and nothing of it can have been delivered,
    so another relay may carry it without any risk of a second copy.

    That is every failure to connect (refused, timed out, a 421 or other refusal of the
    greeting, TLS, AUTH), a 421 ("service not available") to any command (a definite refusal,
    even after the message's text), and a connection dropped or timed out before DATA. A
    timeout or a dropped connection after the text was sent is not: the relay may have
    accepted the message without its reply reaching us.
    """
    if failure.stage == "connect" or failure.smtp_code == 421:
        return True
    return failure.smtp_code is None and failure.stage in {"mail", "rcpt"}


def relay_failing(failure: DeliveryFailure) -> bool:
    """Whether the relay itself is in trouble (it is then marked down): the failures of
    :func:`relay_unavailable`, and no reply after the message's text was sent."""
    return relay_unavailable(failure) or (failure.smtp_code is None and failure.stage == "data")
