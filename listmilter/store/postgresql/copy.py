"""`listmilter migrate`: a state folder's SQLite databases and secret into PostgreSQL.

What is copied, from the config's state folder:

    listmilter.sqlite (store.backend sqlite)    lists, list_settings, members, events, posts,
                                                reports_sent
    or state.sqlite (the yaml overlay)
    pending.sqlite                              pending, sent, held
    bounces.sqlite                              scores, bounces
    secret, secret.keys                         site_keys (with their ids and grace periods)

Each SQLite file is first opened through its own class, so it is brought to
this version's schema and its columns are the PostgreSQL tables' columns.
Everything is written in one PostgreSQL transaction, the row counts of every
table are compared with the source's before it commits, and a difference
rolls it all back. A target that holds anything is refused unless `replace`
is given (then it is emptied first, in the same transaction).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

import psycopg

from listmilter.core.errors import PermanentError
from listmilter.store import StoreError
from listmilter.store.postgresql import db as pgdb
from listmilter.store.postgresql.stores import LISTS_POSTGRESQL, LISTS_YAML

LIST_TABLES = ("lists", "list_settings", "members", "events", "posts", "reports_sent")
PENDING_TABLES = ("pending", "sent", "held")
BOUNCE_TABLES = ("scores", "bounces")
# Emptied by `replace`; also what "not empty" looks at.
DATA_TABLES = LIST_TABLES + PENDING_TABLES + BOUNCE_TABLES + ("site_keys",)


class NotEmpty(PermanentError):
    """The target holds state already; copying into it would mix two sites."""


@dataclass(frozen=True)
class Counted:
    table: str
    source: int
    target: int


def sources(config) -> list[tuple[str | None, tuple[str, ...]]]:
    """(SQLite file, or None when there is none; its tables), each brought to this version's schema."""
    from listmilter.store import bounce_records, pending, sqlite
    from listmilter.store.db import Database
    from listmilter.store.yamlstore import OVERLAY_NAME
    lists_path = os.path.join(config.state_dir, OVERLAY_NAME) if config.backend == "yaml" else config.store_path
    out: list[tuple[str | None, tuple[str, ...]]] = []
    for path, tables, migrations in (
            (lists_path, LIST_TABLES, sqlite.MIGRATIONS),
            (os.path.join(config.state_dir, pending.FILE_NAME), PENDING_TABLES, pending.MIGRATIONS),
            (os.path.join(config.state_dir, bounce_records.NAME), BOUNCE_TABLES, bounce_records.MIGRATIONS)):
        if not os.path.exists(path):
            out.append((None, tables))
            continue
        db = Database(path, "SQLite database", migrations, create=False)
        try:
            db.conn()          # upgraded to this version's schema, or refused if newer
        finally:
            db.close()
        out.append((path, tables))
    return out


def _columns(raw: psycopg.Connection, table: str) -> list[str]:
    return [r[0] for r in raw.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = %s ORDER BY ordinal_position", (table,))]


def counts(raw: psycopg.Connection) -> dict[str, int]:
    return {t: _one(raw, f"SELECT count(*) FROM {t}") for t in DATA_TABLES}


def _one(raw: psycopg.Connection, query: str) -> int:
    row = raw.execute(query).fetchone()
    assert row is not None        # an aggregate always has a row
    return int(row[0])


def copy_state(config, target: pgdb.Target, replace: bool = False) -> list[Counted]:
    """Copy; returns the counts compared. Raises StoreError (nothing written) on any failure."""
    if config.dsn:
        raise StoreError("this config already keeps its state in PostgreSQL (store.dsn); migrate copies "
                         "a state folder's SQLite files: run it with the config used before")
    pgdb.upgrade(target)                           # the schema first: the copy needs its tables
    files = sources(config)
    describe = f"postgresql database {target.describe}"
    try:
        with psycopg.connect(target.dsn, **target.connect_kwargs()) as raw, raw.transaction():
            # Nobody else writes while we copy: listmilter on another host would wait here.
            raw.execute("LOCK TABLE " + ", ".join(DATA_TABLES) + ", meta IN EXCLUSIVE MODE")
            held = {t: n for t, n in counts(raw).items() if n}
            if held and not replace:
                raise NotEmpty(f"{describe} is not empty ("
                                 + ", ".join(f"{t}: {n}" for t, n in held.items())
                                 + "): nothing copied; --force replaces what it holds")
            if replace:
                raw.execute("TRUNCATE " + ", ".join(DATA_TABLES) + " RESTART IDENTITY")
                raw.execute("DELETE FROM meta WHERE name = 'lists'")
            result = []
            for path, tables in files:
                src = sqlite3.connect(f"file:{path}?mode=ro", uri=True) if path else None
                try:
                    if src is not None:
                        src.execute("BEGIN")             # one snapshot of the file
                    for table in tables:
                        result.append(_copy_table(raw, src, table))
                finally:
                    if src is not None:
                        src.close()
            result.append(_copy_keys(raw, config.state_dir))
            raw.execute("INSERT INTO meta(name, value) VALUES ('lists', %s)",
                        (LISTS_YAML if config.backend == "yaml" else LISTS_POSTGRESQL,))
            for table in ("lists", "events", "bounces"):    # identity columns continue after the copied ids
                raw.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                            f"coalesce(max(id), 0) + 1, false) FROM {table}")
            after = counts(raw)
            wrong = [c for c in result if after[c.table] != c.source]
            if wrong:
                raise StoreError(f"{describe}: counts differ after the copy ("
                                 + ", ".join(f"{c.table}: {c.source} in SQLite, {after[c.table]} copied"
                                             for c in wrong) + "); nothing copied")
            return [Counted(c.table, c.source, after[c.table]) for c in result]
    except psycopg.Error as e:
        raise StoreError(f"{describe}: {pgdb.one_line(e)}; nothing copied") from e
    except sqlite3.Error as e:
        raise StoreError(f"reading the SQLite databases in {config.state_dir}: {e}; nothing copied") from e


def _copy_table(raw: psycopg.Connection, src: sqlite3.Connection | None, table: str) -> Counted:
    if src is None:
        return Counted(table, 0, 0)
    columns = _columns(raw, table)
    have = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
    if sorted(have) != sorted(columns):
        raise StoreError(f"table {table}: SQLite has columns {', '.join(have)}, PostgreSQL "
                         f"{', '.join(columns)}; nothing copied")
    n = 0
    cols = ", ".join(columns)
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
        for row in src.execute(f"SELECT {cols} FROM {table}"):
            copy.write_row(pgdb.clean(row))
            n += 1
    return Counted(table, n, n)


def _copy_keys(raw: psycopg.Connection, state_dir: str) -> Counted:
    """The site's keys (the `secret` file as key 0, and `secret.keys` after rotations) with their
    ids and grace periods: ENVIDs, tokens and links made with them keep working."""
    from listmilter.store import secret as secret_mod
    try:
        keys = secret_mod.read_keys(state_dir) or []
    except (secret_mod.SecretError, OSError) as e:
        raise StoreError(f"the site's keys in {state_dir}: {e}; nothing copied") from None
    for key in keys:
        raw.execute("INSERT INTO site_keys(id, secret, created, until) VALUES (%s, %s, %s, %s)",
                    (key.id, key.secret, key.created, key.until))
    return Counted("site_keys", len(keys), len(keys))
