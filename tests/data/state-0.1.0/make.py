"""Make the 0.1.0 state-folder fixtures with the 0.1.0 code itself.

    .venv/bin/python tests/data/state-0.1.0/make.py                # write the fixtures
    .venv/bin/python tests/data/state-0.1.0/make.py --going-back   # can 0.1.0 read them upgraded?

Checks out two commits of this repository in temporary `git worktree`s and
runs a few lines of each one's own API (not today's) to write:

- fb10f03, the last main of release 0.1.0: listmilter.sqlite (schema 2),
  bounces.sqlite and pending.sqlite (no schema version), state.sqlite (the
  yaml backend's overlay, schema 2), into this folder;
- eb85f79, the first 0.1 schema: listmilter.sqlite (schema 1), into schema-1/.

It writes made.json too: the commits, and the pending request's token (only
its hash is stored). tests/test_upgrade.py opens copies with today's code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
RELEASE = "fb10f03"      # the last main of release 0.1.0
FIRST = "eb85f79"        # the first commit with a schema (store only, version 1)
T = 1796126400.0         # 2026-12-01 12:00 UTC: the time the bounce and the request carry

# Run by the 0.1.0 code (PYTHONPATH = its worktree); argv: out folder, yaml lists file.
AT_RELEASE = r'''
import json, os, sys
import listmilter
assert listmilter.__file__.startswith(os.environ["PYTHONPATH"]), listmilter.__file__
from listmilter import bouncedb, bounces, config, tokens
from listmilter.store import DISABLED, Member
from listmilter.store.sqlite import SQLiteStore
from listmilter.store.yamlstore import YAMLStore

out, lists_file, T = sys.argv[1], sys.argv[2], float(sys.argv[3])
LIST = "dev@example.org"

store = SQLiteStore(os.path.join(out, "listmilter.sqlite"))
store.create_list(LIST, {"owners": ["owner@example.org"], "subject_prefix": "[dev]", "bounce_threshold": 3})
store.create_list("quiet@example.org", {})
store.add_members(LIST, [Member("Ann@Example.net", "Ann Example", {"lang": "en"}),
                         Member("bob@example.net"), Member("carol@example.net")], "cli", "root")
store.set_status(LIST, "bob@example.net", DISABLED, "bounce", detail="5.1.1")
store.unsubscribe(LIST, "carol@example.net", "web", "192.0.2.7")
store.close()

db = bouncedb.BounceDB(out)
db.record(LIST, bounces.Failure("bob@example.net", True, "5.1.1", "550 5.1.1 no such user"),
          bouncedb.SCORED, "P1.envid", "P1", bounces.Policy("disable", 3), T)
db.record(LIST, bounces.Failure("Ann@Example.net", False, "4.2.2", "452 4.2.2 mailbox full"),
          bouncedb.TEMPORARY, "P1.envid", "P1", None, T + 60)
db.close()

pending = tokens.PendingDB(out)
token = pending.create(tokens.CONFIRM, LIST, "Dave@example.net", "subscribe", 3, "Dave",
                       "mail", "<req1@example.net>", now=T)
pending.record_sent(LIST, "Dave@example.net", "confirm", now=T)
pending.close()

cfg_path = os.path.join(os.path.dirname(out), "yaml.yaml")
with open(cfg_path, "w") as f:
    f.write(f"state_dir: {out}\nstore:\n  backend: yaml\n" + open(lists_file).read())
yaml_store = YAMLStore(config.load(cfg_path))
yaml_store.subscribe(LIST, Member("erin@example.net", "Erin"), "mail", "<s1@example.net>")
yaml_store.set_status(LIST, "bob@example.net", DISABLED, "bounce", detail="5.1.1")
yaml_store.unsubscribe(LIST, "ann@example.net", "web", "192.0.2.8")
yaml_store.close()
print(json.dumps({"token": token}))
'''

AT_FIRST = r'''
import os, sys
import listmilter
assert listmilter.__file__.startswith(os.environ["PYTHONPATH"]), listmilter.__file__
from listmilter.store import Member
from listmilter.store.sqlite import SQLiteStore

store = SQLiteStore(os.path.join(sys.argv[1], "listmilter.sqlite"))
store.create_list("dev@example.org", {"owners": ["owner@example.org"]})
store.add_members("dev@example.org", [Member("Ann@Example.net", "Ann Example"), Member("bob@example.net")])
store.close()
'''


# Going back: 0.1.0 reading a copy of the fixtures after today's code upgraded them.
READ_AT_RELEASE = r'''
import os, sys
import listmilter
assert listmilter.__file__.startswith(os.environ["PYTHONPATH"]), listmilter.__file__
from listmilter import bouncedb, config, tokens
from listmilter.store.sqlite import SQLiteStore
from listmilter.store.yamlstore import YAMLStore

out, token = sys.argv[1], sys.argv[2]
LIST = "dev@example.org"
store = SQLiteStore(os.path.join(out, "listmilter.sqlite"), create=False)
print("listmilter.sqlite members:", [(m.address, m.status) for m in store.members(LIST)])
cfg_path = os.path.join(os.path.dirname(out), "yaml.yaml")
print("state.sqlite members:", [(m.address, m.status) for m in YAMLStore(config.load(cfg_path)).members(LIST)])
print("pending.sqlite request:", tokens.PendingDB(out).lookup(token).address)
print("bounces.sqlite scores:", [(r.address, r.score) for r in bouncedb.BounceDB(out).rows(LIST)])
'''


@contextlib.contextmanager
def checkout(commit: str):
    """A temporary `git worktree` of `commit`."""
    with tempfile.TemporaryDirectory(prefix="listmilter-0.1.0-") as tmp:
        tree = os.path.join(tmp, "tree")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tree, commit], check=True,
                       capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree], check=True)


def run_at(tree: str, code: str, work: Path, *args: str) -> str:
    """Run `code` with the listmilter of `tree` on the state folder `work`; its stdout."""
    return subprocess.run([sys.executable, "-c", code, str(work), *args], check=True, capture_output=True,
                          text=True, cwd=work.parent, env={**os.environ, "PYTHONPATH": tree}).stdout


def make(commit: str, code: str, out: Path, *args: str) -> str:
    with checkout(commit) as tree, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "state"
        work.mkdir()
        stdout = run_at(tree, code, work, *args)
        out.mkdir(parents=True, exist_ok=True)
        for db in sorted(work.glob("*.sqlite")):
            leftovers = [p.name for p in work.glob(db.name + "-*")]
            assert not leftovers, f"{leftovers}: a connection was left open"
            for stale in ("-wal", "-shm"):      # from opening a fixture in place: not this file's
                (out / (db.name + stale)).unlink(missing_ok=True)
            (out / db.name).write_bytes(db.read_bytes())
            version = sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0]
            print(f"{commit}: {out / db.name}: {db.stat().st_size} bytes, user_version {version}")
        return stdout


def going_back() -> None:
    """Upgrade a copy with this checkout's code, then read it with 0.1.0's."""
    sys.path.insert(0, str(REPO))
    from listmilter.core import config
    from listmilter.store import open_store
    from listmilter.store.bounce_records import BounceDB
    from listmilter.store.pending import PendingDB
    made = json.loads((HERE / "made.json").read_text())
    with checkout(RELEASE) as tree, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "state"
        work.mkdir()
        for db in HERE.glob("*.sqlite"):
            shutil.copy(db, work)
        (work.parent / "yaml.yaml").write_text(f"state_dir: {work}\nstore:\n  backend: yaml\n"
                                               + (HERE / "yaml-lists.yaml").read_text())
        (work.parent / "sqlite.yaml").write_text(f"state_dir: {work}\n")
        for name in ("sqlite.yaml", "yaml.yaml"):
            open_store(config.load(str(work.parent / name))).members("dev@example.org")
        PendingDB(str(work)).lookup(made["token"])
        BounceDB(str(work)).close()
        for db in sorted(work.glob("*.sqlite")):
            print(f"upgraded {db.name}: user_version", sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0])
        print(run_at(tree, READ_AT_RELEASE, work, made["token"]), end="")


def main() -> None:
    if sys.argv[1:] == ["--going-back"]:
        going_back()
        return
    made = json.loads(make(RELEASE, AT_RELEASE, HERE, str(HERE / "yaml-lists.yaml"), repr(T)))
    make(FIRST, AT_FIRST, HERE / "schema-1")
    made.update({"release": RELEASE, "first": FIRST, "time": T})
    (HERE / "made.json").write_text(json.dumps(made, indent=2) + "\n")


if __name__ == "__main__":
    main()
