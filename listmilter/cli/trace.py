"""`listmilter trace QUEUEID`: a post through the mail log, under every queue id it went out as."""

from __future__ import annotations

from os import EX_NOINPUT, EX_USAGE

from listmilter.cli.common import Fail, plural

DEFAULT_LOG = "/var/log/mail.log"


def add_parsers(sub) -> None:
    s = sub.add_parser("trace", help="follow a post through the mail log, under every queue id it produced")
    s.add_argument("queue_id", metavar="QUEUEID", help="the post's queue id, or that of any copy or DSN of it")
    s.add_argument("--log", action="append", metavar="FILE",
                   help=f"a log to read, - for standard input (default {DEFAULT_LOG}); repeat to merge logs")
    s.set_defaults(handler=run)


def run(args, path: str, explicit: bool) -> int:
    from listmilter.core import trace
    if not trace.is_queue_id(args.queue_id):
        raise Fail(f"{args.queue_id!r} is not a queue id (letters and digits, as in the mail log)", EX_USAGE)
    files = args.log or [DEFAULT_LOG]
    logs = []
    for name in files:
        if name == "-":     # e.g. journalctl --since today | listmilter trace ID --log -
            import io
            import sys
            logs.append(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace").read().splitlines())
            continue
        try:
            with open(name, encoding="utf-8", errors="replace") as f:
                logs.append(f.read().splitlines())
        except OSError as e:
            raise Fail(f"{name}: {e.strerror}", EX_NOINPUT) from None
    found = trace.follow(trace.merge(logs), args.queue_id)
    if found is None:
        raise Fail(f"{args.queue_id} is not in {', '.join(files)} (rotated? try --log {files[0]}.1)")
    for line in found.lines:
        print(line)
    done = ", ".join(f"{n} {status}" for status, n in sorted(found.statuses.items())) or "none logged yet"
    ids = " ".join(found.ids)
    print(f"post {found.root}: {plural(len(found.ids), 'queue id')} ({ids}); deliveries: {done}")
    return 0
