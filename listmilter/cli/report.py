"""`listmilter report LIST [--since DATE] [--json|--csv]`: the list's delivery report (core/report.py)."""

from __future__ import annotations

from os import EX_USAGE

from listmilter.cli.common import Fail, admin, existing_list

DEFAULT_DAYS = 30


def add_parsers(sub) -> None:
    s = sub.add_parser("report", help="a list's delivery report: per post recipients and failures, joins, leaves, "
                                      "bounce actions, size over time")
    s.set_defaults(handler=admin(_report))
    s.add_argument("list", help="the list")
    s.add_argument("--since", metavar="DATE",
                   help=f"from this UTC day on, YYYY-MM-DD (default: the last {DEFAULT_DAYS} days)")
    form = s.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object")
    form.add_argument("--csv", action="store_true", help="CSV: a row per post and per day")


def _report(args, cfg, store) -> int:
    import json
    import time

    from listmilter.app import reports
    from listmilter.core import report
    from listmilter.store import open_bounces
    now = time.time()
    if args.since is None:
        since = report.parse_date(report.day_of(now - (DEFAULT_DAYS - 1) * report.DAY))
    else:
        try:
            since = report.parse_date(args.since)
        except report.DateError as e:
            raise Fail(f"--since: {e}", EX_USAGE) from None
    mlist = existing_list(store, args.list)
    bounce_db = open_bounces(cfg)
    try:
        rep = reports.build(cfg, store, bounce_db, mlist, since, now)
    finally:
        bounce_db.close()
    if args.json:
        print(json.dumps(rep.as_json(), ensure_ascii=False))
    elif args.csv:
        print(report.csv_text(rep), end="")
    else:
        print(report.text(rep), end="")
    return 0
