"""Bounce probes (core/probes.py decides): send one to a suspected member, clear the
ones that did not bounce in time (what comes back is app/probe_bounces.py).

A failure in mail to the plain bounce address never moves a score (bounces.suspicion):
the member gets one probe message from `<list>-bounces+probe-CODE@`, and only a bounce of that probe
takes the list's bounce_action.
"""

from __future__ import annotations

from listmilter.app import notices, outgoing
from listmilter.core import probes
from listmilter.core.bounces import Failure, Verdict
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList
from listmilter.log import fields, logger
from listmilter.store.bounce_records import BounceDB


def probe(config, db: BounceDB, mlist: MailingList, failures: list[Failure], secret: Keyring,
          now: float, from_client: bool = False) -> list[str]:
    """Send each failure's member one probe unless one is in flight, all in one SMTP session;
    what was done for each (for the log line), in order: Verdict.UNPROBED for those past the
    list's bounce_probes_per_day, which counts for a report `from_client` (another host) only.
    If the MTA takes not all of them, those it took count as sent, the error is raised, and
    the retry of the bounce sends the others."""
    ls = config.list_settings(mlist.settings)
    per_day = ls.bounce_probes_per_day if from_client else 0
    out: list[str] = []
    started: list[tuple[Failure, str, str]] = []
    for failure in failures:
        sender = probes.make(mlist.address, failure.address, now, secret)
        if sender is None:
            out.append("suspect (no probe: the probe address would exceed 64 characters)")
            continue
        why = f"{failure.status or '-'} {failure.diagnostic}".strip()
        start = db.start_probe(mlist.address, failure.address, now, ls.bounce_probe_days, why, per_day)
        if start == probes.Start.IN_FLIGHT:
            out.append("suspect (a probe is in flight already)")
        elif start == probes.Start.OVER_BUDGET:
            out.append(Verdict.UNPROBED)
        else:
            started.append((failure, sender, why))
            out.append("suspect (probe sent)")
    if Verdict.UNPROBED in out:
        logger.warning("bounce: %s", fields(list=f"<{mlist.address}>", unprobed=out.count(Verdict.UNPROBED),
                                             status=f"probe budget spent: {per_day} probes in the last day for "
                                                    "reports from other hosts (bounce_probes_per_day); "
                                                    "the rest are kept for the owners"))
    queued: list[str] = []
    try:
        outgoing.send_many(config.outgoing, [(sender, [f.address], notices.bounce_probe(mlist.address, f.address))
                                             for f, sender, _ in started], queued)
    except Exception:
        # The MTA took the first len(queued): those probes are out and stay in flight (the
        # retry finds them so, and sends no second one). The rest are ended, for the retry.
        for failure, _, _ in started[len(queued):]:
            db.end_probe(mlist.address, failure.address, now)
        raise
    finally:
        for (failure, sender, why), queue_id in zip(started, queued, strict=False):     # those taken
            logger.info("bounce: %s", fields(list=f"<{mlist.address}>", member=f"<{failure.address}>",
                                              action="probe sent", **{"from": f"<{sender}>"}, queued_as=queue_id,
                                              status=f"suspected by {why}; waiting {ls.bounce_probe_days} days"))
    return out


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

