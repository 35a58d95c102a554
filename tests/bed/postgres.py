"""A private PostgreSQL server for tests and benchmarks (Debian's `postgresql` package).

`initdb` and `pg_ctl` from /usr/lib/postgresql/*/bin, run as user postgres in
a temporary folder, listening on a free port on 127.0.0.1 only (and a unix
socket in that folder, for the superuser). Clients log in as the role
`listmilter` with a password (scram-sha-256 over TCP), the way docs/install.md
sets up a site; the password is in a file, as `store.password_file` reads it.

The fixtures (registered by tests/conftest.py):

- `pg_server`: one server for the session, stopped at the end (also on failure);
- `pg_database`: a new, empty database on it for one test, with the schema
  made by `listmilter db upgrade`'s code; yields a `Database` with its DSN.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from .net import free_port, wait_until

USER = "postgres"
ROLE = "listmilter"
PASSWORD = "test-password-not-secret"


def bin_dir() -> Path:
    """The newest /usr/lib/postgresql/VERSION/bin with initdb (Debian's layout)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if not found:
        raise RuntimeError("PostgreSQL is not installed: run ./bootstrap (Debian package postgresql)")
    return Path(found[-1]).parent


@dataclass
class Database:
    name: str
    dsn: str                 # as a config file's store.dsn gives it (no password)
    password_file: str       # as store.password_file gives it
    server: "PostgreSQL"

    @property
    def url(self) -> str:    # for `listmilter migrate --to`
        return f"postgresql://{ROLE}@127.0.0.1:{self.server.port}/{self.name}"

    def config(self) -> dict:
        """The `store:` keys for this database (docs/configuration.md)."""
        return {"dsn": self.dsn, "password_file": self.password_file}

    def psql(self, sql: str) -> str:
        return self.server.psql(sql, self.name)


class PostgreSQL:
    """One private server: start(), stop(), psql(), new_database()."""

    _names = itertools.count(1)

    def __init__(self, workdir: Path | None = None, fsync: bool = False):
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="lmpg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "run"
        self.port = free_port()
        self.bin = bin_dir()
        self.fsync = fsync
        self.password_file = self.dir / "password"
        self.running = False
        self._initialised = False

    def _run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        # initdb and postgres refuse to run as root; the folder is postgres's.
        proc = subprocess.run(list(args), user=USER, check=False, capture_output=True, text=True,
                              cwd=self.dir, timeout=120, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _init(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, USER, USER)
        self.socket_dir.mkdir(exist_ok=True)
        shutil.chown(self.socket_dir, USER, USER)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, "-E", "UTF8",
                  "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.socket_dir}'\n"
                    f"fsync = {'on' if self.fsync else 'off'}\nmax_connections = 200\n"
                    "log_min_messages = warning\n")
        # Readable by the pipe transport's user, as /etc/listmilter/db-password would be to the service user.
        self.password_file.write_text(PASSWORD + "\n")
        os.chmod(self.password_file, 0o644)
        self._initialised = True

    def start(self) -> "PostgreSQL":
        if not self._initialised:
            self._init()
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"),
                  "-w", "-t", "60", "start")
        self.running = True
        if not getattr(self, "_role", False):
            self.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            self._role = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` is a crash: no shutdown checkpoint)."""
        if not self.running:
            return
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop",
                  check=False)
        self.running = False

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        proc = self._run(str(self.bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", str(self.socket_dir), "-p", str(self.port), "-U", USER, "-d", database,
                         "-c", sql, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    def new_database(self, upgrade: bool = True) -> Database:
        name = f"lm{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE} TEMPLATE template0")
        db = Database(name, f"host=127.0.0.1 port={self.port} dbname={name} user={ROLE}",
                      str(self.password_file), self)
        if upgrade:
            from listmilter.store.postgresql import db as pgdb
            pgdb.upgrade(pgdb.Target(db.dsn, db.password_file))
        return db

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def accepts(self) -> bool:
        proc = self._run(str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), check=False)
        return proc.returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        wait_until(self.accepts, timeout, interval=0.2, what="PostgreSQL to accept connections")


@pytest.fixture(scope="session")
def pg_server():
    server = PostgreSQL()
    try:
        server.start()
        yield server
    finally:
        server.stop("immediate")
        server.remove()


@pytest.fixture
def pg_database(pg_server):
    db = pg_server.new_database()
    yield db
    from listmilter.store.postgresql import db as pgdb
    pgdb.close_pools()          # this process's connections to it, so it can be dropped
    pg_server.psql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")


class State:
    """The pending and bounce databases of one test, on SQLite files or on PostgreSQL (`state` fixture)."""

    def __init__(self, folder: Path, pg: Database | None):
        self.folder = str(folder)
        self.pg = pg
        self.kind = "postgresql" if pg else "sqlite"

    def _target(self):
        from listmilter.store.postgresql.db import Target
        return Target(self.pg.dsn, self.pg.password_file)

    def pending(self):
        if self.pg:
            from listmilter.store.postgresql.stores import PgPendingDB
            return PgPendingDB(self._target())
        from listmilter.store.pending import PendingDB
        return PendingDB(self.folder)

    def bounces(self):
        if self.pg:
            from listmilter.store.postgresql.stores import PgBounceDB
            return PgBounceDB(self._target())
        from listmilter.store.bounce_records import BounceDB
        return BounceDB(self.folder)


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request, tmp_path):
    """Where a test's pending and bounce records live: each test runs on both."""
    return State(tmp_path, request.getfixturevalue("pg_database") if request.param == "postgresql" else None)
