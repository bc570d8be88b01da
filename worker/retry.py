"""When a failed email job runs again: exponential backoff with full jitter, capped.

procrastinate's built-in strategy has neither jitter nor a cap. Here attempt ``n`` (1-based)
waits a uniformly random time in ``[0, min(cap, base * 2**(n-1))]`` ("full jitter"), so a
recovering SMTP server sees a spread-out trickle instead of a synchronized stampede. Only
:class:`~worker.failures.TransientFailure` is retried, and only ``max_attempts`` times in all;
a job cut off by a shutdown is requeued at once without using up an attempt.
"""

from __future__ import annotations

import asyncio
import datetime
import random
from dataclasses import dataclass, field

from procrastinate import RetryDecision
from procrastinate.jobs import Job
from procrastinate.retry import BaseRetryStrategy

from shared.queue import RETRY_PRIORITY
from shared.settings import Settings
from worker.failures import (
    DeliveryFailure,
    InfrastructureFailure,
    Interrupted,
    RateLimited,
    TransientFailure,
)

__all__ = ["RETRY_PRIORITY", "BackoffRetry"]

RATE_LIMIT_SPREAD_BASE_SECONDS = 60
RATE_LIMIT_SPREAD_MAX_SECONDS = 900.0


@dataclass
class BackoffRetry(BaseRetryStrategy):
    """Full-jitter exponential backoff; see the module docstring. Times in seconds."""

    max_attempts: int = 8
    base_seconds: float = 5.0
    cap_seconds: float = 3600.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_settings(cls, settings: Settings) -> BackoffRetry:
        return cls(
            max_attempts=settings.retry_max_attempts,
            base_seconds=settings.retry_base_seconds,
            cap_seconds=settings.retry_cap_seconds,
        )

    def ceiling_seconds(self, attempt: int) -> float:
        """The longest wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.cap_seconds, self.base_seconds * 2.0 ** min(attempt - 1, 62)))

    def delay_seconds(self, attempt: int, retry_after_seconds: float | None = None) -> float:
        """A jittered wait after attempt ``attempt``; a longer ``Retry-After`` wins."""
        delay = float(self.rng.uniform(0, self.ceiling_seconds(attempt)))
        if retry_after_seconds is not None:
            delay = max(delay, min(retry_after_seconds, self.cap_seconds))
        return delay

    def is_last(self, attempt: int) -> bool:
        """True when attempt ``attempt`` (1-based) is the final one allowed."""
        return attempt >= self.max_attempts

    def gives_up(self, failure: DeliveryFailure, attempt: int | None = None) -> bool:
        """Whether ``failure`` ends the recipient's attempts (it becomes a dead letter)."""
        if failure.permanent:
            return True
        if isinstance(failure, InfrastructureFailure):
            return False
        return self.is_last(attempt or failure.attempt or 1)

    @staticmethod
    def rate_limit_spread_seconds(window_seconds: int, times_held: int) -> float:
        """How widely a job held back by a full window is spread after the window ends.

        Not all at once: a backlog far larger than the limit would otherwise come back in
        every window, be fetched and be put back again, working the database hard to send a
        few messages. The spread doubles each time the same job is held back (up to
        ``RATE_LIMIT_SPREAD_MAX_SECONDS``), so a large backlog settles into a trickle of fetches.
        """
        base = min(window_seconds, RATE_LIMIT_SPREAD_BASE_SECONDS)
        return float(min(RATE_LIMIT_SPREAD_MAX_SECONDS, base * 2.0 ** min(times_held, 20)))

    def get_retry_decision(self, *, exception: BaseException, job: Job) -> RetryDecision | None:
        if isinstance(exception, asyncio.CancelledError | Interrupted):
            # The worker is shutting down (a chunk handing back what it had not started, or a
            # job cut off when the grace period ran out): the job did nothing wrong, so it goes
            # straight back to the queue.
            return RetryDecision(retry_at=_now())
        if isinstance(exception, RateLimited):
            widest = self.rate_limit_spread_seconds(exception.limit.window_seconds, job.attempts)
            spread = datetime.timedelta(seconds=self.rng.uniform(0, widest))
            return RetryDecision(retry_at=exception.resume_at + spread, priority=RETRY_PRIORITY)
        if not isinstance(exception, TransientFailure):
            return None
        # The recipient's own count (a shutdown gives its attempt back); the job's as fallback.
        attempt = exception.attempt or job.attempts + 1
        if self.gives_up(exception, attempt):
            return None
        delay = datetime.timedelta(
            seconds=self.delay_seconds(attempt, exception.retry_after_seconds)
        )
        return RetryDecision(retry_at=_now() + delay, priority=RETRY_PRIORITY)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
