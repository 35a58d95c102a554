"""`listmilter held`: posts on the MTA's hold queue for an owner's decision (listmilter.app.held)."""

from __future__ import annotations

import time
from os import EX_TEMPFAIL, EX_USAGE

from listmilter.cli.common import Fail, admin, admin_user, existing_list


def add_parsers(sub) -> None:
    s = sub.add_parser("held", help="held posts: `held [LIST]` lists them, "
                                    "`held approve|reject|discard QUEUEID...` decides")
    s.set_defaults(handler=admin(_held))
    s.add_argument("words", nargs="*", metavar="LIST | approve|reject|discard QUEUEID...",
                   help="a list to show only its held posts; or a decision and the queue ids "
                        "(as in the MTA's `250 ...` reply, `postqueue -p`, Sendmail's `mailq -qQ`)")
    s.add_argument("--run", action="store_true",
                   help="carry out decisions taken by reply and expire old posts now "
                        "(listmilter serve does this every 5 minutes)")


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{int(seconds // 60)}m"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


def _held(args, cfg, store) -> int:
    from listmilter.app import held
    from listmilter.store import open_pending
    pending = open_pending(cfg)
    queue = held.queue_for(cfg)
    try:
        if args.run:
            for line in held.periodic(cfg, store, pending, queue):
                print(line)
            return 0
        words = list(args.words)
        if words and words[0] in held.DECISIONS:
            if len(words) < 2:
                raise Fail(f"held {words[0]}: give the queue ids of the posts", EX_USAGE)
            failed = 0
            for queue_id in words[1:]:
                try:
                    print(held.decide(cfg, store, pending, queue, queue_id, words[0], f"cli {admin_user()}"))
                except held.HeldError as e:
                    print(f"listmilter: {e}")
                    failed += 1
            return 1 if failed else 0
        if len(words) > 1:
            raise Fail("held: give one list, or approve|reject|discard and queue ids", EX_USAGE)
        list_address = existing_list(store, words[0]).address if words else None
        try:
            rows = held.listing(pending, queue, list_address)
        except held.QueueError as e:
            raise Fail(f"cannot read the hold queue: {e}", EX_TEMPFAIL) from None
        now = time.time()
        if not rows:
            print("no held posts")
            return 0
        print(f"{'QUEUE ID':<14} {'AGE':>4}  {'LIST':<30} {'SENDER':<30} REASON")
        for post, entry in rows:
            state = "" if entry is not None else "  [not on the hold queue]"
            if post.decision:
                state += f"  [{post.decision} by {post.decided_by}, not yet done]"
            print(f"{post.queue_id:<14} {_age(now - post.held):>4}  {post.list:<30} {post.sender or '<>':<30} "
                  f"{post.reason}{state}")
        return 0
    finally:
        pending.close()
