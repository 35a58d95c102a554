"""PostgreSQL as the state database, against a real private server (tests/bed/postgres.py).

The store, pending and bounce tests also run on it (tests/test_store.py and the
`state` fixture); here is what only PostgreSQL has: the schema and its
upgrade, the parity of its tables with SQLite's, concurrency across
processes (what SQLite's BEGIN IMMEDIATE and the flock gave), the database
going away and coming back, `check`, `db upgrade` and `migrate`.
"""

from __future__ import annotations

import multiprocessing
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import pytest

from listmilter.core import bounces, config, tokens
from listmilter.core.model import DISABLED, Member, NoSuchList
from listmilter.store import (
    StoreError,
    bounce_records,
    open_bounces,
    open_pending,
    open_store,
    pending,
    site_secret,
    sqlite,
)
from listmilter.store.postgresql import db as pgdb
from listmilter.store.postgresql.schema import MIGRATIONS
from listmilter.store.postgresql.stores import PgBounceDB, PgPendingDB, PgStore
from tests.bed.listmilter import cli
from tests.bed.net import wait_until
from tests.bed.postgres import PostgreSQL

LIST = "dev@example.org"
DAY = 86400.0


def _config(tmp_path: Path, db, backend: str = "postgresql", extra: str = "") -> Path:
    """A config file with the store lines docs/configuration.md gives."""
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nstore:\n  backend: {backend}\n"
                    f"  dsn: \"{db.dsn}\"\n  password_file: {db.password_file}\n{extra}")
    return path


def _target(db) -> pgdb.Target:
    return pgdb.Target(db.dsn, db.password_file)


# -- the schema ------------------------------------------------------------------------
def _sqlite_columns(migrations, tmp_path: Path) -> dict[str, list[str]]:
    from listmilter.store.db import Database
    path = tmp_path / f"parity{len(list(tmp_path.iterdir()))}.sqlite"
    d = Database(str(path), "parity", migrations)
    conn = d.conn()
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    out = {t: sorted(r[1] for r in conn.execute(f"PRAGMA table_info({t})")) for t in tables}
    d.close()
    return out


def test_every_sqlite_table_and_column_is_in_the_postgresql_schema(pg_database, tmp_path):
    """The shared SQL runs on both: a SQLite migration without its PostgreSQL step fails here."""
    pg = {}
    for line in pg_database.psql("SELECT table_name, column_name FROM information_schema.columns "
                                 "WHERE table_schema='public'").splitlines():
        table, column = line.split("|")
        pg.setdefault(table, []).append(column)
    for migrations in (sqlite.MIGRATIONS, pending.MIGRATIONS, bounce_records.MIGRATIONS):
        for table, columns in _sqlite_columns(migrations, tmp_path).items():
            assert sorted(pg[table]) == columns, table
    assert set(pg) == {"meta", "lists", "list_settings", "members", "events", "scores", "bounces",
                       "pending", "sent", "held", "site_keys", "posts", "reports_sent", "probes"}


def test_a_database_without_the_schema_is_refused_until_db_upgrade(pg_server, tmp_path):
    db = pg_server.new_database(upgrade=False)
    path = _config(tmp_path, db)
    cfg = config.load(str(path))
    with pytest.raises(StoreError, match=r"has no listmilter tables: run `listmilter db upgrade`"):
        open_store(cfg)
    proc = cli(path, "check", check=False)
    assert proc.returncode == 1
    assert f"postgresql database {db.url} has no listmilter tables: run `listmilter db upgrade`" in proc.stderr
    assert cli(path, "db", "upgrade").stdout == f"{db.url}: schema version 0 -> {len(MIGRATIONS)}\n"
    assert cli(path, "db", "upgrade").stdout.endswith(f"schema version {len(MIGRATIONS)}, nothing to do\n")
    proc = cli(path, "check", check=False)
    assert f"state: postgresql database {db.url}, schema version {len(MIGRATIONS)}" in proc.stdout
    assert "store: postgresql" in proc.stdout
    # One newer than the code: refused, and check says why.
    db.psql("UPDATE meta SET value='99' WHERE name='schema'")
    with pytest.raises(StoreError, match=f"has schema version 99, this listmilter needs {len(MIGRATIONS)}: "
                                         "it was written by a newer"):
        open_store(cfg)
    proc = cli(path, "check", check=False)
    assert proc.returncode == 1 and "written by a newer listmilter" in proc.stderr
    assert "written by a newer listmilter" in cli(path, "db", "upgrade", check=False).stderr


