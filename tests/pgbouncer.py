"""A PgBouncer of a test's own (Debian's ``pgbouncer``) in front of the test PostgreSQL.

Each :class:`PgBouncer` writes its ini to a directory of its own, listens on a free port on
loopback and serves one PgBouncer database per pool mode asked for, all pointing at the same
real database. PgBouncer refuses to run as root: as root it runs as the user that owns the
embedded PostgreSQL's socket directory (the only user that can reach that socket), or as
``nobody`` for a server on TCP; as anyone else it runs as that user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.processes import free_port, stop, wait_until

DEBIAN_BINARY = Path("/usr/sbin/pgbouncer")
# Server connections per PgBouncer database and user: fewer than the clients a web tier and
# two workers open, so clients really share them.
POOL_SIZE = 10


def pgbouncer_binary() -> str | None:
    """The pgbouncer program (Debian installs it in /usr/sbin, off a user's PATH), or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return str(DEBIAN_BINARY) if os.access(DEBIAN_BINARY, os.X_OK) else None


def _run_as(server: Mapping[str, str]) -> dict[str, Any]:
    """``subprocess`` arguments that drop root, if this runs as root."""
    if os.geteuid() != 0:
        return {}
    host = server.get("host", "")
    if host.startswith("/"):
        user = pwd.getpwuid(Path(host).stat().st_uid)
    else:
        user = pwd.getpwnam("nobody")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class PgBouncer:
    """PgBouncer in front of ``database_url``; :meth:`url` names one of its ``pools``.

    ``pools`` maps a PgBouncer database name to its ``pool_mode`` (``session`` or
    ``transaction``). Use as ``async with``: started on entry, stopped on exit.
    """

    def __init__(self, database_url: str, pools: Mapping[str, str], log_path: Path) -> None:
        self.server = conninfo_to_dict(database_url)
        self.pools = dict(pools)
        self.log_path = log_path
        self.port = free_port()
        self._directory = Path(tempfile.mkdtemp(prefix="mailroom-pgbouncer-"))
        self._proc: asyncio.subprocess.Process | None = None

    def url(self, pool: str) -> str:
        """A libpq URL of PgBouncer database ``pool``, as a client would be configured."""
        assert pool in self.pools, pool
        return make_conninfo(
            host="127.0.0.1",
            port=str(self.port),
            dbname=pool,
            user=str(self.server.get("user", "postgres")),
        )

    def _ini(self) -> str:
        keys = ("host", "port", "user", "password")
        target = {k: self.server[k] for k in keys if k in self.server}
        databases = [
            f"{name} = "
            + " ".join(f"{k}={v}" for k, v in target.items())
            + f" dbname={self.server['dbname']} pool_mode={mode}"
            for name, mode in self.pools.items()
        ]
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self._directory / "users.txt"),
            "max_client_conn": "500",
            "default_pool_size": str(POOL_SIZE),
            # Debian's default; transaction pooling never runs it.
            "server_reset_query": "DISCARD ALL",
        }
        return (
            "[databases]\n"
            + "".join(line + "\n" for line in databases)
            + "[pgbouncer]\n"
            + "".join(f"{k} = {v}\n" for k, v in settings.items())
        )

    async def __aenter__(self) -> PgBouncer:
        binary = pgbouncer_binary()
        assert binary is not None, "apt-get install pgbouncer"
        user = str(self.server.get("user", "postgres"))
        (self._directory / "users.txt").write_text(f'"{user}" ""\n')
        (self._directory / "pgbouncer.ini").write_text(self._ini())
        # The user it runs as only reads these.
        self._directory.chmod(0o755)
        for path in self._directory.iterdir():
            path.chmod(0o644)
        output = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                str(self._directory / "pgbouncer.ini"),
                stdout=output,
                stderr=output,
                **_run_as(self.server),
            )
        finally:
            output.close()
        await wait_until(self._answers, 15, f"pgbouncer on port {self.port}")
        return self

    async def _answers(self) -> bool:
        assert self._proc is not None
        if self._proc.returncode is not None:
            raise AssertionError(
                f"pgbouncer exited with {self._proc.returncode}: {self.log_path.read_text()}"
            )
        try:
            name = next(iter(self.pools))
            async with await psycopg.AsyncConnection.connect(self.url(name), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            await stop(self._proc)
        shutil.rmtree(self._directory, ignore_errors=True)
