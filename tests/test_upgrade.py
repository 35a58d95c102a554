"""Upgrading in place: databases written by release 0.1.0 (tests/data/state-0.1.0, made by
the 0.1.0 code itself, see its README) opened by today's code; and the database layer's
schema versions (listmilter.store.db)."""

from __future__ import annotations

import json
import multiprocessing
import os
import pwd
import shutil
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from listmilter.core import config, moderation
from listmilter.core.bounces import Verdict
from listmilter.core.model import ACTIVE, DISABLED, Member
from listmilter.core.tokens import CONFIRM
from listmilter.store import StoreError, bounce_records, open_store, pending, sqlite
from listmilter.store.bounce_records import BounceDB
from listmilter.store.db import Database, statements
from listmilter.store.pending import PendingDB
from listmilter.store.sqlite import SQLiteStore
from tests.bed.listmilter import cli
from tests.bed.postfix import PIPE_USER

DATA = Path(__file__).parent / "data" / "state-0.1.0"
MADE = json.loads((DATA / "made.json").read_text())
T = MADE["time"]
LIST = "dev@example.org"
# What today's code writes, per file of a state folder.
VERSIONS = {"listmilter.sqlite": len(sqlite.MIGRATIONS), "state.sqlite": len(sqlite.MIGRATIONS),
            "pending.sqlite": len(pending.MIGRATIONS), "bounces.sqlite": len(bounce_records.MIGRATIONS)}


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def state(tmp_path) -> Path:
    """A copy of the 0.1.0 state folder, and a config of each backend using it."""
    folder = tmp_path / "state"
    folder.mkdir()
    for db in DATA.glob("*.sqlite"):
        shutil.copy(db, folder)
    (tmp_path / "sqlite.yaml").write_text(f"state_dir: {folder}\n")
    (tmp_path / "yaml.yaml").write_text(f"state_dir: {folder}\nstore:\n  backend: yaml\n"
                                        + (DATA / "yaml-lists.yaml").read_text())
    return folder


def open_all(state: Path):
    cfg = state.parent
    return (open_store(config.load(str(cfg / "sqlite.yaml"))), open_store(config.load(str(cfg / "yaml.yaml"))),
            PendingDB(str(state)), BounceDB(str(state)))


def check_data(state: Path) -> None:
    """Everything 0.1.0 wrote (tests/data/state-0.1.0/make.py), read through today's classes."""
    store, yaml_store, requests, bounce_db = open_all(state)
    try:
        assert [m.address for m in store.all_lists()] == [LIST, "quiet@example.org"]
        # Step 4: a members list made before nonmember_action's default became hold keeps reject.
        assert store.get_list(LIST).settings == {"owners": ("owner@example.org",), "subject_prefix": "[dev]",
                                                 "bounce_threshold": 3, "nonmember_action": "reject"}
        assert [(m.address, m.name, m.attributes, m.status) for m in store.members(LIST)] == [
            ("Ann@Example.net", "Ann Example", {"lang": "en"}, ACTIVE), ("bob@example.net", "", {}, DISABLED)]
        assert store.recipients(LIST) == ["Ann@Example.net"]
        assert [(e.address, e.action, e.how, e.who, e.detail) for e in store.history(LIST)] == [
            ("Ann@Example.net", "subscribed", "cli", "root", ""),
            ("bob@example.net", "subscribed", "cli", "root", ""),
            ("carol@example.net", "subscribed", "cli", "root", ""),
            ("bob@example.net", "disabled", "bounce", "", "5.1.1"),
            ("carol@example.net", "unsubscribed", "web", "192.0.2.7", "")]

        # The yaml file says ann and bob; the overlay says ann left, bob is disabled, erin joined.
        assert [(m.address, m.status) for m in yaml_store.members(LIST)] == [
            ("bob@example.net", DISABLED), ("erin@example.net", ACTIVE)]
        assert yaml_store.recipients(LIST) == ["erin@example.net"]
        assert [(e.address, e.action, e.how) for e in yaml_store.history(LIST)] == [
            ("erin@example.net", "subscribed", "mail"), ("bob@example.net", "disabled", "bounce"),
            ("ann@example.net", "unsubscribed", "web")]

        request = requests.lookup(MADE["token"])       # stored as its hash only
        assert (request.kind, request.list, request.address, request.name, request.action, request.how,
                request.who, request.created) == (CONFIRM, LIST, "Dave@example.net", "Dave", "subscribe",
                                                  "mail", "<req1@example.net>", T)
        assert requests.open_request(LIST, "dave@example.net", now=T + 1).hash == request.hash
        assert requests.sent_today(LIST, "dave@example.net", now=T + 1) == 1

        [row] = bounce_db.rows(LIST)
        assert (row.address, row.score, row.last_bounce, row.last_status) == ("bob@example.net", 1, T, "5.1.1")
        assert [(r[1], r[6]) for r in bounce_db.records(LIST)] == [
            ("bob@example.net", Verdict.SCORED), ("Ann@Example.net", Verdict.TEMPORARY)]
    finally:
        for db in (store, yaml_store, requests, bounce_db):
            db.close()


