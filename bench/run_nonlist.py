"""What listmilter costs mail that is no list mail: the same Postfix, with and without the milter.

    .venv/bin/python bench/run_nonlist.py [--messages 3000] [--rounds 6] [--sessions 8]

On an MX every message passes the milter. One private Postfix relaying to Postfix's smtp-sink,
with four smtpd listeners: one with listmilter (serve, sqlite store with one list, as
docs/postfix.md wires it) as its milter, one with bench/floor_milter.py (a pymilter milter that
does nothing but accept at DATA: the least any pymilter milter costs), one with
bench/asyncio_floor_milter.py (the same answers from the milter protocol spoken in one asyncio
loop, without libmilter) and one with no milter.
smtp-source sends --messages single-recipient messages to people (no list) with --sessions
sessions into each listener in turn, each going first in turn per round. Messages a second from
smtp-source's start to the last `status=sent` in the Postfix log; the ratios to the listener
without a milter per round, and their medians. Beside them, the CPU each milter process used
per message: a figure that other load on the machine changes little, where it changes the rates.
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

from common import BenchPostfix, MaillogTail, SmtpSink, cpu_seconds, machine, save, stop_all

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import free_port, wait_for_port


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


KINDS = ("with", "bare", "async", "without")     # listmilter, floor_milter.py, asyncio_floor_milter.py, none


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
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, str(Path(__file__).with_name("floor_milter.py")),
                             "--socket", f"inet:{bare_port}@127.0.0.1"], stderr=subprocess.DEVNULL)
    async_port = free_port()
    floor_async = subprocess.Popen([sys.executable, str(Path(__file__).with_name("asyncio_floor_milter.py")),
                                    "--port", str(async_port)], stderr=subprocess.DEVNULL)
    postfix = None
    rounds = []
    try:
        wait_for_port(bare_port)
        wait_for_port(async_port)
        cli(lm.config_path, "list", "create", "dev@example.org")
        lm.start()
        postfix = BenchPostfix(milter=None, sink_port=sink.port, config_path=lm.config_path,
                               socketmap=lm.socketmap_spec, workdir=workdir / "postfix",
                               extra_listeners={"with": lm.milter_spec, "bare": f"inet:127.0.0.1:{bare_port}",
                                                "async": f"inet:127.0.0.1:{async_port}", "without": ""},
                               main_cf={"default_process_limit": "200"})
        postfix.start()
        pids = {"with": lm.proc.pid, "bare": bare.pid, "async": floor_async.pid}
        for kind in KINDS:                                   # warm-up
            run(postfix.ports[kind], 300, args.sessions, postfix)
        for r in range(args.rounds):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]      # each kind goes first in turn
            got = {}
            for kind in order:
                cpu = cpu_seconds(pids[kind]) if kind in pids else 0.0
                got[kind] = run(postfix.ports[kind], args.messages, args.sessions, postfix)
                if kind in pids:
                    got[f"{kind}_cpu_us"] = (cpu_seconds(pids[kind]) - cpu) / args.messages * 1e6
                time.sleep(1)
            got["ratio"] = got["with"] / got["without"]
            got["bare_ratio"] = got["bare"] / got["without"]
            got["async_ratio"] = got["async"] / got["without"]
            rounds.append(got)
            print(f"  round {r}: with listmilter {got['with']:5.0f}/s, with the floor milter {got['bare']:5.0f}/s, "
                  f"with the asyncio floor {got['async']:5.0f}/s, without {got['without']:5.0f}/s; ratios "
                  f"{got['ratio']:.2f}, {got['bare_ratio']:.2f} and {got['async_ratio']:.2f}; milter CPU a message: "
                  f"listmilter {got['with_cpu_us']:.0f} us, bare {got['bare_cpu_us']:.0f} us, "
                  f"asyncio {got['async_cpu_us']:.0f} us",
                  flush=True)
    finally:
        bare.terminate()
        floor_async.terminate()
        stop_all(postfix.stop if postfix else None, lm.stop, sink.stop, bare.wait, floor_async.wait)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)
    print(f"\nmedian over {len(rounds)} rounds: with listmilter {median('with'):.0f}/s, with the floor milter "
          f"{median('bare'):.0f}/s, with the asyncio floor {median('async'):.0f}/s, without {median('without'):.0f}/s")
    print(f"ratio with/without listmilter {median('ratio'):.2f}; floor milter/without {median('bare_ratio'):.2f}; "
          f"asyncio floor/without {median('async_ratio'):.2f}")
    print(f"milter CPU a message: listmilter {median('with_cpu_us'):.0f} us, "
          f"floor milter {median('bare_cpu_us'):.0f} us, asyncio floor {median('async_cpu_us'):.0f} us")
    out = save("nonlist", {"machine": machine(), "args": vars(args), "median_ratio": median("ratio"),
                           "median_bare_ratio": median("bare_ratio"), "median_async_ratio": median("async_ratio"),
                           "rounds": rounds})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
