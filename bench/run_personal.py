"""Personal copies (one-click List-Unsubscribe) against in-place expansion, same Postfix, same run.

    .venv/bin/python bench/run_personal.py [--sizes 100,1000,5000] [--repeat 3]

One listmilter (sqlite store, web.base_url configured) as the milter of one
private Postfix relaying to smtp-sink. For each size N, two lists with the
same N members: `inplaceN@` (one_click: false: the milter expands the post
in place, one queue file for all) and `personalN@` (one_click: true: the
milter re-submits one copy per member through outgoing: SMTP to the same
Postfix, then discards the original). Times from the final "." of DATA to
the 250 reply (every personal copy is queued by then) and to the N-th
`status=sent` line in the Postfix log after the post.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import (
    BIG_LIMITS,
    MaillogTail,
    SmtpSink,
    machine,
    median,
    members,
    message,
    rss,
    save,
    stop_all,
    submit_post,
    wait_queue_empty,
    write_members,
)

from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.postfix import Postfix


def post(port: int, list_address: str, n: int, tail: MaillogTail, timeout: float = 1200.0) -> dict:
    """One post; seconds to the 250 and to the n-th delivery logged after it (any queue id)."""
    before = sum(tail.sent.values())
    t0, t_250, _ = submit_post(port, list_address, message(list_address, n), timeout)
    deadline = time.monotonic() + timeout
    while True:
        tail.poll()
        if sum(tail.sent.values()) - before >= n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(tail.sent.values()) - before} of {n} delivered after {timeout}s")
        time.sleep(0.01)
    return {"to_250": t_250, "to_last_delivery": time.perf_counter() - t0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1000,5000")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    workdir = Path(tempfile.mkdtemp(prefix="lmbench-personal-"))
    workdir.chmod(0o755)
    sink = SmtpSink().start()
    lm = ListmilterServer(workdir / "listmilter", "sqlite",
                          extra={"web": {"base_url": "https://lists.example.org"}})
    postfix = None
    runs = []
    started = time.perf_counter()
    try:
        for n in sizes:
            path = write_members(workdir / f"members-{n}.txt", members(n))
            for kind, one_click in (("inplace", "false"), ("personal", "true")):
                address = f"{kind}{n}@example.org"
                cli(lm.config_path, "list", "create", address, "--posting", "open")
                cli(lm.config_path, "list", "set", address, "one_click", one_click)
                cli(lm.config_path, "members", "import", address, str(path))
        postfix = Postfix(milter=lm.milter_spec, sink_port=sink.port, config_path=lm.config_path,
                          socketmap=lm.socketmap_spec, workdir=workdir / "postfix", main_cf=BIG_LIMITS)
        lm.outgoing_port = postfix.port
        lm.write_config()
        lm.start()
        postfix.start()
        tail = MaillogTail(postfix.dir / "maillog")
        for kind in ("inplace", "personal"):        # warm-up
            post(postfix.port, f"{kind}{sizes[0]}@example.org", sizes[0], tail)
        wait_queue_empty(postfix)
        for n in sizes:
            for r in range(args.repeat):
                order = ["inplace", "personal"] if r % 2 == 0 else ["personal", "inplace"]
                for kind in order:
                    tail = MaillogTail(postfix.dir / "maillog")
                    res = post(postfix.port, f"{kind}{n}@example.org", n, tail)
                    wait_queue_empty(postfix, timeout=600)
                    res.update({"kind": kind, "members": n, "repeat": r, "rss": rss(lm.proc.pid)})
                    runs.append(res)
                    print(f"  {kind:8} n={n:<6} 250 after {res['to_250']:8.3f} s, last delivery after "
                          f"{res['to_last_delivery']:8.3f} s", flush=True)
                    time.sleep(1)
    finally:
        stop_all(postfix.stop if postfix else None, lm.stop, sink.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for n in sizes:
        row = {"members": n}
        for kind in ("inplace", "personal"):
            sel = [r for r in runs if r["kind"] == kind and r["members"] == n]
            row[f"{kind}_250"] = median([r["to_250"] for r in sel])
            row[f"{kind}_last"] = median([r["to_last_delivery"] for r in sel])
        row["copies_per_second"] = n / row["personal_250"]
        row["ratio_last"] = row["personal_last"] / row["inplace_last"]
        rows.append(row)
    print(f"\nmedian of {args.repeat} runs; seconds from the end of DATA")
    head = (f"{'members':>8} | {'250: in place':>13} {'personal':>9} | {'last: in place':>14} "
            f"{'personal':>9} {'ratio':>6} | {'copies/s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['members']:>8} | {r['inplace_250']:13.3f} {r['personal_250']:9.3f} | "
              f"{r['inplace_last']:14.3f} {r['personal_last']:9.3f} {r['ratio_last']:6.1f} | "
              f"{r['copies_per_second']:8.0f}")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    out = save("personal", {"machine": machine(), "args": vars(args), "summary": rows, "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
