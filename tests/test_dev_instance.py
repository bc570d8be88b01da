"""How operator commands find a running ``mailroom dev``: only a live, well-formed record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailroom.instance import (
    INSTANCE_FILE,
    DevInstance,
    find_running,
    remove_instance,
    write_instance,
)

LIVE = DevInstance(
    pid=os.getpid(),
    database_url="host=/tmp dbname=mailroom",
    from_address="mailroom@example.com",
    web_url="http://127.0.0.1:8080/",
)


def test_a_recorded_live_instance_is_found_and_forgotten_once_removed(tmp_path: Path) -> None:
    path = write_instance(tmp_path, LIVE)
    assert path.stat().st_mode & 0o777 == 0o600  # it names the database
    assert find_running(tmp_path) == LIVE
    remove_instance(tmp_path)
    remove_instance(tmp_path)  # twice is fine
    assert find_running(tmp_path) is None


@pytest.mark.slow
def test_an_instance_whose_process_is_gone_is_not_found(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    write_instance(tmp_path, DevInstance(**{**LIVE.__dict__, "pid": int(dead.stdout)}))
    assert find_running(tmp_path) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"a string"',
        json.dumps({**LIVE.__dict__, "pid": "1"}).encode(),
        json.dumps({**LIVE.__dict__, "pid": True}).encode(),
        json.dumps({**LIVE.__dict__, "pid": -1}).encode(),
        json.dumps({**LIVE.__dict__, "pid": 2**80}).encode(),
        json.dumps({**LIVE.__dict__, "database_url": ""}).encode(),
        json.dumps({**LIVE.__dict__, "database_url": 5}).encode(),
        json.dumps({**LIVE.__dict__, "from_address": "x" * 5000}).encode(),
        json.dumps({k: v for k, v in LIVE.__dict__.items() if k != "web_url"}).encode(),
        b"{" + b" " * 70_000 + b"}",
    ],
)
def test_a_bad_record_is_ignored_never_raised(tmp_path: Path, content: bytes) -> None:
    (tmp_path / INSTANCE_FILE).write_bytes(content)
    assert find_running(tmp_path) is None


def test_a_record_that_is_not_a_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / INSTANCE_FILE).mkdir()
    assert find_running(tmp_path) is None
    assert find_running(tmp_path / "no-such-dir") is None
