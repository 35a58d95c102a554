"""`listmilter secret rotate|show`: the site's keys (listmilter.store.secret)."""

from __future__ import annotations

import os
import time

from listmilter.cli.common import Fail
from listmilter.core import when


def add_parsers(sub) -> None:
    s = sub.add_parser("secret", help="the site's keys: rotate, show")
    ssub = s.add_subparsers(dest="secret_command", metavar="rotate|show", required=True)
    r = ssub.add_parser("rotate", help="make a new current key; older keys stay accepted for a grace period")
    r.add_argument("--grace-days", type=float, default=None, metavar="DAYS",
                   help="how long links and envelope ids made with older keys still work (default 30; "
                        "0: refuse them now)")
    r.set_defaults(handler=rotate)
    s2 = ssub.add_parser("show", help="key ids, ages and grace periods (never the keys)")
    s2.set_defaults(handler=show)


def _days(seconds: float) -> str:
    days = round(abs(seconds) / 86400)
    return f"{days} day{'s' if days != 1 else ''}"


def describe(state_dir: str, now: float) -> list[str]:
    from listmilter.store import secret as secret_mod
    keys = secret_mod.read_keys(state_dir)
    if keys is None:
        return [f"no keys in {state_dir} yet: listmilter makes the first one when it first needs it"]
    on_disk = secret_mod.KEYS_NAME if len(keys) > 1 or keys[0].id else secret_mod.FILE_NAME
    return _describe(keys, os.path.join(state_dir, on_disk), now,
                     os.path.join(state_dir, secret_mod.FILE_NAME))


def describe_database(cfg, now: float) -> list[str]:
    """The same for the keys in the PostgreSQL database of store.dsn."""
    from listmilter.store.postgresql import db, stores
    keys_db = stores.PgKeys(db.target_of(cfg))
    keys = keys_db.keys()
    if not keys:
        return [f"no keys in {keys_db.describe} yet: listmilter makes the first one when it first needs it"]
    return _describe(keys, keys_db.describe, now)


def _describe(keys, where: str, now: float, key0_file: str | None = None) -> list[str]:
    lines = [f"keys in {where}:"]
    for i, key in enumerate(keys):
        made = key.created
        if made is None and key0_file:      # key 0: the `secret` file, made before key ids
            try:
                made = os.stat(key0_file).st_mtime
            except OSError:
                made = None
        age = f"made {when.utc_minute(made)} ({_days(now - made)} ago)" if made is not None else "made before key ids"
        if i == 0:
            state = "current (makes new links and envelope ids)"
        elif key.until is None or now < key.until:
            state = (f"accepted until {when.utc_minute(key.until)} ({_days(key.until - now)} left)"
                     if key.until is not None else "accepted")
        else:
            state = f"no longer accepted (since {when.utc_minute(key.until)})"
        lines.append(f"key {key.id}: {state}, {age}")
    return lines


def _config(path: str, explicit: bool):
    from listmilter.core import config as config_mod
    return config_mod.load(path, explicit)


def show(args, path: str, explicit: bool) -> int:
    from listmilter.store import StoreError
    cfg = _config(path, explicit)
    try:
        lines = describe_database(cfg, time.time()) if cfg.dsn else describe(cfg.state_dir, time.time())
    except StoreError as e:
        raise Fail(str(e), os.EX_TEMPFAIL) from None
    for line in lines:
        print(line)
    return 0


def rotate(args, path: str, explicit: bool) -> int:
    from listmilter.store import secret as secret_mod
    grace = secret_mod.GRACE_DAYS if args.grace_days is None else args.grace_days
    if not grace >= 0:
        raise Fail("--grace-days must be 0 or more", os.EX_USAGE)
    cfg = _config(path, explicit)
    if cfg.dsn:         # every host reads the new key from the database within seconds
        from listmilter.store import StoreError
        from listmilter.store.postgresql import db, stores
        try:
            keys = stores.PgKeys(db.target_of(cfg)).rotate(grace)
        except StoreError as e:
            raise Fail(str(e), os.EX_TEMPFAIL) from None
    else:
        keys = secret_mod.rotate(cfg.state_dir, grace)
    print(f"key {keys[0].id} is now current; "
          + (f"links and envelope ids made with older keys work for {grace:g} more days"
             if len(keys) > 1 else "links and envelope ids made with older keys no longer work"))
    print("running listmilter processes use it from their next message or request")
    return 0
