"""bounce_unrecognised: digest (the default): what reached <list>-bounces@ and scored nobody goes
to the owners in one mail a day at most (app/bounce_processing.send_digest, the bounce records'
claim_digest). The real-Postfix run is tests/test_bounces.py's
test_by_default_the_owners_get_one_digest_a_day_of_what_scored_nobody."""

from __future__ import annotations

import email
import email.policy
import shutil
import sqlite3
import time
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from listmilter.app import bounce_processing, notices, outgoing
from listmilter.core import config
from listmilter.core.bounces import DAY, Failure, Verdict
from listmilter.store import bounce_records, open_bounces, open_store
from listmilter.store.bounce_records import BounceDB
from listmilter.store.db import Database
from tests.bed.listmilter import cli

LIST = "dev@example.org"
T = 1_800_000_000.0


def _unrecognised(db: BounceDB, why: str, at: float, kept: str = "") -> None:
    db.record(LIST, Failure("", False, "", why), Verdict.UNRECOGNISED, now=at, kept=kept)


def test_a_digest_claims_what_no_digest_named_and_at_most_one_a_day(tmp_path):
    db = BounceDB(str(tmp_path))
    try:
        _unrecognised(db, "unverified: one", T, "/k/1.eml")
        _unrecognised(db, "feedback: two", T + 5, "/k/2.eml")
        db.record(LIST, Failure("m@x.org", True, "5.1.1"), Verdict.NOT_MEMBER, "", "P1", now=T + 6)
        assert db.claim_digest(LIST, T + 10, DAY, T - 30 * DAY) == [
            (T, "unverified: one", "/k/1.eml"), (T + 5, "feedback: two", "/k/2.eml")]
        assert db.claim_digest(LIST, T + 20, DAY, 0) == []                 # nothing new
        _unrecognised(db, "three", T + 30)
        assert db.claim_digest(LIST, T + 10 + DAY - 1, DAY, 0) == []       # the last one is not a day old
        assert db.claim_digest(LIST, T + 10 + DAY, DAY, 0) == [(T + 30, "three", "")]
        # One the MTA did not take comes back for the next run; older than `since` never comes.
        _unrecognised(db, "four", T + 3 * DAY)
        _unrecognised(db, "too old", T + 1.5 * DAY)
        claimed_at = T + 4 * DAY
        assert [r[1] for r in db.claim_digest(LIST, claimed_at, DAY, T + 2 * DAY)] == ["four"]
        db.unclaim_digest(LIST, claimed_at)
        assert [r[1] for r in db.claim_digest(LIST, claimed_at + 1, DAY, T + 2 * DAY)] == ["four"]
        assert db.claim_digest("other@example.org", claimed_at, DAY, 0) == []
    finally:
        db.close()


def test_a_run_with_nothing_to_name_takes_no_write_lock(tmp_path):
    """The periodic run asks every list: with nothing new, or nothing due, it must not wait for,
    nor take, the database's write lock (deliver processes write bounces there meanwhile)."""
    db = BounceDB(str(tmp_path))
    writer = sqlite3.connect(tmp_path / bounce_records.NAME, isolation_level=None)
    try:
        _unrecognised(db, "told", T)
        assert len(db.claim_digest(LIST, T + 10, DAY, 0)) == 1
        _unrecognised(db, "new, for tomorrow's digest", T + 20)
        writer.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        assert db.claim_digest(LIST, T + 30, DAY, 0) == []                 # new, but not due yet
        assert db.claim_digest("other@example.org", T + 2 * DAY, DAY, 0) == []   # nothing at all
        assert time.monotonic() - started < 5          # a writer would wait 15 s, then fail
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        db.close()


def _setup(tmp_path, setting: str | None):
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\n")
    cli(path, "list", "create", LIST, "--owner", "owner@example.org")
    if setting:
        cli(path, "list", "set", LIST, "bounce_unrecognised", setting)
    cfg = config.load(str(path))
    return cfg, open_store(cfg), open_bounces(cfg)


