"""Member import benchmark: 100,000 members into a fresh sqlite store (and, with
--postgresql, into a fresh PostgreSQL database on a private server here), the
way an admin does it (whole CLI commands, Python start-up included), and how
long the yaml store takes to load a config file holding them.

Baselines in the same run, each a whole process as well: Python starting and
doing nothing, `listmilter --version` (start-up and argument parsing), and a
floor: a bare Python script that reads the same file and inserts every line in
one transaction into a fresh SQLite table of the same shape as listmilter's
members table (key, address, ...; primary key on list and key), with nothing
else (no validation, no consent record).

    .venv/bin/python bench/run_import.py [--members 100000] [--repeat 3] [--postgresql]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import machine, median, members, save, start_postgresql, store_config, write_members

from listmilter.core import config as config_mod
from listmilter.store import open_store


def timed(args: list[str], input: str | None = None, env: dict | None = None, ok=(0,)) -> float:
    t = time.perf_counter()
    proc = subprocess.run(args, input=input, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})
    elapsed = time.perf_counter() - t
    if proc.returncode not in ok or "Traceback" in proc.stderr:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return elapsed


# The floor: what any Python import of a file of addresses into SQLite costs at least.
FLOOR = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("CREATE TABLE members (list_id INTEGER NOT NULL, key TEXT NOT NULL, address TEXT NOT NULL,"
           " name TEXT NOT NULL DEFAULT '', attrs TEXT NOT NULL DEFAULT '{}',"
           " status TEXT NOT NULL DEFAULT 'active', added REAL NOT NULL, PRIMARY KEY (list_id, key))"
           " WITHOUT ROWID")
now = time.time()
with db, open(sys.argv[2]) as f:
    db.executemany("INSERT OR IGNORE INTO members(list_id, key, address, added) VALUES (1, ?, ?, ?)",
                   ((a.lower(), a, now) for a in (line.strip() for line in f) if a))
db.close()
"""


def write_config(folder: Path, backend: str = "sqlite", lists: dict | None = None, db=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"state_dir": str(folder / "state"), "store": store_config(backend, db),
           "log": {"target": str(folder / "listmilter.log")}}
    if lists:
        cfg["lists"] = lists
    path = folder / "listmilter.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _postgresql(work: Path, lm: list[str], file: Path, stdin_text: str, n: int, repeat: int,
                secs: dict) -> None:
    """The same commands with store.backend postgresql, each run on a new database."""
    server, _ = start_postgresql(work)
    try:
        for key in ("pg_members_import_fresh", "pg_members_add_stdin_fresh", "pg_members_import_again"):
            secs[key] = []
        for r in range(repeat):
            cfg = write_config(work / f"pg-{r}", "postgresql", db=server.new_database())
            timed(lm + ["-c", str(cfg), "list", "create", "a@example.org"])
            timed(lm + ["-c", str(cfg), "list", "create", "b@example.org"])
            secs["pg_members_import_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            secs["pg_members_add_stdin_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "add", "b@example.org", "-"], input=stdin_text))
            secs["pg_members_import_again"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            count = subprocess.run(lm + ["-c", str(cfg), "list", "show", "a@example.org"],
                                   capture_output=True, text=True).stdout
            assert f"members: {n}" in count, count
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--postgresql", action="store_true", help="also import into PostgreSQL (store.backend postgresql)")
    args = p.parse_args()
    n = args.members
    lm = [sys.executable, "-m", "listmilter"]
    work = Path(tempfile.mkdtemp(prefix="lmimport-"))
    results: dict = {"machine": machine(), "members": n, "repeat": args.repeat, "seconds": {}}
    secs = results["seconds"]
    try:
        addrs = members(n)
        file = write_members(work / "members.txt", addrs)
        stdin_text = file.read_text()

        secs["python_startup"] = [timed([sys.executable, "-c", "pass"]) for _ in range(args.repeat)]
        secs["listmilter_version"] = [timed(lm + ["--version"]) for _ in range(args.repeat)]
        secs["floor_python_sqlite"] = [timed([sys.executable, "-c", FLOOR, str(work / f"floor-{r}.sqlite"), str(file)])
                                       for r in range(args.repeat)]
        for key in ("members_import_fresh", "members_add_stdin_fresh", "members_import_again"):
            secs[key] = []
        for r in range(args.repeat):
            cfg = write_config(work / f"sqlite-{r}")
            timed(lm + ["-c", str(cfg), "list", "create", "a@example.org"])
            secs["members_import_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            # The store's size with this one list of n members (before list b is added).
            results["sqlite_file_bytes"] = os.path.getsize(work / f"sqlite-{r}" / "state" / "listmilter.sqlite")
            timed(lm + ["-c", str(cfg), "list", "create", "b@example.org"])
            secs["members_add_stdin_fresh"].append(
                timed(lm + ["-c", str(cfg), "members", "add", "b@example.org", "-"], input=stdin_text))
            # The same file again: every line already a member (INSERT OR IGNORE).
            secs["members_import_again"].append(
                timed(lm + ["-c", str(cfg), "members", "import", "a@example.org", str(file)]))
            count = subprocess.run(lm + ["-c", str(cfg), "list", "show", "a@example.org"],
                                   capture_output=True, text=True).stdout
            assert f"members: {n}" in count, count

        if args.postgresql:
            _postgresql(work, lm, file, stdin_text, n, args.repeat, secs)

        # yaml store: the members live in the config file; what it costs is loading it
        # (at start and at every reload after an edit).
        ycfg = write_config(work / "yaml", "yaml", {"a@example.org": {"members": addrs}})
        results["yaml_file_bytes"] = ycfg.stat().st_size
        secs["yaml_load_and_open"] = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            store = open_store(config_mod.load(str(ycfg)))
            secs["yaml_load_and_open"].append(time.perf_counter() - t)
            assert store.member_count("a@example.org") == n
        # check also asks postconf about Postfix: give it an empty Postfix config, so that costs
        # nothing (postconf's fatal exit on a missing main.cf sleeps 1 s); the missing milter
        # lines make check exit 1, which is not what is timed here.
        pf = work / "postfix"
        pf.mkdir()
        for name in ("main.cf", "master.cf"):
            (pf / name).write_text("")
            os.utime(pf / name, (time.time() - 10,) * 2)    # Postfix waits on a just-written file
        secs["yaml_check_command"] = [timed(lm + ["-c", str(ycfg), "check"], env={"MAIL_CONFIG": str(pf)}, ok=(0, 1))
                                      for _ in range(args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"{n} members, median of {args.repeat} (min in brackets), wall seconds of the whole command:")
    for key, values in secs.items():
        print(f"  {key:26} {median(values):7.3f}  ({min(values):.3f})")
    floor = median(secs["floor_python_sqlite"])
    print(f"  import / floor: {median(secs['members_import_fresh']) / floor:.2f}x; "
          f"add from stdin / floor: {median(secs['members_add_stdin_fresh']) / floor:.2f}x")
    print(f"  sqlite store with one list of {n} members: {results['sqlite_file_bytes']} bytes; "
          f"yaml config: {results['yaml_file_bytes']} bytes")
    path = save("import", results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