def test_upgrade_racing_processes_upgrade_once(pg_server):
    db = pg_server.new_database(upgrade=False)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pgdb.upgrade(_target(db)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    last = len(MIGRATIONS)
    assert sorted(results) == [(0, last)] + [(last, last)] * 3


def test_config_keys_for_postgresql(tmp_path):
    def load(text):
        return config.parse(text, "x.yaml")
    cfg = load("store:\n  backend: postgresql\n  dsn: host=db dbname=l user=l\n  password_file: /etc/pw\n")
    assert (cfg.backend, cfg.dsn, cfg.password_file) == ("postgresql", "host=db dbname=l user=l", "/etc/pw")
    assert load("store:\n  backend: yaml\n  dsn: postgresql://l@db/l\n").dsn == "postgresql://l@db/l"
    for text, message in (
            ("store:\n  backend: postgresql\n", "x.yaml:2: store.backend postgresql needs store.dsn"),
            ("store:\n  dsn: host=db\n", "x.yaml:2: store.dsn needs store.backend: postgresql"),
            ("store:\n  backend: postgresql\n  dsn: host=db password=s3cret\n",
             "x.yaml:3: store.dsn: put the password in store.password_file"),
            ("store:\n  backend: postgresql\n  dsn: postgresql://l:s3cret@db/l\n",
             "x.yaml:3: store.dsn: put the password in store.password_file"),
            ("store:\n  backend: postgresql\n  dsn: host=db\n  password_file: pw\n",
             "x.yaml:4: store.password_file must be an absolute path"),
            ("store:\n  backend: postgresql\n  dsn: host=db\n  path: /x.sqlite\n",
             "x.yaml:4: store.path is the SQLite file"),
            ("store:\n  backend: mysql\n", "x.yaml:2: store.backend must be sqlite, yaml or postgresql")):
        with pytest.raises(config.ConfigError) as e:
            load(text)
        assert str(e.value).startswith(message), text


def test_password_from_the_environment_and_a_wrong_one(pg_database, tmp_path, monkeypatch):
    cfg = config.load(str(_config(tmp_path, pg_database)))
    store = open_store(cfg)
    store.create_list(LIST, {})
    # libpq's own PGPASSWORD, no password_file: the config file holds no secret at all.
    path = tmp_path / "env.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nstore:\n  backend: postgresql\n  dsn: \"{pg_database.dsn}\"\n")
    password = Path(pg_database.password_file).read_text().strip()
    assert cli(path, "list", "ls", env={"PGPASSWORD": password}).stdout.startswith(LIST)
    proc = cli(path, "list", "ls", env={"PGPASSWORD": "wrong"}, check=False)
    assert proc.returncode == 75
    assert proc.stderr.startswith(f"listmilter: postgresql store {pg_database.url}: ")
    assert "password authentication failed" in proc.stderr and "wrong" not in proc.stderr.replace(
        "password authentication failed", "")


def test_one_database_holds_either_a_list_store_or_a_yaml_overlay(pg_database, tmp_path):
    open_store(config.load(str(_config(tmp_path, pg_database)))).create_list(LIST, {})
    yaml_cfg = config.load(str(_config(tmp_path, pg_database, "yaml", f"lists:\n  {LIST}:\n    members: []\n")))
    with pytest.raises(StoreError, match="holds the lists of store.backend postgresql; this config uses it for "
                                         "the yaml backend overlay"):
        open_store(yaml_cfg)


# -- concurrency across processes ---------------------------------------------------------
def _claim(target, hash_, barrier, out):
    barrier.wait()
    out.put(PgPendingDB(target).claim(hash_, "confirmed"))


def test_a_token_is_used_once_when_processes_race(pg_database):
    target = _target(pg_database)
    db = PgPendingDB(target)
    for _ in range(5):
        token = db.create(tokens.CONFIRM, LIST, "ann@example.net", "subscribe", 3)
        hash_ = tokens.token_hash(token)
        ctx = multiprocessing.get_context("fork")
        barrier, out = ctx.Barrier(6), ctx.Queue()
        workers = [ctx.Process(target=_claim, args=(target, hash_, barrier, out)) for _ in range(6)]
        for w in workers:
            w.start()
        results = [out.get(timeout=30) for _ in workers]
        for w in workers:
            w.join(30)
        assert sorted(results) == [False] * 5 + [True]


def _serialized_worker(target, path, rounds):
    db = PgPendingDB(target)
    for _ in range(rounds):
        with db.serialized():
            # read, decide, write, as the subscription service does: never interleaved
            n = int(Path(path).read_text())
            time.sleep(0.001)
            Path(path).write_text(str(n + 1))


