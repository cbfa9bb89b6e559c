"""Start a real PostgreSQL server (Debian's ``postgresql`` package) for the tests.

::

    with running_postgres() as server:
        url = server.create_database()      # postgresql://postgres@127.0.0.1:PORT/edgeward_…
        registry = pki.open_registry(url)

The server refuses to run as root, so under root the data directory belongs to the
``postgres`` user and every server command runs through ``runuser -u postgres``. It listens on
127.0.0.1 and a Unix socket inside its data directory, on a free port, with ``trust``
authentication (loopback only, thrown away at the end). ``stop()``/``start()`` restart it on the
same port and data, for tests of reconnection.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PostgresServer", "find_postgres_bin", "running_postgres"]


def find_postgres_bin() -> Path | None:
    """The directory of ``initdb``/``pg_ctl``: the newest /usr/lib/postgresql/N/bin, or PATH."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    port: int
    as_postgres: bool
    host: str = "127.0.0.1"

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n{output}\n{self.log()}")

    def url(self, database: str = "postgres", *, password: str | None = None) -> str:
        auth = "postgres" if password is None else f"postgres:{password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.datadir} -c listen_addresses={self.host}"
        self._run(
            "pg_ctl", "-D", str(self.datadir), "-o", options,
            "-l", str(self.datadir / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"edgeward_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log(self) -> str:
        path = self.datadir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextlib.contextmanager
def running_postgres(bindir: Path | None = None) -> Iterator[PostgresServer]:
    """A PostgreSQL server in a temporary data directory, stopped and removed on exit."""
    bindir = bindir or find_postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    as_postgres = os.geteuid() == 0
    # Not under pytest's tmp_path: its directories are 0700 root's, closed to 'postgres'.
    datadir = Path(tempfile.mkdtemp(prefix="edgeward-pg-")) / "data"
    datadir.parent.chmod(0o755)
    if as_postgres:
        shutil.chown(datadir.parent, user="postgres", group="postgres")
    server = PostgresServer(bindir, datadir, _free_port(), as_postgres)
    try:
        server._run(
            "initdb", "-D", str(datadir), "-A", "trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        # Test speed: no fsync (the data is thrown away); room for many test databases.
        with (datadir / "postgresql.conf").open("a") as conf:
            conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
            conf.write("max_connections = 300\n")
        started = time.monotonic()
        server.start()
        while time.monotonic() - started < 60:
            try:
                with socket.create_connection((server.host, server.port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(datadir.parent, ignore_errors=True)