def test_the_periodic_run_mails_the_digest_from_the_owner_address_and_tries_again(tmp_path, monkeypatch):
    cfg, store, db = _setup(tmp_path, None)         # the default: digest
    sent, fail = [], []

    def send(out, sender, recipients, message):
        if fail:
            raise outgoing.OutgoingError("connection refused")
        sent.append((sender, recipients, message))
    monkeypatch.setattr(outgoing, "send", send)
    try:
        mlist = store.get_list(LIST)
        assert bounce_processing.send_digest(cfg, db, mlist, T) == []     # nothing kept
        _unrecognised(db, "unverified: no envelope id listmilter issued", T - 60, "/var/lib/x/1.eml")
        fail.append(1)
        assert bounce_processing.send_digest(cfg, db, mlist, T) == [
            f"list=<{LIST}>, status=unrecognised bounces digest not sent, tried again later (connection refused)"]
        fail.clear()
        assert bounce_processing.send_digest(cfg, db, mlist, T + 3600) == [
            f"list=<{LIST}>, status=unrecognised bounces digest sent, to=<owner@example.org>, messages=1"]
        [(sender, to, message)] = sent
        assert (sender, to) == ("dev-owner@example.org", ["owner@example.org"])
        msg = email.message_from_bytes(message, policy=email.policy.default)
        assert msg["Subject"] == f"Unrecognised bounces for {LIST}: 1"
        text = msg.get_content()
        assert "unverified: no envelope id listmilter issued" in text and "/var/lib/x/1.eml" in text
        assert f"listmilter bounces {LIST} --kept" in text
        _unrecognised(db, "later", T + 7200)
        assert bounce_processing.send_digest(cfg, db, mlist, T + 7200) == []      # a day after the last
        assert len(bounce_processing.send_digest(cfg, db, mlist, T + 3600 + DAY)) == 1
    finally:
        store.close()
        db.close()


def test_forward_and_keep_send_no_digest(tmp_path, monkeypatch):
    for setting in ("forward", "keep"):
        cfg, store, db = _setup(tmp_path / setting, setting)
        monkeypatch.setattr(outgoing, "send", lambda *a: (_ for _ in ()).throw(AssertionError("sent")))
        try:
            _unrecognised(db, "x", T)
            assert bounce_processing.send_digest(cfg, db, store.get_list(LIST), T + DAY) == []
        finally:
            store.close()
            db.close()


@given(st.lists(st.tuples(st.floats(0, 4e9), st.text(max_size=400), st.text(max_size=100)), min_size=1, max_size=5))
def test_any_reason_and_path_make_a_readable_digest(kept):
    """A reason may quote what a hostile message said: any text gives a mail whose body lines
    are printable, one per message (and its file)."""
    message = notices.unrecognised_digest(LIST, ("owner@example.org",), kept)
    msg = email.message_from_bytes(message, policy=email.policy.default)
    assert msg["Subject"] == f"Unrecognised bounces for {LIST}: {len(kept)}"
    body = msg.get_content()
    assert all(line.isprintable() for line in body.splitlines())


def test_upgrading_marks_what_was_kept_before_as_told(tmp_path):
    """bounces.sqlite step 2: messages kept before were forwarded or kept as the list said then;
    the first digest after the upgrade does not name them again."""
    path = tmp_path / bounce_records.NAME
    old = Database(str(path), "bounce database", bounce_records.MIGRATIONS[:1])
    old.conn()
    old.close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO bounces(at, list, key, address, permanent, verdict, diagnostic) "
                  "VALUES (?, ?, '', '', 0, 'unrecognised', 'before')", (T, LIST))
    conn.commit()
    conn.close()
    db = BounceDB(str(tmp_path))
    try:
        assert db.claim_digest(LIST, T + 60, DAY, 0) == []
        _unrecognised(db, "after", T + 30 + DAY)
        assert db.claim_digest(LIST, T + 60 + DAY, DAY, 0) == [(T + 30 + DAY, "after", "")]
    finally:
        db.close()


def test_the_0_1_0_bounce_database_takes_every_step(tmp_path):
    shutil.copy(Path(__file__).parent / "data" / "state-0.1.0" / bounce_records.NAME, tmp_path)
    db = BounceDB(str(tmp_path))
    try:
        assert db.conn.execute("PRAGMA user_version").fetchone()[0] == len(bounce_records.MIGRATIONS) == 3
        assert db.claim_digest(LIST, T, DAY, 0) == []
        assert db.probes() == []
    finally:
        db.close()
