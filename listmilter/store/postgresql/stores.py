"""The list store, the yaml overlay, the pending and bounce records and the site's keys on PostgreSQL.

Each class is its SQLite counterpart with PostgreSQL's connections: the
public methods and their SQL are inherited (the interface every caller
already uses), and only what the two databases do differently is here:

- connections: a pooled connection per read, one transaction per write
  (listmilter.store.postgresql.db), instead of SQLite's connection per thread;
- concurrency: SQLite serialises every writer (BEGIN IMMEDIATE), PostgreSQL
  runs them side by side, so where a decision reads and then writes, a lock
  says who goes first: a transaction advisory lock per member for a bounce
  score, a session advisory lock for the pending requests' "look, decide,
  record" (the flock on pending.lock with SQLite), a try-lock so one host does
  the hourly bounce run; "exactly once" stays with the unique constraints
  (a bounce per post and member, a token's single use);
- bulk: an import is COPY into a temporary table and one INSERT ... SELECT.
"""

from __future__ import annotations

import contextlib
import json
import secrets as secrets_mod
import time
from typing import Iterable

from listmilter.core import addresses
from listmilter.core.keys import LEGACY, Keyring
from listmilter.core.model import Member, NoSuchList
from listmilter.store import StoreError
from listmilter.store.bounce_records import BounceDB
from listmilter.store.pending import PendingDB
from listmilter.store.postgresql.db import (
    KEYS_LOCK,
    LOCK_CLASS,
    MEMBER_LOCKS,
    PENDING_LOCK,
    PERIODIC_LOCK,
    Database,
    Target,
    clean,
    process_lock,
)
from listmilter.store.secret import DAY, GRACE_DAYS, Key, SecretError, keyring_of
from listmilter.store.sqlite import SQLiteStore

# meta 'lists': which backend's rows the list tables hold. The yaml overlay's
# rows (who left, who is disabled) are not lists a postgresql store could serve.
LISTS_POSTGRESQL = "postgresql"
LISTS_YAML = "yaml"