def test_a_0_1_0_state_folder_is_upgraded_in_place_and_keeps_everything(state):
    assert {p.name: user_version(p) for p in state.glob("*.sqlite")} == {
        "listmilter.sqlite": 2, "state.sqlite": 2, "pending.sqlite": 0, "bounces.sqlite": 0}
    check_data(state)
    assert {p.name: user_version(p) for p in state.glob("*.sqlite")} == VERSIONS

    # Today's code keeps working on them: a write to each.
    store, yaml_store, requests, bounce_db = open_all(state)
    try:
        assert store.subscribe(LIST, Member("frank@example.net"), "mail", "<f@example.net>")
        assert yaml_store.subscribe(LIST, Member("gina@example.net"), "web", "192.0.2.9")
        assert requests.lookup(requests.create(CONFIRM, LIST, "h@example.net", "subscribe", 3)).address == \
            "h@example.net"
        from listmilter.core.bounces import Failure, Policy
        verdict, row = bounce_db.record(LIST, Failure("bob@example.net", True, "5.1.1"), Verdict.SCORED,
                                        "P2.envid", "P2", Policy("disable", 3), T + 86400)
        assert (verdict, row.score) == (Verdict.SCORED, 2)
    finally:
        for db in (store, yaml_store, requests, bounce_db):
            db.close()
    assert "frank@example.net" in cli(state.parent / "sqlite.yaml", "members", "ls", LIST).stdout.split()


def test_opening_a_current_database_again_writes_nothing(state):
    check_data(state)
    # Another writer holds every file's write lock: opening needs none, so it goes on.
    holders = []
    for path in state.glob("*.sqlite"):
        conn = sqlite3.connect(path, isolation_level=None, timeout=0)
        conn.execute("BEGIN IMMEDIATE")
        holders.append(conn)
    try:
        check_data(state)
    finally:
        for conn in holders:
            conn.execute("ROLLBACK")
            conn.close()
    assert {p.name: user_version(p) for p in state.glob("*.sqlite")} == VERSIONS


def test_the_first_0_1_schema_gains_the_consent_record(tmp_path):
    path = tmp_path / "listmilter.sqlite"
    shutil.copy(DATA / "schema-1" / "listmilter.sqlite", path)
    assert user_version(path) == 1
    store = SQLiteStore(str(path), create=False)
    try:
        assert [(m.address, m.name) for m in store.members(LIST)] == [("Ann@Example.net", "Ann Example"),
                                                                      ("bob@example.net", "")]
        assert store.get_list(LIST).settings == {"owners": ("owner@example.org",), "nonmember_action": "reject"}
        assert store.history(LIST) == []
        assert store.unsubscribe(LIST, "bob@example.net", "cli", "root")
        assert [(e.address, e.action) for e in store.history(LIST)] == [("bob@example.net", "unsubscribed")]
    finally:
        store.close()
    assert user_version(path) == len(sqlite.MIGRATIONS)


