"""`listmilter posts [LIST]`: personal posts in fan-out and done (core/fanout.py), like `postqueue -p`."""

from __future__ import annotations

import sys

from listmilter.cli.common import admin, existing_list, plural


def add_parsers(sub) -> None:
    s = sub.add_parser("posts", help="personal posts being fanned out, and done: copies sent, refused, left")
    s.set_defaults(handler=admin(_posts))
    s.add_argument("list", nargs="?", help="only this list's posts")


def _posts(args, cfg, store):
    import time

    from listmilter.core import addresses
    from listmilter.store import fanout_records
    only = addresses.key(existing_list(store, args.list).address) if args.list else None
    records = [r for _, r in fanout_records.every(cfg.state_dir)
               if only is None or addresses.key(r.list_address) == only]
    if records:
        print(f"{'POST':<14} {'POSTED':<16} {'STATE':<8} {'SENT':>8} {'REFUSED':>8} {'LEFT':>8} {'TRIES':>5}  LIST")
    for r in records:
        posted = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.posted_at))
        state = "done" if r.done else "fan-out"
        print(f"{r.post_id:<14} {posted:<16} {state:<8} {r.sent:>8} {r.refused:>8} {r.left:>8} {r.attempts:>5}  "
              f"{r.list_address}")
    running = sum(1 for r in records if not r.done)
    print(f"{plural(len(records), 'post')}, {running} in fan-out", file=sys.stderr)
