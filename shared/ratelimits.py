"""Sending-rate limits: how many messages per second, hour and day, per sender and domain.

Limits are fixed windows aligned on the clock (UTC): a second, the hour, the day. Every worker
takes a slot in each window that applies before it sends, through PostgreSQL
(:meth:`shared.db.Database.take_send_slot`), so the limits hold across processes and hosts. A
job that finds a window full is put back for when the window ends, without spending an attempt.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.settings import Settings

_WINDOWS = {1: "per second", 60: "per minute", 3600: "per hour", 86_400: "per day"}


@dataclass(frozen=True)
class Limit:
    """At most ``max_sent`` messages per ``window_seconds`` seconds within ``scope``."""

    name: str  # what an operator reads: "per day", "per minute to example.org"
    scope: str
    window_seconds: int
    max_sent: int

    @property
    def kind(self) -> str:
        """The window alone ("per minute"): a bounded label for metrics."""
        return _WINDOWS.get(self.window_seconds, f"per {self.window_seconds} s")


def sender_limits(settings: Settings) -> list[Limit]:
    """The limits on everything the sender sends (unset settings are no limit)."""
    sender = settings.from_address or "sender"
    found = [
        ("per second", 1, settings.rate_per_second),
        ("per hour", 3600, settings.rate_per_hour),
        ("per day", 86_400, settings.rate_per_day),
    ]
    # The window's length is part of the scope: send_windows is keyed by (scope, start), and the
    # second, the hour and the day that start at the same moment must not share a row.
    return [Limit(name, f"sender:{sender}:{w}s", w, n) for name, w, n in found if n is not None]


def limits_for(settings: Settings, recipient: str) -> list[Limit]:
    """Every limit a message to ``recipient`` counts against."""
    limits = sender_limits(settings)
    if settings.rate_per_domain_per_minute is not None:
        domain = recipient.rsplit("@", 1)[-1].lower()
        limits.append(
            Limit(
                f"per minute to {domain}",
                f"domain:{domain}",
                60,
                settings.rate_per_domain_per_minute,
            )
        )
    return limits


@dataclass
class LocalWindow:
    """A limit counted in this process only, in clock-aligned windows like the shared ones.

    For a relay's own limit (``MAILROOM_SMTP_RELAYS``' ``rate_per_second`` and
    ``rate_per_minute``): it is checked on the way to the relay, with no round trip to the
    database, so every worker process has the whole limit to itself.
    """

    limit: Limit
    clock: Callable[[], float] = time.time
    _window: int = field(default=-1, repr=False)
    _sent: int = field(default=0, repr=False)

    def take(self) -> datetime | None:
        """Count one message, or return when the full window ends (and count nothing)."""
        now = self.clock()
        window = int(now // self.limit.window_seconds)
        if window != self._window:
            self._window, self._sent = window, 0
        if self._sent >= self.limit.max_sent:
            return datetime.fromtimestamp((window + 1) * self.limit.window_seconds, UTC)
        self._sent += 1
        return None