def test_serialized_is_one_step_across_processes_and_threads(pg_database, tmp_path):
    target = _target(pg_database)
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_serialized_worker, args=(target, counter, 40)) for _ in range(3)]
    threads = [threading.Thread(target=_serialized_worker, args=(target, counter, 40)) for _ in range(3)]
    for w in procs + threads:
        w.start()
    for w in procs + threads:
        w.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert counter.read_text() == str(6 * 40)


def test_one_host_does_the_periodic_run(pg_database):
    # Two objects, two connections: as two hosts would have.
    a, b = PgBounceDB(_target(pg_database)), PgBounceDB(_target(pg_database))
    with a.periodic_turn() as first, b.periodic_turn() as second:
        assert first and not second
    with b.periodic_turn() as later:
        assert later


def _add(target, n, out):
    store = PgStore(target)
    out.put(store.add_members(LIST, [Member(f"m{i}@example.net") for i in range(n)], "cli", "racer"))


def test_parallel_imports_add_each_member_once(pg_database):
    target = _target(pg_database)
    store = PgStore(target)
    store.create_list(LIST, {})
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_add, args=(target, 2000, out)) for _ in range(3)]
    for w in workers:
        w.start()
    results = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(60)
    assert sum(added for added, _ in results) == 2000
    assert store.member_count(LIST) == 2000
    assert len(store.history(LIST)) == 2000           # one consent record each, never two


def test_hostile_text_is_kept_not_retried_forever(pg_database):
    """PostgreSQL refuses NUL and lone surrogates in text; a DSN can carry both."""
    db = PgBounceDB(_target(pg_database))
    fail = bounces.Failure("dead@example.net", True, "5.1.1", "gone\0 \udcff away")
    policy = bounces.Policy("disable", 3, 7, 2, 7)
    verdict, row = db.record(LIST, fail, bounces.Verdict.SCORED, "P1.x", "P1", policy, time.time())
    assert verdict == bounces.Verdict.SCORED and row.last_diagnostic == "gone\ufffd ? away"


def test_probes_and_their_daily_budget(pg_database):
    """bounce_probes_per_day counts a list's probes of the last day in PostgreSQL as in SQLite."""
    from tests.test_probes import probe_budget_holds
    probe_budget_holds(PgBounceDB(_target(pg_database)))


# -- the database going away -----------------------------------------------------------------
@pytest.fixture
def own_server():
    server = PostgreSQL()
    try:
        server.start()
        yield server
    finally:
        pgdb.close_pools()
        server.stop("immediate")
        server.remove()


def test_database_down_is_a_store_error_and_it_recovers_by_itself(own_server, tmp_path):
    db = own_server.new_database()
    cfg = config.load(str(_config(tmp_path, db)))
    store = open_store(cfg)
    store.create_list(LIST, {})
    store.add_members(LIST, [Member("ann@example.net")])
    pend = open_pending(cfg)
    secret = site_secret(cfg)
    own_server.stop("immediate")       # a crash: the pool's connections are broken
    started = time.monotonic()
    for call in (lambda: store.recipients(LIST), lambda: store.subscribe(LIST, Member("b@example.net"), "mail"),
                 lambda: pend.create(tokens.CONFIRM, LIST, "c@example.net", "subscribe", 3),
                 lambda: open_bounces(cfg).rows(LIST)):
        with pytest.raises(StoreError, match=r"postgresql://listmilter@127\.0\.0\.1"):
            call()
    assert time.monotonic() - started < 4 * (pgdb.WAIT + 2)      # waits are bounded
    own_server.start()
    own_server.wait_ready()
    # The same objects work again: the pool replaced its connections.
    assert wait_until(lambda: _or_none(lambda: store.recipients(LIST)), 20, what="the pool to reconnect") \
        == ["ann@example.net"]
    assert store.subscribe(LIST, Member("b@example.net"), "mail")
    assert pend.lookup(pend.create(tokens.CONFIRM, LIST, "c@example.net", "subscribe", 3)).address == "c@example.net"
    assert site_secret(cfg) == secret


def _or_none(call):
    try:
        return call()
    except StoreError:
        return None


