"""The sqlite store, listmilter's embedded default.

WAL mode lets the milter read while the CLI writes; every write is one
transaction (BEGIN IMMEDIATE), so an import is all-or-nothing. Connections
(one per thread), transactions and schema upgrades are listmilter.store.db's.

The SQL is also PostgreSQL's (listmilter.store.postgresql runs these methods
with `?` turned into `%s`): keep to what both understand (ON CONFLICT,
RETURNING), and override in PgStore where they differ.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any, Iterable

from listmilter.core import addresses
from listmilter.core.model import (
    ACTIVE,
    DISABLED,
    Event,
    ListExists,
    MailingList,
    Member,
    NoSuchList,
)
from listmilter.store.db import Database, sqlite_errors

# The schema, step by step (listmilter.store.db): step 1 is 0.1.0's first
# schema, step 2 added the consent record, step 3 the delivery reports' posts, step 4 kept
# nonmember_action reject on the members lists made before its default became hold. All also
# make the yaml backend's overlay.
MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS lists (
    id       INTEGER PRIMARY KEY,
    address  TEXT NOT NULL UNIQUE,          -- lower case
    created  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS list_settings (
    list_id  INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
    name     TEXT NOT NULL,
    value    TEXT NOT NULL,                 -- JSON
    PRIMARY KEY (list_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS members (
    list_id  INTEGER NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
    key      TEXT NOT NULL,                 -- lower-cased address, for matching
    address  TEXT NOT NULL,                 -- as given, for delivery
    name     TEXT NOT NULL DEFAULT '',
    attrs    TEXT NOT NULL DEFAULT '{}',
    status   TEXT NOT NULL DEFAULT 'active',
    added    REAL NOT NULL,
    PRIMARY KEY (list_id, key)
) WITHOUT ROWID;
""",
    """
-- The consent record. Keyed by list address, not id: it outlives the list.
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    list     TEXT NOT NULL,
    key      TEXT NOT NULL,
    address  TEXT NOT NULL,
    action   TEXT NOT NULL,
    how      TEXT NOT NULL,
    who      TEXT NOT NULL DEFAULT '',
    detail   TEXT NOT NULL DEFAULT '',
    at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_member ON events(list, key);
""",
    """
-- Delivery reports (core/report.py): each post sent to a list, written when the MTA took its
-- copies, and when each list's weekly report last went to its owners. Keyed by list address.
CREATE TABLE IF NOT EXISTS posts (
    list       TEXT NOT NULL,
    post_id    TEXT NOT NULL,
    at         REAL NOT NULL,
    recipients INTEGER NOT NULL,
    refused    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (list, post_id)
);
CREATE INDEX IF NOT EXISTS posts_at ON posts(list, at);
CREATE TABLE IF NOT EXISTS reports_sent (
    list     TEXT PRIMARY KEY,
    at       REAL NOT NULL
);
""",
    """
-- nonmember_action's default became hold: a members list made before keeps refusing
-- non-members (reject), as its owners knew it, until they change it. (In the yaml backend's
-- overlay the settings table is unused; the file's lists follow the new default.)
INSERT INTO list_settings(list_id, name, value)
    SELECT id, 'nonmember_action', '"reject"' FROM lists
    WHERE id NOT IN (SELECT list_id FROM list_settings WHERE name = 'nonmember_action')
      AND id NOT IN (SELECT list_id FROM list_settings WHERE name = 'posting' AND value <> '"members"');
""",
)
# Status of an overlay row (yaml backend) for someone listed in the file who left.
UNSUBSCRIBED = "unsubscribed"


