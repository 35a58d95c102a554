"""What the command groups share: argument checks, the admin's name, the store for admin commands."""

from __future__ import annotations

import functools
import os
import sys
from os import EX_DATAERR, EX_TEMPFAIL


class Fail(Exception):
    """Print `listmilter: MESSAGE` and exit with `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 list`, `2 lists`."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def parse_address(text: str) -> str:
    from listmilter.core import addresses
    try:
        return addresses.check(addresses.strip_brackets(text))
    except addresses.AddressError as e:
        raise Fail(str(e), EX_DATAERR) from None


def parse_list_address(text: str) -> str:
    from listmilter.core import addresses
    return addresses.key(parse_address(text))


def parse_setting(name: str, value):
    from listmilter.core import settings
    try:
        return settings.parse(name, value)
    except settings.SettingError as e:
        raise Fail(f"{name}: {e}", EX_DATAERR) from None


def admin_user() -> str:
    user = os.environ.get("SUDO_USER")
    try:
        import pwd
        me = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        me = str(os.getuid())
    return f"{me} (via sudo from {user})" if user and user != me else me


def read_addresses(items: list[str]):
    from listmilter.core import importer
    if items == ["-"]:
        lines = sys.stdin.read().splitlines()
        source = "<stdin>"
    else:
        lines = items
        source = "<arguments>"
    parsed = importer.parse(lines)
    report_errors(parsed, source if items == ["-"] else None)
    return parsed


def report_errors(parsed, source: str | None):
    if parsed.errors:
        for number, message in parsed.errors:
            where = f"{source}:{number}" if source else f"argument {number}"
            print(f"{where}: {message}", file=sys.stderr)
        raise Fail(f"{len(parsed.errors)} bad lines; nothing was changed", EX_DATAERR)


def admin(handler):
    """Run `handler(args, cfg, store)` with the config loaded and the store open (and closed after)."""
    @functools.wraps(handler)
    def run(args, path: str, explicit: bool) -> int:
        from listmilter.core import config as config_mod
        from listmilter.log import setup
        from listmilter.store import StoreError, open_store
        setup("stderr")
        cfg = config_mod.load(path, explicit)
        try:
            store = open_store(cfg)
        except StoreError as e:
            raise Fail(str(e), EX_TEMPFAIL) from None
        try:
            return handler(args, cfg, store) or 0
        finally:
            store.close()
    return run


def existing_list(store, text: str):
    """The list named by `text`, or NoSuchList."""
    from listmilter.core.model import NoSuchList
    address = parse_list_address(text)
    mlist = store.get_list(address)
    if mlist is None:
        raise NoSuchList(address)
    return mlist
