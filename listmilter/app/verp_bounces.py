"""Bounces to a personal copy's VERP address, `<list>-bounces+CODE@` (core/verp.py).

The code names the member and the post, so whatever comes back there is that
member's (core.verp.failure_of says what counts): it is scored for that member
only, tied to the post by the code even when the ENVID was dropped. A code that
does not verify (forged, garbled, a key past its grace period) is no VERP
address: the message is handled as mail to the plain `<list>-bounces@`
(listmilter.app.bounce_processing), which keeps for the owner what it cannot tie
to a post.

Kept apart from bounce_processing.py, whose reading and recording it reuses.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from listmilter.app import bounce_processing
from listmilter.app.bounce_processing import Outcome
from listmilter.core import bounces, envid, verp
from listmilter.core.bounces import Verdict
from listmilter.core.keys import Keyring
from listmilter.core.model import DISABLED, MailingList
from listmilter.log import logger
from listmilter.store import open_bounces

# A bounce that names none of the list's members costs one HMAC per member to tie to its
# code (about 1 s at 100,000 members): anyone can send such mail from the null sender, so
# serve does at most this many of those scans per list and hour; past it, the message is
# handled as mail to the plain bounce address (kept for the owners, nobody scored).
MEMBER_SCANS_PER_HOUR = 30


class _ScanBudget:
    """Member scans done per list in the last hour (serve's hand-off threads share it)."""

    def __init__(self, per_hour: int):
        self.per_hour = per_hour
        self._done: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def take(self, list_address: str, now: float) -> bool:
        with self._lock:
            done = self._done.setdefault(list_address, deque())
            while done and done[0] <= now - 3600:
                done.popleft()
            if len(done) >= self.per_hour:
                return False
            done.append(now)
            return True


member_scans = _ScanBudget(MEMBER_SCANS_PER_HOUR)


def is_code(extension: str) -> bool:
    """Does the extension look like a VERP code (not yet verified)?"""
    return verp.parse(extension) is not None


def handle(config, store, secret: Keyring, mlist: MailingList, extension: str, sender: str, data: bytes,
           now: float | None = None) -> Outcome | None:
    """Process one message to `<list>-bounces+CODE@`; None if CODE does not verify for any
    address the message names or any member of the list (the caller then handles it as
    mail to the plain bounce address)."""
    now = time.time() if now is None else now
    code = verp.parse(extension)
    if code is None or not verp.fresh(code, now):
        return None
    report = bounce_processing.read(data, sender)
    named = [f.address for f in report.failures]
    # The addresses the bounce names first: one HMAC each. Only a bounce that names
    # none (or only forwarded addresses) costs one per member of the list.
    bound = verp.find(extension, mlist.address, named, secret)
    if bound is None:
        if not member_scans.take(mlist.address, now):
            logger.warning("verp: %s: more than %d bounces an hour name no member; this one is handled "
                           "as mail to the plain bounce address", mlist.address, MEMBER_SCANS_PER_HOUR)
            return None
        bound = verp.find(extension, mlist.address, (m.address for m in store.members(mlist.address)), secret)
    if bound is None:
        return None
    failure = verp.failure_of(report, bound.member, sender == "")
    kind = f"verp {report.kind}"
    if failure is None:
        if report.kind == bounces.AUTORESPONSE:
            return Outcome(kind, ())
        db = open_bounces(config)
        try:
            why = f"{report.kind} to the VERP address of <{bound.member}>: names no failure"
            kept = bounce_processing.keep_for_owner(config, db, mlist, data, why, now)
        finally:
            db.close()
        return Outcome(kind, (), kept, report.envid)
    # The ENVID's post id keeps its case (the code's is lower-cased): use it when it is the same post.
    post = envid.parse(report.envid, mlist.address, secret) if report.envid else None
    if post is None or post.post_id.lower() != bound.post_id:
        post = envid.Post(bound.post_id, bound.posted_at)
    member = store.member(mlist.address, bound.member)
    verdict = bounces.verdict(failure, bounces.DSN, post.posted_at, member.added if member else None,
                              member is not None and member.status != DISABLED)
    policy = bounce_processing.policy_of(config, mlist)
    db = open_bounces(config)
    try:
        final, row = db.record(mlist.address, failure, verdict, report.envid, post.post_id, policy, now)
        if final == Verdict.DUPLICATE:
            row = db.row(mlist.address, failure.address)     # a retry: finish what the first left pending
        if row is not None and row.pending:
            bounce_processing.apply_pending(config, store, db, mlist, row, policy, now, secret)
        kept = ""
        if final in bounces.FOR_OWNER:
            kept = bounce_processing.keep_for_owner(
                config, db, mlist, data, f"<{failure.address}> {failure.status or '-'}: {bounces.FOR_OWNER[final]}",
                now)
        return Outcome(kind, ((failure.address, failure.status, final),), kept, report.envid)
    finally:
        db.close()
