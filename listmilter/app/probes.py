"""Bounce probes (core/probes.py decides): send one to a suspected member, clear the
ones that did not bounce in time (what comes back is app/probe_bounces.py).

A failure bound only to a post's ENVID never moves a score: the member gets one
probe message from `<list>-bounces+probe-CODE@`, and only a bounce of that probe
takes the list's bounce_action.
"""

from __future__ import annotations

from listmilter.app import notices, outgoing
from listmilter.core import probes
from listmilter.core.bounces import Failure
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList
from listmilter.log import fields, logger
from listmilter.store.bounce_records import BounceDB


def probe(config, db: BounceDB, mlist: MailingList, failure: Failure, secret: Keyring, now: float) -> str:
    """Send `failure`'s member one probe unless one is in flight; what was done (for the log)."""
    ls = config.list_settings(mlist.settings)
    sender = probes.make(mlist.address, failure.address, now, secret)
    if sender is None:
        return "suspect (no probe: the probe address would exceed 64 characters)"
    why = f"{failure.status or '-'} {failure.diagnostic}".strip()
    if not db.start_probe(mlist.address, failure.address, now, ls.bounce_probe_days, why):
        return "suspect (a probe is in flight already)"
    try:
        outgoing.send(config.outgoing, sender, [failure.address], notices.bounce_probe(mlist.address, failure.address))
    except Exception:
        db.end_probe(mlist.address, failure.address, now)     # the retry of this bounce sends it
        raise
    logger.info("bounce: %s", fields(list=f"<{mlist.address}>", member=f"<{failure.address}>",
                                      action="probe sent", **{"from": f"<{sender}>"},
                                      status=f"suspected by {why}; waiting {ls.bounce_probe_days} days"))
    return "suspect (probe sent)"


def expire(config, store, db: BounceDB, now: float, done: list[str]) -> None:
    """Probes that did not bounce within bounce_probe_days: the suspicion is cleared."""
    for list_key, address, sent_at, why in db.probes():
        mlist = store.get_list(list_key)
        days = config.list_settings(mlist.settings).bounce_probe_days if mlist else 0
        if mlist is not None and not probes.expired(sent_at, now, days):
            continue
        if db.end_probe(list_key, address, sent_at):
            line = f"probe to {address} ({list_key}) did not bounce in {days} days: suspicion cleared ({why})"
            logger.info("bounce: %s", fields(list=f"<{list_key}>", member=f"<{address}>",
                                              action="probe cleared", status=line))
            done.append(line)

