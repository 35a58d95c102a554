"""A personal post's fan-out: its copies, from the MTA's queue, into the re-injection listener.

`listmilter deliver` gets the queued post for `<list>-fanout+CODE@` (core/fanout.py)
and runs `deliver` below in its own process (mta/handoff.py says why not in serve).
The post stays in the MTA's queue until this returns 0, so every failure a retry
can fix (the store, the listener) raises a TemporaryError: `deliver` exits 75
(or is killed) and the MTA tries again later, and the fan-out goes on from its
progress record.

Members are sent in address-key order, BATCH at a time shared among the
sessions (app/reinject.py); the record moves on once the MTA has answered for
the whole batch. So a crash resends at most one batch: no member gets more
than two copies, and at most BATCH members get two.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

from listmilter.app import dmarc_lookup, reinject
from listmilter.core import dmarc, fanout, plan, verp
from listmilter.core.errors import TemporaryError
from listmilter.core.keys import Keyring
from listmilter.core.model import ACTIVE, MailingList
from listmilter.log import fields, log_queue_ids, logger
from listmilter.store import archive, fanout_records

BATCH = 500             # copies between two records: the bound on copies sent twice after a crash
# The queue id the milter gave the post, for the log (the code carries it lower-cased).
POST_ID_HEADER = "X-Listmilter-Post-Id"


class Deferred(TemporaryError):
    """The post stays queued: the text says why."""


# -- who gets a post, and their links (the milter's inline path uses these too) ---------------
def post_members(store, list_address: str, personal: bool):
    """([(member, the list it is on)], nested lists, {list: {member: added}} when personal):
    the list's active members, with those of lists on this server that are members of it.
    Each list's Member records are dropped as soon as read: only address and `added` stay."""
    epochs: dict[str, dict[str, float]] = {}

    def members_of(address: str) -> list[str]:
        if not personal:
            return store.recipients(address)
        added = {m.address: m.added for m in store.members(address) if m.status == ACTIVE}
        epochs[address] = added      # for the links
        return list(added)
    list_of = plan.list_finder([m.address for m in store.all_lists()])
    found, nested = plan.nested_members(list_address, members_of, list_of)
    return found, nested, epochs


def unsubscribe_links(base_url: str | None, secret: Keyring,
                      epochs: dict[str, dict[str, float]]) -> Callable[[str, str], str]:
    """link(member, list it is on): the member's one-click link, naming their membership (its
    `added`) of the list they are on (for a member of a nested list: that list), so it leaves
    that list and dies when that membership ends. "" without a base URL: the copy keeps the
    mailto: link."""
    from listmilter.core.tokens import unsubscribe_token

    def link(member: str, on: str) -> str:
        if not base_url:
            return ""
        return f"{base_url}/u/{unsubscribe_token(secret, on, member, epochs[on][member])}"
    return link


