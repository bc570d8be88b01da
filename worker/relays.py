"""Sending through several SMTP relays: spread by weight, failed over, probed back.

:class:`RelayMailer` is the worker's :class:`worker.smtp.Mailer`. Each relay is an
:class:`worker.smtp.SmtpMailer` of its own (its connections, its slow-down, its up or down
state); this module only decides which relay a message goes to:

- the relays that are up and ``primary`` share the sends by weight, in a smooth weighted
  round-robin (nginx's: deterministic, and no relay gets a run of sends in a row beyond what
  its weight asks); the ``fallback`` relays share them the same way while no primary is up;
- a relay that cannot take the message without any risk of it being delivered
  (:func:`worker.failures.relay_unavailable`: refused, timed out connecting, 421, dropped before
  DATA) is marked down and the same send goes on to the next relay, within the same attempt of
  the recipient and under the same claim. Any other failure is the send's outcome, as it is
  with one relay: in particular no reply after the message's text was sent (the relay may have
  it) is never sent elsewhere by the failover; the recipient's retry, later, may go anywhere;
- a relay marked down is probed (a connection: greeting, TLS, AUTH, nothing sent) after
  ``probe_min_seconds``, twice as long after each failed probe up to ``probe_max_seconds``,
  and is up again when a probe connects; a successful send resets the wait;
- while no relay is up, each send tries the relays that are down, primaries first, so a short
  outage of every relay costs no more than it does with one relay; if none takes it, the
  send fails transiently and the recipient's retry, with its backoff, takes over.

A relay's own rate limit (:class:`shared.ratelimits.LocalWindow`) makes it skipped while its
window is full; when every relay that is up is full, the send waits for the first window to
end (:class:`worker.failures.RateLimited`, as the shared limits do).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Sequence

import structlog

from shared.metrics import (
    SMTP_CONCURRENCY_LIMIT,
    SMTP_FAILOVERS,
    SMTP_SLOWDOWN_UNTIL,
    SMTP_SLOWED_DOWN,
)
from shared.ratelimits import Limit
from shared.settings import Settings, SmtpRelay
from worker.dkim import DkimSigner
from worker.failures import DeliveryFailure, RateLimited, relay_unavailable
from worker.smtp import OutgoingMessage, SmtpMailer, SmtpServer

log = structlog.get_logger(__name__)

PROBE_MIN_SECONDS = 5.0
PROBE_MAX_SECONDS = 120.0


class _Relay:
    """One relay's mailer with what routing needs: its weight, its role, its probe."""

    def __init__(self, config: SmtpRelay, mailer: SmtpMailer, probe_min_seconds: float) -> None:
        self.name = config.name
        self.weight = config.weight
        self.primary = config.role == "primary"
        self.mailer = mailer
        self.current_weight = 0  # the smooth weighted round-robin's running score
        self.probe_wait_seconds = probe_min_seconds
        self.probe: asyncio.Task[None] | None = None
        self.failovers = SMTP_FAILOVERS.labels(relay=config.name)


