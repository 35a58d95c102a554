"""Delivery reports, applied: the rows read from the list store and the bounce records
(listmilter.core.report does the counting), and the weekly mail to the owners that
`listmilter serve` sends for a list with `report_weekly: true`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from listmilter.app import notices, outgoing
from listmilter.core import addresses, report
from listmilter.core.model import ACTIVE, MailingList
from listmilter.log import fields
from listmilter.store import open_bounces

WEEK = 7 * report.DAY
PERIOD = 3600.0         # how often serve looks for a list whose weekly report is due


def build(config, store, bounce_db, mlist: MailingList, since: float, now: float | None = None) -> report.Report:
    """The list's report from `since` to now, from what the stores recorded."""
    now = time.time() if now is None else now
    posts = [report.Post(post_id, at, recipients, refused)
             for post_id, at, recipients, refused in store.posts(mlist.address, since)]
    failures = [report.Failure(at, post_id, address, bool(permanent), status)
                for at, post_id, address, permanent, status in bounce_db.failures_since(mlist.address, since)]
    members = store.members(mlist.address)
    return report.build(mlist.address, since, now, posts, failures, store.history(mlist.address),
                        len(members), sum(1 for m in members if m.status == ACTIVE))


def weekly_mail(mlist: MailingList, owners: tuple[str, ...], rep: report.Report, templates: str = "") -> bytes:
    owner = addresses.role_address(mlist.address, "owner")
    subject, text = notices.render(notices.template_text("weekly_report", templates), {
        "list": mlist.address, "since": report.day_of(rep.since), "until": report.day_of(rep.until),
        "posts": str(len(rep.posts)), "recipients": str(rep.recipients),
        "permanent": str(rep.permanent), "temporary": str(rep.temporary),
        "report": report.text(rep)})
    return notices.command_reply(owner, ", ".join(owners), subject, text)


def periodic(config, store, bounce_db, now: float | None = None) -> Iterator[str]:
    """Send each due weekly report (a line per list sent or failed). At most one a week per list:
    the time is claimed in the store before sending (one host of several sends it) and given
    back if the MTA did not take the mail, so the next run tries again."""
    now = time.time() if now is None else now
    for mlist in store.all_lists():
        eff = config.list_settings(mlist.settings)
        if not eff.report_weekly:
            continue
        last = store.report_sent(mlist.address)
        if not report.weekly_due(last, now):
            continue
        owners = config.owners(mlist.settings)
        if not owners:
            continue
        if not store.claim_report(mlist.address, now, now - WEEK + 1):
            continue
        try:
            rep = build(config, store, bounce_db, mlist, now - WEEK, now)
            outgoing.send(config.outgoing, "", list(owners), weekly_mail(mlist, owners, rep, eff.templates))
        except Exception as e:
            store.unclaim_report(mlist.address, last)
            yield fields(list=f"<{mlist.address}>", status=f"weekly report not sent, tried again later ({e})")
            continue
        yield fields(list=f"<{mlist.address}>", status="weekly report sent", to=" ".join(f"<{o}>" for o in owners),
                     posts=len(rep.posts))


def start_periodic(runtime, period: float = PERIOD, first: float = 300.0) -> threading.Thread:
    """`listmilter serve` looks for due weekly reports every `period` seconds."""
    from listmilter.app.runtime import every

    def job(config, store):
        bounce_db = open_bounces(config)
        try:
            yield from periodic(config, store, bounce_db)
        finally:
            bounce_db.close()
    return every(runtime, "report", period, first, job)
