"""Telling a second stop request from the same one delivered twice.

The first SIGTERM or SIGINT asks for a graceful stop and a second one for an immediate exit.
A wrapper such as ``uv run`` forwards the signal it receives, so when a whole process group is
signalled (``timeout``, a service manager's control-group kill) the same request reaches
Mailroom twice within milliseconds. Only a signal that comes at least ``REPEAT_AFTER_SECONDS`` after
the first counts as a second request.
"""

from __future__ import annotations

import time

REPEAT_AFTER_SECONDS = 0.25


class StopRequests:
    """Counts stop requests: :meth:`received` says which one a signal is."""

    def __init__(self) -> None:
        self._first_at: float | None = None

    def received(self) -> str:
        """``"first"``, ``"duplicate"`` (the first one again) or ``"again"`` (stop now)."""
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
            return "first"
        return "duplicate" if now - self._first_at < REPEAT_AFTER_SECONDS else "again"
