"""`listmilter bounces`: bouncing members, kept bounce mail, and the periodic run on demand."""

from __future__ import annotations

from listmilter.cli.common import admin, existing_list


def add_parsers(sub) -> None:
    s = sub.add_parser("bounces", help="bouncing members: scores, last DSN status and diagnostic")
    s.set_defaults(handler=admin(_bounces))
    s.add_argument("list", nargs="?", help="one list (default: all)")
    s.add_argument("--kept", action="store_true",
                   help="list the bounce-address mail that scored nobody, kept for the owner")
    s.add_argument("--run", action="store_true",
                   help="send due warnings and remove members now (listmilter serve does this hourly)")


def _bounces(args, cfg, store):
    from listmilter.app import bounce_processing
    from listmilter.core import bounces
    from listmilter.store import open_bounces
    if args.run:
        done = bounce_processing.periodic(cfg, store)
        for line in done:
            print(line)
        if not done:
            print("nothing to do: no warning or removal is due, no action is pending, "
                  "no score has reached its list's bounce_threshold")
        return 0
    lists = [existing_list(store, args.list).address] if args.list else [m.address for m in store.all_lists()]
    where = args.list or "any list"
    db = open_bounces(cfg)
    try:
        if args.kept:
            kept = [(address, record) for address in lists
                    for record in db.records(address, verdict=bounces.Verdict.UNRECOGNISED)]
            for address, (at, _, _, _, why, _, _, path) in kept:
                print(f"{bounces.fmt_time(at)}  {address}  {path}\n    {why}")
            if not kept:
                print(f"no bounce mail kept for {where}")
            return 0
        rows = [(address, row) for address in lists for row in db.rows(address)]
        if not rows:
            print(f"no bouncing members on {where}")
            return 0
        print(f"{'LIST':<28} {'MEMBER':<32} {'STATE':<9} SCORE  {'LAST BOUNCE':<21} STATUS  DIAGNOSTIC")
        for address, row in rows:
            member = store.member(address, row.address)
            state = "gone" if member is None else member.status
            if row.pending:
                state += "*"
            print(f"{address:<28} {row.address:<32} {state:<9} {row.score:>5}  "
                  f"{bounces.fmt_time(row.last_bounce):<21} {row.last_status or '-':<7} "
                  f"{row.last_diagnostic}")
    finally:
        db.close()
    return 0