class RelayMailer:
    """Sends each message through one of several relays; see the module's docstring."""

    def __init__(
        self,
        relays: Sequence[tuple[SmtpRelay, SmtpMailer]],
        *,
        probe_min_seconds: float = PROBE_MIN_SECONDS,
        probe_max_seconds: float = PROBE_MAX_SECONDS,
    ) -> None:
        if not any(config.role == "primary" for config, _ in relays):
            raise ValueError("at least one relay must be a primary")
        self._relays = [_Relay(config, mailer, probe_min_seconds) for config, mailer in relays]
        self._probe_min_seconds = probe_min_seconds
        self._probe_max_seconds = probe_max_seconds
        self._only = self._relays[0] if len(self._relays) == 1 else None
        for relay in self._relays:
            relay.mailer.on_limit_change = self._publish_limit
        self._publish_limit()
        # Across relays: slowed down while any of them is; until the last of them ends.
        SMTP_SLOWED_DOWN.set_function(
            lambda: float(any(r.mailer.slowed_down for r in self._relays))
        )
        SMTP_SLOWDOWN_UNTIL.set_function(
            lambda: max(r.mailer.slowdown_until_unix() for r in self._relays)
        )

    @property
    def relays(self) -> dict[str, SmtpMailer]:
        """Each relay's mailer, by name (for what reports on them)."""
        return {relay.name: relay.mailer for relay in self._relays}

    async def send(self, message: OutgoingMessage) -> str:
        """Send ``message`` through the next relay, and the next after that while a relay
        cannot take it; return the reply, or raise the last relay's failure."""
        if self._only is not None:  # one relay: nowhere else to go, nothing to choose
            return await self._send_via(self._only, message)
        tried: set[str] = set()
        failure: DeliveryFailure | None = None
        failed_on: _Relay | None = None
        waiting: RateLimited | None = None
        while (relay := self._next(tried)) is not None:
            tried.add(relay.name)
            if failure is not None and failed_on is not None:
                failed_on.failovers.inc()
                log.info(
                    "smtp_failover",
                    from_relay=failed_on.name,
                    relay=relay.name,
                    error=failure.message,
                )
                failed_on = None
            try:
                return await self._send_via(relay, message)
            except RateLimited as full:
                if waiting is None or full.resume_at < waiting.resume_at:
                    waiting = full
            except DeliveryFailure as failed:
                if not relay_unavailable(failed):
                    raise
                failure, failed_on = failed, relay
        if waiting is not None:  # not the recipient's fault: it waits for the window
            raise waiting
        assert failure is not None  # every relay is tried when none is up, so one failed
        raise failure

    async def _send_via(self, relay: _Relay, message: OutgoingMessage) -> str:
        try:
            reply = await relay.mailer.send(message)
        except DeliveryFailure:
            if not relay.mailer.is_up:
                self._watch(relay)
            raise
        relay.probe_wait_seconds = self._probe_min_seconds
        return reply

    def _next(self, tried: set[str]) -> _Relay | None:
        """The relay to try next: among those up (primaries, else fallbacks) by weight; while
        none is up, any not tried yet, primaries first."""
        untried = [r for r in self._relays if r.name not in tried]
        up = [r for r in untried if r.mailer.is_up]
        if up:
            return self._pick([r for r in up if r.primary] or up)
        if any(r.mailer.is_up for r in self._relays):
            return None  # one is up but was tried (its window is full): do not go to one down
        down = sorted(untried, key=lambda r: (not r.primary, -r.weight))
        return down[0] if down else None

    @staticmethod
    def _pick(candidates: list[_Relay]) -> _Relay:
        """Smooth weighted round-robin: every candidate gains its weight, the highest score
        is chosen and loses the candidates' total."""
        total, best = 0, candidates[0]
        for relay in candidates:
            relay.current_weight += relay.weight
            total += relay.weight
            if relay.current_weight > best.current_weight:
                best = relay
        best.current_weight -= total
        return best

    def _watch(self, relay: _Relay) -> None:
        """Probe a relay that is down until it is up again (once: one probe task a relay)."""
        if relay.probe is None or relay.probe.done():
            # A context of its own: the probe's log lines are not the job's that started it.
            relay.probe = asyncio.create_task(
                self._probe(relay), name=f"probe-{relay.name}", context=contextvars.Context()
            )

    async def _probe(self, relay: _Relay) -> None:
        # A background loop: it logs and goes on whatever a probe raises, until the relay is up.
        while not relay.mailer.is_up:
            wait = relay.probe_wait_seconds
            relay.probe_wait_seconds = min(self._probe_max_seconds, wait * 2)
            await asyncio.sleep(wait)
            if relay.mailer.is_up:
                return  # a send brought it back meanwhile
            try:
                await relay.mailer.probe()
            except DeliveryFailure as failed:
                log.info(
                    "smtp_relay_probe_failed",
                    relay=relay.name,
                    error=failed.message,
                    next_probe_in_s=relay.probe_wait_seconds,
                )
            except Exception as exc:
                log.error("smtp_relay_probe_crashed", relay=relay.name, error=type(exc).__name__)

    def _publish_limit(self) -> None:
        SMTP_CONCURRENCY_LIMIT.set(sum(r.mailer.concurrency_limit for r in self._relays))

    async def close(self) -> None:
        """Stop the probes and say QUIT on every relay's idle connections."""
        probes = [r.probe for r in self._relays if r.probe is not None]
        for probe in probes:
            probe.cancel()
        for probe in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        for relay in self._relays:
            relay.probe = None
        await asyncio.gather(*(r.mailer.close() for r in self._relays))


def relay_limits(relay: SmtpRelay) -> list[Limit]:
    """The relay's own sending-rate limits (per worker process)."""
    found = [("per second", 1, relay.rate_per_second), ("per minute", 60, relay.rate_per_minute)]
    return [
        Limit(f"relay {relay.name} {name}", f"relay:{relay.name}:{w}s", w, n)
        for name, w, n in found
        if n is not None
    ]


def build_mailer(
    settings: Settings,
    *,
    signer: DkimSigner | None = None,
    probe_min_seconds: float = PROBE_MIN_SECONDS,
    probe_max_seconds: float = PROBE_MAX_SECONDS,
) -> RelayMailer:
    """The worker's mailer: one SmtpMailer per relay of the settings, routed by a RelayMailer.

    A relay has ``max_connections`` connections (the worker's concurrency when unset).
    """
    relays = [
        (
            config,
            SmtpMailer(
                SmtpServer.from_relay(config),
                size=config.max_connections or settings.worker_concurrency,
                signer=signer,
                rate_limits=relay_limits(config),
            ),
        )
        for config in settings.relays()
    ]
    return RelayMailer(
        relays, probe_min_seconds=probe_min_seconds, probe_max_seconds=probe_max_seconds
    )
