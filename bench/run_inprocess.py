"""The Python work listmilter adds over the floor milter for one post, in process:
reading the members from the sqlite store and building the edits, against the
floor's own per-post Python work (the same (address, parameters) pairs built
from a list already in memory), in the same run.

    .venv/bin/python bench/run_inprocess.py [--members 100000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import machine, median, members, save

from listmilter.core import config as config_mod
from listmilter.core import plan
from listmilter.core.model import Member
from listmilter.store import open_store

LIST = "bench@example.org"
HEADERS = [("From", "alice@example.net"), ("To", LIST), ("Subject", "bench"),
           ("Message-ID", "<bench@example.net>"), ("Date", "Thu, 01 Jan 2026 00:00:00 +0000")]


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=100000)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lminprocess-"))
    try:
        (work / "c.yaml").write_text(f"state_dir: {work}/state\n")
        cfg = config_mod.load(str(work / "c.yaml"))
        store = open_store(cfg)
        store.create_list(LIST, {"posting": "open"})
        addrs = members(args.members)
        store.add_members(LIST, [Member(a) for a in addrs], "cli", "bench")
        ls = plan.effective_settings(LIST, cfg.list_settings(store.get_list(LIST).settings))
        secret = b"s" * 32
        secs = {
            "store.recipients (sqlite)": timed(lambda: store.recipients(LIST), args.repeat),
            "plan.expand_list": timed(lambda: plan.expand_list(ls, [f"<{LIST}>"], addrs, HEADERS, "Q1",
                                                               secret, time.time()), args.repeat),
            "floor: pairs from a list in memory": timed(
                lambda: [(f"<{m}>", f"NOTIFY=FAILURE ORCPT=rfc822;{m}") for m in addrs], args.repeat),
        }
        assert len(store.recipients(LIST)) == args.members
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.members} members, median of {args.repeat} (min in brackets), seconds:")
    for name, values in secs.items():
        print(f"  {name:<36} {median(values):7.3f}  ({min(values):.3f})")
    path = save("inprocess", {"machine": machine(), "args": vars(args), "seconds": secs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
