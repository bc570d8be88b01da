"""A running ``mailroom dev``, as the operator commands find it.

``mailroom dev`` writes ``instance.json`` into its data directory while it runs and removes it
when it stops, so that ``mailroom dead-letters``, ``mailroom bounces`` and ``mailroom check``
run in the same directory work against it without a ``MAILROOM_DATABASE_URL`` written by hand.
The file is only trusted as far as it is checked: the process it names must be alive, and each
value must be a string of sensible length.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

INSTANCE_FILE = "instance.json"
DEFAULT_DATA_DIR = Path(".mailroom")
_MAX_FILE_BYTES = 64 * 1024
_MAX_VALUE_CHARS = 4096


@dataclass(frozen=True)
class DevInstance:
    pid: int
    database_url: str
    from_address: str
    web_url: str


def write_instance(data_dir: Path, instance: DevInstance) -> Path:
    """Record ``instance`` in ``data_dir``, readable by its owner only (it names the database)."""
    path = data_dir / INSTANCE_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(instance)))
    os.chmod(temporary, 0o600)
    temporary.replace(path)  # never a half-written file for a reader
    return path


def remove_instance(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / INSTANCE_FILE).unlink()


def find_running(data_dir: Path = DEFAULT_DATA_DIR) -> DevInstance | None:
    """The ``mailroom dev`` running on ``data_dir``, or ``None`` (no file, a stale or bad one)."""
    path = data_dir / INSTANCE_FILE
    try:
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict):
        return None
    pid = values.get("pid")
    texts = {k: values.get(k) for k in ("database_url", "from_address", "web_url")}
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if not all(isinstance(v, str) and 0 < len(v) <= _MAX_VALUE_CHARS for v in texts.values()):
        return None
    if not _alive(pid):
        return None  # killed without removing its file
    return DevInstance(pid=pid, **texts)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    except OverflowError:
        return False
    return True
