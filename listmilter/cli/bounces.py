"""`listmilter bounces`: bouncing members, kept bounce mail, and the periodic run on demand."""

from __future__ import annotations

import time
from os import EX_NOINPUT, EX_USAGE

from listmilter.cli.common import Fail, admin, existing_list


def add_parsers(sub) -> None:
    s = sub.add_parser("bounces", help="bouncing members: scores, last DSN status and diagnostic")
    s.set_defaults(handler=admin(_bounces))
    s.add_argument("list", nargs="?", help="one list (default: all)")
    s.add_argument("--kept", action="store_true",
                   help="list the bounce-address mail that scored nobody, kept for the owner")
    s.add_argument("--run", action="store_true",
                   help="send due warnings and remove members now (listmilter serve does this hourly)")
    s.add_argument("--explain", metavar="FILE",
                   help="what listmilter reads in one message (FILE, or - for stdin): its kind, each "
                        "failed address, status, binding and verdict; records nothing")
    s.add_argument("--json", action="store_true", help="with --explain: one JSON object")


def _explain(args, cfg, store) -> int:
    """Thin over core.bounces.explain: read the file, look the ENVID and the members up, print."""
    import json
    import sys

    from listmilter.core import addresses, bounces, envid, mailparse
    from listmilter.core.model import DISABLED
    from listmilter.store import site_secret
    if args.explain == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.explain, "rb") as stream:
                data = stream.read()
        except OSError as e:
            raise Fail(f"cannot read {args.explain}: {e.strerror}", EX_NOINPUT) from None
    sender = bounces.envelope_sender(mailparse.parse(data, headers_only=True))
    report = bounce_report(data, "" if sender is None else sender)
    mlist = existing_list(store, args.list) if args.list else None
    if mlist is None and bounces.envid_list(report.envid):
        mlist = store.get_list(addresses.key(bounces.envid_list(report.envid)))
    posted_at = None
    members: dict[str, tuple[float, bool]] | None = None
    if mlist is not None:
        post = envid.parse(report.envid, mlist.address, site_secret(cfg)) if report.envid else None
        posted_at = post.posted_at if post is not None else None     # as deliver scores it
        members = {}
        for failure in report.failures:
            member = store.member(mlist.address, failure.address)
            if member is not None:
                members[addresses.key(failure.address)] = (member.added, member.status != DISABLED)
    result = _bound_explanation(cfg, store, data, mlist, report, "" if sender is None else sender) \
        or bounces.explain(report, posted_at, members, time.time())
    if args.json:
        print(json.dumps(result.as_json(), ensure_ascii=False))
        return 0
    print(f"kind: {result.kind}: {bounces.KIND_MEANS.get(bounces.Kind(result.kind), result.kind)}")
    print("sender: " + ("<> (from Return-Path)" if sender == "" else f"<{sender}> (from Return-Path)"
                        if sender else "none recorded (no Return-Path): read as from the null sender <>"))
    if report.envid:
        if mlist is None:
            state = "names no list of this site (name the LIST)"
        elif posted_at is not None:
            state = f"issued by this site for {mlist.address}"
        else:
            state = f"not one this site issued for {mlist.address}"
        print(f"envid: {report.envid} ({state})")
    else:
        print("envid: none")
    print(f"list: {mlist.address if mlist else 'none'}")
    for f in result.failures:
        print(f"<{f.address}> {f.status or '-'} {'permanent' if f.permanent else 'temporary'}, "
              f"binding {f.binding}: {f.verdict}: {f.why}")
    if not result.failures:
        print("failures: none found")
    return 0


def _delivered_to(store, data: bytes, mlist):
    """(list, extension) of the `<list>-bounces+EXTENSION@` address the message was delivered
    to, from the Delivered-To or X-Original-To field the MTA adds; None if none names one."""
    from listmilter.core import mailparse, plan
    head = mailparse.parse(data, headers_only=True)
    for name in ("Delivered-To", "X-Original-To"):
        recipient = mailparse.text(head.get(name)).strip().strip("<>")
        if not recipient:
            continue
        found, role = plan.find_list(recipient, store.get_list)
        if found is None or role is None or role.role != "bounces" or not role.extension:
            continue
        if mlist is None or found.address == mlist.address:
            return found, role.extension
    return None


def _bound_explanation(cfg, store, data: bytes, mlist, report, sender: str):
    """The explanation of a message delivered to a probe's or a personal copy's own
    address, which binds the member (core/probes.py, core/verp.py); None for any other."""
    from listmilter.core import probes, verp
    from listmilter.core.model import DISABLED
    from listmilter.store import open_bounces, site_secret
    to = _delivered_to(store, data, mlist)
    if to is None:
        return None
    found, extension = to
    secret = site_secret(cfg)
    if probes.is_code(extension):
        db = open_bounces(cfg)
        try:
            flying = {address: sent_at for _, address, sent_at, _ in db.probes(found.address)}
        finally:
            db.close()
        # As deliver: a code binds only the member whose probe is in flight (answered or
        # cleared, the address is plain bounce mail again).
        bound = probes.find(extension, found.address, flying, secret)
        if bound is None:
            return None
        return probes.explain(report, bound, flying[bound.member], sender == "")
    code = verp.parse(extension)
    if code is None or not verp.fresh(code, time.time()):
        return None
    named = [f.address for f in report.failures]
    member_bound = verp.find(extension, found.address, named + [m.address for m in store.members(found.address)],
                             secret)
    if member_bound is None:
        return None
    member = store.member(found.address, member_bound.member)
    return verp.explain(report, member_bound.member, sender == "", member_bound.posted_at,
                        member.added if member else None, member is not None and member.status != DISABLED)


def bounce_report(data: bytes, sender: str):
    """As `listmilter deliver` reads it (never raises: unreadable mail is UNREADABLE)."""
    from listmilter.app import bounce_processing
    return bounce_processing.read(data, sender)


def _bounces(args, cfg, store):
    from listmilter.app import bounce_processing
    from listmilter.core import bounces, when
    from listmilter.store import open_bounces
    if args.explain:
        return _explain(args, cfg, store)
    if args.json:
        raise Fail("--json goes with --explain", EX_USAGE)
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
                print(f"{when.utc_minute(at)}  {address}  {path}\n    {why}")
            if not kept:
                print(f"no bounce mail kept for {where}")
            return 0
        rows = [(address, row) for address in lists for row in db.rows(address)]
        flying = [(address, probe) for address in lists for probe in db.probes(address)]
        for address, (_, member, sent_at, why) in flying:
            print(f"probe in flight: {address} {member} sent {when.utc_minute(sent_at)} (suspected by {why})")
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
                  f"{when.utc_minute(row.last_bounce):<21} {row.last_status or '-':<7} "
                  f"{row.last_diagnostic}")
    finally:
        db.close()
    return 0
