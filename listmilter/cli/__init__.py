"""The `listmilter` command: one module per command group.

    serve.py          serve, deliver, web (the long-running and MTA-run commands)
    check.py          check
    lists.py          list create|delete|show|ls|set|unset
    members.py        members add|remove|ls|import|export|enable|disable|history
    bounces.py        bounces
    held.py           held [LIST], held approve|reject|discard ID...
    trace.py          trace
    archive.py        archive
    posts.py          posts (personal posts in fan-out)
    report.py         report (a list's delivery report)
    subscriptions.py  pending, approve, reject
    secret.py         secret rotate|show
    db.py             db upgrade, migrate (the state databases; SQLite to PostgreSQL)

Each adds its parsers with a `handler` default; every subcommand is a thin
adapter: parse arguments, call the core and the application, print. Errors
become one line (`listmilter: ...` or `FILE:LINE: ...`) and an exit code
from sysexits.h, here in one place, never a traceback.
"""

from __future__ import annotations

import sys

from listmilter import __version__

GROUPS = ("serve", "check", "subscriptions", "lists", "members", "bounces", "held", "secret", "trace", "archive",
          "posts", "report", "db")


def _parser():
    import argparse
    import importlib
    p = argparse.ArgumentParser(prog="listmilter", description="Mailing lists inside your MTA.")
    p.add_argument("-c", "--config", metavar="CONFIG",
                   help="config file (default: $LISTMILTER_CONFIG or /etc/listmilter/listmilter.yaml)")
    p.add_argument("--version", action="version", version=f"listmilter {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in GROUPS:
        importlib.import_module(f"listmilter.cli.{group}").add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Postfix starts `deliver` once per message: hand it to the running serve
    # before paying for argparse, the config and the core (listmilter.mta.handoff).
    from listmilter.mta import handoff
    code = handoff.deliver(argv)
    if code is not None:
        return code
    from listmilter import paths
    args = _parser().parse_args(argv)
    path, explicit = paths.path_from_environment(args.config)
    try:
        return args.handler(args, path, explicit) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        message, code = _failure(e)
        if code is None:
            raise
        print(message, file=sys.stderr)
        return code


def _failure(e: Exception) -> tuple[str, int | None]:
    """The one place where errors become the CLI's message and exit code (None: a bug, raise)."""
    from os import EX_CONFIG, EX_NOINPUT, EX_TEMPFAIL, EX_USAGE

    from listmilter.app.outgoing import OutgoingError
    from listmilter.cli.common import Fail
    from listmilter.core.config import ConfigError
    from listmilter.core.errors import ListmilterError
    from listmilter.core.model import ListExists, NoSuchList
    from listmilter.store import ReadOnlyStore
    from listmilter.store.secret import SecretError
    if isinstance(e, Fail):
        return f"listmilter: {e}", e.code
    if isinstance(e, ConfigError):
        return str(e), EX_CONFIG
    if isinstance(e, SecretError):          # like a config error: the admin must fix a file
        return f"listmilter: {e}", EX_CONFIG
    if isinstance(e, NoSuchList):
        return f"listmilter: no such list: {e}", EX_NOINPUT
    if isinstance(e, ListExists):
        return f"listmilter: list already exists: {e}", 1
    if isinstance(e, ReadOnlyStore):
        return f"listmilter: {e}", EX_USAGE
    if isinstance(e, OutgoingError):
        return f"listmilter: not done, mail could not be sent: {e}", EX_TEMPFAIL
    if isinstance(e, ListmilterError):
        return f"listmilter: {e}", EX_TEMPFAIL if e.temporary else 1
    return "", None