# -- migrate ---------------------------------------------------------------------------------
def _sqlite_site(tmp_path: Path, backend: str = "sqlite") -> tuple[Path, dict]:
    """A state folder as a site running on SQLite has it: lists, members, the record, pending
    requests and counters, bounce scores and records, the secret."""
    path = tmp_path / "sqlite.yaml"
    state = tmp_path / "state"
    if backend == "yaml":
        path.write_text(f"state_dir: {state}\nstore:\n  backend: yaml\nlists:\n  {LIST}:\n"
                        "    members: [ann@example.net, bob@example.net]\n")
    else:
        path.write_text(f"state_dir: {state}\n")
    cfg = config.load(str(path))
    store = open_store(cfg)
    if backend == "sqlite":
        store.create_list(LIST, {"owners": ["owner@example.org"], "subject_prefix": "[dev]"})
        store.add_members(LIST, [Member(f"m{i}@example.net", f"M {i}") for i in range(300)])
        store.remove_members(LIST, ["m7@example.net"])
    store.subscribe(LIST, Member("carol@example.net"), "mail", "<1@example.net>")
    store.set_status(LIST, "carol@example.net", DISABLED, "bounce", detail="5.1.1")
    store.record_post(LIST, "P0", time.time() - 2 * DAY, 300)          # the delivery reports' rows
    store.claim_report(LIST, time.time() - DAY, time.time())
    store.close()
    pend = open_pending(cfg)
    token = pend.create(tokens.CONFIRM, LIST, "dan@example.net", "subscribe", 3)
    pend.record_sent(LIST, "dan@example.net", "confirm_subscribe")
    pend.close()
    bdb = open_bounces(cfg)
    policy = bounces.Policy("disable", 3, 7, 2, 7)
    for day in range(2):
        bdb.record(LIST, bounces.Failure("carol@example.net", True, "5.1.1", "gone"), bounces.Verdict.SCORED,
                   f"P{day}.x", f"P{day}", policy, time.time() - (2 - day) * DAY)
    bdb.close()
    return path, {"token": token, "secret": site_secret(cfg)}


@pytest.mark.parametrize("backend", ["sqlite", "yaml"])
def test_migrate_copies_a_state_folder_and_verifies_the_counts(pg_database, tmp_path, backend):
    path, made = _sqlite_site(tmp_path, backend)
    before = open_store(config.load(str(path)))
    members_before = [(m.address, m.name, m.status) for m in before.members(LIST)]
    history_before = [(e.address, e.action, e.how, e.who, e.detail) for e in before.history(LIST)]
    password = f"--password-file={pg_database.password_file}"
    out = cli(path, "migrate", "--to", pg_database.url, password).stdout
    lines = out.splitlines()
    assert lines[0] == f"copied {tmp_path}/state ({backend}) into {pg_database.url}:"
    counted = {line.split()[0]: (int(line.split()[1]), int(line.split()[3])) for line in lines[1:13]}
    assert counted["members"] == ((300 - 1 + 1, 300 - 1 + 1) if backend == "sqlite" else (1, 1))
    assert counted["pending"] == (1, 1) and counted["sent"] == (1, 1) and counted["bounces"] == (2, 2)
    assert counted["site_keys"] == (1, 1) and counted["scores"] == (1, 1) and counted["held"] == (0, 0)
    assert counted["posts"] == (1, 1) and counted["reports_sent"] == (1, 1)
    assert "Counts verified." in out
    # The config lines it prints are what the site uses from now on.
    new = tmp_path / "pg.yaml"
    new.write_text(f"state_dir: {tmp_path}/state\n"
                   + textwrap.dedent(out.split("Now set in the config file (docs/upgrade.md):\n")[1])
                   + (f"lists:\n  {LIST}:\n    members: [ann@example.net, bob@example.net]\n"
                      if backend == "yaml" else ""))
    cfg = config.load(str(new))
    assert (cfg.backend, cfg.dsn, cfg.password_file) == (
        backend if backend == "yaml" else "postgresql", pg_database.url, pg_database.password_file)
    after = open_store(cfg)
    assert [(m.address, m.name, m.status) for m in after.members(LIST)] == members_before
    assert [(e.address, e.action, e.how, e.who, e.detail) for e in after.history(LIST)] == history_before
    if backend == "sqlite":
        assert after.get_list(LIST).settings == before.get_list(LIST).settings
    assert open_pending(cfg).lookup(made["token"]).address == "dan@example.net"   # its link still works
    assert site_secret(cfg) == made["secret"]                                    # and so do ENVIDs
    assert open_bounces(cfg).row(LIST, "carol@example.net").score == 2
    assert [(p, n) for p, _, n, _ in after.posts(LIST)] == [("P0", 300)] and after.report_sent(LIST)
    # New rows continue after the copied ids.
    after.subscribe(LIST, Member("erin@example.net"), "web", "192.0.2.1")
    assert after.history(LIST)[-1].address == "erin@example.net"
    # A second migrate finds a target that is not empty: refused, nothing changed.
    proc = cli(path, "migrate", "--to", pg_database.url, password, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"listmilter: postgresql database {pg_database.url} is not empty (")
    assert "--force replaces what it holds" in proc.stderr
    assert after.is_member(LIST, "erin@example.net")
    # --force replaces it.
    cli(path, "migrate", "--to", pg_database.url, password, "--force")
    assert not after.is_member(LIST, "erin@example.net")
    assert [(m.address, m.status) for m in after.members(LIST)] == [(a, s) for a, _, s in members_before]