def test_a_schema_2_store_gains_the_delivery_report_tables(state):
    """0.1.0's listmilter.sqlite and state.sqlite (schema 2) get step 3: posts and reports_sent, empty,
    and today's code writes and reads them; the members and the consent record stay as they were."""
    for name, cfg in (("listmilter.sqlite", "sqlite.yaml"), ("state.sqlite", "yaml.yaml")):
        assert user_version(state / name) == 2
        store = open_store(config.load(str(state.parent / cfg)))
        try:
            assert store.posts(LIST) == [] and store.report_sent(LIST) is None
            history = store.history(LIST)
            assert user_version(state / name) == len(sqlite.MIGRATIONS)
            store.record_post(LIST, "4XyZ1s2B3c", T, 2, 1)
            store.record_post(LIST, "4XyZ1s2B3c", T, 3, 0)       # a resumed fan-out's final count
            assert store.posts(LIST) == [("4XyZ1s2B3c", T, 3, 0)]
            assert store.claim_report(LIST, T, T - 1) and not store.claim_report(LIST, T + 1, T - 1)
            assert store.report_sent(LIST) == T
            assert store.history(LIST) == history
        finally:
            store.close()


def test_members_lists_made_before_hold_became_the_default_keep_refusing_non_members(tmp_path):
    """Step 4 pins nonmember_action: reject on the lists that would change: a members list without
    the setting. A list that set it, or posts openly or as announcements, is left as it is, and a
    list made after the upgrade holds a non-member's post (the new default)."""
    path = tmp_path / "listmilter.sqlite"
    shutil.copy(DATA / "listmilter.sqlite", path)
    Database(str(path), "sqlite store", sqlite.MIGRATIONS[:3]).close()     # as the last release left it
    conn = sqlite3.connect(path)
    for address, settings_ in (("set@example.org", {"nonmember_action": "accept"}),
                               ("members@example.org", {"posting": "members"}),
                               ("open@example.org", {"posting": "open"}),
                               ("news@example.org", {"posting": "announce"})):
        list_id = conn.execute("INSERT INTO lists(address, created) VALUES (?, ?)", (address, T)).lastrowid
        conn.executemany("INSERT INTO list_settings VALUES (?, ?, ?)",
                         [(list_id, n, json.dumps(v)) for n, v in settings_.items()])
    conn.commit()
    conn.close()
    cfg = config.parse(f"state_dir: {tmp_path}\n")
    store = SQLiteStore(str(path), create=False)
    try:
        assert user_version(path) == len(sqlite.MIGRATIONS)
        pinned = {m.address: m.settings.get("nonmember_action") for m in store.all_lists()}
        assert pinned == {LIST: "reject", "quiet@example.org": "reject", "set@example.org": "accept",
                          "members@example.org": "reject", "open@example.org": None, "news@example.org": None}
        store.create_list("new@example.org", {})
        for address, action in ((LIST, moderation.REJECT), ("new@example.org", moderation.HOLD)):
            rules = moderation.rules_of(cfg.list_settings(store.get_list(address).settings))
            assert moderation.decide(rules, address, "out@example.net", False).action == action
    finally:
        store.close()


# Each file opened by what uses it (the yaml store opens its overlay when asked about members).
OPENERS = {
    "listmilter.sqlite": lambda state: open_store(config.load(str(state.parent / "sqlite.yaml"))),
    "state.sqlite": lambda state: open_store(config.load(str(state.parent / "yaml.yaml"))).members(LIST),
    "pending.sqlite": lambda state: PendingDB(str(state)).lookup(MADE["token"]),
    "bounces.sqlite": lambda state: BounceDB(str(state)),
}


@pytest.mark.parametrize("name", sorted(VERSIONS))
def test_a_database_newer_than_the_code_is_refused_and_left_alone(state, name):
    path = state / name
    future = VERSIONS[name] + 1
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={future}")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError) as e:
        OPENERS[name](state)
    assert f"{path} has schema version {future}, this listmilter needs {VERSIONS[name]}: " \
           "it was written by a newer listmilter" in str(e.value)
    assert path.read_bytes() == before and user_version(path) == future


