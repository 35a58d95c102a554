"""Both stores: membership changes made at run time, and the consent record kept for each."""

from __future__ import annotations

import sqlite3

import pytest

from listmilter.core import config
from listmilter.core.model import ACTIVE, DISABLED, Member
from listmilter.store import open_store
from listmilter.store.sqlite import SQLiteStore
from tests.bed.listmilter import cli

LIST = "dev@example.org"


def _store(tmp_path, backend, pg=None):
    path = tmp_path / "listmilter.yaml"
    # With PostgreSQL: the same tests, everything in the database (the yaml overlay too).
    database = (f"  dsn: '{pg.dsn}'\n  password_file: {pg.password_file}\n" if pg else "")
    if backend.startswith("yaml"):
        path.write_text(f"state_dir: {tmp_path}/state\nstore:\n  backend: yaml\n{database}lists:\n"
                        f"  {LIST}:\n    members:\n      - Ann@example.net\n      - bob@example.net\n")
    elif pg:
        path.write_text(f"state_dir: {tmp_path}/state\nstore:\n  backend: postgresql\n{database}")
    else:
        path.write_text(f"state_dir: {tmp_path}/state\n")
    cfg = config.load(str(path))
    store = open_store(cfg)
    if not backend.startswith("yaml"):
        store.create_list(LIST, {})
        store.add_members(LIST, [Member("Ann@example.net"), Member("bob@example.net")], "config", "test")
    return store


@pytest.fixture(params=["sqlite", "yaml", "postgresql", "yaml+postgresql"])
def store(request, tmp_path):
    pg = request.getfixturevalue("pg_database") if "postgresql" in request.param else None
    s = _store(tmp_path, request.param, pg)
    yield s
    s.close()


def test_subscribe_unsubscribe_and_status_change_recipients(store):
    assert store.subscribe(LIST, Member("carol@example.com"), "mail", "<id1@example.com>")
    assert not store.subscribe(LIST, Member("CAROL@example.com"), "mail", "<id2@example.com>")
    assert sorted(store.recipients(LIST)) == ["Ann@example.net", "bob@example.net", "carol@example.com"]

    assert store.set_status(LIST, "ann@example.net", DISABLED, "bounce", detail="5.1.1")
    assert not store.set_status(LIST, "ann@example.net", DISABLED, "bounce")
    assert store.member(LIST, "ann@example.net").status == DISABLED
    assert store.is_member(LIST, "ann@example.net")          # disabled members may still post
    assert sorted(store.recipients(LIST)) == ["bob@example.net", "carol@example.com"]

    assert store.unsubscribe(LIST, "bob@example.net", "web", "192.0.2.7")
    assert not store.unsubscribe(LIST, "bob@example.net", "web", "192.0.2.7")
    assert store.member(LIST, "bob@example.net") is None
    assert sorted(store.recipients(LIST)) == ["carol@example.com"]
    assert store.set_status(LIST, "ann@example.net", ACTIVE, "cli", "root")
    assert sorted(store.recipients(LIST)) == ["Ann@example.net", "carol@example.com"]
    assert {m.address for m in store.members(LIST)} == {"Ann@example.net", "carol@example.com"}

    # Someone who left may come back.
    assert store.subscribe(LIST, Member("bob@example.net"), "mail", "<id3@example.com>")
    assert "bob@example.net" in store.recipients(LIST)

    record = [(e.address, e.action, e.how, e.who, e.detail) for e in store.history(LIST, "BOB@example.net")]
    assert record[-2:] == [("bob@example.net", "unsubscribed", "web", "192.0.2.7", ""),
                           ("bob@example.net", "subscribed", "mail", "<id3@example.com>", "")]
    if store.backend != "yaml":   # the yaml file's own members have no join record
        assert record[0] == ("bob@example.net", "subscribed", "config", "test", "")
    actions = [(e.address, e.action) for e in store.history(LIST, "ann@example.net")]
    assert actions[-2:] == [("Ann@example.net", "disabled"), ("Ann@example.net", "enabled")]


def test_sqlite_store_of_version_1_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE lists (id INTEGER PRIMARY KEY, address TEXT NOT NULL UNIQUE, created REAL NOT NULL);
        CREATE TABLE list_settings (list_id INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
            PRIMARY KEY (list_id, name)) WITHOUT ROWID;
        CREATE TABLE members (list_id INTEGER NOT NULL, key TEXT NOT NULL, address TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '', attrs TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'active', added REAL NOT NULL,
            PRIMARY KEY (list_id, key)) WITHOUT ROWID;
        INSERT INTO lists VALUES (1, 'dev@example.org', 0);
        INSERT INTO members(list_id, key, address, added) VALUES (1, 'a@example.net', 'a@example.net', 0);
        PRAGMA user_version=1;
    """)
    conn.close()
    store = SQLiteStore(str(path), create=False)
    assert store.recipients(LIST) == ["a@example.net"]
    assert store.unsubscribe(LIST, "a@example.net", "cli", "root")
    assert [e.action for e in store.history(LIST)] == ["unsubscribed"]
    store.close()


def test_members_history_cli_shows_and_exports_the_record(tmp_path):
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\n")
    cli(path, "list", "create", LIST)
    cli(path, "members", "add", LIST, "ann@example.net", "bob@example.net")
    cli(path, "members", "remove", LIST, "bob@example.net")
    out = cli(path, "members", "history", LIST, "bob@example.net").stdout.splitlines()
    assert len(out) == 2
    assert out[0].split(" ", 1)[1].startswith("bob@example.net subscribed by cli (")
    assert out[1].split(" ", 1)[1].startswith("bob@example.net unsubscribed by cli (")
    csv_out = cli(path, "members", "history", LIST, "--csv").stdout.splitlines()
    assert csv_out[0] == "at,address,action,how,who,detail"
    assert sorted(line.split(",")[1:3] for line in csv_out[1:]) == [
        ["ann@example.net", "subscribed"], ["bob@example.net", "subscribed"], ["bob@example.net", "unsubscribed"]]
    proc = cli(path, "members", "history", LIST, "nobody@example.net", check=False)
    assert proc.returncode == 1 and "no membership changes recorded for nobody@example.net" in proc.stderr


def test_delivery_report_rows(store):
    """The posts sent and the weekly report's last time (core/report.py), on every backend."""
    assert store.posts(LIST) == [] and store.report_sent(LIST) is None
    store.record_post(LIST, "P1", 1000.0, 2, 1)
    store.record_post(LIST, "P2", 2000.0, 5)
    store.record_post(LIST, "P1", 1000.0, 3, 0)           # a resumed fan-out's final count
    assert store.posts(LIST) == [("P1", 1000.0, 3, 0), ("P2", 2000.0, 5, 0)]
    assert store.posts(LIST.upper(), since=1500) == [("P2", 2000.0, 5, 0)]
    store.forget_post(LIST, "P2")
    store.forget_post(LIST, "NONE")
    assert store.posts(LIST) == [("P1", 1000.0, 3, 0)]
    # The weekly report: claimed once until `last_before` has passed, given back on failure.
    assert store.claim_report(LIST, 100.0, 50.0)
    assert not store.claim_report(LIST, 120.0, 100.0)     # sent at 100, not before 100: not again
    assert store.report_sent(LIST) == 100.0
    assert store.claim_report(LIST, 200.0, 101.0)
    store.unclaim_report(LIST, 100.0)
    assert store.report_sent(LIST) == 100.0
    store.unclaim_report(LIST, None)
    assert store.report_sent(LIST) is None