def test_migrate_refuses_a_newer_sqlite_file_and_copies_nothing(pg_database, tmp_path):
    path, _ = _sqlite_site(tmp_path)
    conn = sqlite3.connect(tmp_path / "state" / "bounces.sqlite")
    conn.execute("PRAGMA user_version=9")
    conn.close()
    proc = cli(path, "migrate", "--to", pg_database.url, f"--password-file={pg_database.password_file}",
               check=False)
    assert proc.returncode == 75 and "schema version 9" in proc.stderr
    assert pg_database.psql("SELECT count(*) FROM members") == "0"


# -- db upgrade on SQLite -------------------------------------------------------------------
def test_db_upgrade_on_sqlite_makes_and_reports_every_file(tmp_path):
    from listmilter.store.db import Database
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\n")
    state = tmp_path / "state"
    old = Database(str(state / "pending.sqlite"), "pending database", pending.MIGRATIONS[:1])   # as 0.1 wrote it
    old.conn()
    old.close()
    out = cli(path, "db", "upgrade").stdout.splitlines()
    assert out == [f"{state}/listmilter.sqlite: created, schema version {len(sqlite.MIGRATIONS)}",
                   f"{state}/pending.sqlite: schema version 1 -> {len(pending.MIGRATIONS)}",
                   f"{state}/bounces.sqlite: created, schema version {len(bounce_records.MIGRATIONS)}"]
    assert all(line.endswith("nothing to do") for line in cli(path, "db", "upgrade").stdout.splitlines())


def test_deleting_a_list_deletes_its_members_and_settings(pg_database):
    store = PgStore(_target(pg_database))
    store.create_list(LIST, {"subject_prefix": "[dev]"})
    store.add_members(LIST, [Member("ann@example.net"), Member("bob@example.net")])
    store.delete_list(LIST)
    assert pg_database.psql("SELECT count(*) FROM members") == "0"
    assert pg_database.psql("SELECT count(*) FROM list_settings") == "0"
    store.create_list(LIST, {})
    assert store.members(LIST) == [] and store.get_list(LIST).settings == {}
    assert [e.action for e in store.history(LIST)] == ["subscribed", "subscribed"]    # the record stays
    with pytest.raises(NoSuchList):
        store.delete_list("nothing@example.org")


# -- the site's keys ------------------------------------------------------------------------
def test_keys_live_in_the_database_and_rotate_for_every_host(pg_database, tmp_path):
    from listmilter.store import key_source
    from listmilter.store.postgresql.stores import PgKeySource
    path = _config(tmp_path, pg_database)
    cfg = config.load(str(path))
    first = site_secret(cfg)
    assert first.ids == (0,) and site_secret(cfg) == first          # made once, then the same for all
    assert not (tmp_path / "state" / "secret").exists()              # nothing on this host's disk
    source = key_source(cfg)
    assert isinstance(source, PgKeySource) and source.keyring == first
    out = cli(path, "secret", "rotate", "--grace-days", "10").stdout
    assert out.startswith("key 1 is now current; links and envelope ids made with older keys work for 10 more")
    shown = cli(path, "secret", "show").stdout.splitlines()
    assert shown[0] == f"keys in site keys {pg_database.url}:"
    assert shown[1].startswith("key 1: current (makes new links and envelope ids), made ")
    assert shown[2].startswith("key 0: accepted until ") and "(10 days left)" in shown[2]
    ring = site_secret(cfg)
    assert ring.ids == (1, 0) and ring.secret(0) == first.secret(0)
    source._read_at -= PgKeySource.REFRESH                          # a long-running process, seconds later
    assert source.refresh().ids == (1, 0)
    cli(path, "secret", "rotate", "--grace-days", "0")
    assert site_secret(cfg).ids == (2,)                              # older keys refused at once


def test_check_warns_about_a_key_file_the_database_does_not_have(pg_database, tmp_path):
    from listmilter.store import secret as secret_mod
    path = _config(tmp_path, pg_database)
    site_secret(config.load(str(path)))
    secret_mod.load_or_create(str(tmp_path / "state"))             # made by this host before the move
    proc = cli(path, "check", check=False)
    assert "keys: current key 0, 0 older ones in the database" in proc.stdout
    assert (f"warning: {tmp_path}/state/secret holds keys the database does not: envelope ids and links made "
            "with them no longer verify") in proc.stderr
