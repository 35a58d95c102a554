"""Mail to a probe's one-time address, `<list>-bounces+probe-CODE@` (core/probes.py).

Whatever comes back there from the null sender, DSN or not, while that probe is
in flight, says the member's address is dead: the list's bounce_action is taken
(listmilter.app.bounce_processing carries it out). A code that verifies for no
probe in flight is no probe address: the caller handles the message as mail to
the plain `<list>-bounces@`.
"""

from __future__ import annotations

import time

from listmilter.app import bounce_processing
from listmilter.app.bounce_processing import Outcome
from listmilter.core import probes
from listmilter.core.bounces import Verdict
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList
from listmilter.store import open_bounces


def handle(config, store, secret: Keyring, mlist: MailingList, extension: str, sender: str, data: bytes,
           now: float | None = None) -> Outcome | None:
    """Mail to `<list>-bounces+probe-CODE@`; None if CODE verifies for no probe in flight
    (the caller then handles it as mail to the plain bounce address)."""
    now = time.time() if now is None else now
    db = open_bounces(config)
    try:
        flying = {address: sent_at for _, address, sent_at, _ in db.probes(mlist.address)}
        bound = probes.find(extension, mlist.address, flying, secret)
        if bound is None:
            return None
        report = bounce_processing.read(data, sender)
        kind = f"probe {report.kind}"
        decision = probes.on_bounce(flying.get(bound.member), bound, sender == "", report.kind)
        if decision != probes.DEAD:
            return Outcome(kind, ((bound.member, "", decision),))
        failure = probes.failure_of(report, bound.member)
        policy = bounce_processing.policy_of(config, mlist)
        # The address is dead: the list's action, whatever the score (the probe is the evidence).
        # Recorded once per probe; the probe stays in flight until the action is done, so
        # a retry after a failed notice finds it again and finishes (as for a scored DSN).
        # Once per probe: its time as recorded (two probes of one member may share a second,
        # and so a code), so a retry of this DSN is a duplicate and the next probe's is not.
        db.record(mlist.address, failure, Verdict.SCORED, report.envid,
                  f"{probes.PREFIX}{flying[bound.member]:.6f}", policy, now)
        db.set_pending(mlist.address, bound.member, policy.action)
        row = db.row(mlist.address, bound.member)
        member = store.member(mlist.address, bound.member)
        if row is not None and row.pending and (member is not None or row.pending == "remove"):
            bounce_processing.apply_pending(config, store, db, mlist, row, policy, now, secret)
        db.end_probe(mlist.address, bound.member, flying[bound.member])
        return Outcome(kind, ((bound.member, failure.status, Verdict.PROBE_BOUNCED),), "", report.envid)
    finally:
        db.close()