class PgStore(SQLiteStore):
    """The list store (store.backend: postgresql), or with `lists=LISTS_YAML` the yaml overlay."""

    backend = "postgresql"

    def __init__(self, target: Target, lists: str = LISTS_POSTGRESQL, name: str = "postgresql store"):
        self.pg = Database(target, name)
        self.db = self.pg          # type: ignore[assignment]  # release() and close() are the base's
        self.path = target.describe
        self.describe = self.pg.describe
        self._claim(lists)

    def _claim(self, lists: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT INTO meta(name, value) VALUES ('lists', ?) ON CONFLICT DO NOTHING", (lists,))
            held = conn.execute("SELECT value FROM meta WHERE name='lists'").fetchone()[0]
        if held != lists:
            raise StoreError(
                f"{self.describe} holds the lists of store.backend {held}; this config uses it for "
                f"{'store.backend ' + lists if lists == LISTS_POSTGRESQL else 'the yaml backend overlay'}: "
                "give each its own database (docs/configuration.md)")

    def _conn(self):
        return self.pg.reads

    def _write(self):
        return self.pg.transaction()

    def add_members(self, list_address: str, members: Iterable[Member],
                    how: str = "cli", who: str = "", detail: str = "") -> tuple[int, int]:
        """Add in one transaction, recording each addition; returns (added, already members).

        Writers to one list take turns on its row (SQLite's BEGIN IMMEDIATE, per list), so
        the members found here are all there are, and the new ones go in with COPY: 100,000
        in about a second. The primary key still refuses a duplicate, should one slip by."""
        given = 0
        rows: dict[str, tuple] = {}
        for m in members:
            given += 1
            k = addresses.key(m.address)
            if k not in rows:      # the first of two spellings wins, as with SQLite's INSERT OR IGNORE
                rows[k] = clean((k, m.address, m.name, json.dumps(m.attributes) if m.attributes else "{}"))
        now = time.time()
        list_key = addresses.key(list_address)
        with self._write() as conn:
            raw = conn.raw
            found = raw.execute("SELECT id FROM lists WHERE address=%s FOR NO KEY UPDATE", (list_key,)).fetchone()
            if found is None:
                raise NoSuchList(list_address)
            list_id = found[0]
            if len(rows) > 1000:      # a big import: every key of the list costs less than asking for each
                existing = {k for (k,) in raw.execute("SELECT key FROM members WHERE list_id=%s", (list_id,))}
            else:
                existing = {k for (k,) in raw.execute("SELECT key FROM members WHERE list_id=%s AND key = ANY(%s)",
                                                      (list_id, list(rows)))}
            new = [r for k, r in rows.items() if k not in existing]
            if new:
                with raw.cursor() as cur:
                    with cur.copy("COPY members (list_id, key, address, name, attrs, added) FROM STDIN") as copy:
                        for key, address, name, attrs in new:
                            copy.write_row((list_id, key, address, name, attrs, now))
                    with cur.copy("COPY events (list, key, address, action, how, who, detail, at) FROM STDIN") as copy:
                        for key, address, _, _ in new:
                            copy.write_row((list_key, key, address, "subscribed", how, who, detail, now))
        return len(new), given - len(new)

    def delete_list(self, address: str) -> None:
        """The list, its settings and its members (no foreign key cascades members here: schema.py)."""
        with self._write() as conn:
            found = conn.execute("SELECT id FROM lists WHERE address=? FOR UPDATE",
                                 (addresses.key(address),)).fetchone()
            if found is None:
                raise NoSuchList(address)
            conn.execute("DELETE FROM members WHERE list_id=?", (found[0],))
            conn.execute("DELETE FROM lists WHERE id=?", (found[0],))

    def remove_members(self, list_address: str, addrs: Iterable[str],
                       how: str = "cli", who: str = "", detail: str = "") -> tuple[int, list[str]]:
        """Remove in one transaction, recording each removal; returns (removed, not members)."""
        addrs = list(addrs)
        now = time.time()
        with self._write() as conn:
            list_id = self._list_id(conn, list_address)
            gone = conn.raw.execute(
                "WITH gone AS (DELETE FROM members WHERE list_id=%s AND key = ANY(%s) RETURNING key, address) "
                "INSERT INTO events(list, key, address, action, how, who, detail, at) "
                "SELECT %s, key, address, 'unsubscribed', %s, %s, %s, %s FROM gone RETURNING key",
                (list_id, [addresses.key(a) for a in addrs], addresses.key(list_address), how, who, detail,
                 now)).fetchall()
        removed = {k for (k,) in gone}
        missing, seen = [], set()
        for a in addrs:
            k = addresses.key(a)
            if k not in removed and k not in seen:
                missing.append(a)
            seen.add(k)
        return len(removed), missing

    def check(self) -> list[str]:
        return self.pg.check()


class PgPendingDB(PendingDB):
    """Pending requests and reply counters (pending.sqlite's tables)."""

    def __init__(self, target: Target):
        self.pg = Database(target, "pending requests")
        self.db = self.pg          # type: ignore[assignment]
        self.path = target.describe
        self.describe = self.pg.describe
        self._target = target

    def _conn(self):
        return self.pg.reads

    def _tx(self):
        return self.pg.transaction()

    @contextlib.contextmanager
    def serialized(self):
        """"Look at what is pending and sent, decide, record" as one step across hosts: a session
        advisory lock. The threads of one process queue on a lock of their own first, so
        those waiting hold no pooled connection (the holder needs one for its work)."""
        with process_lock(self._target), self.pg.advisory_lock(PENDING_LOCK):
            yield

    def check(self) -> list[str]:
        return self.pg.check()


class PgBounceDB(BounceDB):
    """Bounce scores and records (bounces.sqlite's tables)."""

    def __init__(self, target: Target):
        self.pg = Database(target, "bounce records")
        self.db = self.pg          # type: ignore[assignment]
        self.path = target.describe
        self.describe = self.pg.describe

    @property
    def conn(self):
        return self.pg.reads

    def _write(self):
        return self.pg.transaction()

    def _lock_member(self, conn, list_key: str, key: str) -> None:
        # Two DSNs for one member at once (two hosts, or two pipe processes) read the
        # same score; the second waits here until the first has written its own.
        conn.raw.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (MEMBER_LOCKS, f"{list_key} {key}"))

    @contextlib.contextmanager
    def periodic_turn(self):
        """One host does the periodic run at a time; the others skip theirs."""
        with self.pg.advisory_lock(PERIODIC_LOCK, wait=False) as got:
            yield got

    def check(self) -> list[str]:
        return self.pg.check()


