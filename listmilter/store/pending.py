"""Pending requests and rate-limit counters: state_dir/pending.sqlite.

Both store backends use this one database. Only a token's SHA-256 is stored.
Each row binds the token to one list, one address and one action; a token is
used at most once and expires. Every write is one transaction (BEGIN
IMMEDIATE): the pipe transport, the web endpoint and the CLI may run at the
same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time

from listmilter.core import addresses
from listmilter.core.subscriptions import OWN, Request, Sent
from listmilter.core.tokens import DAY, KEEP_DAYS, Pending, new_token, token_hash
from listmilter.store import StoreError, statedir
from listmilter.store.db import Database, adopt_owner, sqlite_errors

FILE_NAME = "pending.sqlite"
LOCK_NAME = "pending.lock"

# The schema, step by step (listmilter.store.db). 0.1.0 wrote step 1 without a version.
MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS pending (
    hash     TEXT PRIMARY KEY,       -- sha256 of the token, hex
    kind     TEXT NOT NULL,          -- confirm | moderate
    list     TEXT NOT NULL,          -- list key
    key      TEXT NOT NULL,          -- address key
    address  TEXT NOT NULL,          -- as given
    name     TEXT NOT NULL DEFAULT '',
    action   TEXT NOT NULL,          -- subscribe | unsubscribe
    how      TEXT NOT NULL DEFAULT '',   -- how the request came (mail, web, cli)
    who      TEXT NOT NULL DEFAULT '',   -- e.g. the requesting Message-ID
    created  REAL NOT NULL,
    expires  REAL NOT NULL,
    done     REAL,                   -- when used (confirmed, approved, rejected)
    outcome  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS pending_member ON pending(list, key);
CREATE TABLE IF NOT EXISTS sent (    -- replies sent to commands: the rate-limit counters
    list     TEXT NOT NULL,
    key      TEXT NOT NULL,          -- address key of the recipient
    what     TEXT NOT NULL,
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sent_list ON sent(list, at);
""", """
-- Who asked for each reply, so the limits count per sender and per client, and
-- replies to third parties (unverified) apart from replies to the sender (own).
ALTER TABLE sent ADD COLUMN budget TEXT NOT NULL DEFAULT 'own';   -- own | unverified (core.subscriptions)
ALTER TABLE sent ADD COLUMN sender TEXT NOT NULL DEFAULT '';      -- address key of the envelope sender
ALTER TABLE sent ADD COLUMN client TEXT NOT NULL DEFAULT '';      -- the SMTP client's IP address, if known
""")


