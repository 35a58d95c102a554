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
from listmilter.core.tokens import DAY, KEEP_DAYS, HeldPost, Pending, new_token, token_hash
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
""", """
-- Posts on the MTA's hold queue for an owner's decision (listmilter.app.held).
CREATE TABLE IF NOT EXISTS held (
    queue_id   TEXT PRIMARY KEY,     -- the MTA's queue id of the held message
    list       TEXT NOT NULL,        -- list key
    sender     TEXT NOT NULL,        -- the envelope sender, as given
    reason     TEXT NOT NULL,
    subject    TEXT NOT NULL DEFAULT '',
    size       INTEGER NOT NULL DEFAULT 0,
    hash       TEXT NOT NULL,        -- sha256 of the code in the owners' notice
    held       REAL NOT NULL,
    decision   TEXT NOT NULL DEFAULT '',   -- approve | reject | discard | expire, once asked for
    decided_by TEXT NOT NULL DEFAULT '',
    done       REAL                  -- when the decision was carried out on the queue
);
CREATE INDEX IF NOT EXISTS held_hash ON held(hash);
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

    # -- held posts ------------------------------------------------------------
    _HELD = "SELECT queue_id, list, sender, reason, subject, size, held, decision, decided_by, done FROM held "

    @sqlite_errors
    def add_held(self, queue_id: str, list_address: str, sender: str, reason: str, subject: str, size: int,
                 now: float | None = None) -> str:
        """Record a held post; returns the code for the owners' notice (shown once, stored hashed).
        A queue id Postfix uses again (after the old message is long gone) replaces the old row."""
        now = time.time() if now is None else now
        code = new_token()
        with self._tx() as conn:
            conn.execute("INSERT INTO held(queue_id, list, sender, reason, subject, size, hash, held) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(queue_id) DO UPDATE SET list=excluded.list, "
                         "sender=excluded.sender, reason=excluded.reason, subject=excluded.subject, "
                         "size=excluded.size, hash=excluded.hash, held=excluded.held, decision='', "
                         "decided_by='', done=NULL",
                         (queue_id, addresses.key(list_address), sender, reason, subject, size,
                          token_hash(code), now))
        return code

    @staticmethod
    def _held_row(row) -> HeldPost:
        return HeldPost(*row)

    @sqlite_errors
    def held_post(self, queue_id: str) -> HeldPost | None:
        row = self._conn().execute(self._HELD + "WHERE queue_id=?", (queue_id,)).fetchone()
        return self._held_row(row) if row else None

    @sqlite_errors
    def held_by_code(self, code: str) -> HeldPost | None:
        row = self._conn().execute(self._HELD + "WHERE hash=?", (token_hash(code),)).fetchone()
        return self._held_row(row) if row else None

    @sqlite_errors
    def held_posts(self, list_address: str | None = None, open_only: bool = True) -> list[HeldPost]:
        """Held posts (of one list, or all), oldest first; open_only: not yet carried out."""
        query = self._HELD + "WHERE 1=1"
        params: tuple = ()
        if open_only:
            query += " AND done IS NULL"
        if list_address:
            query += " AND list=?"
            params += (addresses.key(list_address),)
        return [self._held_row(r) for r in self._conn().execute(query + " ORDER BY held", params)]

    @sqlite_errors
    def decide_held(self, queue_id: str, decision: str, by: str) -> bool:
        """Ask for a decision on a held post: True for the one caller whose decision counts
        (the first; a later approve after a reject changes nothing)."""
        with self._tx() as conn:
            row = conn.execute("UPDATE held SET decision=?, decided_by=? WHERE queue_id=? AND decision='' "
                               "AND done IS NULL RETURNING queue_id", (decision, by, queue_id)).fetchone()
        return row is not None

    @sqlite_errors
    def undecide_held(self, queue_id: str) -> None:
        """Undo decide_held when the queue could not be told (the post is still held)."""
        with self._tx() as conn:
            conn.execute("UPDATE held SET decision='', decided_by='' WHERE queue_id=? AND done IS NULL",
                         (queue_id,))

    @sqlite_errors
    def held_done(self, queue_id: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as conn:
            conn.execute("UPDATE held SET done=? WHERE queue_id=?", (now, queue_id))

    @sqlite_errors
    def purge_held(self, before: float) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM held WHERE done IS NOT NULL AND done<?", (before,))

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
