"""The Python work a message to no list costs in the milter, in process: listmilter's callbacks
(connect, MAIL, RCPT, DATA, with its real sqlite store holding one list) against
bench/floor_milter.py's, driven by pymilter's Milter.testctx.TestCtx as libmilter would drive
them, in the same run. What neither includes is libmilter's own per-command work (threads, poll,
the socket), which run_nonlist.py measures through the real Postfix.

    .venv/bin/python bench/run_callbacks.py [--messages 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import Milter
import Milter.test  # noqa: F401  (makes @noreply callbacks answer CONTINUE under TestCtx)
from common import machine, median, save
from floor_milter import FloorMilter
from Milter.testctx import TestCtx

from listmilter.app.runtime import Runtime
from listmilter.core.model import Member
from listmilter.mta.milter import InFlight, ListMilter


def per_message_us(factory, messages: int) -> float:
    """Microseconds a message: a new connection (libmilter makes a new milter object per
    connection), MAIL, one RCPT to a person, DATA (where both accept a message to no list)."""
    Milter.factory = factory
    t0 = time.perf_counter()
    for _ in range(messages):
        ctx = TestCtx()
        ctx._setsymval("i", "4XyZ1s2B3c")
        ctx._connect()
        ctx.getpriv().connect("client.example.net", 2, ("192.0.2.1", 40000))
        ctx._envfrom("<alice@example.net>")
        ctx._envrcpt("<person@example.net>")
        if ctx._data() != Milter.ACCEPT:
            raise SystemExit("a message to no list was not accepted at DATA")
        ctx._close()
    return (time.perf_counter() - t0) / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lm-callbacks-"))
    try:
        config = root / "listmilter.yaml"
        config.write_text(f"state_dir: {root}/state\nsite:\n  admin: admin@example.net\n")
        runtime = Runtime(str(config))
        runtime.store.create_list("list1@example.org", {})
        runtime.store.add_members("list1@example.org", [Member("m@example.net")], "config", "bench")
        ListMilter.runtime = runtime            # as serve sets it
        ListMilter.in_flight = InFlight()
        rows = {"listmilter": [], "floor": []}
        for r in range(args.repeat):
            # Alternate which goes first, as the other benches do.
            order = [("listmilter", ListMilter), ("floor", FloorMilter)]
            for name, factory in (order if r % 2 == 0 else order[::-1]):
                rows[name].append(per_message_us(factory, args.messages))
        lm, floor = median(rows["listmilter"]), median(rows["floor"])
        print(f"per message to no list, median of {args.repeat}: listmilter {lm:.1f} us, "
              f"floor milter {floor:.1f} us; listmilter's own work {lm - floor:.1f} us")
        out = save("callbacks", {"machine": machine(), "args": vars(args), "runs_us": rows,
                                 "listmilter_us": lm, "floor_us": floor})
        print(f"wrote {out}")
        runtime.store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
