"""The test process's own memory: how far its resident set rose while a block ran."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_mb(field: str) -> float:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in MB."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


@dataclass
class PeakRss:
    start_mb: float
    peak_mb: float = 0.0

    @property
    def growth_mb(self) -> float:
        return max(0.0, self.peak_mb - self.start_mb)


@contextmanager
def peak_rss() -> Iterator[PeakRss]:
    """The RSS at the start of the block and its peak during it (filled in at the end).

    The peak is the kernel's high-water mark, reset first (writing 5 to ``clear_refs``), so
    memory allocated and freed again inside the block counts.
    """
    measured = PeakRss(start_mb=status_mb("VmRSS"))
    try:
        _CLEAR_REFS.write_text("5")
        field = "VmHWM"
    except OSError:  # the peak cannot be reset here: the RSS at the end is the best we have
        field = "VmRSS"
    try:
        yield measured
    finally:
        measured.peak_mb = status_mb(field)