class SQLiteStore:
    backend = "sqlite"

    def __init__(self, path: str, create: bool = True, name: str = "sqlite store"):
        self.path = path
        self.db = Database(path, name, MIGRATIONS, create=create)
        self.describe = self.db.describe
        self._conn()  # fail now, not on the first message, if it cannot be opened

    def _conn(self) -> sqlite3.Connection:
        return self.db.conn()

    def _list_id(self, conn: sqlite3.Connection, address: str) -> int:
        row = conn.execute("SELECT id FROM lists WHERE address=?", (addresses.key(address),)).fetchone()
        if row is None:
            raise NoSuchList(address)
        return row[0]

    # -- reading -----------------------------------------------------------
    @sqlite_errors
    def get_list(self, address: str) -> MailingList | None:
        conn = self._conn()
        row = conn.execute("SELECT id, address FROM lists WHERE address=?",
                           (addresses.key(address),)).fetchone()
        if row is None:
            return None
        return self._mailing_list(conn, *row)

    def _mailing_list(self, conn, list_id: int, address: str) -> MailingList:
        list_settings = {name: json.loads(value) for name, value in conn.execute(
            "SELECT name, value FROM list_settings WHERE list_id=?", (list_id,))}
        for name, value in list_settings.items():
            if isinstance(value, list):
                list_settings[name] = tuple(value)
        return MailingList(address, list_settings, f"{self.path}")

    @sqlite_errors
    def all_lists(self) -> list[MailingList]:
        conn = self._conn()
        rows = conn.execute("SELECT id, address FROM lists ORDER BY address").fetchall()
        return [self._mailing_list(conn, *row) for row in rows]

    @sqlite_errors
    def recipients(self, list_address: str) -> list[str]:
        conn = self._conn()
        list_id = self._list_id(conn, list_address)
        return [r[0] for r in conn.execute(
            "SELECT address FROM members WHERE list_id=? AND status='active'", (list_id,))]

    @sqlite_errors
    def is_member(self, list_address: str, address: str) -> bool:
        conn = self._conn()
        row = conn.execute(
            "SELECT 1 FROM members JOIN lists ON lists.id = members.list_id "
            "WHERE lists.address=? AND members.key=?",
            (addresses.key(list_address), addresses.key(address))).fetchone()
        return row is not None

    _MEMBER = "SELECT address, name, attrs, status, added FROM members "

    @staticmethod
    def _member(row) -> Member:
        address, name, attrs, status, added = row
        return Member(address, name, json.loads(attrs), status, added)

    @sqlite_errors
    def members(self, list_address: str) -> list[Member]:
        conn = self._conn()
        list_id = self._list_id(conn, list_address)
        return [self._member(row) for row in conn.execute(
            self._MEMBER + "WHERE list_id=? ORDER BY key", (list_id,))]

    @sqlite_errors
    def member(self, list_address: str, address: str) -> Member | None:
        conn = self._conn()
        list_id = self._list_id(conn, list_address)
        row = conn.execute(self._MEMBER + "WHERE list_id=? AND key=?",
                           (list_id, addresses.key(address))).fetchone()
        return self._member(row) if row else None

    @sqlite_errors
    def history(self, list_address: str, address: str | None = None) -> list[Event]:
        query = "SELECT at, list, address, action, how, who, detail FROM events WHERE list=?"
        params: tuple = (addresses.key(list_address),)
        if address is not None:
            query += " AND key=?"
            params += (addresses.key(address),)
        return [Event(*row) for row in self._conn().execute(query + " ORDER BY at, id", params)]

    @sqlite_errors
    def member_count(self, list_address: str) -> int:
        conn = self._conn()
        list_id = self._list_id(conn, list_address)
        return conn.execute("SELECT count(*) FROM members WHERE list_id=?", (list_id,)).fetchone()[0]

    # -- writing -----------------------------------------------------------
    def _write(self):
        return self.db.transaction()

    @sqlite_errors
    def create_list(self, address: str, list_settings: dict[str, Any]) -> MailingList:
        key = addresses.key(address)
        with self._write() as conn:
            row = conn.execute("INSERT INTO lists(address, created) VALUES (?, ?) ON CONFLICT DO NOTHING "
                               "RETURNING id", (key, time.time())).fetchone()
            if row is None:
                raise ListExists(address)
            conn.executemany("INSERT INTO list_settings(list_id, name, value) VALUES (?, ?, ?)",
                             [(row[0], n, json.dumps(v)) for n, v in list_settings.items()])
        return self.get_list(key)

    @sqlite_errors
    def delete_list(self, address: str) -> None:
        with self._write() as conn:
            list_id = self._list_id(conn, address)
            conn.execute("DELETE FROM lists WHERE id=?", (list_id,))

    @sqlite_errors
    def set_setting(self, address: str, name: str, value: Any) -> None:
        with self._write() as conn:
            list_id = self._list_id(conn, address)
            conn.execute("INSERT INTO list_settings(list_id, name, value) VALUES (?, ?, ?) "
                         "ON CONFLICT(list_id, name) DO UPDATE SET value=excluded.value",
                         (list_id, name, json.dumps(value)))

    @sqlite_errors
    def unset_setting(self, address: str, name: str) -> None:
        with self._write() as conn:
            list_id = self._list_id(conn, address)
            conn.execute("DELETE FROM list_settings WHERE list_id=? AND name=?", (list_id, name))

    @staticmethod
    def _event(conn, list_address: str, address: str, action: str, how: str, who: str,
               detail: str, at: float) -> None:
        conn.execute("INSERT INTO events(list, key, address, action, how, who, detail, at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (addresses.key(list_address), addresses.key(address), address, action, how,
                      who, detail, at))

    @sqlite_errors
    def add_members(self, list_address: str, members: Iterable[Member],
                    how: str = "cli", who: str = "", detail: str = "") -> tuple[int, int]:
        """Add in one transaction, recording each addition; returns (added, already members)."""
        rows = [(m.address, addresses.key(m.address), m.name, json.dumps(m.attributes) if m.attributes else "{}")
                for m in members]
        with self._write() as conn:
            list_id = self._list_id(conn, list_address)
            # Writers are serialised, so this transaction's rows are exactly those added at `now`.
            now = max(time.time(), conn.execute("SELECT coalesce(max(added), 0) FROM members").fetchone()[0]
                      + 1e-6)
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO members(list_id, key, address, name, attrs, added) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ((list_id, k, a, n, attrs, now) for a, k, n, attrs in rows))
            added = conn.total_changes - before
            conn.execute("INSERT INTO events(list, key, address, action, how, who, detail, at) "
                         "SELECT ?, key, address, 'subscribed', ?, ?, ?, added FROM members "
                         "WHERE list_id=? AND added=?",
                         (addresses.key(list_address), how, who, detail, list_id, now))
        return added, len(rows) - added

    @sqlite_errors
    def remove_members(self, list_address: str, addrs: Iterable[str],
                       how: str = "cli", who: str = "", detail: str = "") -> tuple[int, list[str]]:
        """Remove in one transaction, recording each removal; returns (removed, not members)."""
        missing = []
        removed = 0
        now = time.time()
        with self._write() as conn:
            list_id = self._list_id(conn, list_address)
            for address in addrs:
                cur = conn.execute("DELETE FROM members WHERE list_id=? AND key=? RETURNING address",
                                   (list_id, addresses.key(address)))
                row = cur.fetchone()
                if row:
                    removed += 1
                    self._event(conn, list_address, row[0], "unsubscribed", how, who, detail, now)
                else:
                    missing.append(address)
        return removed, missing

    def subscribe(self, list_address: str, member: Member, how: str, who: str = "",
                  detail: str = "") -> bool:
        """Make `member` a member; False if they already were."""
        return self.add_members(list_address, [member], how, who, detail)[0] == 1

    def unsubscribe(self, list_address: str, address: str, how: str, who: str = "",
                    detail: str = "") -> bool:
        """End a membership; False if `address` was no member."""
        return self.remove_members(list_address, [address], how, who, detail)[0] == 1

    @sqlite_errors
    def set_status(self, list_address: str, address: str, status: str, how: str,
                   who: str = "", detail: str = "") -> bool:
        """Enable or disable delivery to a member; False if no member or no change."""
        if status not in (ACTIVE, DISABLED):
            raise ValueError(f"unknown member status {status!r}")
        with self._write() as conn:
            list_id = self._list_id(conn, list_address)
            row = conn.execute("UPDATE members SET status=? WHERE list_id=? AND key=? AND status!=? "
                               "RETURNING address", (status, list_id, addresses.key(address), status)).fetchone()
            if row:
                self._event(conn, list_address, row[0], "enabled" if status == ACTIVE else "disabled",
                            how, who, detail, time.time())
        return row is not None

    @sqlite_errors
    def set_overlay(self, list_address: str, member: Member, status: str, action: str,
                    how: str, who: str, detail: str) -> None:
        """Yaml backend: record a member's run-time status (creating the list row on demand)."""
        key = addresses.key(list_address)
        now = time.time()
        # `added` is when this membership began: a (re-)subscription starts a new one
        # (one-click links of the old one stop working, listmilter.core.tokens);
        # disabling, enabling or leaving keeps it (0 for a member of the file).
        added = now if action == "subscribed" else member.added
        with self._write() as conn:
            conn.execute("INSERT INTO lists(address, created) VALUES (?, ?) ON CONFLICT DO NOTHING", (key, now))
            list_id = self._list_id(conn, key)
            conn.execute(
                "INSERT INTO members(list_id, key, address, name, attrs, status, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(list_id, key) DO UPDATE SET "
                "status=excluded.status, address=excluded.address, added=excluded.added",
                (list_id, addresses.key(member.address), member.address, member.name,
                 json.dumps(member.attributes) if member.attributes else "{}", status, added))
            self._event(conn, key, member.address, action, how, who, detail, now)

    @sqlite_errors
    def overlay(self, list_address: str) -> dict[str, Member]:
        """Yaml backend: run-time statuses of a list's members, by key."""
        rows = self._conn().execute(
            "SELECT m.address, m.name, m.attrs, m.status, m.added FROM members m "
            "JOIN lists ON lists.id = m.list_id WHERE lists.address=?", (addresses.key(list_address),))
        return {addresses.key(m.address): m for m in map(self._member, rows)}

    # -- delivery reports (core/report.py) ------------------------------------
    @sqlite_errors
    def record_post(self, list_address: str, post_id: str, at: float, recipients: int, refused: int = 0) -> None:
        """A post the MTA took for `recipients` members; a fan-out resumed after a crash writes
        its row again with the final count."""
        with self._write() as conn:
            conn.execute("INSERT INTO posts(list, post_id, at, recipients, refused) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(list, post_id) DO UPDATE SET recipients=excluded.recipients, "
                         "refused=excluded.refused",
                         (addresses.key(list_address), post_id, at, recipients, refused))

    @sqlite_errors
    def forget_post(self, list_address: str, post_id: str) -> None:
        """A held post that was never sent (rejected, discarded, expired) leaves the report."""
        with self._write() as conn:
            conn.execute("DELETE FROM posts WHERE list=? AND post_id=?", (addresses.key(list_address), post_id))

    @sqlite_errors
    def posts(self, list_address: str, since: float = 0) -> list[tuple[str, float, int, int]]:
        """(post_id, at, recipients, refused) of the list's posts since `since`, oldest first."""
        return [tuple(r) for r in self._conn().execute(
            "SELECT post_id, at, recipients, refused FROM posts WHERE list=? AND at>=? ORDER BY at, post_id",
            (addresses.key(list_address), since))]

    @sqlite_errors
    def report_sent(self, list_address: str) -> float | None:
        """When the list's weekly report last went out (None: never)."""
        row = self._conn().execute("SELECT at FROM reports_sent WHERE list=?",
                                   (addresses.key(list_address),)).fetchone()
        return row[0] if row else None

    @sqlite_errors
    def claim_report(self, list_address: str, now: float, last_before: float) -> bool:
        """Note that the weekly report goes out now, unless one went out at or after `last_before`
        (another process or host claimed it meanwhile): True if this caller is to send it."""
        with self._write() as conn:
            row = conn.execute("INSERT INTO reports_sent(list, at) VALUES (?, ?) ON CONFLICT(list) DO UPDATE "
                               "SET at=excluded.at WHERE reports_sent.at < ? RETURNING list",
                               (addresses.key(list_address), now, last_before)).fetchone()
        return row is not None

    @sqlite_errors
    def unclaim_report(self, list_address: str, previous: float | None) -> None:
        """Undo claim_report when the mail could not be sent (the next run tries again)."""
        with self._write() as conn:
            if previous is None:
                conn.execute("DELETE FROM reports_sent WHERE list=?", (addresses.key(list_address),))
            else:
                conn.execute("UPDATE reports_sent SET at=? WHERE list=?", (previous, addresses.key(list_address)))

    @sqlite_errors
    def check(self) -> list[str]:
        """Problems found by sqlite's own integrity check (empty when all is well)."""
        return self.db.quick_check()

    def release(self) -> None:
        """Close the calling thread's connection; its next call opens a new one. For
        threads that outlive their work, such as the web server's workers."""
        self.db.release()

    def close(self) -> None:
        """Close every thread's connection (call when no thread uses the store any more)."""
        self.db.close()