@pytest.mark.mta      # runs `listmilter serve` (which must refuse to start)
def test_the_cli_says_which_database_is_too_new(state):
    conn = sqlite3.connect(state / "listmilter.sqlite")
    conn.execute("PRAGMA user_version=7")
    conn.close()
    for command in (["members", "ls", LIST], ["serve"]):
        proc = cli(state.parent / "sqlite.yaml", *command, check=False)
        assert proc.returncode == 75 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"listmilter: sqlite store {state}/listmilter.sqlite has schema version 7, "
                                       f"this listmilter needs {VERSIONS['listmilter.sqlite']}: it was written by "
                                       "a newer listmilter "
                                       "(docs/upgrade.md)")
    conn = sqlite3.connect(state / "bounces.sqlite")
    conn.execute("PRAGMA user_version=9")
    conn.close()
    proc = cli(state.parent / "yaml.yaml", "check", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"bounce database {state}/bounces.sqlite has schema version 9" in proc.stderr
    assert user_version(state / "pending.sqlite") == VERSIONS["pending.sqlite"]     # check upgraded it


def test_the_backup_and_restore_commands_of_docs_upgrade_md(state, tmp_path):
    """Run as docs/upgrade.md gives them, with the test's folders for /var/lib and /var/backups."""
    doc = (Path(__file__).parents[1] / "docs" / "upgrade.md").read_text()
    backup = ['mkdir -m 700 -p /var/backups/listmilter-before-upgrade',
              'cd /var/lib/listmilter',
              'for db in *.sqlite; do sqlite3 "$db" ".backup /var/backups/listmilter-before-upgrade/$db"; done']
    restore = ['cd /var/backups/listmilter-before-upgrade',
               'for db in *.sqlite; do sqlite3 "/var/lib/listmilter/$db" ".restore $db"; done']
    version = 'sqlite3 /var/lib/listmilter/bounces.sqlite "PRAGMA user_version"'
    for line in backup + restore + [version]:
        assert line in doc

    def sh(lines: list[str]) -> str:
        script = "\n".join(lines).replace("/var/lib/listmilter", str(state)) \
            .replace("/var/backups", str(tmp_path / "backups"))
        return subprocess.run(["bash", "-ec", script], capture_output=True, text=True, check=True).stdout

    before = {p.name: user_version(p) for p in state.glob("*.sqlite")}
    sh(backup)
    check_data(state)                                       # upgraded
    store = open_store(config.load(str(state.parent / "sqlite.yaml")))
    store.subscribe(LIST, Member("frank@example.net"), "mail")
    store.close()
    assert sh([version]) == f"{VERSIONS['bounces.sqlite']}\n"
    sh(restore)
    assert {p.name: user_version(p) for p in state.glob("*.sqlite")} == before
    assert sh([version]) == "0\n"
    check_data(state)                                       # as 0.1.0 left it, without frank


def test_the_docs_give_the_schema_versions_of_this_code():
    docs = Path(__file__).parents[1] / "docs"
    upgrade, design = (docs / "upgrade.md").read_text(), (docs / "design.md").read_text()
    assert f"`state.sqlite` (yaml overlay) | {VERSIONS['listmilter.sqlite']} |" in upgrade
    assert f"| `bounces.sqlite` | {VERSIONS['bounces.sqlite']} |" in upgrade
    assert f"| `pending.sqlite` | {VERSIONS['pending.sqlite']} |" in upgrade
    assert f"`state_dir/listmilter.sqlite`, schema {VERSIONS['listmilter.sqlite']})" in design
    assert f"`state_dir/state.sqlite` (schema {VERSIONS['state.sqlite']})" in design
    assert f"`state_dir/bounces.sqlite` (schema {VERSIONS['bounces.sqlite']})" in design
    assert f"`state_dir/pending.sqlite` (schema {VERSIONS['pending.sqlite']})" in design


# -- the database layer itself ------------------------------------------------------------
def test_a_file_is_made_wal_once_and_later_opens_only_read_its_journal_mode(tmp_path, monkeypatch):
    path = str(tmp_path / "x.sqlite")
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args, **kw):
        conn = connect(*args, **kw)
        conn.set_trace_callback(statements.append)
        return conn
    monkeypatch.setattr(sqlite3, "connect", traced)
    for _ in range(2):
        db = Database(path, "test database", ["CREATE TABLE a(n)"])
        assert db.conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()
    assert statements.count("PRAGMA journal_mode=WAL") == 1


