"""The `listmilter` command: serve, check, deliver, and list/member administration.

Every subcommand is a thin adapter: parse arguments, call the core, print.
Errors are one line (`listmilter: ...` or `FILE:LINE: ...`) and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import os
import sys

# Exit codes from sysexits.h, which Postfix's pipe(8) and Sendmail understand.
from os import EX_CONFIG, EX_DATAERR, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE

from . import __version__


class Fail(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def _parser():
    import argparse
    p = argparse.ArgumentParser(prog="listmilter", description="Mailing lists inside your MTA.")
    p.add_argument("-c", "--config", metavar="CONFIG",
                   help="config file (default: $LISTMILTER_CONFIG or /etc/listmilter/listmilter.yaml)")
    p.add_argument("--version", action="version", version=f"listmilter {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run the milter (and the Postfix socketmap) in the foreground")
    s.add_argument("--socket", help="milter socket, overrides milter.socket")

    sub.add_parser("check", help="check the config file and the store; exit non-zero on errors")

    s = sub.add_parser("deliver", help="pipe transport: read one message on stdin")
    s.add_argument("recipient")
    s.add_argument("sender", nargs="?", default=None)

    _subscription_parsers(sub)

    lst = sub.add_parser("list", help="create, delete, show and configure lists")
    ls = lst.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ls.add_parser("create", help="create a list")
    s.add_argument("address")
    s.add_argument("--owner", action="append", default=[], help="owner address (repeatable)")
    s.add_argument("--posting", choices=("open", "members", "announce"))
    s.add_argument("--subject-prefix")
    s.add_argument("--description")
    s.add_argument("--notify", action="store_true", help="mail the site admin that the list exists")
    s = ls.add_parser("delete", help="delete a list and its members")
    s.add_argument("address")
    s = ls.add_parser("show", help="effective settings of a list and where each comes from")
    s.add_argument("address")
    ls.add_parser("ls", help="all lists with their member counts")
    s = ls.add_parser("set", help="set a list setting (sqlite store)")
    s.add_argument("address")
    s.add_argument("key")
    s.add_argument("value", nargs="+")
    s = ls.add_parser("unset", help="remove a list's own value for a setting")
    s.add_argument("address")
    s.add_argument("key")

    mem = sub.add_parser("members", help="add, remove, list, import and export members")
    ms = mem.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = ms.add_parser("add", help="add addresses (or - to read them from stdin)")
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("remove", help="remove addresses (or - to read them from stdin)")
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("ls", help="print the members, one per line")
    s.add_argument("list")
    s = ms.add_parser("import", help="add members from a file (plain or CSV), all or nothing")
    s.add_argument("list")
    s.add_argument("file", help="file name, or - for stdin")
    s = ms.add_parser("export", help="write the members as CSV (address,name,attributes...)")
    s.add_argument("list")
    s = ms.add_parser("enable", help="deliver to a member again and reset their bounce score")
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("disable", help="stop delivering to a member (they stay a member)")
    s.add_argument("list")
    s.add_argument("addresses", nargs="+")
    s = ms.add_parser("history", help="the consent record: every membership change, who made it and how")
    s.add_argument("list")
    s.add_argument("address", nargs="?", help="one address (default: everyone)")
    s.add_argument("--csv", action="store_true", help="write CSV (at,address,action,how,who,detail)")
    s = sub.add_parser("bounces", help="bouncing members: scores, last DSN status and diagnostic")
    s.add_argument("list", nargs="?", help="one list (default: all)")
    s.add_argument("--kept", action="store_true",
                   help="list the bounce-address mail that scored nobody, kept for the owner")
    s.add_argument("--run", action="store_true",
                   help="send due warnings and remove members now (listmilter serve does this hourly)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Postfix starts `deliver` once per message: hand it to the running serve
    # before paying for argparse, the config and the core (listmilter.handoff).
    from . import handoff, paths
    code = handoff.deliver(argv)
    if code is not None:
        return code
    args = _parser().parse_args(argv)
    from . import config as config_mod
    from .log import setup
    path, explicit = paths.path_from_environment(args.config)
    try:
        if args.command == "deliver":
            return _deliver(args, path, explicit)
        if args.command == "serve":
            return _serve(args, path, explicit)
        if args.command == "check":
            return _check(path, explicit)
        if args.command == "bounces":
            args.action = None
        if args.command == "web":
            return _web(args, path, explicit)
        if args.command in ("pending", "approve", "reject"):
            setup("stderr")
            return _subscriptions(args, path, explicit)
        setup("stderr")
        return _admin(args, path, explicit)
    except config_mod.ConfigError as e:
        print(e, file=sys.stderr)
        return EX_CONFIG
    except Fail as e:
        print(f"listmilter: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


# -- serve / deliver / check ------------------------------------------------
def _runtime(path: str, explicit: bool):
    """The running config and store for `serve` and `web`; Fail (75) if the store cannot open."""
    from .runtime import Runtime
    from .store import StoreError
    try:
        return Runtime(path, explicit)
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    except OSError as e:    # the state folder, e.g. made by root before the service user ran
        raise Fail(f"state folder: {e}", EX_TEMPFAIL) from None


def _serve(args, path: str, explicit: bool) -> int:
    from .log import logger, setup
    runtime = _runtime(path, explicit)
    cfg = runtime.config
    setup(cfg.log_target, cfg.log_facility)
    from . import milter, socketmap
    socket = args.socket or cfg.milter_socket
    try:
        # How long a stop waits for messages in flight; keep systemd's TimeoutStopSec above it.
        grace = float(os.environ.get("LISTMILTER_STOP_GRACE") or 30)
    except ValueError:
        print("listmilter: LISTMILTER_STOP_GRACE must be a number of seconds", file=sys.stderr)
        return EX_USAGE
    # Signals are taken by threads waiting for them (milter.run), so block
    # them before any thread starts: threads inherit the mask, and one
    # without the block would die of SIGTERM's default action.
    import signal
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT})
    try:
        table = socketmap.start(runtime, cfg.socketmap_socket)
    except OSError as e:
        print(f"listmilter: cannot listen on socketmap socket {cfg.socketmap_socket}: {e}", file=sys.stderr)
        return EX_TEMPFAIL
    from . import handoff
    try:
        deliveries = handoff.start(runtime)
    except OSError as e:    # `deliver` then works in its own process: slower, still correct
        logger.warning("warning: cannot listen on %s: %s; `listmilter deliver` works without serve",
                       os.path.join(cfg.state_dir, handoff.SOCKET_NAME), e)
        deliveries = None
    logger.info("starting listmilter %s: milter=%s, socketmap=%s, deliver=%s, config=%s, store=%s %s, lists=%d",
                __version__, socket, cfg.socketmap_socket, deliveries.path if deliveries else "(none)",
                cfg.path or "built-in defaults",
                cfg.backend, cfg.path if cfg.backend == "yaml" else cfg.store_path,
                len(runtime.store.all_lists()))
    from . import bounce_processing
    bounce_processing.start_periodic(runtime)
    try:
        milter.run(runtime, socket, grace=grace, on_reload=lambda: _reload(runtime))
    except Exception as e:   # libmilter could not open its socket, for one
        logger.error("fatal: milter: %s", e)
        return EX_TEMPFAIL
    finally:
        if deliveries:
            handoff.stop(deliveries)
        socketmap.stop(table)
    logger.info("stopping listmilter")
    return 0


def _reload(runtime) -> None:
    from .log import logger
    logger.info("reload requested (SIGUSR1): reading %s", runtime.path)
    runtime.reload_now()


def _deliver(args, path: str, explicit: bool) -> int:
    from . import deliver
    from .log import setup
    state: dict = {}

    def runtime():
        # Config problems surface inside deliver.main, which turns them into 75.
        from . import config as config_mod
        from .store import open_store
        cfg = config_mod.load(path, explicit)
        setup(cfg.log_target, cfg.log_facility, "listmilter/deliver")
        state["store"] = open_store(cfg)
        return cfg, state["store"]

    setup("syslog" if os.path.exists("/dev/log") else "stderr", "mail", "listmilter/deliver")
    try:
        return deliver.main(runtime, args.recipient, args.sender)
    finally:
        if "store" in state:
            state["store"].close()


def _check(path: str, explicit: bool) -> int:
    from . import check
    report = check.run(path, explicit)
    for line in report.notes:
        print(line)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)      # each names its place: FILE:LINE, the store, the list
    return 1 if report.errors else 0


# -- subscriptions: web, pending, approve, reject ------------------------------------
def _subscription_parsers(sub) -> None:
    s = sub.add_parser("web", help="run the one-click unsubscribe and confirmation web endpoint (foreground)")
    s.add_argument("--listen", metavar="HOST:PORT", help="overrides web.listen")
    s = sub.add_parser("pending", help="subscription requests waiting for a confirmation or an owner")
    s.add_argument("list", nargs="?", help="one list (default: all)")
    for name, verb in (("approve", "approve"), ("reject", "reject")):
        s = sub.add_parser(name, help=f"{verb} requests waiting for an owner (moderated lists)")
        s.add_argument("list")
        s.add_argument("addresses", nargs="+")


def _web(args, path: str, explicit: bool) -> int:
    import signal
    from .log import logger, setup
    runtime = _runtime(path, explicit)
    cfg = runtime.config
    try:
        setup(cfg.log_target, cfg.log_facility, "listmilter/web")
    except OSError as e:
        raise Fail(f"cannot open the log: {e}", EX_TEMPFAIL) from None
    listen = args.listen or cfg.web.listen
    if not listen:
        raise Fail("web.listen is not configured (or give --listen HOST:PORT)", EX_CONFIG)
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit():
        raise Fail(f"--listen must be HOST:PORT (got {listen!r})", EX_USAGE)
    if not cfg.web.base_url:
        logger.warning("web: web.base_url is not configured: posts carry no one-click links")
    from . import web
    try:
        server = web.serve(runtime, host, int(port))
    except OSError as e:
        print(f"listmilter: cannot listen on {listen}: {e}", file=sys.stderr)
        return EX_TEMPFAIL

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()    # returns on SIGTERM/SIGINT once the requests at work are answered (5 s at most)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        runtime.store.close()
    logger.info("web: stopped")
    return 0


def _subscriptions(args, path: str, explicit: bool) -> int:
    import time as time_mod
    from . import config as config_mod
    from . import secret as secret_mod
    from .service import Service
    from .store import StoreError, open_store
    cfg = config_mod.load(path, explicit)
    try:
        store = open_store(cfg)
        service = Service(cfg, store, secret_mod.load_or_create(cfg.state_dir))
    except (StoreError, OSError) as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    try:
        list_address = _list_address(args.list) if args.list else None
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
        for text in args.addresses:
            address = _address(text)
            outcome = service.decide(mlist, address, args.command == "approve", _admin_user())
            if outcome is None:
                print(f"warning: no request of {address} waits for approval on {mlist.address}", file=sys.stderr)
                failed += 1
            else:
                print(f"{mlist.address}: {address}: {outcome.status}")
        return 1 if failed else 0
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    except Exception as e:
        from .outgoing import OutgoingError
        if isinstance(e, OutgoingError):
            raise Fail(f"not done, the notice could not be sent: {e}", EX_TEMPFAIL) from None
        raise
    finally:
        service.close()
        store.close()


# -- administration ------------------------------------------------------------
def _admin(args, path: str, explicit: bool) -> int:
    from . import config as config_mod
    from .store import ListExists, NoSuchList, ReadOnlyStore, StoreError, open_store
    cfg = config_mod.load(path, explicit)
    try:
        store = open_store(cfg)
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    try:
        handler = _ADMIN[(args.command, args.action)]
        return handler(args, cfg, store) or 0
    except NoSuchList as e:
        raise Fail(f"no such list: {e}", EX_NOINPUT) from None
    except ListExists as e:
        raise Fail(f"list already exists: {e}") from None
    except ReadOnlyStore as e:
        raise Fail(str(e), EX_USAGE) from None
    except StoreError as e:
        raise Fail(str(e), EX_TEMPFAIL) from None
    finally:
        store.close()


def _address(text: str) -> str:
    from . import addresses
    try:
        return addresses.check(addresses.strip_brackets(text))
    except addresses.AddressError as e:
        raise Fail(str(e), EX_DATAERR) from None


def _list_address(text: str) -> str:
    from . import addresses
    return addresses.key(_address(text))


def _setting(name: str, value):
    from . import settings
    try:
        return settings.parse(name, value)
    except settings.SettingError as e:
        raise Fail(f"{name}: {e}", EX_DATAERR) from None


def _admin_user() -> str:
    user = os.environ.get("SUDO_USER")
    try:
        import pwd
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        me = str(os.getuid())
    return f"{me} (via sudo from {user})" if user and user != me else me


def _list_create(args, cfg, store):
    address = _list_address(args.address)
    values = {"owners": args.owner or None, "posting": args.posting,
              "subject_prefix": args.subject_prefix, "description": args.description}
    list_settings = {k: _setting(k, v) for k, v in values.items() if v is not None}
    mlist = store.create_list(address, list_settings)
    print(f"created list {mlist.address}")
    if args.notify:
        from . import notices, outgoing
        eff = lambda name: cfg.effective(name, mlist.settings).value  # noqa: E731
        message = notices.list_created(mlist.address, cfg.site_admin, eff("owners"), eff("posting"),
                                       _admin_user())
        try:
            outgoing.send(cfg.outgoing, "", [cfg.site_admin], message)
        except outgoing.OutgoingError as e:
            raise Fail(f"list {mlist.address} was created, but the notice to {cfg.site_admin} "
                       f"was not sent: {e}") from None
        print(f"notified {cfg.site_admin}")


def _list_delete(args, cfg, store):
    address = _list_address(args.address)
    count = store.member_count(address)
    store.delete_list(address)
    print(f"deleted list {address} ({count} members)")


def _list_show(args, cfg, store):
    from . import settings
    from .store import NoSuchList
    mlist = store.get_list(_list_address(args.address))
    if mlist is None:
        raise NoSuchList(args.address)
    print(f"list: {mlist.address}")
    print(f"defined in: {mlist.origin} ({store.backend} store)")
    print(f"members: {store.member_count(mlist.address)}")
    for name in settings.SETTINGS:
        eff = cfg.effective(name, mlist.settings)
        value = ", ".join(eff.value) if isinstance(eff.value, (tuple, list)) else eff.value
        shown = f'"{value}"' if isinstance(value, str) and (value == "" or value != value.strip()) else value
        print(f"{name} = {shown}    # {eff.origin}")


def _list_ls(args, cfg, store):
    for mlist in store.all_lists():
        print(f"{mlist.address}\t{store.member_count(mlist.address)}")


def _list_set(args, cfg, store):
    from . import settings
    if args.key not in settings.SETTINGS:
        raise Fail(f"unknown setting {args.key!r}; known: {', '.join(settings.SETTINGS)}", EX_USAGE)
    raw = args.value if args.key == "owners" else " ".join(args.value)
    value = _setting(args.key, raw)
    store.set_setting(_list_address(args.address), args.key,
                      list(value) if isinstance(value, tuple) else value)
    print(f"{_list_address(args.address)}: {args.key} = {value if not isinstance(value, tuple) else ', '.join(value)}")


def _list_unset(args, cfg, store):
    store.unset_setting(_list_address(args.address), args.key)
    print(f"{_list_address(args.address)}: {args.key} now comes from defaults")


def _read_addresses(items: list[str]):
    from . import importer
    if items == ["-"]:
        lines = sys.stdin.read().splitlines()
        source = "<stdin>"
    else:
        lines = items
        source = "<arguments>"
    parsed = importer.parse(lines)
    _report_errors(parsed, source if items == ["-"] else None)
    return parsed


def _report_errors(parsed, source: str | None):
    if parsed.errors:
        for number, message in parsed.errors:
            where = f"{source}:{number}" if source else f"argument {number}"
            print(f"{where}: {message}", file=sys.stderr)
        raise Fail(f"{len(parsed.errors)} bad lines; nothing was changed", EX_DATAERR)


def _members_add(args, cfg, store):
    parsed = _read_addresses(args.addresses)
    added, existing = store.add_members(_list_address(args.list), parsed.members, "cli", _admin_user())
    print(f"{_list_address(args.list)}: added {added}, already members {existing + parsed.duplicates}")


def _members_remove(args, cfg, store):
    parsed = _read_addresses(args.addresses)
    removed, missing = store.remove_members(_list_address(args.list), [m.address for m in parsed.members],
                                         "cli", _admin_user())
    for address in missing:
        print(f"warning: {address} is not a member", file=sys.stderr)
    print(f"{_list_address(args.list)}: removed {removed}")
    return 1 if missing else 0


def _members_ls(args, cfg, store):
    out = sys.stdout
    for m in store.members(_list_address(args.list)):
        out.write(m.address + "\n")


def _members_import(args, cfg, store):
    from . import importer
    address = _list_address(args.list)
    if store.get_list(address) is None:
        from .store import NoSuchList
        raise NoSuchList(address)
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
    _report_errors(parsed, args.file if args.file != "-" else "<stdin>")
    added, existing = store.add_members(address, parsed.members, "cli", _admin_user(),
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


def _members_export(args, cfg, store):
    import csv
    members = store.members(_list_address(args.list))
    extra = sorted({k for m in members for k in m.attributes})
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["address", "name", *extra])
    for m in members:
        writer.writerow([m.address, m.name, *(m.attributes.get(k, "") for k in extra)])


def _members_status(args, cfg, store, enable: bool):
    from . import bounce_processing
    from .store import DISABLED
    address = _list_address(args.list)
    if store.get_list(address) is None:
        from .store import NoSuchList
        raise NoSuchList(address)
    failed = 0
    for text in args.addresses:
        member_address = _address(text)
        if store.member(address, member_address) is None:
            print(f"warning: {member_address} is not a member of {address}", file=sys.stderr)
            failed += 1
            continue
        if enable:
            changed = bounce_processing.enable(cfg, store, address, member_address, "cli", _admin_user())
        else:
            changed = store.set_status(address, member_address, DISABLED, "cli", _admin_user())
        state = "enabled" if enable else "disabled"
        print(f"{address}: {member_address} {state}" + ("" if changed else f" (already {state})"))
    return 1 if failed else 0


def _bounces(args, cfg, store):
    from . import bounce_processing, bouncedb, bounces
    if args.run:
        for line in bounce_processing.periodic(cfg, store):
            print(line)
        return 0
    lists = [_list_address(args.list)] if args.list else [m.address for m in store.all_lists()]
    if args.list and store.get_list(lists[0]) is None:
        from .store import NoSuchList
        raise NoSuchList(lists[0])
    db = bouncedb.BounceDB(cfg.state_dir)
    try:
        if args.kept:
            for address in lists:
                for at, _, _, _, why, _, _, kept in db.records(address, verdict=bouncedb.UNRECOGNISED):
                    print(f"{bounces.fmt_time(at)}  {address}  {kept}\n    {why}")
            return 0
        print(f"{'LIST':<28} {'MEMBER':<32} {'STATE':<9} SCORE  {'LAST BOUNCE':<21} STATUS  DIAGNOSTIC")
        for address in lists:
            for row in db.rows(address):
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


def _members_history(args, cfg, store):
    import csv
    import time as time_mod
    address = _list_address(args.list)
    if store.get_list(address) is None:
        from .store import NoSuchList
        raise NoSuchList(address)
    events = store.history(address, _address(args.address) if args.address else None)
    stamp = lambda at: time_mod.strftime("%Y-%m-%dT%H:%M:%S%z", time_mod.localtime(at))  # noqa: E731
    if args.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["at", "address", "action", "how", "who", "detail"])
        for e in events:
            writer.writerow([stamp(e.at), e.address, e.action, e.how, e.who, e.detail])
        return 0
    for e in events:
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


_ADMIN = {
    ("list", "create"): _list_create,
    ("list", "delete"): _list_delete,
    ("list", "show"): _list_show,
    ("list", "ls"): _list_ls,
    ("list", "set"): _list_set,
    ("list", "unset"): _list_unset,
    ("members", "add"): _members_add,
    ("members", "remove"): _members_remove,
    ("members", "ls"): _members_ls,
    ("members", "import"): _members_import,
    ("members", "export"): _members_export,
    ("members", "history"): _members_history,
    ("members", "enable"): lambda args, cfg, store: _members_status(args, cfg, store, enable=True),
    ("members", "disable"): lambda args, cfg, store: _members_status(args, cfg, store, enable=False),
    ("bounces", None): _bounces,
}
