"""Held posts, applied: the MTA's hold queue, the pending database's `held` rows, the notices.

A post that core.moderation holds is expanded as usual, recorded here and
put on the MTA's hold queue by the milter (quarantine). Approving it is
releasing it (released mail does not pass the milter again: it goes to
the members the milter added); rejecting or discarding it is deleting it
from there. A decision is first recorded (once: the first one
counts), then carried out; when the queue cannot be told now (the queue commands
need root: `listmilter deliver` runs as the pipe user), `serve`'s periodic
run carries it out, and expires posts nobody decided on after `hold_days`.

The queue is Postfix's hold queue or Sendmail's quarantine (config `mta.type`): the
commands for each are in app/holdqueue.py, which this module reaches through `queue_for`.
"""

from __future__ import annotations

import threading
import time

from listmilter.app import notices, outgoing
from listmilter.app.holdqueue import QueueEntry, QueueError, queue_for
from listmilter.core import addresses, headers, mailparse, moderation, when
from listmilter.core.errors import PermanentError
from listmilter.core.tokens import HeldPost
from listmilter.log import fields, logger

APPROVE, REJECT, DISCARD, EXPIRE = "approve", "reject", "discard", "expire"
DECISIONS = (APPROVE, REJECT, DISCARD)
SUMMARY_BODY = 16 * 1024        # characters of the body read for the owners' summary
KEEP_DONE_DAYS = 30             # rows of carried-out decisions are kept this long (for `listmilter held`)


class HeldError(PermanentError):
    """No such held post, or a decision that cannot be taken."""


# -- holding a post: called by the milter at end of message ---------------------------
def owner_notice(list_address: str, owners: tuple[str, ...], queue_id: str, code: str, reason: str,
                 message_headers: list[tuple[str, str]], body: bytes, size: int, hold_days: int,
                 templates: str = "") -> bytes:
    """To the owners: one per held post, the code in the Subject (reply to approve)."""
    def first(name: str) -> str:
        for n, v in message_headers:
            if n.lower() == name:
                return headers.decode(v)
        return ""
    raw = "".join(f"{n}: {v}\r\n" for n, v in message_headers).encode("utf-8", "surrogateescape") + b"\r\n" + body
    lines = moderation.first_lines(mailparse.body_text(raw, SUMMARY_BODY))
    request = addresses.role_address(list_address, "request")
    subject = first("subject")[:120] or "(no subject)"
    values = {"list": list_address, "subject": subject, "code": code, "reason": reason,
              "from": first("from")[:200] or "(none)", "size": str(size), "queue_id": queue_id,
              "first_lines": "\n".join(f"    {line}" for line in lines) or "    (no text)",
              "days": str(hold_days)}
    notice_subject, text = notices.render(notices.template_text("held_owner", templates), values)
    return notices.command_reply(request, ", ".join(owners), notice_subject, text, reply_to=request)


def hold(config, pending, queue_id: str, list_address: str, owners: tuple[str, ...], sender: str, reason: str,
         message_headers: list[tuple[str, str]], body: bytes, size: int, hold_days: int, templates: str) -> None:
    """Record a held post and tell the owners; anything failing undoes the record and raises
    (the milter answers 451: the client tries again, nothing is held half-way)."""
    subject = next((headers.decode(v) for n, v in message_headers if n.lower() == "subject"), "")[:200]
    code = pending.add_held(queue_id, list_address, sender, reason, subject, size)
    try:
        outgoing.send(config.outgoing, "", list(owners), owner_notice(
            list_address, owners, queue_id, code, reason, message_headers, body, size, hold_days, templates))
    except Exception as e:
        pending.held_done(queue_id)       # never listed as held: the client retries with a new queue id
        if isinstance(e, outgoing.OutgoingError):
            raise QueueError(f"the owners' notice could not be sent: {e}") from e
        raise


# -- deciding -------------------------------------------------------------------------
def decide(config, store, pending, queue, queue_id: str, decision: str, by: str) -> str:
    """An owner's or admin's decision on one held post; what happened, for the log and the CLI."""
    post = pending.held_post(queue_id)
    if post is None:
        raise HeldError(f"{queue_id}: no post held by listmilter has this queue id")
    if post.done is not None:
        return f"{queue_id}: already done ({post.decision or 'gone'})"
    if not pending.decide_held(queue_id, decision, by):
        again = pending.held_post(queue_id) or post
        return f"{queue_id}: already decided ({again.decision} by {again.decided_by})"
    post = pending.held_post(queue_id) or post
    return carry_out(config, store, pending, queue, post)


