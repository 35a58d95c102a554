"""Personal posts fanned out from Postfix's queue against Postfix's own floor and in-place expansion.

    .venv/bin/python bench/run_fanout.py [--sizes 1000,10000,100000] [--repeat 3] [--big-members 1000]

One listmilter (sqlite store, web.base_url set: one-click lists go out per member) as the milter
of one private Postfix, with its re-injection listener (docs/postfix.md) as outgoing.reinject,
relaying to Postfix's smtp-sink (C). For each size N, in alternating order per round:

- floor:    smtp-source, 8 sessions, N single-recipient messages of a personal copy's size into
            the re-injection listener (what Postfix itself does with N messages, no listmilter);
- personal: one post to a one_click list of N members (the fan-out: 8 pipelined sessions);
- in place: one post to a one_click: false list of N members (one queue file for all).

Times are from the final "." of DATA (smtp-source's start for the floor) to the 250 reply and to
the N-th `status=sent` in the Postfix log after it. serve's peak resident memory (VmHWM) is read
after each size, and the peak of every listmilter process is sampled 20 times a second. First (after
a warm-up) one post of a 1 MB message to a personal list of --big-members members, for memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    BIG_LIMITS,
    MaillogTail,
    SmtpSink,
    machine,
    median,
    members,
    save,
    stop_all,
    submit_post,
    write_members,
)

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import free_port
from tests.bed.postfix import Postfix

BODY_LINE = "This is a benchmark post, line of text.\r\n"


def message(to: str, size: int) -> bytes:
    body = BODY_LINE * max(1, size // len(BODY_LINE))
    return (f"From: alice@example.net\r\nTo: {to}\r\nSubject: bench\r\n"
            f"Message-ID: <bench.{time.time_ns()}@example.net>\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
            f"{body}").encode()


class PeakRss:
    """The highest resident memory (MiB) of any `listmilter` process, sampled while running."""

    def __init__(self) -> None:
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read()
                    # serve, web and `deliver` (not Postfix's pipe, whose argv names listmilter too)
                    if not cmd.startswith((b"/", b"python")) or b"-m\0listmilter" not in cmd \
                            and b"bin/listmilter" not in cmd or b"run_fanout" in cmd:
                        continue
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                self.peak = max(self.peak, int(line.split()[1]) / 1024)
                except OSError:
                    pass
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def wait_sent(tail: MaillogTail, n: int, t0: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while sum(tail.sent.values()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(tail.sent.values())} of {n} delivered after {timeout}s")
        time.sleep(0.02)
        tail.poll()
    return time.perf_counter() - t0


def post(port: int, list_address: str, n: int, size: int, postfix: Postfix, timeout: float) -> dict:
    tail = MaillogTail(postfix.dir / "maillog")
    t0, t_250, _ = submit_post(port, list_address, message(list_address, size), 600)
    return {"to_250": t_250, "to_last": wait_sent(tail, n, t0, timeout)}


def floor(port: int, n: int, size: int, postfix: Postfix, timeout: float) -> dict:
    """smtp-source: n messages of `size` bytes, one recipient each, 8 sessions, into `port`."""
    tail = MaillogTail(postfix.dir / "maillog")
    t0 = time.perf_counter()
    subprocess.run(["smtp-source", "-s", "8", "-m", str(n), "-l", str(size), "-f", "alice@example.net",
                    "-t", "floor@example.net", "-N", "-d", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    t_submitted = time.perf_counter() - t0
    return {"to_250": t_submitted, "to_last": wait_sent(tail, n, t0, timeout)}


def drained(postfix: Postfix, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not postfix.queue_empty():
        if time.monotonic() > deadline:
            raise TimeoutError("queue not empty")
        time.sleep(0.2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--big-members", type=int, default=1000)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-fanout-"))
    workdir.chmod(0o755)
    sink = SmtpSink().start()
    reinject = free_port()
    lm = ListmilterServer(workdir / "listmilter", "sqlite",
                          extra={"web": {"base_url": "https://lists.example.org"}})
    lm.reinject_port = reinject
    postfix = None
    runs, memory = [], []
    started = time.perf_counter()
    try:
        for n in sorted(set(sizes + [args.big_members])):
            path = write_members(workdir / f"members-{n}.txt", members(n))
            for kind, one_click in (("inplace", "false"), ("personal", "true")):
                address = f"{kind}{n}@example.org"
                cli(lm.config_path, "list", "create", address, "--posting", "open")
                cli(lm.config_path, "list", "set", address, "one_click", one_click)
                cli(lm.config_path, "members", "import", address, str(path))
        postfix = Postfix(milter=lm.milter_spec, sink_port=sink.port, config_path=lm.config_path,
                          socketmap=lm.socketmap_spec, workdir=workdir / "postfix",
                          main_cf={**BIG_LIMITS, "listmilter_time_limit": "3600s",
                                   "default_process_limit": "200"}, reinject_port=reinject)
        lm.outgoing_port = postfix.port
        lm.write_config()
        lm.start()
        postfix.start()
        # The size of one personal copy (headers with the one-click link), for the floor's messages.
        copy_size = len(message("x@example.org", 1200)) + 600
        post(postfix.port, f"personal{sizes[0]}@example.org", sizes[0], 1200, postfix, 600)     # warm-up
        drained(postfix)
        # The big message first, while serve's heap holds no big list yet (Python keeps what it took).
        with PeakRss() as peak:
            big = post(postfix.port, f"personal{args.big_members}@example.org", args.big_members,
                       1 << 20, postfix, 1800)
            drained(postfix, 1800)
        memory.append({"members": args.big_members, "message": "1 MB", "peak_rss_mib": round(peak.peak, 1),
                       **big})
        print(f"  1 MB to {args.big_members}: 250 after {big['to_250']:.3f} s, last after {big['to_last']:.1f} s, "
              f"peak RSS {peak.peak:.1f} MiB", flush=True)
        for n in sizes:
            with PeakRss() as peak:
                for r in range(args.repeat):
                    kinds = ["floor", "personal", "inplace"]
                    order = kinds if r % 2 == 0 else kinds[::-1]
                    for kind in order:
                        timeout = 60 + n / 50
                        if kind == "floor":
                            res = floor(reinject, n, copy_size, postfix, timeout)
                        else:
                            res = post(postfix.port, f"{kind}{n}@example.org", n, 1200, postfix, timeout)
                        drained(postfix)
                        res.update(kind=kind, members=n, round=r)
                        runs.append(res)
                        print(f"  {kind:8} n={n:<7} 250 after {res['to_250']:8.3f} s, last delivery after "
                              f"{res['to_last']:8.3f} s", flush=True)
                        time.sleep(1)
            memory.append({"members": n, "peak_rss_mib": round(peak.peak, 1)})
    finally:
        stop_all(postfix.stop if postfix else None, lm.stop, sink.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for n in sizes:
        row = {"members": n}
        for kind in ("floor", "personal", "inplace"):
            sel = [r for r in runs if r["kind"] == kind and r["members"] == n]
            row[f"{kind}_250"] = median([r["to_250"] for r in sel])
            row[f"{kind}_last"] = median([r["to_last"] for r in sel])
        row["personal_vs_floor"] = row["personal_last"] / row["floor_last"]
        row["wait_vs_inplace"] = row["personal_250"] / row["inplace_250"]
        row["peak_rss_mib"] = next(m["peak_rss_mib"] for m in memory if m["members"] == n and "message" not in m)
        rows.append(row)
    print(f"\nmedian of {args.repeat} rounds; seconds")
    head = (f"{'members':>8} | {'poster waits: in place':>22} {'personal':>9} | {'last delivery: floor':>20} "
            f"{'personal':>9} {'ratio':>6} {'in place':>9} | {'peak RSS MiB':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['members']:>8} | {r['inplace_250']:22.3f} {r['personal_250']:9.3f} | {r['floor_last']:20.2f} "
              f"{r['personal_last']:9.2f} {r['personal_vs_floor']:6.2f} {r['inplace_last']:9.2f} | "
              f"{r['peak_rss_mib']:12.1f}")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    out = save("fanout", {"machine": machine(), "args": vars(args), "summary": rows, "memory": memory,
                          "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
