"""Bounce processing: what `listmilter deliver` does with mail to <list>-bounces@,
and the periodic run that warns and removes disabled members.

The decisions are in listmilter.core.bounces (pure); this module looks members up
in the store, records in the bounce database, changes memberships and sends
the notices, through the local MTA.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from dataclasses import dataclass, replace

from listmilter.app import notices, outgoing, probes
from listmilter.core import addresses, bounces, commands, envid, mac, mailparse
from listmilter.core import probes as probe_rules
from listmilter.core.bounces import Verdict
from listmilter.core.keys import Keyring, keyring
from listmilter.core.model import ACTIVE, DISABLED, MailingList, NoSuchList
from listmilter.log import fields, logger
from listmilter.store import kept, open_bounces, site_secret
from listmilter.store.bounce_records import BounceDB, Row

KEPT_FOLDER = kept.FOLDER


@dataclass(frozen=True)
class Outcome:
    kind: str                 # what the message was (bounces.DSN, AUTORESPONSE ...)
    verdicts: tuple[tuple[str, str, str], ...]   # (address, status, verdict)
    kept: str = ""            # file kept for the owner
    envid: str = ""

    def summary(self) -> str:
        parts = [f"<{a}> {s or '-'} {v}" for a, s, v in self.verdicts]
        text = self.kind + (": " + ", ".join(parts) if parts else "")
        return text + (f", kept {self.kept}" if self.kept else "")


def policy_of(config, mlist: MailingList) -> bounces.Policy:
    return bounces.Policy.of(config.list_settings(mlist.settings))


def handle(config, store, secret: Keyring, mlist: MailingList, sender: str, data: bytes,
           now: float | None = None) -> Outcome:
    """Process one message that reached <list>-bounces@."""
    now = time.time() if now is None else now
    report = read(data, sender)
    if report.kind == bounces.AUTORESPONSE:
        return Outcome(report.kind, ())
    policy = policy_of(config, mlist)
    post = envid.parse(report.envid, mlist.address, secret) if report.envid else None
    from_client = commands.received_client(data) != ""      # another host's report, not our MTA's own
    if post is not None and probe_rules.suspect_report(report.failures, from_client):
        # A remote MTA gets one post's copy for the recipients of its own domain: its report
        # naming failures at several is forged (or from a relay host). Our own MTA's names
        # any. Each named member is only probed anyway, within bounce_probes_per_day.
        logger.warning("bounce: %s", fields(list=f"<{mlist.address}>", envid=report.envid,
                                             failures=len(report.failures),
                                             status="suspect report: failures at several receiving "
                                                    "domains; the members named are only probed (at most "
                                                    "bounce_probes_per_day a day), none is scored"))
    db = open_bounces(config)
    try:
        verdicts: list[tuple[str, str, str]] = []
        suspects: list[tuple[int, bounces.Failure]] = []
        for failure in report.failures:
            member = store.member(mlist.address, failure.address)
            # Bound to a post at most, never to the member: a suspicion, not a score.
            verdict = bounces.suspicion(failure, post.posted_at if post else None,
                                        member.added if member else None,
                                        member is not None and member.status != DISABLED, now)
            final, row = db.record(mlist.address, failure, verdict, report.envid,
                                   post.post_id if post else "", policy, now)
            if verdict == Verdict.SUSPECT:
                # Also for a duplicate: a retry after a failed probe sends it.
                suspects.append((len(verdicts), failure))
                verdicts.append((failure.address, failure.status, ""))
                continue
            verdicts.append((failure.address, failure.status, final))
            if final == Verdict.DUPLICATE:
                # A retry: finish whatever the first delivery left pending.
                row = db.row(mlist.address, failure.address)
            if row is not None and row.pending:
                apply_pending(config, store, db, mlist, row, policy, now, secret)
        # All of the report's probes in one SMTP session (a DSN of our own MTA may name thousands).
        sent = probes.probe(config, db, mlist, [f for _, f in suspects], secret, now, from_client)
        for (i, failure), what in zip(suspects, sent, strict=True):
            verdicts[i] = (failure.address, failure.status, what)
        kept = ""
        unused = [v for v in verdicts if v[2] in bounces.FOR_OWNER]
        if not report.failures or unused:
            why = (_NO_FAILURE.get(report.kind, f"{report.kind}: names no failed recipient")
                   if not report.failures else
                   "; ".join(f"<{a}> {s or '-'}: {bounces.FOR_OWNER[Verdict(v)]}" for a, s, v in unused))
            kept = keep_for_owner(config, db, mlist, data, why, now)
        return Outcome(report.kind, tuple(verdicts), kept, report.envid)
    finally:
        db.close()


def read(data: bytes, sender: str) -> bounces.Report:
    """What the message is. Reading never fails: what cannot be read is UNREADABLE, kept for the owner."""
    try:
        return bounces.read_bytes(data, null_sender=(sender == ""))
    except Exception:   # a bug in reading hostile mail: keep the message, never retry it for days
        logger.exception("bounce: %s", fields(**{"from": f"<{sender}>"}, size=len(data),
                                               status="unreadable (internal error; kept for the owner)"))
        return bounces.Report(bounces.UNREADABLE)


_NO_FAILURE: dict[str, str] = {
    bounces.UNREADABLE: "unreadable: listmilter could not read this message (see its log)",
    bounces.FEEDBACK: "feedback: an abuse report (ARF): a recipient marked a post as spam; no delivery failed",
}


def keep_for_owner(config, db: BounceDB, mlist: MailingList, data: bytes, why: str, now: float) -> str:
    """Keep a message that scored nobody (listmilter.store.kept: bounded, named by content hash),
    and (forward) the owners."""
    ls = config.list_settings(mlist.settings)
    path, cut = kept.keep(config.state_dir, mlist.address, data, ls.bounce_kept_max_kb * 1024)
    if cut:
        why = f"{why} (kept: the first {ls.bounce_kept_max_kb} KB of {len(data) // 1024} KB)"
    _prune(config, mlist, now, path)
    db.record(mlist.address, bounces.Failure("", False, "", why[:300]), Verdict.UNRECOGNISED,
              now=now, kept=path)
    if ls.bounce_unrecognised == "forward":
        owners = config.owners(mlist.settings)
        # From the list's own <list>-owner@, so the owners' providers check SPF against
        # this host. Not -bounces@: a forward that failed would come back there,
        # score nobody and be forwarded again, forever; a failure to -owner@ reaches
        # the owners once, as a bounce from the null sender, and stops there.
        outgoing.send(config.outgoing, addresses.role_address(mlist.address, "owner"), list(owners),
                      notices.unrecognised_bounce(mlist.address, owners, why,
                                                  data[:ls.bounce_kept_max_kb * 1024]))
    return path


DIGEST_EVERY = bounces.DAY


def send_digest(config, db: BounceDB, mlist: MailingList, now: float) -> list[str]:
    """bounce_unrecognised: digest: one mail to the owners naming what was kept since the last
    one, at most once a day (DIGEST_EVERY); what was done. A digest the MTA did not take gives
    its messages back, and the next run tries again."""
    ls = config.list_settings(mlist.settings)
    if ls.bounce_unrecognised != "digest":
        return []
    claimed = db.claim_digest(mlist.address, now, DIGEST_EVERY, now - ls.bounce_kept_days * bounces.DAY)
    if not claimed:
        return []
    owners = config.owners(mlist.settings)
    try:
        # From <list>-owner@, as the forwarded copies: a digest that bounces reaches the owners
        # once and stops there.
        outgoing.send(config.outgoing, addresses.role_address(mlist.address, "owner"), list(owners),
                      notices.unrecognised_digest(mlist.address, owners, claimed))
    except Exception as e:
        db.unclaim_digest(mlist.address, now)
        return [fields(list=f"<{mlist.address}>",
                       status=f"unrecognised bounces digest not sent, tried again later ({e})")]
    return [fields(list=f"<{mlist.address}>", status="unrecognised bounces digest sent",
                   to=" ".join(f"<{o}>" for o in owners), messages=len(claimed))]


def _prune(config, mlist: MailingList, now: float, keep_path: str = "") -> list[str]:
    """Kept mail past the list's retention or over its quota goes; never fails the caller."""
    ls = config.list_settings(mlist.settings)
    try:
        gone = kept.prune(config.state_dir, mlist.address, now, ls.bounce_kept_days,
                          ls.bounce_kept_quota_mb * 1024 * 1024, keep_path)
    except OSError as e:
        logger.error("warning: bounce: cannot prune kept mail of %s: %s", mlist.address, e)
        return []
    if gone:
        logger.info("bounce: %s", fields(list=f"<{mlist.address}>", deleted=len(gone),
                                          status="kept mail past bounce_kept_days or bounce_kept_quota_mb"))
    return gone


