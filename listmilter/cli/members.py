"""`listmilter members`: add, remove, list, import, export, enable, disable, history."""

from __future__ import annotations

import sys
from os import EX_NOINPUT

from listmilter.cli.common import (
    Fail,
    admin,
    admin_user,
    existing_list,
    parse_address,
    parse_list_address,
    read_addresses,
    report_errors,
)


def add_parsers(sub) -> None:
    mem = sub.add_parser("members", help="add, remove, list, import and export members")
    ms = mem.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ms.add_parser("add", help="add addresses (or - to read them from stdin)")
    s.set_defaults(handler=admin(_add))
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("remove", help="remove addresses (or - to read them from stdin)")
    s.set_defaults(handler=admin(_remove))
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("ls", help="print the members who receive posts, one per line")
    s.set_defaults(handler=admin(_ls))
    s.add_argument("list")
    s.add_argument("--all", action="store_true",
                   help="every member, disabled ones too, with their status (address TAB status)")
    s = ms.add_parser("import", help="add members from a file (plain or CSV), all or nothing")
    s.set_defaults(handler=admin(_import))
    s.add_argument("list")
    s.add_argument("file", help="file name, or - for stdin")
    s = ms.add_parser("export", help="write the members as CSV (address,name,attributes...)")
    s.set_defaults(handler=admin(_export))
    s.add_argument("list")
    s = ms.add_parser("enable", help="deliver to a member again and reset their bounce score")
    s.set_defaults(handler=admin(_enable))
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("disable", help="stop delivering to a member (they stay a member)")
    s.set_defaults(handler=admin(_disable))
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("history", help="the consent record: every membership change, who made it and how")
    s.set_defaults(handler=admin(_history))
    s.add_argument("list")
    s.add_argument("address", nargs="?", help="one address (default: everyone)")
    s.add_argument("--csv", action="store_true", help="write CSV (at,address,action,how,who,detail)")


def _add(args, cfg, store):
    parsed = read_addresses(args.addresses)
    added, existing = store.add_members(parse_list_address(args.list), parsed.members, "cli", admin_user())
    print(f"{parse_list_address(args.list)}: added {added}, already members {existing + parsed.duplicates}")


def _remove(args, cfg, store):
    parsed = read_addresses(args.addresses)
    removed, missing = store.remove_members(parse_list_address(args.list), [m.address for m in parsed.members],
                                         "cli", admin_user())
    for address in missing:
        print(f"warning: {address} is not a member", file=sys.stderr)
    print(f"{parse_list_address(args.list)}: removed {removed}")
    return 1 if missing else 0


def _ls(args, cfg, store):
    from listmilter.cli.common import plural
    from listmilter.core.model import ACTIVE
    address = existing_list(store, args.list).address
    out = sys.stdout
    hidden = 0
    for m in store.members(address):
        if args.all:
            out.write(f"{m.address}\t{m.status}\n")
        elif m.status == ACTIVE:
            out.write(m.address + "\n")
        else:
            hidden += 1
    if hidden:
        print(f"{address}: {plural(hidden, 'disabled member')} not shown (they receive no posts); "
              "`listmilter members ls --all` shows every member with its status", file=sys.stderr)


def _import(args, cfg, store):
    from listmilter.core import importer
    address = existing_list(store, args.list).address
    try:
        if args.file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.file, encoding="utf-8-sig", errors="surrogateescape") as f:
                lines = f.read().splitlines()
    except OSError as e:
        raise Fail(f"{args.file}: {e.strerror}", EX_NOINPUT) from None
    progress = _progress(len(lines)) if sys.stderr.isatty() and len(lines) >= 10000 else None
    parsed = importer.parse(lines, progress)
    if progress:
        progress(len(lines), done=True)
    report_errors(parsed, args.file if args.file != "-" else "<stdin>")
    added, existing = store.add_members(address, parsed.members, "cli", admin_user(),
                                        f"import {args.file}")
    print(f"{address}: imported {added} new members from {args.file} "
          f"({existing + parsed.duplicates} already members or repeated)")


def _progress(total: int):
    def show(n: int, done: bool = False) -> None:
        width = 30
        filled = width * n // max(total, 1)
        sys.stderr.write(f"\rreading {'#' * filled}{'.' * (width - filled)} {n}/{total} lines")
        if done:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _export(args, cfg, store):
    import csv
    members = store.members(parse_list_address(args.list))
    extra = sorted({k for m in members for k in m.attributes})
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["address", "name", *extra])
    for m in members:
        writer.writerow([m.address, m.name, *(m.attributes.get(k, "") for k in extra)])


def _set_status(args, cfg, store, enable: bool):
    from listmilter.app import bounce_processing
    from listmilter.core.model import DISABLED
    address = existing_list(store, args.list).address
    failed = 0
    for text in args.addresses:
        member_address = parse_address(text)
        if store.member(address, member_address) is None:
            print(f"warning: {member_address} is not a member of {address}", file=sys.stderr)
            failed += 1
            continue
        if enable:
            changed = bounce_processing.enable(cfg, store, address, member_address, "cli", admin_user())
        else:
            changed = store.set_status(address, member_address, DISABLED, "cli", admin_user())
        state = "enabled" if enable else "disabled"
        print(f"{address}: {member_address} {state}" + ("" if changed else f" (already {state})"))
    return 1 if failed else 0


def _enable(args, cfg, store):
    return _set_status(args, cfg, store, enable=True)


def _disable(args, cfg, store):
    return _set_status(args, cfg, store, enable=False)


def _history(args, cfg, store):
    import csv
    import time as time_mod
    address = existing_list(store, args.list).address
    events = store.history(address, parse_address(args.address) if args.address else None)
    stamp = lambda at: time_mod.strftime("%Y-%m-%dT%H:%M:%S%z", time_mod.localtime(at))  # noqa: E731
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["at", "address", "action", "how", "who", "detail"])
        for e in events:
            writer.writerow([stamp(e.at), e.address, e.action, e.how, e.who, e.detail])
    for e in events if not args.csv else ():
        line = f"{stamp(e.at)} {e.address} {e.action} by {e.how}"
        if e.who:
            line += f" ({e.who})"
        if e.detail:
            line += f": {e.detail}"
        print(line)
    if not events:
        print(f"{address}: no membership changes recorded" + (f" for {args.address}" if args.address else ""),
              file=sys.stderr)
        return 1 if args.address else 0
    return 0
