"""`listmilter db upgrade` and `listmilter migrate`: the state databases' schema, and moving to PostgreSQL."""

from __future__ import annotations

import os
import sqlite3
from os import EX_TEMPFAIL, EX_USAGE

from listmilter.cli.common import Fail


def add_parsers(sub) -> None:
    d = sub.add_parser("db", help="the state databases (SQLite files or PostgreSQL)")
    ds = d.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ds.add_parser("upgrade", help="bring the databases to this listmilter's schema (create them if new)")
    s.set_defaults(handler=upgrade)

    s = sub.add_parser("migrate", help="copy this config's SQLite state (or yaml overlay) into PostgreSQL")
    s.add_argument("--to", required=True, metavar="DSN",
                   help="the PostgreSQL database: postgresql://USER@HOST/DB or 'host=... dbname=... user=...'")
    s.add_argument("--password-file", metavar="FILE",
                   help="the database password, first line (default: PGPASSWORD or ~/.pgpass)")
    s.add_argument("--force", action="store_true",
                   help="empty the target first if it holds anything (default: refuse a non-empty target)")
    s.set_defaults(handler=migrate)


def _load(path: str, explicit: bool):
    from listmilter.core import config as config_mod
    from listmilter.log import setup
    setup("stderr")
    return config_mod.load(path, explicit)


def upgrade(args, path: str, explicit: bool) -> int:
    from listmilter.store import StoreError
    cfg = _load(path, explicit)
    try:
        if cfg.dsn:
            from listmilter.store.postgresql import db as pgdb
            target = pgdb.target_of(cfg)
            print(_line(target.describe, *pgdb.upgrade(target)))
            return 0
        for where, was, now in _upgrade_sqlite(cfg):
            print(_line(where, was, now))
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    return 0


def _line(where: str, before: int | None, after: int) -> str:
    if before is None:
        return f"{where}: created, schema version {after}"
    if before == after:
        return f"{where}: schema version {after}, nothing to do"
    return f"{where}: schema version {before} -> {after}"


def _upgrade_sqlite(cfg) -> list[tuple[str, int | None, int]]:
    """Every SQLite database of this config, opened through its class (which upgrades it)."""
    from listmilter.store import bounce_records, pending, sqlite
    from listmilter.store.db import Database
    from listmilter.store.yamlstore import OVERLAY_NAME
    files: list[tuple[str, str, tuple[str, ...]]] = [
        (os.path.join(cfg.state_dir, pending.FILE_NAME), "pending database", pending.MIGRATIONS),
        (os.path.join(cfg.state_dir, bounce_records.NAME), "bounce database", bounce_records.MIGRATIONS)]
    if cfg.backend == "sqlite":
        files.insert(0, (cfg.store_path, "sqlite store", sqlite.MIGRATIONS))
    elif os.path.exists(os.path.join(cfg.state_dir, OVERLAY_NAME)):    # made when first needed
        files.insert(0, (os.path.join(cfg.state_dir, OVERLAY_NAME), "yaml overlay", sqlite.MIGRATIONS))
    out = []
    for path, name, migrations in files:
        before = _user_version(path)
        db = Database(path, name, migrations)
        try:
            db.conn()
        finally:
            db.close()
        out.append((path, before, len(migrations)))
    return out


def _user_version(path: str) -> int | None:
    if not os.path.exists(path):
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0         # the class's open says what is wrong with it


def migrate(args, path: str, explicit: bool) -> int:
    from listmilter.store import StoreError
    from listmilter.store.postgresql import copy
    from listmilter.store.postgresql import db as pgdb
    cfg = _load(path, explicit)
    if args.password_file and not os.path.isabs(args.password_file):
        raise Fail("--password-file must be an absolute path (it goes into the config as store.password_file)",
                   EX_USAGE)
    target = pgdb.Target(args.to, args.password_file)
    try:
        counted = copy.copy_state(cfg, target, replace=args.force)
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    print(f"copied {cfg.state_dir} ({cfg.backend}) into {target.describe}:")
    for c in counted:
        print(f"  {c.table:14} {c.source:>9} rows, {c.target:>9} in PostgreSQL")
    print("Counts verified. Now set in the config file (docs/upgrade.md):")
    print("  store:")
    print(f"    backend: {'yaml' if cfg.backend == 'yaml' else 'postgresql'}")
    print(f"    dsn: \"{_without_password(args.to)}\"")
    if args.password_file:
        print(f"    password_file: {args.password_file}")
    return 0


def _without_password(dsn: str) -> str:
    """The DSN as the config file should hold it."""
    from psycopg import conninfo
    try:
        d = conninfo.conninfo_to_dict(dsn)
    except Exception:
        return dsn
    if "password" not in d:
        return dsn
    d.pop("password")
    return conninfo.make_conninfo("", **{k: str(v) for k, v in d.items() if v is not None})