def _evidence(db: BounceDB, list_address: str, address: str) -> list[tuple]:
    rows = db.records(list_address, address)
    return [(at, status, diag) for at, _, permanent, status, diag, _, verdict, _ in rows
            if permanent and verdict in (Verdict.SCORED, Verdict.COUNTED_TODAY)][-10:]


def apply_pending(config, store, db: BounceDB, mlist: MailingList, row: Row, policy: bounces.Policy,
                  now: float, secret: Keyring) -> None:
    """Carry out the action a score called for (bounces.STEPS says how); clear it once done."""
    steps = bounces.STEPS[bounces.Action(row.pending)]
    owners = config.owners(mlist.settings)
    detail = f"bounce score {row.score}, last {row.last_status or '-'} {row.last_diagnostic}".strip()
    if steps.membership == "unsubscribe":
        store.unsubscribe(mlist.address, row.address, "bounce", detail=detail)
    elif steps.membership == "disable":
        store.set_status(mlist.address, row.address, DISABLED, "bounce", detail=detail)
    links = ([decision_address(mlist.address, row.address, d, secret) for d in DECISIONS]
             if steps.decision_links else [])
    mails = [(list(owners), notices.bounce_owner(mlist.address, owners, row.address, steps.owner_notice,
                                                 row.score, _evidence(db, mlist.address, row.address), *links))]
    interval = policy.warning_interval_days * bounces.DAY
    warned = steps.warn_member and policy.warnings > 0
    if warned:
        mails.append(([row.address], notices.bounce_warning(mlist.address, row.address, 1, policy.warnings,
                                                            _removal_date(now, policy.warnings, interval))))
    outgoing.send_many(config.outgoing, [("", rcpts, m) for rcpts, m in mails])
    if steps.record == "forget":
        db.forget(mlist.address, row.address)
    elif steps.record == "disabled":
        db.mark_disabled(mlist.address, row.address, now, now + interval, 1 if warned else 0)
    else:
        db.mark_reported(mlist.address, row.address, now)
    logger.info("bounce: %s", fields(list=f"<{mlist.address}>", member=f"<{row.address}>",
                                      action=steps.logged_as, score=row.score))