def carry_out(config, store, pending, queue, post: HeldPost) -> str:
    """Tell the queue what was decided; a queue that cannot be told now keeps the decision for later."""
    qid, decision = post.queue_id, post.decision
    try:
        found = queue.release(qid) if decision == APPROVE else queue.delete(qid)
    except QueueError as e:
        logger.warning("%s: %s", qid, fields(list=f"<{post.list}>", **{"from": f"<{post.sender}>"},
                                             status=f"{decision} recorded, not yet done ({e}); "
                                                    "serve's periodic run tries again"))
        return f"{qid}: {decision} recorded; the queue could not be told now ({e}), serve tries again"
    pending.held_done(qid)
    if not found:
        logger.warning("%s: %s", qid, fields(list=f"<{post.list}>", status=f"{decision}: not on the hold queue "
                                                                          "(released or deleted by other means?)"))
        return f"{qid}: not on the hold queue any more"
    if decision != APPROVE:
        _not_sent(store, post)
    told = ""
    if decision in (REJECT, EXPIRE) and post.sender:
        told = _tell_poster(config, store, post)
    logger.info("%s: %s", qid, fields(list=f"<{post.list}>", **{"from": f"<{post.sender}>"},
                                       status={APPROVE: "released from hold (approved)", REJECT: "deleted (rejected)",
                                               DISCARD: "deleted (discarded)", EXPIRE: "deleted (expired)"}[decision],
                                       by=post.decided_by, poster=told or None))
    done = {APPROVE: "approved, released", REJECT: "rejected, deleted", DISCARD: "discarded, deleted",
            EXPIRE: "expired, deleted"}[decision]
    return f"{qid}: {done}" + (f"; poster {told}" if told else "")


def _not_sent(store, post: HeldPost) -> None:
    """The milter counted the post for the delivery reports as it held it: it never went."""
    try:
        store.forget_post(post.list, post.queue_id)
    except Exception as e:      # the report counts one post too many; the decision stands
        logger.error("%s: %s", post.queue_id, fields(list=f"<{post.list}>",
                                                     status=f"not taken out of the delivery report ({e})"))


def _tell_poster(config, store, post: HeldPost) -> str:
    mlist = store.get_list(post.list)
    eff = config.list_settings(mlist.settings) if mlist else None
    values = {"list": post.list, "subject": post.subject or "(no subject)",
              "held_at": when.utc_minute(post.held), "reason": post.reason,
              "days": str(eff.hold_days if eff else ""), "owner_address": addresses.role_address(post.list, "owner")}
    template = "held_rejected" if post.decision == REJECT else "held_expired"
    subject, text = notices.render(notices.template_text(template, eff.templates if eff else ""), values)
    try:
        outgoing.send(config.outgoing, "", [post.sender], notices.command_reply(
            addresses.role_address(post.list, "owner"), post.sender, subject, text))
    except outgoing.OutgoingError as e:     # the post is gone all the same; say so
        logger.error("%s: %s", post.queue_id, fields(list=f"<{post.list}>", status=f"poster not told ({e})"))
        return "not told"
    return "told"


def periodic(config, store, pending, queue, now: float | None = None) -> list[str]:
    """Carry out recorded decisions, expire posts past their list's hold_days; what was done."""
    now = time.time() if now is None else now
    done = []
    for post in pending.held_posts():
        if not post.decision:
            mlist = store.get_list(post.list)
            days = config.list_settings(mlist.settings).hold_days if mlist else 0
            if not moderation.expired(post.held, days, now) or \
                    not pending.decide_held(post.queue_id, EXPIRE, f"hold_days ({days})"):
                continue
            post = pending.held_post(post.queue_id) or post
        done.append(carry_out(config, store, pending, queue, post))
    pending.purge_held(now - KEEP_DONE_DAYS * 86400)
    return done


def listing(pending, queue, list_address: str | None = None) -> list[tuple[HeldPost, QueueEntry | None]]:
    """The posts listmilter holds (of one list, or all), each with its hold-queue entry (None: gone)."""
    posts = pending.held_posts(list_address)
    entries = queue.held() if posts else {}
    return [(post, entries.get(post.queue_id)) for post in posts]


PERIOD = 300.0


def start_periodic(runtime, period: float = PERIOD, first: float = 60.0) -> threading.Thread:
    """`listmilter serve` runs `periodic` every few minutes (decisions taken by reply when
    the pipe transport could not tell the queue itself, and expiry)."""
    from listmilter.app.runtime import every
    from listmilter.store import open_pending

    def job(config, store):
        pending = open_pending(config)
        try:
            yield from periodic(config, store, pending, queue_for(config))
        finally:
            pending.close()
    return every(runtime, "held", period, first, job)