def test_an_upgrade_is_one_transaction(tmp_path):
    path = str(tmp_path / "x.sqlite")

    def fails(conn):
        conn.execute("INSERT INTO a VALUES (1)")
        conn.execute("INSERT INTO no_such_table VALUES (1)")
    db = Database(path, "test database", ["CREATE TABLE a(n)", "CREATE TABLE b(n)", fails])
    with pytest.raises(StoreError, match="upgrade from schema version 0 to 3 failed, nothing changed: "
                                         "no such table: no_such_table"):
        db.conn()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()
    db = Database(path, "test database", ["CREATE TABLE a(n)", "CREATE TABLE b(n)"])
    assert db.conn().execute("PRAGMA user_version").fetchone()[0] == 2
    db.close()
    # Later steps run on their own; the earlier ones are not run again.
    db = Database(path, "test database", ["CREATE TABLE a(n)", "CREATE TABLE b(n)",
                                          "INSERT INTO a VALUES ('three')"])
    assert db.conn().execute("SELECT n FROM a").fetchall() == [("three",)]
    db.close()


def _open_old_pending(path: str, barrier) -> None:
    barrier.wait()
    db = Database(path, "pending database", pending.MIGRATIONS + ("CREATE TABLE upgraded(n)",
                                                                  "INSERT INTO upgraded VALUES (1)"))
    db.conn()
    db.close()


def test_processes_opening_an_old_database_at_once_upgrade_it_once(tmp_path):
    path = tmp_path / "pending.sqlite"
    shutil.copy(DATA / "pending.sqlite", path)
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6)
    workers = [ctx.Process(target=_open_old_pending, args=(str(path), barrier)) for _ in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM upgraded").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(pending.MIGRATIONS) + 2
    assert conn.execute("SELECT count(*) FROM pending").fetchone()[0] == 1
    conn.close()


def test_connections_are_per_thread_and_release_closes_the_callers(tmp_path):
    db = Database(str(tmp_path / "x.sqlite"), "test database", ["CREATE TABLE a(n)"])
    mine = db.conn()
    assert db.conn() is mine
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(db.conn()))
    t.start()
    t.join()
    assert theirs[0] is not mine
    db.release()
    with pytest.raises(sqlite3.ProgrammingError):
        mine.execute("SELECT 1")
    theirs[0].execute("SELECT 1")                    # another thread's stays open
    assert db.conn() is not mine
    db.close()
    with pytest.raises(sqlite3.ProgrammingError):
        theirs[0].execute("SELECT 1")
    assert db.quick_check() == []


def test_statements_split_where_sqlite_does():
    script = """
        CREATE TABLE t(s TEXT DEFAULT 'a;b');   -- a comment; with a semicolon
        CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET s = 'x;y'; END;
        INSERT INTO t VALUES ('c')
    """
    parts = list(statements(script))
    assert len(parts) == 3 and parts[1].strip().startswith("-- a comment; with a semicolon\n")
    conn = sqlite3.connect(":memory:")
    for statement in parts:
        conn.execute(statement)
    assert conn.execute("SELECT s FROM t").fetchall() == [("x;y",)]


def test_files_root_creates_are_0640_and_belong_to_the_state_folders_owner(tmp_path):
    assert os.geteuid() == 0, "the suite runs as root (README)"
    folder = tmp_path / "state"
    folder.mkdir()
    os.chown(folder, pwd.getpwnam(PIPE_USER).pw_uid, pwd.getpwnam(PIPE_USER).pw_gid)
    owner = folder.stat()
    dbs = [SQLiteStore(str(folder / "listmilter.sqlite")), PendingDB(str(folder)), BounceDB(str(folder))]
    dbs[1].sent_today(LIST)
    try:
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["bounces.sqlite", "bounces.sqlite-shm", "bounces.sqlite-wal",
                         "listmilter.sqlite", "listmilter.sqlite-shm", "listmilter.sqlite-wal",
                         "pending.sqlite", "pending.sqlite-shm", "pending.sqlite-wal"]
        for name in files:
            st = (folder / name).stat()
            assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (owner.st_uid, owner.st_gid, 0o640), name
    finally:
        for db in dbs:
            db.close()

