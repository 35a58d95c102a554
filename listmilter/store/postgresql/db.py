"""One layer under listmilter's PostgreSQL database, the counterpart of store/db.py.

- One connection pool per process and database (psycopg_pool), shared by the
  store, the pending and bounce records and the keys: a `deliver` run opens
  the bounce records for each DSN, and that must not cost a new login.
  Every connection is checked before it is handed out, so connections a
  restart or a fail-over broke are replaced on their own; a caller waits at
  most WAIT seconds for one, then gets StoreError (451 / exit 75).
- The password comes from `store.password_file` (read at each new
  connection, so a changed file is picked up) or from libpq's own
  PGPASSWORD / ~/.pgpass; it never has to be in the config file.
- Reads run in autocommit, one statement at a time (as SQLite's do outside a
  transaction); writes in one transaction each (`transaction()`).
- The SQL the SQLite classes share is written with `?` placeholders; `sql()`
  turns it into psycopg's `%s`. Dialect differences stay in the PostgreSQL
  classes (listmilter.store.postgresql.stores), small and explicit.
- psycopg errors become StoreError naming the database, never the password.
- The schema is an ordered list of migration steps (schema.MIGRATIONS, the
  same rule as store/db.py: step i brings version i to i + 1), counted in the
  table `meta`. Unlike SQLite, opening never changes the schema: several
  hosts share the database, and the role listmilter runs as need not own
  it. `listmilter db upgrade` runs the missing steps in one transaction under
  an advisory lock; a database behind or ahead of the code is refused with a
  message that says what to do.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg_pool import ConnectionPool, PoolTimeout

from listmilter.store import StoreError
from listmilter.store.db import statements
from listmilter.store.postgresql.schema import MIGRATIONS

WAIT = 5.0               # seconds a caller waits for a connection: well within Postfix's milter and
                         # socketmap timeouts, so the client gets listmilter's own 451
POOL_MAX = 8
# Defaults for what the DSN does not say: a dead server or a fail-over is noticed in seconds.
CONNECT_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1", "keepalives_idle": "10", "keepalives_interval": "5", "keepalives_count": "3",
    "tcp_user_timeout": "15000",
    "application_name": "listmilter",
}
# Advisory locks: (LOCK_CLASS, what) pairs, so they cannot meet another program's.
LOCK_CLASS = 0x6C6D          # "lm"
SCHEMA_LOCK = 1
PENDING_LOCK = 2
PERIODIC_LOCK = 3
KEYS_LOCK = 4
MEMBER_LOCKS = LOCK_CLASS + 1     # (MEMBER_LOCKS, hash of list and member): one member's bounce score


@dataclass(frozen=True)
class Target:
    """Where the database is: `store.dsn` and `store.password_file`."""
    dsn: str
    password_file: str | None = None

    @property
    def describe(self) -> str:
        """host:port/dbname as user, for messages: never the password."""
        try:
            d = pg_conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            return "postgresql (unreadable store.dsn)"
        host = str(d.get("host") or os.environ.get("PGHOST") or "localhost")
        port = str(d.get("port") or os.environ.get("PGPORT") or "5432")
        user = str(d.get("user") or os.environ.get("PGUSER") or "")
        name = str(d.get("dbname") or os.environ.get("PGDATABASE") or user)
        return f"postgresql://{user + '@' if user else ''}{host}:{port}/{name}"

    def connect_kwargs(self) -> dict:
        """Arguments for each new connection: the defaults, and the password file read now."""
        try:
            given = pg_conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error as e:
            raise StoreError(f"store.dsn: {one_line(e)}") from None
        kw: dict = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        if self.password_file:
            try:
                with open(self.password_file, encoding="utf-8") as f:
                    kw["password"] = f.readline().rstrip("\r\n")
            except OSError as e:
                raise StoreError(f"store.password_file {self.password_file}: {e.strerror}") from None
        kw["autocommit"] = True
        return kw


def target_of(config) -> Target:
    return Target(config.dsn, config.password_file)


def one_line(e: BaseException) -> str:
    return re.sub(r"\s+", " ", str(e)).strip()


def _clean(value):
    """A text PostgreSQL can store: it refuses NUL and lone surrogates, which SQLite keeps and
    hostile mail can bring (a DSN's diagnostic); refusing them would retry a delivery forever."""
    if isinstance(value, str) and (not value.isascii() or "\0" in value):
        return value.replace("\0", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return value


def clean(params):
    """Query parameters (a tuple or list of values), each one `_clean`ed."""
    if isinstance(params, (tuple, list)):
        return tuple(_clean(v) for v in params)
    return params


@functools.lru_cache(maxsize=512)
def sql(query: str) -> str:
    """Shared SQL (sqlite3's `?`) as psycopg wants it (`%s`, a literal % doubled)."""
    return query.replace("%", "%%").replace("?", "%s")


# -- pools -------------------------------------------------------------------------
# The pool retries failed connections by itself and logs each failure; what a
# caller that waited in vain needs is the last reason, in its own StoreError.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
_last_failure: dict[str, str] = {}


class _Connection(psycopg.Connection):
    """Remembers why the last attempt to connect to a DSN failed (a wrong password, no server)."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs):
        try:
            conn = super().connect(conninfo, **kwargs)
        except psycopg.Error as e:
            _last_failure[conninfo] = one_line(e)
            raise
        _last_failure.pop(conninfo, None)
        return conn


_pools: dict[tuple, ConnectionPool] = {}
_version_checked: dict[tuple, float] = {}
VERSION_CHECK_INTERVAL = 60.0
_locks: dict[tuple, threading.Lock] = {}
_pools_lock = threading.Lock()


def _pool_key(target: Target) -> tuple:
    return (os.getpid(), target.dsn, target.password_file)


def pool(target: Target) -> ConnectionPool:
    """This process's pool for `target` (made on first use; a forked child makes its own)."""
    key = _pool_key(target)
    p = _pools.get(key)
    if p is not None:
        return p
    with _pools_lock:
        p = _pools.get(key)
        if p is None:
            # Check the DSN now: a broken one is a clear error, not WAIT seconds of retries.
            target.connect_kwargs()
            p = ConnectionPool(target.dsn, connection_class=_Connection, kwargs=lambda: _kwargs(target),
                               min_size=1, max_size=POOL_MAX,
                               timeout=WAIT, reconnect_timeout=60.0, max_idle=300.0,
                               check=ConnectionPool.check_connection, name=f"listmilter {target.describe}",
                               open=True)
            _pools[key] = p
            _locks[key] = threading.Lock()
    return p


def _kwargs(target: Target) -> dict:
    """connect_kwargs for the pool, whose failure (an unreadable password file) is remembered too."""
    try:
        return target.connect_kwargs()
    except StoreError as e:
        _last_failure[target.dsn] = str(e)
        raise


def process_lock(target: Target) -> threading.Lock:
    pool(target)
    return _locks[_pool_key(target)]


def close_pools() -> None:
    """Close this process's pools (at exit; tests, before they drop a database)."""
    with _pools_lock:
        mine = [k for k in _pools if k[0] == os.getpid()]
        pools = [_pools.pop(k) for k in mine]
        for k in mine:
            _version_checked.pop(k, None)
    for p in pools:
        p.close(timeout=2)


atexit.register(close_pools)


# -- connections -------------------------------------------------------------------
class Rows:
    """A read's result, fetched whole while the connection was borrowed (cursor-like)."""

    def __init__(self, rows: list, rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def fetchone(self):
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list:
        return self._rows

    def __iter__(self):
        return iter(self._rows)


class Reads:
    """`execute` for reads outside a transaction: each statement on a pooled connection."""

    def __init__(self, db: "Database"):
        self.db = db

    def execute(self, query: str, params=()) -> Rows:
        with self.db.errors(), self.db.pool.connection() as raw:
            cur = raw.execute(sql(query), clean(params))
            return Rows(cur.fetchall() if cur.description else [], cur.rowcount)


class Tx:
    """One transaction's connection: `execute`/`executemany` of shared SQL; `raw` for PostgreSQL's own."""

    def __init__(self, raw: psycopg.Connection):
        self.raw = raw

    def execute(self, query: str, params=()) -> psycopg.Cursor:
        return self.raw.execute(sql(query), clean(params))

    def executemany(self, query: str, params) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(sql(query), (clean(p) for p in params))


class Database:
    """The database as one of listmilter's parts sees it (`name` says which, in messages).

    Refuses, at once, a database whose schema is not the one this code writes."""

    def __init__(self, target: Target, name: str):
        self.target = target
        self.name = name
        self.describe = f"{name} {target.describe}"
        self.pool = pool(target)
        self.reads = Reads(self)
        # The schema is checked once per process and minute, not for each object: `deliver`
        # opens the bounce records for every DSN, the web the pending requests for every click.
        key = _pool_key(target)
        if time.monotonic() - _version_checked.get(key, -VERSION_CHECK_INTERVAL) >= VERSION_CHECK_INTERVAL:
            with self.errors(), self.pool.connection() as raw:
                self._check_version(schema_version(raw))
            _version_checked[key] = time.monotonic()

    @contextlib.contextmanager
    def errors(self):
        """psycopg's errors (the pool's timeout included) as StoreError naming this database."""
        try:
            yield
        except PoolTimeout as e:
            why = _last_failure.get(self.target.dsn)
            raise StoreError(f"{self.describe}: {why + ' (retried for ' + str(WAIT) + ' s)' if why else e}") from e
        except psycopg.Error as e:
            raise StoreError(f"{self.describe}: {one_line(e) or e.__class__.__name__}") from e

    @contextlib.contextmanager
    def transaction(self):
        """`with db.transaction() as conn:` one transaction, rolled back on an exception."""
        with self.errors(), self.pool.connection() as raw, raw.transaction():
            yield Tx(raw)

    @contextlib.contextmanager
    def advisory_lock(self, what: int, wait: bool = True):
        """Hold a session advisory lock on a connection of its own (a flock across hosts);
        yields False when `wait` is False and another process holds it. The server drops
        it by itself if this process or its connection dies."""
        with self.errors(), self.pool.connection() as raw:
            if wait:
                raw.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, what))
                got = True
            else:
                row = raw.execute("SELECT pg_try_advisory_lock(%s, %s)", (LOCK_CLASS, what)).fetchone()
                got = bool(row and row[0])
            try:
                yield got
            finally:
                if got and not raw.closed:
                    with contextlib.suppress(psycopg.Error):
                        raw.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, what))

    def _check_version(self, version: int) -> None:
        needed = len(MIGRATIONS)
        if version == needed:
            return
        if version == 0:
            raise StoreError(f"{self.describe} has no listmilter tables: run `listmilter db upgrade` "
                             "(as a role that may create tables in it; docs/install.md)")
        if version < needed:
            raise StoreError(f"{self.describe} has schema version {version}, this listmilter needs {needed}: "
                             "run `listmilter db upgrade` (docs/upgrade.md)")
        raise StoreError(f"{self.describe} has schema version {version}, this listmilter needs {needed}: "
                         "it was written by a newer listmilter (docs/upgrade.md)")

    def check(self) -> list[str]:
        """Problems worth an admin's attention (none: reachable, schema current)."""
        with self.errors(), self.pool.connection() as raw:
            self._check_version(schema_version(raw))
        return []

    def release(self) -> None:
        """Nothing: a borrowed connection goes back to the pool at once."""

    def close(self) -> None:
        """Nothing: the pool is the process's (close_pools)."""


