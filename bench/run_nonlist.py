"""What listmilter costs mail that is no list mail: the same Postfix, with and without the milter.

    .venv/bin/python bench/run_nonlist.py [--messages 3000] [--rounds 6] [--sessions 8]

On an MX every message passes the milter. One private Postfix relaying to Postfix's smtp-sink,
with two smtpd listeners: one with listmilter (serve, sqlite store with one list, as
docs/postfix.md wires it) as its milter, one with no milter. smtp-source sends --messages
single-recipient messages to people (no list) with --sessions sessions into one listener, then
the other, alternating which goes first per round. Messages a second from smtp-source's start
to the last `status=sent` in the Postfix log; the ratio with/without per round, and its median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BenchPostfix, MaillogTail, SmtpSink, machine, save, stop_all

from tests.bed.listmilter import ListmilterServer, cli


def run(port: int, n: int, sessions: int, postfix: BenchPostfix) -> float:
    """Messages a second, smtp-source's start to the n-th delivery."""
    tail = MaillogTail(postfix.dir / "maillog")
    t0 = time.perf_counter()
    subprocess.run(["smtp-source", "-s", str(sessions), "-m", str(n), "-l", "2000", "-f", "alice@example.net",
                    "-t", "person@example.net", "-N", "-d", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    deadline = time.monotonic() + 600
    while sum(tail.sent.values()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(tail.sent.values())} of {n} delivered")
        time.sleep(0.02)
        tail.poll()
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-nonlist-"))
    workdir.chmod(0o755)
    sink = SmtpSink().start()
    lm = ListmilterServer(workdir / "listmilter", "sqlite")
    postfix = None
    rounds = []
    try:
        cli(lm.config_path, "list", "create", "dev@example.org")
        lm.start()
        postfix = BenchPostfix(milter=None, sink_port=sink.port, config_path=lm.config_path,
                               socketmap=lm.socketmap_spec, workdir=workdir / "postfix",
                               extra_listeners={"with": lm.milter_spec, "without": ""},
                               main_cf={"default_process_limit": "200"})
        postfix.start()
        with_port, without_port = postfix.ports["with"], postfix.ports["without"]
        run(with_port, 300, args.sessions, postfix)          # warm-up
        run(without_port, 300, args.sessions, postfix)
        for r in range(args.rounds):
            order = ["with", "without"] if r % 2 == 0 else ["without", "with"]
            got = {}
            for kind in order:
                got[kind] = run(postfix.ports[kind], args.messages, args.sessions, postfix)
                time.sleep(1)
            got["ratio"] = got["with"] / got["without"]
            rounds.append(got)
            print(f"  round {r}: with listmilter {got['with']:7.0f}/s, without {got['without']:7.0f}/s, "
                  f"ratio {got['ratio']:.2f}", flush=True)
    finally:
        stop_all(postfix.stop if postfix else None, lm.stop, sink.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"\nmedian ratio with/without listmilter over {len(rounds)} rounds: {ratio:.2f} "
          f"(with {statistics.median(r['with'] for r in rounds):.0f}/s, "
          f"without {statistics.median(r['without'] for r in rounds):.0f}/s)")
    out = save("nonlist", {"machine": machine(), "args": vars(args), "median_ratio": ratio, "rounds": rounds})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
