"""Queue-file size of a list post: how many bytes each milter-added recipient
(NOTIFY=FAILURE, ORCPT=rfc822;ADDR) costs in a Postfix queue file, against
listmilter.cli.check.queue_file_estimate().

    .venv/bin/python bench/run_queuesize.py [--sizes 1000,10000] [--lengths 20,60]

It prints the measured sizes, the fit, and what the fit predicts (computed,
not measured): where the default message_size_limit is reached, and the size
of a 100,000-recipient post.

Listmilter (sqlite store) expands each post in a private Postfix whose
smtpd_end_of_data_restrictions put it on hold, so the queue file stays as
cleanup wrote it (the file message_size_limit is checked against); then the
file under queue/hold is measured. Fit: size = c + N * (a + b * len).
"""

from __future__ import annotations

import argparse
import shutil
import smtplib
import sys
import tempfile
from pathlib import Path

from common import (
    BIG_LIMITS,
    SmtpSink,
    machine,
    message,  # noqa: E402
    save,
    stop_all,
    write_members,
)

from listmilter.cli import check
from tests.bed.listmilter import ListmilterServer, cli
from tests.bed.net import wait_until
from tests.bed.postfix import Postfix


def addrs(n: int, length: int) -> list[str]:
    """n addresses of exactly `length` characters: mXXX000001@example.net."""
    pad = length - len("m000001@example.net")
    assert pad >= 0
    return [f"m{'x' * pad}{i:06d}@example.net" for i in range(1, n + 1)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--lengths", default="20,60")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lengths = [int(s) for s in args.lengths.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lmqueue-"))
    work.chmod(0o755)
    sink = SmtpSink().start()
    lm = ListmilterServer(work / "listmilter", "sqlite")
    postfix = None
    rows = []
    try:
        for n in sizes:
            for length in lengths:
                address = f"q{n}-{length}@example.org"
                cli(lm.config_path, "list", "create", address, "--posting", "open")
                f = write_members(work / f"m-{n}-{length}.txt", addrs(n, length))
                cli(lm.config_path, "members", "import", address, str(f))
        lm.start()
        postfix = Postfix(milter=lm.milter_spec, sink_port=sink.port, config_path=lm.config_path,
                          socketmap=lm.socketmap_spec, workdir=work / "postfix",
                          main_cf={**BIG_LIMITS,
                                   "smtpd_end_of_data_restrictions": "check_client_access static:HOLD"})
        lm.outgoing_port = postfix.port
        lm.write_config()
        postfix.start()
        hold = postfix.dir / "queue" / "hold"
        for n in sizes:
            for length in lengths:
                address = f"q{n}-{length}@example.org"
                before = set(hold.iterdir()) if hold.exists() else set()
                with smtplib.SMTP("127.0.0.1", postfix.port, timeout=300) as s:
                    s.sendmail("alice@example.net", [address], message(address, n))
                new = wait_until(lambda before=before: (set(hold.iterdir()) - before) if hold.exists() else None,
                                 60, what="a file in the hold queue")
                (qfile,) = new
                size = qfile.stat().st_size
                estimate = check.queue_file_estimate(addrs(n, length))
                rows.append({"members": n, "length": length, "queue_file_bytes": size,
                             "check_estimate": estimate, "queue_id": qfile.name})
                print(f"  N={n:<6} len={length:<3} queue file {size:>9} bytes "
                      f"({size / n:7.1f} per recipient); check.py estimate {estimate:>9}", flush=True)
    finally:
        stop_all(postfix.stop if postfix else None, lm.stop, sink.stop)
        shutil.rmtree(work, ignore_errors=True)

    # Per-recipient slope for each length, then a + b * len across lengths.
    def size(n, length):
        return next(r["queue_file_bytes"] for r in rows if r["members"] == n and r["length"] == length)
    n1, n2 = min(sizes), max(sizes)
    slopes = {L: (size(n2, L) - size(n1, L)) / (n2 - n1) for L in lengths}
    l1, l2 = min(lengths), max(lengths)
    b = (slopes[l2] - slopes[l1]) / (l2 - l1)
    a = slopes[l1] - b * l1
    c = {L: size(n1, L) - n1 * slopes[L] for L in lengths}
    print(f"\nper recipient: {a:.1f} + {b:.2f} * len(address) bytes "
          f"(slopes {', '.join(f'len {L}: {s:.2f}' for L, s in slopes.items())}); "
          f"fixed part {', '.join(f'{v:.0f}' for v in c.values())} bytes")
    allowance = check.QUEUE_BYTES_MESSAGE_ALLOWANCE
    print(f"check.py allows {allowance} bytes for the message, plus per recipient:")
    for L in (20, 30, 60):
        per = a + b * L
        est = check.queue_file_estimate(["x" * L]) - allowance
        limit_n = int((10240000 - sum(c.values()) / len(c)) // per)
        print(f"  len {L}: {per:.1f} bytes measured vs {est} estimated; "
              f"default message_size_limit (10,240,000) reached at about {limit_n} recipients; "
              f"100,000 recipients make about {(sum(c.values()) / len(c) + 100000 * per) / 1e6:.1f} MB")
    path = save("queuesize", {"machine": machine(), "rows": rows, "fit": {"a": a, "b": b, "fixed": c,
                                                                          "slopes": slopes}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