def _removal_date(now: float, warnings_left: int, interval: float) -> str:
    return "on or after " + time.strftime("%Y-%m-%d", time.gmtime(now + warnings_left * interval))


def periodic(config, store, now: float | None = None) -> list[str]:
    """Warn and remove members disabled by bounces, finish pending actions, act on scores
    that reached a lowered threshold; what was done."""
    now = time.time() if now is None else now
    secret = site_secret(config)
    done: list[str] = []
    db = open_bounces(config)
    try:
        with db.periodic_turn() as mine:
            if not mine:     # several hosts share the database: one of them does it
                return ["skipped: another host is doing the periodic run now"]
            _periodic(config, store, db, secret, now, done)
    finally:
        db.close()
    return done


def _periodic(config, store, db, secret: Keyring, now: float, done: list[str]) -> None:
    """One periodic run's work, appended to `done`."""
    for lst in store.all_lists():
        for path in _prune(config, lst, now):
            done.append(f"deleted kept {path} ({lst.address})")
        done.extend(send_digest(config, db, lst, now))
    probes.expire(config, store, db, now, done)
    for row in db.rows():
        mlist = store.get_list(row.list)
        if mlist is None:
            db.forget(row.list, row.address)
            continue
        policy = policy_of(config, mlist)
        member = store.member(mlist.address, row.address)
        # A pending remove has removed the member already (its notice failed): finish it,
        # or the owners are never told.
        if row.pending and (member is not None or row.pending == "remove"):
            apply_pending(config, store, db, mlist, row, policy, now, secret)
            done.append(f"{row.pending} {row.address} ({mlist.address})")
            continue
        if member is None:
            db.forget(mlist.address, row.address)       # removed by other means
            continue
        if not row.acted and member.status == ACTIVE \
                and bounces.due(bounces.Score(row.score, row.last_scored, row.last_bounce), now, policy) \
                and db.set_pending(mlist.address, row.address, policy.action):
            # The threshold was lowered after this member scored.
            apply_pending(config, store, db, mlist, replace(row, pending=policy.action), policy, now, secret)
            done.append(f"{policy.action} {row.address} ({mlist.address}): bounce score {row.score} "
                        f"reached bounce_threshold {policy.threshold}")
            continue
        if not row.acted or row.next_warning == 0 or member.status != DISABLED:
            continue
        step = bounces.next_step(row.warnings_sent, row.next_warning, now, policy)
        interval = policy.warning_interval_days * bounces.DAY
        if step == "warn":
            number = row.warnings_sent + 1
            outgoing.send(config.outgoing, "", [row.address], notices.bounce_warning(
                mlist.address, row.address, number, policy.warnings,
                _removal_date(now, policy.warnings - row.warnings_sent, interval)))
            db.mark_warned(mlist.address, row.address, number, now + interval)
            done.append(f"warned {row.address} ({mlist.address}, {number}/{policy.warnings})")
        elif step == "remove":
            apply_pending(config, store, db, mlist, replace(row, pending="remove"),
                          policy, now, secret)
            done.append(f"removed {row.address} ({mlist.address})")