def schema_version(raw: psycopg.Connection) -> int:
    found = raw.execute("SELECT to_regclass('meta')").fetchone()
    if found is None or found[0] is None:
        return 0
    row = raw.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
    return int(row[0]) if row else 0


def upgrade(target: Target) -> tuple[int, int]:
    """Run the migration steps the database lacks, in one transaction: (version before, after).

    Processes racing each other upgrade once: the second waits for the first's lock,
    then finds nothing to do."""
    describe = f"postgresql database {target.describe}"
    needed = len(MIGRATIONS)
    try:
        with psycopg.connect(target.dsn, **target.connect_kwargs()) as raw, raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, SCHEMA_LOCK))
            before = schema_version(raw)
            if before > needed:
                raise StoreError(f"{describe} has schema version {before}, this listmilter needs {needed}: "
                                 "it was written by a newer listmilter (docs/upgrade.md)")
            try:
                for step in MIGRATIONS[before:]:
                    for statement in statements(step):
                        raw.execute(statement)
            except psycopg.Error as e:
                raise StoreError(f"{describe}: upgrade from schema version {before} to {needed} failed, "
                                 f"nothing changed: {one_line(e)}") from e
            raw.execute("INSERT INTO meta(name, value) VALUES ('schema', %s) "
                        "ON CONFLICT (name) DO UPDATE SET value=excluded.value", (str(needed),))
            return before, needed
    except psycopg.Error as e:
        raise StoreError(f"{describe}: {one_line(e)}") from e


def version_of(target: Target) -> int:
    """The database's schema version (0: no listmilter tables), for `check` and `db upgrade`."""
    try:
        with psycopg.connect(target.dsn, **target.connect_kwargs()) as raw:
            return schema_version(raw)
    except psycopg.Error as e:
        raise StoreError(f"postgresql database {target.describe}: {one_line(e)}") from e