class PendingDB:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, FILE_NAME)
        self.db = Database(self.path, "pending database", MIGRATIONS)
        self.describe = self.db.describe

    def _conn(self) -> sqlite3.Connection:
        return self.db.conn()

    @contextlib.contextmanager
    def serialized(self):
        """Hold the lock that makes "look at what is pending and sent, decide, record"
        one step across processes (the pipe transport runs several deliveries at once)."""
        path = os.path.join(os.path.dirname(self.path), LOCK_NAME)
        try:
            fd = statedir.open_private(path)
            adopt_owner(path)
        except OSError as e:
            raise StoreError(f"pending lock {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _tx(self):
        return self.db.transaction()

    def close(self) -> None:
        self.db.close()

    # -- requests ------------------------------------------------------------
    @sqlite_errors
    def create(self, kind: str, list_address: str, address: str, action: str, days: float,
               name: str = "", how: str = "", who: str = "", now: float | None = None) -> str:
        """A new pending request; returns its token (shown once, stored hashed)."""
        now = time.time() if now is None else now
        token = new_token()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO pending(hash, kind, list, key, address, name, action, how, who, created, expires) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (token_hash(token), kind, addresses.key(list_address), addresses.key(address), address,
                 name, action, how, who, now, now + days * DAY))
        return token

    @sqlite_errors
    def drop(self, token: str) -> None:
        """Forget a request (its mail could not be sent)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM pending WHERE hash=?", (token_hash(token),))

    @sqlite_errors
    def lookup(self, token: str) -> Pending | None:
        row = self._conn().execute(self._SELECT + "WHERE hash=?", (token_hash(token),)).fetchone()
        return self._row(row) if row else None

    _SELECT = ("SELECT kind, list, address, name, action, how, who, created, expires, done, outcome, hash "
               "FROM pending ")

    @staticmethod
    def _row(row) -> Pending:
        return Pending(*row)

    @sqlite_errors
    def claim(self, hash_: str, outcome: str, now: float | None = None) -> bool:
        """Use a request (by token_hash): True for the one caller that marks it done (single use)."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            row = conn.execute("UPDATE pending SET done=?, outcome=? WHERE hash=? AND done IS NULL "
                               "AND expires>? RETURNING hash", (now, outcome, hash_, now)).fetchone()
        return row is not None

    @sqlite_errors
    def release(self, hash_: str) -> None:
        """Undo claim() when what it allowed could not be done; the token works again."""
        with self._tx() as conn:
            conn.execute("UPDATE pending SET done=NULL, outcome='' WHERE hash=?", (hash_,))

    @sqlite_errors
    def open_request(self, list_address: str, address: str, kind: str | None = None,
                     action: str | None = None, now: float | None = None) -> Pending | None:
        """The newest unused, unexpired request for this list and address."""
        now = time.time() if now is None else now
        query = self._SELECT + "WHERE list=? AND key=? AND done IS NULL AND expires>?"
        params: tuple = (addresses.key(list_address), addresses.key(address), now)
        if kind:
            query += " AND kind=?"
            params += (kind,)
        if action:
            query += " AND action=?"
            params += (action,)
        row = self._conn().execute(query + " ORDER BY created DESC LIMIT 1", params).fetchone()
        return self._row(row) if row else None

    @sqlite_errors
    def waiting(self, list_address: str | None = None, now: float | None = None) -> list[Pending]:
        """Unused, unexpired requests (of one list, or all), oldest first."""
        now = time.time() if now is None else now
        query = self._SELECT + "WHERE done IS NULL AND expires>?"
        params: tuple = (now,)
        if list_address:
            query += " AND list=?"
            params += (addresses.key(list_address),)
        return [self._row(r) for r in self._conn().execute(query + " ORDER BY created", params)]

    # -- rate limits -----------------------------------------------------------
    @sqlite_errors
    def sent_today(self, list_address: str, address: str | None = None, now: float | None = None) -> int:
        now = time.time() if now is None else now
        query = "SELECT count(*) FROM sent WHERE list=? AND at>?"
        params: tuple = (addresses.key(list_address), now - DAY)
        if address is not None:
            query += " AND key=?"
            params += (addresses.key(address),)
        return self._conn().execute(query, params).fetchone()[0]

    @sqlite_errors
    def sent_counts(self, list_address: str, request: Request, now: float | None = None) -> Sent:
        """What the daily limits count for one request (core.subscriptions.Sent), in one query."""
        now = time.time() if now is None else now
        sender, address = addresses.key(request.sender), addresses.key(request.address)
        count = "coalesce(sum(CASE WHEN {} THEN 1 ELSE 0 END), 0)"     # SQLite's and PostgreSQL's
        row = self._conn().execute(
            "SELECT " + ", ".join(count.format(c) for c in (
                "budget='own' AND key=?", "budget='own' AND key=?", "budget='unverified' AND key=?",
                "budget='unverified' AND sender=?", "budget='unverified' AND client=? AND client!=''",
                "budget='unverified'")) + " FROM sent WHERE list=? AND at>?",
            (sender, address, address, sender, request.client, addresses.key(list_address), now - DAY)).fetchone()
        return Sent(*(int(n) for n in row))

    @sqlite_errors
    def record_sent(self, list_address: str, address: str, what: str, now: float | None = None,
                    budget: str = OWN, sender: str = "", client: str = "") -> None:
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute("INSERT INTO sent(list, key, what, at, budget, sender, client) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (addresses.key(list_address), addresses.key(address), what, now, budget,
                          addresses.key(sender), client))

    @sqlite_errors
    def purge(self, now: float | None = None) -> None:
        """Drop what no limit and no refusal reply needs any more."""
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute("DELETE FROM pending WHERE expires<?", (now - KEEP_DAYS * DAY,))
            conn.execute("DELETE FROM sent WHERE at<?", (now - DAY,))

    def check(self) -> list[str]:
        """Problems SQLite's quick_check finds (none if there is no database yet)."""
        return self.db.quick_check()