# -- the site's keys -----------------------------------------------------------------
class PgKeys:
    """The site's keys (site_keys), for every host alike: listmilter.store.secret's keys
    (ids, one current, older ones accepted until their grace period ends) in a table.
    The highest id is current."""

    def __init__(self, target: Target):
        self.pg = Database(target, "site keys")
        self.describe = self.pg.describe

    def keys(self) -> list[Key]:
        """Every key, the current one first (empty before the first is made)."""
        return [Key(kid, bytes(secret), created, until) for kid, secret, created, until in self.pg.reads.execute(
            "SELECT id, secret, created, until FROM site_keys ORDER BY id DESC")]

    def _keys_or_create(self) -> list[Key]:
        keys = self.keys()
        if not keys:        # key 0 on first use; the first host to ask wins
            with self.pg.transaction() as conn:
                conn.execute("INSERT INTO site_keys(id, secret, created) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                             (LEGACY, secrets_mod.token_bytes(32), time.time()))
            keys = self.keys()
        return keys

    def load_or_create(self, now: float | None = None) -> Keyring:
        """The keys accepted now, as secret.load_or_create gives them from files."""
        return keyring_of(self._keys_or_create(), time.time() if now is None else now)

    def rotate(self, grace_days: float = GRACE_DAYS, now: float | None = None) -> list[Key]:
        """A new current key; the others stay accepted for `grace_days` at most (secret.rotate's rules)."""
        if grace_days < 0:
            raise ValueError("the grace period cannot be negative")
        now = time.time() if now is None else now
        self._keys_or_create()
        until = now + grace_days * DAY
        with self.pg.transaction() as conn:
            conn.raw.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, KEYS_LOCK))
            newest = conn.execute("SELECT max(id) FROM site_keys").fetchone()[0]
            if newest + 1 > 0xFFFF:
                raise SecretError("no key ids left (65535 rotations)")
            conn.execute("UPDATE site_keys SET until = least(coalesce(until, ?), ?)", (until, until))
            conn.execute("DELETE FROM site_keys WHERE until <= ?", (now,))
            conn.execute("INSERT INTO site_keys(id, secret, created) VALUES (?, ?, ?)",
                         (newest + 1, secrets_mod.token_bytes(32), now))
        return self.keys()


class PgKeySource:
    """The keyring for a long-running process (secret.KeySource's interface): read again every
    REFRESH seconds, so a rotation on any host reaches every host; while the database cannot
    be read, the keys read before stay in use."""

    REFRESH = 10.0

    def __init__(self, target: Target):
        self._keys = PgKeys(target)
        self.keyring = self._keys.load_or_create()
        self._read_at = time.monotonic()

    def refresh(self, now: float | None = None) -> Keyring:
        if time.monotonic() - self._read_at >= self.REFRESH:
            self._read_at = time.monotonic()
            try:
                self.keyring = self._keys.load_or_create(now)
            except StoreError as e:
                raise SecretError(f"keys not read again: {e}") from e
        return self.keyring
