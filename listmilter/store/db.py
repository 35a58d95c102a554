"""One layer under every SQLite database listmilter keeps.

listmilter.sqlite (the sqlite store), state.sqlite (the yaml backend's
overlay), bounces.sqlite and pending.sqlite all open through `Database`:

- one connection per thread, keyed by thread id (libmilter's worker threads
  are not Python threads, and threading.local does not follow them reliably);
  `release()` closes the calling thread's, `close()` all of them;
- WAL, so the milter reads while the CLI or a pipe process writes;
  synchronous=NORMAL; a busy timeout instead of "database is locked" at once;
- files created 0640 (statedir.create_private, never by the umask) and, when root creates them, given to the
  state folder's owner (statedir.adopt);
- writes in `BEGIN IMMEDIATE` transactions (`Transaction`);
- sqlite3 errors as StoreError naming the database (`sqlite_errors`);
- the schema as an ordered list of migration steps, counted in `user_version`.

Migrations: step i (0-based) brings a database from version i to i + 1.
Opening a database runs the steps it lacks, all in one transaction: a
failure leaves it as it was. One that is newer than the code is refused:
an older listmilter cannot know what a newer one changed. Databases written
before they had a version (0.1.0's pending.sqlite and bounces.sqlite, at 0)
have their tables already: step 1 uses CREATE ... IF NOT EXISTS, so it
adopts them unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence

from listmilter.store import StoreError, statedir

# SQL statements, or a function given the connection inside the upgrade's transaction.
Migration = str | Callable[[sqlite3.Connection], None]


def adopt_owner(path: str) -> None:
    """A database and the -wal and -shm files SQLite creates as whoever opens it first."""
    statedir.adopt(os.path.dirname(os.path.abspath(path)), path, path + "-wal", path + "-shm")


def sqlite_errors(fn):
    """A method whose sqlite3 errors become StoreError, named by the object's `describe`."""
    def wrapper(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except sqlite3.Error as e:
            raise StoreError(f"{self.describe}: {e}") from e
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class Transaction:
    """`with Transaction(conn) as conn:` one BEGIN IMMEDIATE write, rolled back on an exception."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:    # some errors (disk full) end it by themselves
            self.conn.execute("ROLLBACK")


def statements(script: str) -> Iterator[str]:
    """The statements of an SQL script one by one (executescript would COMMIT the
    upgrade's transaction first). complete_statement keeps a ';' inside a string,
    a comment or a trigger body where it belongs."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\r\n;"):
                yield pending
            pending = ""
    if pending.strip(" \t\r\n;"):
        yield pending


def user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


class Database:
    """One SQLite file: its connections, its transactions and its schema version.

    `name` says what it is in messages ("bounce database"); `migrations` is the
    schema, step by step (see the module's doc); the version this code writes is
    len(migrations). With create=False a missing file is a StoreError.
    """

    def __init__(self, path: str, name: str, migrations: Sequence[Migration], *,
                 create: bool = True, timeout: float = 10):
        self.path = path
        self.name = name
        self.describe = f"{name} {path}"
        self.migrations = tuple(migrations)
        self.create = create
        self.timeout = timeout
        self._conns: dict[int, sqlite3.Connection] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @property
    def version(self) -> int:
        """The schema version this code reads and writes."""
        return len(self.migrations)

    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection; the first one creates or upgrades the file."""
        if self._pid != os.getpid():
            # A forked child must not use its parent's connections (SQLite forbids it);
            # forget them without closing, they are the parent's.
            with self._lock:
                self._conns, self._pid = {}, os.getpid()
        conn = self._conns.get(threading.get_ident())
        if conn is None:
            conn = self._open()
            with self._lock:
                self._conns[threading.get_ident()] = conn
        return conn

    def transaction(self) -> Transaction:
        return Transaction(self.conn())

    def release(self) -> None:
        """Close the calling thread's connection; its next call opens a new one. For
        threads that outlive their work, such as the web server's workers."""
        with self._lock:
            conn = self._conns.pop(threading.get_ident(), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close every thread's connection (call when no thread uses the database any more)."""
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def quick_check(self) -> list[str]:
        """What SQLite's quick_check finds wrong (empty when all is well, or no file yet)."""
        if not os.path.exists(self.path):
            return []
        try:
            rows = self.conn().execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.describe}: {e}") from e
        return [r[0] for r in rows if r[0] != "ok"]

    def _open(self) -> sqlite3.Connection:
        if not self.create and not os.path.exists(self.path):
            raise StoreError(f"{self.describe} does not exist")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o750, exist_ok=True)
            if self.create and not os.path.exists(self.path):
                # 0640 made here: SQLite gives its -wal and -shm files the database file's mode.
                # A folder this user may not write: SQLite's own error below, in the words
                # troubleshooting.md gives.
                with contextlib.suppress(PermissionError):
                    statedir.create_private(self.path)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                   check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.describe}: cannot open: {e}") from e
        try:
            # WAL stays set in the file once made: setting it again on every open asks for a lock
            # that SQLite may refuse at once ("database is locked", no busy wait) while another
            # process checkpoints, and serve's periodic threads open these files every run.
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._upgrade(conn)
            # After the upgrade: a migration that rebuilds a table must not cascade.
            conn.execute("PRAGMA foreign_keys=ON")
        except StoreError:
            conn.close()
            raise
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"{self.describe}: cannot open: {e}") from e
        finally:
            adopt_owner(self.path)      # also a file root created and could not upgrade
        return conn

    def _too_new(self, version: int) -> StoreError:
        return StoreError(f"{self.describe} has schema version {version}, this listmilter needs "
                          f"{self.version}: it was written by a newer listmilter (docs/upgrade.md)")

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Run the migration steps the file lacks, in one transaction."""
        version = user_version(conn)
        if version == self.version:
            return      # the usual case: no write, no lock
        if not 0 <= version < self.version:
            raise self._too_new(version)
        with Transaction(conn):
            version = user_version(conn)    # another process may have upgraded it meanwhile
            if not 0 <= version <= self.version:
                raise self._too_new(version)
            if version == self.version:
                return
            try:
                for step in self.migrations[version:]:
                    if callable(step):
                        step(conn)
                    else:
                        for statement in statements(step):
                            conn.execute(statement)
            except sqlite3.Error as e:
                raise StoreError(f"{self.describe}: upgrade from schema version {version} to "
                                 f"{self.version} failed, nothing changed: {e}") from e
            broken = conn.execute("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise StoreError(f"{self.describe}: upgrade from schema version {version} to "
                                 f"{self.version} left {len(broken)} broken references; not done")
            conn.execute(f"PRAGMA user_version={self.version}")
