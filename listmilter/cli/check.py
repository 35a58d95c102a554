"""`listmilter check`: the config, the store, and what Postfix will make of the lists."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from listmilter.cli.common import plural
from listmilter.core import config as config_mod
from listmilter.core import plan, settings
from listmilter.mta import postfix_check as mta
from listmilter.store import StoreError, open_store

# Bytes a milter-added recipient with NOTIFY=FAILURE and ORCPT takes in a
# Postfix queue file: 3 x its length + 60 (measured with Postfix 3.7.11 by
# bench/run_queuesize.py; see docs/performance.md).
QUEUE_BYTES_PER_RECIPIENT = 60
QUEUE_BYTES_MESSAGE_ALLOWANCE = 1 << 20   # room left for the message itself


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def queue_file_estimate(recipients: list[str]) -> int:
    return sum(3 * len(r) + QUEUE_BYTES_PER_RECIPIENT for r in recipients) + QUEUE_BYTES_MESSAGE_ALLOWANCE


def _check_sendmail(cfg, report: Report) -> None:
    """mta.type sendmail: held posts are listed and released with mta.sendmail (docs/moderation.md)."""
    program = cfg.sendmail_program
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        report.errors.append(f"mta.sendmail: {program} is not an executable file; `listmilter held` "
                             "needs it for posts held in Sendmail's quarantine")
    else:
        report.notes.append(f"mta: sendmail ({program}); Postfix checks skipped")


def run(path: str, explicit: bool) -> Report:
    report = Report()
    try:
        cfg = config_mod.load(path, explicit)
    except config_mod.ConfigError as e:
        report.errors.append(str(e))
        return report
    report.notes.append(f"config: {cfg.path or 'built-in defaults (no ' + path + ')'}")
    limit = None    # Postfix's message_size_limit
    postfix = mta.Postfix.ask() if cfg.mta == "postfix" else None
    if cfg.mta == "sendmail":
        _check_sendmail(cfg, report)
    elif postfix is None:
        report.notes.append("postfix: postconf not found; Postfix checks skipped")
    elif postfix.error:
        report.errors.append(f"postfix: postconf cannot read the Postfix config ({postfix.error}); "
                             "set MAIL_CONFIG to the instance's config folder")
        postfix = None
    else:
        mta.check(postfix, cfg, report)
        size_limit = postfix.params.get("message_size_limit", "")
        if size_limit.isdigit():
            limit = int(size_limit)
    _check_web(cfg, report)
    if cfg.dsn:
        if not _check_postgresql(cfg, report):
            return report       # the store cannot open either: one line says why
    else:
        _check_databases(cfg, report)
        _check_keys(cfg, report)
    if cfg.backend == "sqlite" and not os.path.exists(cfg.store_path):
        report.warnings.append(f"{cfg.store_path}: sqlite store does not exist yet; "
                               "`listmilter serve` or `listmilter list create` creates it")
        return report
    try:
        store = open_store(cfg)
        problems = store.check()
        lists = store.all_lists()
    except StoreError as e:
        report.errors.append(str(e))
        return report
    report.errors.extend(f"{cfg.store_path}: integrity: {p}" for p in problems)
    where = {"yaml": cfg.path, "postgresql": getattr(store, "path", "")}.get(cfg.backend, cfg.store_path)
    report.notes.append(f"store: {cfg.backend} ({where}), {plural(len(lists), 'list')}")

    personal = []       # (members, list) of the lists whose posts go one copy per member
    for mlist in lists:
        eff = cfg.list_settings(mlist.settings)
        is_personal = plan.personal(cfg.web.base_url, eff)
        # Read once, and only when a check below needs them (a big list is a big read).
        recipients = store.recipients(mlist.address) if is_personal or limit else []
        if is_personal:
            personal.append((len(recipients), mlist.address))
        for name, value in mlist.settings.items():
            try:
                settings.parse(name, list(value) if isinstance(value, tuple) else value)
            except settings.SettingError as e:
                report.errors.append(f"{mlist.origin}: list {mlist.address}: {name}: {e}")
        folder = eff.templates
        if folder and not os.path.isdir(folder):
            report.warnings.append(f"{mlist.origin}: list {mlist.address}: templates folder {folder} "
                                   "does not exist; the shipped templates are used")
        if not eff.owners:
            report.warnings.append(f"{mlist.origin}: list {mlist.address} has no owners; "
                                   f"mail to its -owner address goes to {cfg.site_admin}")
        if limit:
            estimate = queue_file_estimate(recipients)
            if estimate > limit:
                report.warnings.append(
                    f"list {mlist.address}: a post makes a Postfix queue file of about {estimate} bytes, "
                    f"more than message_size_limit = {limit}: Postfix would refuse posts with "
                    f"'552 5.3.4 message file too big'. Set message_size_limit (and mailbox_size_limit) "
                    f"to at least {estimate * 5 // 4} in main.cf")
    store.close()
    if personal and not cfg.outgoing.reinject:
        report.warnings.append(
            f"{plural(len(personal), 'list')} (the biggest: {max(personal)[1]}) send one copy per member and "
            "outgoing.reinject is not set: the poster waits until every copy is queued; "
            "set it to the MTA's listener without milters (docs/postfix.md)")
    elif personal and postfix is not None:
        mta.check_fanout(postfix, cfg, report, max(personal)[0])
    return report


def _check_web(cfg, report: Report) -> None:
    """The `web:` keys."""
    web = cfg.web
    if web.base_url:
        report.notes.append(f"web: base_url={web.base_url}, listen={web.listen or '(not here)'}: posts go out "
                            "as one copy per member with a one-click List-Unsubscribe (lists with one_click: true, "
                            "or a footer with {member})")
        if web.base_url.startswith("http://"):
            report.warnings.append(f"web.base_url {web.base_url} is not https: mail providers expect "
                                   "https one-click unsubscribe URLs (RFC 8058)")
        if cfg.outgoing.sendmail:
            report.warnings.append("web.base_url with outgoing.sendmail: every personal copy of a post is "
                                   "one sendmail process; use outgoing.smtp for lists of any size")
    else:
        report.notes.append("web: no base_url: posts carry only a mailto: List-Unsubscribe (lists with a "
                            "footer naming {member}: one copy per member), confirmation mails have no link")
        if web.listen:
            report.warnings.append(f"web.listen {web.listen} without web.base_url: no mail will link to it")


def _check_databases(cfg, report: Report) -> None:
    """pending.sqlite and bounces.sqlite, where they exist: opened (so brought up to this
    version's schema, or refused if newer) and checked by SQLite's quick_check."""
    from listmilter.store import bounce_records, pending
    for name, open_db in ((pending.FILE_NAME, pending.PendingDB), (bounce_records.NAME, bounce_records.BounceDB)):
        path = os.path.join(cfg.state_dir, name)
        if not os.path.exists(path):
            continue
        try:
            db = open_db(cfg.state_dir)
            try:
                problems = db.check()
            finally:
                db.close()
        except StoreError as e:
            report.errors.append(str(e))
            continue
        report.errors.extend(f"{path}: integrity: {p}" for p in problems)


def _check_postgresql(cfg, report: Report) -> bool:
    """The database of store.dsn: reachable, its schema this version's. False if it cannot be used."""
    from listmilter.store.postgresql import db as pgdb
    from listmilter.store.postgresql.schema import MIGRATIONS
    target = pgdb.target_of(cfg)
    try:
        version = pgdb.version_of(target)
    except StoreError as e:
        report.errors.append(str(e))
        return False
    where = f"postgresql database {target.describe}"
    if version == 0:
        report.errors.append(f"{where} has no listmilter tables: run `listmilter db upgrade`")
        return False
    if version < len(MIGRATIONS):
        report.errors.append(f"{where} has schema version {version}, this listmilter needs {len(MIGRATIONS)}: "
                             "run `listmilter db upgrade`")
        return False
    if version > len(MIGRATIONS):
        report.errors.append(f"{where} has schema version {version}, this listmilter needs {len(MIGRATIONS)}: "
                             "it was written by a newer listmilter; upgrade listmilter on this host")
        return False
    report.notes.append(f"state: {where}, schema version {version}")
    _check_pg_keys(cfg, target, report)
    return True


def _check_pg_keys(cfg, target, report: Report) -> None:
    """The site's keys in the database; and a key file left in state_dir that the database does
    not know: what was signed with it (ENVIDs of posts in flight, links in old mail) no longer verifies."""
    from listmilter.store import secret as secret_mod
    from listmilter.store.postgresql.stores import PgKeys
    try:
        keys = PgKeys(target).keys()
    except StoreError as e:
        report.errors.append(str(e))
        return
    if not keys:
        report.notes.append("keys: none in the database yet; the first run makes one")
    else:
        report.notes.append(f"keys: current key {keys[0].id}, {len(keys) - 1} older ones in the database "
                            "(`listmilter secret show`)")
    try:
        local = secret_mod.read_keys(cfg.state_dir) or []
    except (secret_mod.SecretError, OSError):
        return          # unused with store.dsn: not worth an error
    known = {k.secret for k in keys}
    if any(k.secret not in known for k in local):
        path = os.path.join(cfg.state_dir, secret_mod.FILE_NAME)
        report.warnings.append(f"{path} holds keys the database does not: envelope ids and links made with them "
                               "no longer verify; `listmilter migrate` copies them (docs/upgrade.md), or remove "
                               "the files")


def _check_keys(cfg, report: Report) -> None:
    """The site's keys, as serve would read them (a secret it refuses stops it starting)."""
    from listmilter.store import secret as secret_mod
    try:
        keys = secret_mod.read_keys(cfg.state_dir)
    except (secret_mod.SecretError, OSError) as e:
        report.errors.append(f"keys: {e}")
        return
    if keys is None:
        report.notes.append(f"keys: none in {cfg.state_dir} yet; the first run makes one")
    else:
        report.notes.append(f"keys: current key {keys[0].id}, {len(keys) - 1} older ones on file "
                            "(`listmilter secret show`)")


def add_parsers(sub) -> None:
    s = sub.add_parser("check", help="check the config file and the store; exit non-zero on errors")
    s.add_argument("--live", action="store_true",
                   help="also ask the running serve, its sockets, the outgoing MTA and Postfix's postmap")
    s.set_defaults(handler=main)


def live(path: str, explicit: bool, report: Report) -> None:
    """`check --live`: the path a post takes, probed while it runs (listmilter.mta.live)."""
    from listmilter.mta import live as live_mod
    try:
        cfg = config_mod.load(path, explicit)
    except config_mod.ConfigError:
        return          # already one line of the report
    lists: list[str] = []
    try:
        if cfg.backend == "sqlite" and not os.path.exists(cfg.store_path):
            raise StoreError("no store yet")       # not made by a check
        store = open_store(cfg)
        try:
            lists = [m.address for m in store.all_lists()]
        finally:
            store.close()
    except StoreError:
        pass            # already in the report; the probes do not need the store
    live_mod.run(cfg, lists, report)


def main(args, path: str, explicit: bool) -> int:
    report = run(path, explicit)
    if args.live:
        live(path, explicit, report)
    for line in report.notes:
        print(line)
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.errors:
        print(line, file=sys.stderr)      # each names its place: FILE:LINE, the store, the list
    return 1 if report.errors else 0
