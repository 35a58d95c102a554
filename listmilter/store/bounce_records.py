"""Bounce records and scores: state_dir/bounces.sqlite, for both list backends.

Postfix runs several `listmilter deliver` processes at once; every change is
one BEGIN IMMEDIATE transaction, so concurrent DSNs never lose an update, and
a DSN delivered twice (a retry after a crash) scores once: a bounce is
recorded once per (list, post, member, permanence).

An action a score calls for (remove, disable, notify) is first written here
as `pending`, in the same transaction as the score, and cleared once done.
If doing it fails, the next bounce or the periodic run does it, so no
decision is lost between two databases.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass

from listmilter.core import addresses, probes
from listmilter.core.bounces import DAY, Failure, Policy, Score, Verdict, score_bounce
from listmilter.store.db import Database, sqlite_errors

NAME = "bounces.sqlite"
# The schema, step by step (listmilter.store.db). 0.1.0 wrote step 1 without a version.
MIGRATIONS = ("""
CREATE TABLE IF NOT EXISTS scores (
    list          TEXT NOT NULL,
    key           TEXT NOT NULL,
    address       TEXT NOT NULL,
    score         INTEGER NOT NULL DEFAULT 0,
    last_scored   REAL NOT NULL DEFAULT 0,
    last_bounce   REAL NOT NULL DEFAULT 0,
    last_status   TEXT NOT NULL DEFAULT '',
    last_diagnostic TEXT NOT NULL DEFAULT '',
    pending       TEXT NOT NULL DEFAULT '',   -- remove | disable | notify, until done
    acted         REAL NOT NULL DEFAULT 0,    -- when the action was taken (0: not yet)
    warnings_sent INTEGER NOT NULL DEFAULT 0,
    next_warning  REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (list, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bounces (
    id         INTEGER PRIMARY KEY,
    at         REAL NOT NULL,
    list       TEXT NOT NULL,
    key        TEXT NOT NULL,
    address    TEXT NOT NULL,
    permanent  INTEGER NOT NULL,
    status     TEXT NOT NULL DEFAULT '',
    diagnostic TEXT NOT NULL DEFAULT '',
    envid      TEXT NOT NULL DEFAULT '',
    post_id    TEXT NOT NULL DEFAULT '',
    verdict    TEXT NOT NULL,               -- scored, counted-today, temporary, not-member, ...
    kept       TEXT NOT NULL DEFAULT ''     -- file of a message kept for the owner
);
CREATE UNIQUE INDEX IF NOT EXISTS bounces_once ON bounces(list, post_id, key, permanent) WHERE post_id != '';
CREATE INDEX IF NOT EXISTS bounces_member ON bounces(list, key);
""", """
-- When an unrecognised message went to the owners in a digest (bounce_unrecognised: digest);
-- 0: not yet. Those kept before were forwarded or kept as the list said then: not again.
ALTER TABLE bounces ADD COLUMN digested REAL NOT NULL DEFAULT 0;
UPDATE bounces SET digested = at WHERE verdict = 'unrecognised';
""", """
-- Bounce probes in flight (core/probes.py): one per member.
CREATE TABLE IF NOT EXISTS probes (
    list     TEXT NOT NULL,
    key      TEXT NOT NULL,
    address  TEXT NOT NULL,
    sent_at  REAL NOT NULL,              -- the probe's time, also in its code (core/probes.py)
    why      TEXT NOT NULL DEFAULT '',   -- the suspicion: status and words of the failure
    PRIMARY KEY (list, key)
) WITHOUT ROWID;
""")

@dataclass(frozen=True)
class Row:
    list: str
    address: str
    score: int
    last_scored: float
    last_bounce: float
    last_status: str
    last_diagnostic: str
    pending: str
    acted: float
    warnings_sent: int
    next_warning: float


class BounceDB:
    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, NAME)
        self.db = Database(self.path, "bounce database", MIGRATIONS, timeout=15)
        self.describe = self.db.describe
        self.db.conn()      # fail now if it cannot be opened

    @property
    def conn(self) -> sqlite3.Connection:
        """The calling thread's connection."""
        return self.db.conn()

    def _write(self):
        return self.db.transaction()

    def check(self) -> list[str]:
        """Problems SQLite's quick_check finds (empty when all is well)."""
        return self.db.quick_check()

    def release(self) -> None:
        """Close the calling thread's connection (see listmilter.store.db)."""
        self.db.release()

    def close(self) -> None:
        self.db.close()

    # -- recording -------------------------------------------------------------
    @sqlite_errors
    def record(self, list_address: str, failure: Failure, verdict: str, envid: str = "",
               post_id: str = "", policy: Policy | None = None, now: float | None = None,
               kept: str = "") -> tuple[str, Row | None]:
        """Record one failure; score it if `verdict` is Verdict.SCORED.

        Returns the final verdict (Verdict.DUPLICATE, Verdict.COUNTED_TODAY or the one given)
        and, for a scored failure, the member's row after it (with `pending`
        set if the score reached the threshold just now).
        """
        now = time.time() if now is None else now
        list_key = addresses.key(list_address)
        key = addresses.key(failure.address)
        with self._write() as conn:
            inserted = conn.execute(
                "INSERT INTO bounces(at, list, key, address, permanent, status, diagnostic, "
                "envid, post_id, verdict, kept) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING id",
                (now, list_key, key, failure.address, int(failure.permanent), failure.status,
                 failure.diagnostic, envid, post_id, verdict, kept)).fetchone()
            if inserted is None:
                return Verdict.DUPLICATE, None
            bounce_id = inserted[0]
            if verdict != Verdict.SCORED:
                return verdict, None
            self._lock_member(conn, list_key, key)
            row = self._row(conn, list_key, key)
            current = Score(row.score, row.last_scored, row.last_bounce) if row else Score()
            assert policy is not None
            new, counted, pending = score_bounce(current, now, policy, row.pending if row else "",
                                                 bool(row and row.acted))
            conn.execute(
                "INSERT INTO scores(list, key, address, score, last_scored, last_bounce, last_status, "
                "last_diagnostic, pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(list, key) DO UPDATE SET address=excluded.address, score=excluded.score, "
                "last_scored=excluded.last_scored, last_bounce=excluded.last_bounce, "
                "last_status=excluded.last_status, last_diagnostic=excluded.last_diagnostic, "
                "pending=excluded.pending",
                (list_key, key, failure.address, new.score, new.last_scored, new.last_bounce,
                 failure.status, failure.diagnostic, pending))
            if not counted:
                conn.execute("UPDATE bounces SET verdict=? WHERE id=?", (Verdict.COUNTED_TODAY, bounce_id))
            return (Verdict.SCORED if counted else Verdict.COUNTED_TODAY), self._row(conn, list_key, key)

    def _lock_member(self, conn, list_key: str, key: str) -> None:
        """Keep others from scoring this member until the transaction ends: nothing to do
        here, BEGIN IMMEDIATE already serialises SQLite's writers (PostgreSQL's differs)."""

    @contextlib.contextmanager
    def periodic_turn(self):
        """True if this process may do the periodic run now (with one host, always)."""
        yield True

    _SCORES = ("SELECT list, address, score, last_scored, last_bounce, last_status, last_diagnostic, "
               "pending, acted, warnings_sent, next_warning FROM scores")

    def _row(self, conn, list_key: str, key: str) -> Row | None:
        row = conn.execute(self._SCORES + " WHERE list=? AND key=?", (list_key, key)).fetchone()
        return Row(*row) if row else None

    # -- after an action -------------------------------------------------------
    @sqlite_errors
    def _update(self, sql: str, params: tuple) -> int:
        with self._write() as conn:
            return conn.execute(sql, params).rowcount

    def mark_disabled(self, list_address: str, address: str, now: float, next_warning: float,
                      warnings_sent: int) -> None:
        self._update("UPDATE scores SET pending='', acted=?, warnings_sent=?, next_warning=? "
                     "WHERE list=? AND key=?", (now, warnings_sent, next_warning,
                                                addresses.key(list_address), addresses.key(address)))

    def set_pending(self, list_address: str, address: str, action: str) -> bool:
        """Call for `action` on a score no action was taken on yet; False if one was."""
        return self._update("UPDATE scores SET pending=? WHERE list=? AND key=? AND pending='' AND acted=0",
                            (action, addresses.key(list_address), addresses.key(address))) > 0

    def mark_warned(self, list_address: str, address: str, warnings_sent: int, next_warning: float) -> None:
        self._update("UPDATE scores SET warnings_sent=?, next_warning=? WHERE list=? AND key=?",
                     (warnings_sent, next_warning, addresses.key(list_address), addresses.key(address)))

    def mark_reported(self, list_address: str, address: str, now: float) -> None:
        self._update("UPDATE scores SET pending='', acted=? WHERE list=? AND key=?",
                     (now, addresses.key(list_address), addresses.key(address)))

    def forget(self, list_address: str, address: str) -> bool:
        """Drop a member's score (removed, or kept by the owner: they start again from 0)."""
        return self._update("DELETE FROM scores WHERE list=? AND key=?",
                            (addresses.key(list_address), addresses.key(address))) > 0

    # -- probes (core/probes.py): one in flight per member ----------------------
    @sqlite_errors
    def start_probe(self, list_address: str, address: str, now: float, probe_days: int, why: str = "",
                    per_day: int = 0) -> probes.Start:
        """Note a probe sent now if probes.start says PROBE (an expired one in flight is replaced);
        `per_day` counts the list's probes in flight sent in the last day (0: no limit)."""
        list_key, key = addresses.key(list_address), addresses.key(address)
        with self._write() as conn:
            self._lock_member(conn, list_key, key)
            row = conn.execute("SELECT sent_at FROM probes WHERE list=? AND key=?", (list_key, key)).fetchone()
            sent_last_day = conn.execute("SELECT count(*) FROM probes WHERE list=? AND sent_at>?",
                                         (list_key, now - DAY)).fetchone()[0] if per_day else 0
            verdict = probes.start(row[0] if row else None, now, probe_days, sent_last_day, per_day)
            if verdict == probes.Start.PROBE:
                conn.execute("DELETE FROM probes WHERE list=? AND key=?", (list_key, key))
                conn.execute("INSERT INTO probes(list, key, address, sent_at, why) VALUES (?, ?, ?, ?, ?)",
                             (list_key, key, address, now, why[:300]))
            return verdict

    @sqlite_errors
    def probe(self, list_address: str, address: str) -> float | None:
        """When the member's probe in flight was sent, None if none is."""
        row = self.conn.execute("SELECT sent_at FROM probes WHERE list=? AND key=?",
                                (addresses.key(list_address), addresses.key(address))).fetchone()
        return row[0] if row else None

    @sqlite_errors
    def probes(self, list_address: str | None = None) -> list[tuple[str, str, float, str]]:
        """(list, address, sent_at, why) of the probes in flight."""
        if list_address:
            return self.conn.execute("SELECT list, address, sent_at, why FROM probes WHERE list=? ORDER BY key",
                                     (addresses.key(list_address),)).fetchall()
        return self.conn.execute("SELECT list, address, sent_at, why FROM probes ORDER BY list, key").fetchall()

    def end_probe(self, list_address: str, address: str, sent_at: float | None = None) -> bool:
        """The probe bounced or expired (only the one sent at `sent_at`, if given); True if it was in flight."""
        sql = "DELETE FROM probes WHERE list=? AND key=?"
        params: tuple = (addresses.key(list_address), addresses.key(address))
        if sent_at is not None:
            sql, params = sql + " AND sent_at=?", params + (sent_at,)
        return self._update(sql, params) > 0

    # -- reading ---------------------------------------------------------------
    @sqlite_errors
    def row(self, list_address: str, address: str) -> Row | None:
        """One member's score, or None."""
        return self._row(self.conn, addresses.key(list_address), addresses.key(address))

    @sqlite_errors
    def rows(self, list_address: str | None = None) -> list[Row]:
        if list_address:
            cur = self.conn.execute(self._SCORES + " WHERE list=? ORDER BY list, key",
                                    (addresses.key(list_address),))
        else:
            cur = self.conn.execute(self._SCORES + " ORDER BY list, key")
        return [Row(*r) for r in cur]

    @sqlite_errors
    def records(self, list_address: str, address: str | None = None, verdict: str | None = None
                ) -> list[tuple]:
        """(at, address, permanent, status, diagnostic, envid, verdict, kept), oldest first."""
        query = ("SELECT at, address, permanent, status, diagnostic, envid, verdict, kept FROM bounces "
                 "WHERE list=?")
        params: tuple = (addresses.key(list_address),)
        if address:
            query += " AND key=?"
            params += (addresses.key(address),)
        if verdict:
            query += " AND verdict=?"
            params += (verdict,)
        return self.conn.execute(query + " ORDER BY at, id", params).fetchall()

    @sqlite_errors
    def claim_digest(self, list_address: str, now: float, every: float, since: float) -> list[tuple]:
        """(at, diagnostic, kept) of the list's unrecognised messages recorded after `since` that
        no digest named yet, marked as in today's digest, oldest first; none while the last
        digest is less than `every` seconds old. The caller sends them, or gives them back
        (unclaim_digest)."""
        list_key = addresses.key(list_address)
        # Most runs find nothing due: a read first, so the periodic run takes no write lock per
        # list; asked again under the lock, as another run may have claimed them meanwhile.
        if not self._digest_due(self.conn, list_key, now, every, since):
            return []
        with self._write() as conn:
            if not self._digest_due(conn, list_key, now, every, since):
                return []
            rows = conn.execute("UPDATE bounces SET digested=? WHERE list=? AND verdict=? AND digested=0 "
                                "AND at>? RETURNING at, diagnostic, kept, id",
                                (now, list_key, Verdict.UNRECOGNISED, since)).fetchall()
        return [tuple(r[:3]) for r in sorted(rows, key=lambda r: (r[0], r[3]))]

    @staticmethod
    def _digest_due(conn, list_key: str, now: float, every: float, since: float) -> bool:
        """Is there a message after `since` no digest named, and the last digest `every` old?"""
        if conn.execute("SELECT 1 FROM bounces WHERE list=? AND verdict=? AND digested=0 AND at>? LIMIT 1",
                        (list_key, Verdict.UNRECOGNISED, since)).fetchone() is None:
            return False
        last = conn.execute("SELECT max(digested) FROM bounces WHERE list=?", (list_key,)).fetchone()[0]
        return not (last and last > now - every)

    @sqlite_errors
    def unclaim_digest(self, list_address: str, claimed_at: float) -> None:
        """The digest claimed at `claimed_at` did not go: its messages wait for the next run."""
        with self._write() as conn:
            conn.execute("UPDATE bounces SET digested=0 WHERE list=? AND digested=?",
                         (addresses.key(list_address), claimed_at))

    @sqlite_errors
    def failures_since(self, list_address: str, since: float) -> list[tuple]:
        """(at, post_id, address, permanent, status) of every bounce recorded for the list since
        `since`, oldest first: the delivery report's failures (listmilter.core.report)."""
        return self.conn.execute("SELECT at, post_id, address, permanent, status FROM bounces "
                                 "WHERE list=? AND at>=? ORDER BY at, id",
                                 (addresses.key(list_address), since)).fetchall()