# -- the owner's decision by mail -------------------------------------------------
# A disable or notify notice carries two addresses, <list>-bounces+keep-TOKEN@
# and <list>-bounces+remove-TOKEN@. TOKEN is core/mac.py's 128-bit MAC of list,
# member and decision under a key derived for "bounce decision": it names the
# member without the address, and only the notice's readers know it. The member
# is found again among the list's scored members, so nothing needs to be stored.
# The 20-hex-digit codes of notices sent before core/mac.py are still accepted:
# their length and alphabet tell them apart, and an owner may answer weeks later.
DECISIONS = ("keep", "remove")
DECISION_USE = "bounce decision"
_DECISION_TOKEN = re.compile(rf"[a-z2-7]{{{mac.FULL}}}")
_OLD_DECISION_TOKEN = re.compile(r"[0-9a-f]{20}")


def _decision_token(list_address: str, member: str, decision: str, secret: Keyring | bytes,
                    kid: int | None = None) -> str:
    """The code under key `kid` (default: the current key)."""
    ring = keyring(secret)
    key = ring.own_key(ring.current_id if kid is None else kid, DECISION_USE)
    return mac.tag(key, addresses.key(list_address), addresses.key(member), decision)


def _old_decision_token(list_address: str, member: str, decision: str, ring: Keyring, kid: int) -> str:
    key = ring.own_mac_key(kid, DECISION_USE)
    old = hmac.new(key, "\0".join(("bounce-decision", addresses.key(list_address),
                                   addresses.key(member), decision)).encode(), hashlib.sha256)
    return old.hexdigest()[:20]


def _is_decision_token(token: str, list_address: str, member: str, decision: str,
                       secret: Keyring | bytes) -> bool:
    """Made with any key still accepted? (`token` comes from mail: any text.)"""
    ring = keyring(secret)
    if _DECISION_TOKEN.fullmatch(token):
        return any(mac.same(token, _decision_token(list_address, member, decision, ring, kid)) for kid in ring.ids)
    if _OLD_DECISION_TOKEN.fullmatch(token):
        return any(mac.same(token, _old_decision_token(list_address, member, decision, ring, kid))
                   for kid in ring.ids)
    return False


def decision_address(list_address: str, member: str, decision: str, secret: Keyring | bytes) -> str:
    return addresses.role_address(list_address, "bounces",
                                  f"{decision}-{_decision_token(list_address, member, decision, secret)}")


def decide(config, store, secret: Keyring, mlist: MailingList, extension: str, sender: str,
           data: bytes) -> str:
    """Mail to <list>-bounces+keep-TOKEN@ or +remove-TOKEN@: the owner's decision. The log status."""
    decision, _, token = extension.partition("-")
    msg = mailparse.parse(data, headers_only=True)
    if not sender or bounces.is_auto_response(msg):
        return "ignored (decision from the null sender or an auto-responder)"
    if not (_DECISION_TOKEN.fullmatch(token) or _OLD_DECISION_TOKEN.fullmatch(token)):
        return f"refused (not a {decision} token)"
    db = open_bounces(config)
    try:
        row = next((r for r in db.rows(mlist.address)
                    if _is_decision_token(token, mlist.address, r.address, decision, secret)),
                   None)
        if row is None:
            return f"refused (no bouncing member matches this {decision} token)"
        who = f"{sender}, {mailparse.message_id(msg.get('Message-ID'))}".rstrip(", ")
        if decision == "keep":
            enable(config, store, mlist.address, row.address, "owner", who)
        else:
            store.unsubscribe(mlist.address, row.address, "owner", who, "bouncing; the owner replied: remove")
            db.forget(mlist.address, row.address)
        return f"{'kept' if decision == 'keep' else 'removed'} <{row.address}> (owner's reply)"
    finally:
        db.close()


def enable(config, store, list_address: str, address: str, how: str, who: str) -> bool:
    """Re-enable a member and start their score again (the owner's `keep`)."""
    if store.get_list(list_address) is None:
        raise NoSuchList(list_address)
    changed = store.set_status(list_address, address, ACTIVE, how, who)
    db = open_bounces(config)
    try:
        forgot = db.forget(list_address, address)
    finally:
        db.close()
    return changed or forgot


PERIOD = 3600.0


def start_periodic(runtime, period: float = PERIOD, first: float = 60.0) -> threading.Thread:
    """`listmilter serve` runs `periodic` hourly (the first run a minute after start)."""
    from listmilter.app.runtime import every
    return every(runtime, "bounce", period, first, periodic)
