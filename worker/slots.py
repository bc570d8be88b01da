"""The worker's send slots: a semaphore that publishes how many of its slots are taken."""

from __future__ import annotations

import asyncio
from typing import Literal

from shared.metrics import WORKER_BUSY_SLOTS


class SendSlots(asyncio.Semaphore):
    """``asyncio.Semaphore`` of the sends in flight, counted in ``mailroom_worker_busy_slots``.

    The count moves with the slot itself: up once ``acquire`` has it (nothing awaits between,
    so a cancelled wait never counts), down in ``release``.
    """

    async def acquire(self) -> Literal[True]:
        await super().acquire()
        WORKER_BUSY_SLOTS.inc()
        return True

    def release(self) -> None:
        WORKER_BUSY_SLOTS.dec()
        super().release()
