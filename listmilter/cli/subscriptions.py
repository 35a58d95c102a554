"""`listmilter pending`, `approve`, `reject`: subscription requests waiting for someone."""

from __future__ import annotations

import sys
from os import EX_NOINPUT, EX_TEMPFAIL

from listmilter.cli.common import Fail, admin_user, parse_address, parse_list_address


def add_parsers(sub) -> None:
    s = sub.add_parser("pending", help="subscription requests waiting for a confirmation or an owner")
    s.add_argument("list", nargs="?", help="one list (default: all)")
    s.set_defaults(handler=run)
    for name, verb in (("approve", "approve"), ("reject", "reject")):
        s = sub.add_parser(name, help=f"{verb} requests waiting for an owner (moderated lists)")
        s.add_argument("list")
        s.add_argument("addresses", nargs="+")
        s.set_defaults(handler=run)


def run(args, path: str, explicit: bool) -> int:
    import time as time_mod

    from listmilter.app.subscription_service import Service
    from listmilter.core import config as config_mod
    from listmilter.log import setup
    from listmilter.store import StoreError, open_store, site_secret
    setup("stderr")
    cfg = config_mod.load(path, explicit)
    try:
        store = open_store(cfg)
        service = Service(cfg, store, site_secret(cfg))
    except (StoreError, OSError) as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    try:
        list_address = parse_list_address(args.list) if args.list else None
        mlist = store.get_list(list_address) if list_address else None
        if list_address and mlist is None:
            raise Fail(f"no such list: {list_address}", EX_NOINPUT)
        if args.command == "pending":
            stamp = lambda at: time_mod.strftime("%Y-%m-%d %H:%M", time_mod.localtime(at))  # noqa: E731
            waiting = service.pending.waiting(list_address)
            for p in waiting:
                state = "awaiting-approval" if p.kind == "moderate" else "awaiting-confirmation"
                print(f"{p.list}\t{p.address}\t{p.action}\t{state}\t{stamp(p.created)}\t"
                      f"expires {stamp(p.expires)}")
            if not waiting:
                print("no pending requests", file=sys.stderr)
            return 0
        failed = 0
        assert mlist is not None          # approve and reject name their list
        for text in args.addresses:
            address = parse_address(text)
            outcome = service.decide(mlist, address, args.command == "approve", admin_user())
            if outcome is None:
                print(f"warning: no request of {address} waits for approval on {mlist.address}", file=sys.stderr)
                failed += 1
            else:
                print(f"{mlist.address}: {address}: {outcome.status}")
        return 1 if failed else 0
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    except Exception as e:
        from listmilter.app.outgoing import OutgoingError
        if isinstance(e, OutgoingError):
            raise Fail(f"not done, the notice could not be sent: {e}", EX_TEMPFAIL) from None
        raise
    finally:
        service.close()
        store.close()