# -- the queued post ----------------------------------------------------------------------
def queued_post(data: bytes) -> tuple[list[tuple[str, str]], bytes, list[str]]:
    """(header fields, body with CRLF line ends, the values of listmilter's own POST_ID_HEADER)
    of the post as the pipe gives it; the fields without what delivery added (a leading
    `From ` line, Return-Path) and without that marker. Folded fields keep their folds, as
    the milter sees them."""
    text = data.replace(b"\r\n", b"\n")
    if text.startswith(b"From "):
        text = text.partition(b"\n")[2]
    head, _, body = text.partition(b"\n\n")
    fields_: list[tuple[str, str]] = []
    for line in head.decode("utf-8", "surrogateescape").split("\n"):
        if line[:1] in (" ", "\t") and fields_:
            fields_[-1] = (fields_[-1][0], fields_[-1][1] + "\n" + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields_.append((name, value.lstrip(" ")))
    marks = [v.strip() for n, v in fields_ if n.strip().lower() == POST_ID_HEADER.lower()]
    kept = [(n, v) for n, v in fields_ if n.strip().lower() not in ("return-path", POST_ID_HEADER.lower())]
    return kept, body.replace(b"\n", b"\r\n"), marks


def _post_id(marks: list[str], code: verp.Code) -> str:
    """The queue id the milter wrote down, when it is the code's (else the code's, lower-cased)."""
    return next((m for m in marks if m.lower() == code.post_id), code.post_id)


def deliver(config, store, secret: Keyring, mlist: MailingList, extension: str, sender: str, data: bytes) -> str:
    """Fan the post out (or go on with it); the status for the pipe's log line.
    Raises a TemporaryError when the post must stay queued."""
    now = time.time()
    code = fanout.verified(mlist.address, extension, secret, now)
    if code is None:
        # Not made by this site's milter (or past its age): nothing to send, never worth a retry.
        logger.warning("fanout: %s", fields(list=f"<{mlist.address}>", **{"from": f"<{sender}>"},
                                            status="discarded (fan-out address not valid)"))
        return "discarded (fan-out address not valid)"
    key = fanout.post_key(code.post_id, code.posted_at)
    try:
        with fanout_records.locked(config.state_dir, key):
            return _fan_out(config, store, secret, mlist, code, key, sender, data)
    except fanout_records.Busy:
        raise Deferred("this post's fan-out is running in another process; tried again later") from None


def _fan_out(config, store, secret: Keyring, mlist: MailingList, code: verp.Code, key: str, sender: str,
             data: bytes) -> str:
    message_headers, body, marks = queued_post(data)
    post_id = _post_id(marks, code)
    record = fanout_records.read(config.state_dir, key)
    if record is not None and record.done:
        _log(post_id, mlist.address, sender, "fan-out already done", sent=record.sent, refused=record.refused)
        return "fan-out already done"
    eff = config.list_settings(mlist.settings)
    ls = plan.effective_settings(mlist.address, eff)
    # (member, list it is on), each once (plan.nested_members): a few hundred bytes a member.
    found, nested, epochs = post_members(store, mlist.address, True)
    link = unsubscribe_links(config.web.base_url if eff.one_click else None, secret, epochs)
    verdict = _dmarc(config, ls, message_headers, post_id, sender)
    template = plan.PersonalTemplate(ls, message_headers, body, post_id, secret, code.posted_at, verdict)
    members = len(found)
    first = record is None
    if record is None:
        record = fanout.Progress(mlist.address, post_id, code.posted_at, started=time.time())
    todo = fanout.in_order(found, record.after)
    record = replace(record, members=record.sent + record.refused + len(todo), attempts=record.attempts + 1,
                     updated=time.time())
    fanout_records.write(config.state_dir, key, record)
    if first:
        _archive(config, eff, ls, message_headers, body, post_id, code.posted_at, secret, verdict)
    host, port = _listener(config)
    started = time.monotonic()
    _log(post_id, mlist.address, sender, "fan-out started" if first else "fan-out resumed", members=members,
         left=len(todo), nested=" ".join(f"<{a}>" for a in nested) or None, envid=template.envid,
         to=f"{host}:{port}", sessions=config.outgoing.sessions)
    for note in template.notes:
        _log(post_id, mlist.address, sender, note)
    pool = reinject.Pool(host, port, config.outgoing.sessions)
    try:
        for i in range(0, len(todo), BATCH):
            batch = todo[i:i + BATCH]
            sent = pool.send(batch, lambda pair: template.copy(pair[0], link(*pair)), template.mail_options)
            for member, reply in sent.refused.items():
                _log(post_id, mlist.address, sender, f"member refused ({reply})", logging.WARNING, to=f"<{member}>")
            log_queue_ids(post_id, mlist.address, sent.queued)
            record = record.advanced(batch[-1][0], len(sent.queued), len(sent.refused), time.time())
            fanout_records.write(config.state_dir, key, record)
    except TemporaryError as e:
        _log(post_id, mlist.address, sender, f"fan-out deferred ({e})", logging.WARNING, sent=record.sent,
             refused=record.refused, left=record.left)
        raise
    finally:
        pool.close()
    record = replace(record, done=True, updated=time.time())
    fanout_records.write(config.state_dir, key, record)
    for note in template.all_notes()[len(template.notes):]:
        _log(post_id, mlist.address, sender, note)
    _log(post_id, mlist.address, sender, "fanned out (personal copies)", members=record.sent, refused=record.refused,
         seconds=f"{time.monotonic() - started:.2f}", envid=template.envid)
    try:        # for the delivery reports (core/report.py); never holds the post up
        store.record_post(mlist.address, post_id, code.posted_at, record.sent, record.refused)
    except Exception as e:
        _log(post_id, mlist.address, sender, f"not recorded for the delivery report ({e.__class__.__name__}: {e})",
             logging.ERROR)
    if first:       # records whose codes no longer verify: no delivery can ask for them
        fanout_records.expire(config.state_dir, time.time() - verp.MAX_AGE - 86400)
    return f"fanned out ({record.sent} copies, {record.refused} refused)"


def _log(post_id: str, list_address: str, sender: str, status: str, level: int = logging.INFO, **after) -> None:
    """One line as the milter writes them: `QUEUEID: list=<>, from=<>, status=...`."""
    logger.log(level, "%s: %s", post_id, fields(list=f"<{list_address}>", **{"from": f"<{sender}>"},
                                                status=status, **after))


def _listener(config) -> tuple[str, int]:
    o = config.outgoing
    if o.reinject_host:
        return o.reinject_host, o.reinject_port
    if o.smtp_host:     # through the milter again: slower, still right (the copies are no list mail)
        return o.smtp_host, o.smtp_port
    raise Deferred("outgoing: sendmail cannot take a fan-out; set outgoing.reinject (HOST:PORT)")


def _dmarc(config, ls: plan.ListSettings, message_headers, post_id: str, sender: str) -> dmarc.Verdict | None:
    """The From domain's DMARC policy, looked up when the copies are made. Never raises."""
    if not ls.wants_dmarc():
        return None
    verdict = dmarc_lookup.post_verdict(config.dns_nameservers, message_headers)
    status = dmarc.log_status(verdict, ls.dmarc_mitigation, ls.dmarc_policies)
    if status:
        _log(post_id, ls.address, sender, status, logging.WARNING if verdict.policy == dmarc.UNKNOWN else logging.INFO)
    return verdict


def _archive(config, eff, ls, message_headers, body, post_id: str, posted_at: float, secret: Keyring,
             verdict: dmarc.Verdict | None) -> None:
    """Keep the post in its list's archive once; a failure is logged and never holds the post up."""
    if not eff.archive:
        return
    try:
        archive.add(config.state_dir, ls.address,
                    plan.archived_copy(ls, message_headers, body, post_id, secret, posted_at, verdict), post_id)
    except Exception as e:      # a full disk, a folder of the wrong owner: the post goes all the same
        logger.log(logging.ERROR, "%s: %s", post_id, fields(
            list=f"<{ls.address}>", status=f"not archived ({e.__class__.__name__}: {e}); the post went out"))
