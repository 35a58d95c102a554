"""What a post's expansion reads from the store, in process: `recipients()` of an
N-member list from SQLite and from PostgreSQL (a private server here, fsync on),
alternating, so both see the same machine load. The part of an expansion the
store decides; the rest (libmilter's ADDRCPT packets, Postfix) is the floor's too.

    .venv/bin/python bench/run_read.py [--members 100000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, median, members, save, start_postgresql

from listmilter.core.model import Member
from listmilter.store.postgresql import db as pgdb
from listmilter.store.postgresql.stores import PgStore
from listmilter.store.sqlite import SQLiteStore

LIST = "bench@example.org"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lmread-"))
    server, db = start_postgresql(work)
    times: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    try:
        addrs = [Member(a) for a in members(args.members)]
        stores = {"sqlite": SQLiteStore(str(work / "listmilter.sqlite")),
                  "postgresql": PgStore(pgdb.Target(db.dsn, db.password_file))}
        for store in stores.values():
            store.create_list(LIST, {})
            store.add_members(LIST, addrs)
            store.recipients(LIST)          # warm: connection, caches
        for _ in range(args.repeat):
            for name, store in stores.items():
                t = time.perf_counter()
                got = store.recipients(LIST)
                times[name].append(time.perf_counter() - t)
                assert len(got) == args.members
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"recipients() of {args.members} members, median of {args.repeat} (min):")
    for name, values in times.items():
        print(f"  {name:10} {median(values):.3f} s  ({min(values):.3f})")
    path = save("read", {"machine": machine(), "args": vars(args), "seconds": times})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
