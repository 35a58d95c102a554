"""The milter: a thin adapter between libmilter callbacks and listmilter.core.plan.

Decisions that can be refused per recipient (who may post) are made at
RCPT time, so SMTP clients get a 550 for that recipient only. Everything
else happens at end of message, the only place a milter may edit the
envelope. Any failure answers 4xx: a post is never accepted unexpanded.
(When the milter is not running at all, the MTA goes on without it; the
pipe transport then puts list mail back through here: mta/deliver.py.)
"""

from __future__ import annotations

import logging
import os
import signal
import socket as sockets
import threading
import time

import Milter

from listmilter.app import dmarc_lookup, held, notices, outgoing
from listmilter.app import fanout as app_fanout
from listmilter.app.runtime import Runtime
from listmilter.core import addresses, dmarc, fanout, moderation, plan, policy
from listmilter.core.plan import DROPPED, LIST, OWNER, PLAIN, REFUSED, Recipient
from listmilter.log import fields, log_queue_ids, logger
from listmilter.mta import killpoint
from listmilter.mta.socketmap import parse_socket
from listmilter.store import StoreError, archive, open_pending

# CHGBODY: a footer added in place, a wrapped post (dmarc_mitigation: wrap_message).
ACTIONS = (Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT | Milter.ADDRCPT_PAR
           | Milter.DELRCPT | Milter.CHGFROM | Milter.QUARANTINE)


class InFlight:
    """Messages between MAIL FROM and their end, so a stop lets them finish."""

    # After the last end of message, libmilter still has to send our reply.
    REPLY_SETTLE = 0.5

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.last_end = 0.0
        self.stopping = False

    def begin(self) -> bool:
        with self.cond:
            if self.stopping:
                return False
            self.count += 1
            return True

    def end(self) -> None:
        with self.cond:
            self.count -= 1
            self.last_end = time.monotonic()
            self.cond.notify_all()

    def drain(self, grace: float) -> int:
        """Refuse new messages, wait up to grace seconds for the others; return how many are left."""
        deadline = time.monotonic() + grace
        with self.cond:
            self.stopping = True
            while True:
                now = time.monotonic()
                settle = self.last_end + self.REPLY_SETTLE - now
                if (self.count == 0 and settle <= 0) or now >= deadline:
                    return self.count
                self.cond.wait(min(deadline - now, settle if self.count == 0 else 1.0))


class ListMilter(Milter.Base):
    runtime: Runtime   # set by serve() before the first connection
    in_flight = InFlight()

    def __init__(self) -> None:
        self.non_smtp = False
        self.client = "unknown"
        self.in_message = False
        self._reset()

    def _begin(self) -> bool:
        if not self.in_message:
            self.in_message = self.in_flight.begin()
        return self.in_message

    def _end(self) -> None:
        if self.in_message:
            self.in_message = False
            self.in_flight.end()

    def _reset(self) -> None:
        self.sender = ""
        self.recipients: list[Recipient] = []
        self.headers: list[tuple[str, str]] = []
        self.body_chunks: list[bytes] = []
        self.need_body = False
        self.split: plan.Split | None = None
        self.personal = False      # the in-place list's post goes out as one copy per member
        self.fanout = False        # ... made by serve's fan-out from the MTA's queue
        self.archive = False       # the in-place list keeps its posts (setting `archive`)
        self.verdict: dmarc.Verdict | None = None   # the From domain's DMARC policy, once looked up
        self.need_body_for_hold = False
        self.body_edit = False      # the in-place post may get a new body (plan.body_needed)

    def _tempfail(self, why: str) -> int:
        self.setreply("451", "4.3.0", f"listmilter: {why}; try again later")
        return Milter.TEMPFAIL

    def _refuse(self, reason: str) -> int:
        # libmilter reads % in a reply as a format character (pymilter raises on a
        # single one): a sender such as a%b@example.net must get this 550, not a 451.
        self.setreply("550", "5.7.1", reason.replace("%", "%%"))
        return Milter.REJECT

    def _failed(self, queue_id: str, e: Exception, **where) -> int:
        """The one place where a failure becomes the SMTP answer: 451 4.3.0, so the
        client retries and nothing is accepted unexpanded. (pymilter would answer an
        exception that escapes a callback with 451 4.3.0 too, but unlogged.)"""
        if isinstance(e, StoreError):
            status, why, level = f"list store: {e}", "list store unavailable", logging.ERROR
        elif isinstance(e, held.QueueError):
            status, why, level = f"cannot hold the post: {e}", "cannot hold the post", logging.ERROR
        elif isinstance(e, outgoing.OutgoingError):
            status, why, level = f"cannot re-submit: {e}", "cannot split the message", logging.ERROR
        elif isinstance(e, Milter.milter.error):
            # libmilter could not pass an edit on: the MTA gave up on this message (Sendmail's
            # E: timeout for a big list) or went away. It answers the client 4xx itself.
            status, why, level = (f"the MTA did not take the changes: {e}; its end-of-message timeout?",
                                  "the MTA did not take the changes", logging.ERROR)
        else:
            logger.exception("%s: internal error, message deferred", queue_id)
            return self._tempfail("internal error")
        if where:      # before a queue id exists, Postfix logs NOQUEUE with the recipient
            logger.log(level, "%s: %s", queue_id, fields(**where, status=f"deferred ({e})"))
        else:
            self._log(queue_id, f"deferred ({status})", level=level)
        return self._tempfail(why)

    def _queue_id(self) -> str:
        return self.getsymval("i") or "NOQUEUE"

    def _log(self, queue_id: str, status: str, list_address: str | None = None, client: bool = False,
             level: int = logging.INFO, **after) -> None:
        """One line per event, as Postfix writes them: `QUEUEID: list=<>, from=<>, status=...`."""
        logger.log(level, "%s: %s", queue_id, fields(
            list=f"<{list_address}>" if list_address else None, **{"from": f"<{self.sender}>"},
            client=self.client if client else None, status=status, **after))

    # -- callbacks ---------------------------------------------------------
    @Milter.noreply
    def connect(self, hostname, family, hostaddr):
        # Postfix's cleanup emulates a connection from port 0 for mail from the
        # sendmail command (non_smtpd_milters): there a recipient cannot be refused.
        port = hostaddr[1] if isinstance(hostaddr, tuple) and len(hostaddr) > 1 else None
        self.non_smtp = port == 0
        ip = hostaddr[0] if isinstance(hostaddr, tuple) and hostaddr else hostaddr
        # The MTA passes "[IP]" as the name of a client without a verified name;
        # Postfix itself logs that client as unknown[IP].
        name = hostname if hostname and hostname != f"[{ip}]" else "unknown"
        self.client = f"{name}[{ip}]"
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self._reset()
        self.sender = addresses.strip_brackets(mailfrom)
        if not self._begin():
            return self._tempfail("shutting down")
        try:
            self.config, self.store = self.runtime.current()
        except Exception:
            logger.exception("NOQUEUE: cannot load config or store")
            return self._tempfail("configuration unavailable")
        return Milter.CONTINUE

    def envrcpt(self, to, *params):
        address = addresses.strip_brackets(to)
        try:
            recipient = self._classify(to, address)
        except Exception as e:
            return self._failed("NOQUEUE", e, to=f"<{address}>")
        if recipient.kind == REFUSED:
            self._log(self._queue_id(), f"rejected ({recipient.reason})", recipient.list_address,
                      client=True)
            if not self.non_smtp:
                return self._refuse(recipient.reason)
        self.recipients.append(recipient)
        return Milter.CONTINUE

    def _classify(self, rcpt: str, address: str) -> Recipient:
        mlist, role = plan.find_list(address, self.store.get_list)
        if mlist is None:
            return Recipient(rcpt, address)
        if role is not None:
            if role.role == fanout.ROLE:
                # The milter writes this address itself (core/fanout.py); nobody may send to it.
                return Recipient(rcpt, address, REFUSED, mlist.address,
                                 f"{address} is for listmilter's own use; no mail is taken for it")
            if role.role == "owner":
                return Recipient(rcpt, address, OWNER, mlist.address)
            return Recipient(rcpt, address, PLAIN, mlist.address)   # for the pipe transport
        if self.sender == policy.NULL_SENDER:
            return Recipient(rcpt, address, PLAIN, mlist.address, "null sender")
        eff = self.config.list_settings(mlist.settings)
        decision = moderation.decide(moderation.rules_of(eff), mlist.address, self.sender,
                                     self.store.is_member(mlist.address, self.sender))
        if decision.action == moderation.REJECT:
            return Recipient(rcpt, address, REFUSED, mlist.address, decision.reason)
        if decision.action == moderation.DISCARD:
            return Recipient(rcpt, address, DROPPED, mlist.address, decision.reason)
        hold = decision.reason if decision.action == moderation.HOLD else ""
        return Recipient(rcpt, address, LIST, mlist.address, hold=hold)

    def data(self):
        for r in self.recipients:
            if r.kind == DROPPED:
                self._log(self._queue_id(), f"discarded ({r.reason})", r.list_address, client=True)
        if not any(r.kind != PLAIN for r in self.recipients):
            self._end()
            return Milter.ACCEPT       # no list work: skip the rest of this message
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        killpoint.reached("header")
        self.headers.append((name, value))
        return Milter.CONTINUE

    def eoh(self):
        # Headers are complete: decide what stays here and what is split off,
        # so the body is buffered only when a copy must be re-submitted.
        queue_id = self._queue_id()
        try:
            self.recipients = self._mark_loops(queue_id)
            self.split = plan.split(self.recipients)
            in_place = self.split.in_place_list
            self.personal = in_place is not None and self._personalized(in_place)
            # With a re-injection listener a personal post waits in the MTA's queue for
            # serve's fan-out, which makes (and archives) the copies: no body needed here.
            self.fanout = self.personal and self.config.outgoing.reinject is not None
            self.archive = in_place is not None and not self.fanout and \
                self.config.list_settings(self._list(in_place).settings).archive
            self.body_edit = in_place is not None and not self.fanout and \
                plan.body_needed(self._settings(in_place), self.personal)
            # A held post's notice quotes its first lines; max_message_size needs the size.
            self.need_body_for_hold = in_place is not None and (
                bool(self._hold_reason(in_place)) or
                self.config.list_settings(self._list(in_place).settings).max_message_size > 0)
        except Exception as e:
            return self._failed(queue_id, e)
        self.need_body = bool(self.split.reinject) or (self.personal and not self.fanout) or self.archive \
            or self.need_body_for_hold or self.body_edit
        return Milter.CONTINUE

    def _mark_loops(self, queue_id: str) -> list[Recipient]:
        """A post that has been through its list before is left for the pipe
        transport, like null-sender mail: it is never expanded again."""
        out = []
        for r in self.recipients:
            if r.kind == LIST:
                reason = plan.loop_reason(self.sender, self.headers, self._settings(r.list_address))
                if reason:
                    self._log(queue_id, f"not expanded ({reason})", r.list_address)
                    r = Recipient(r.rcpt, r.address, PLAIN, r.list_address, reason)
            out.append(r)
        return out

    def body(self, chunk):
        killpoint.reached("body")
        if not self.need_body:
            return Milter.SKIP
        self.body_chunks.append(chunk)
        return Milter.CONTINUE

    def eom(self):
        queue_id = self._queue_id()
        try:
            return self._eom(queue_id)
        except Exception as e:
            return self._failed(queue_id, e)
        finally:
            self._end()

    def close(self):
        self._end()
        return Milter.CONTINUE

    def abort(self):
        self._end()
        self._reset()
        return Milter.CONTINUE

    # -- end of message ----------------------------------------------------
    def _list(self, list_address: str):
        mlist = self.store.get_list(list_address)
        if mlist is None:
            raise StoreError(f"list {list_address} vanished during the transaction")
        return mlist

    def _settings(self, list_address: str) -> plan.ListSettings:
        return plan.effective_settings(list_address, self.config.list_settings(self._list(list_address).settings))

    def _personalized(self, list_address: str) -> bool:
        """One copy per member (a one-click URL or a footer of their own: plan.personal)?"""
        return plan.personal(self.config.web.base_url,
                             self.config.list_settings(self._list(list_address).settings))

    def _keepalive(self) -> None:
        try:
            self.progress()        # resets Postfix's milter timeouts during a long loop
        except Exception as e:
            if not getattr(self, "_progress_failed", False):
                self._progress_failed = True
                logger.warning("%s: milter progress() failed (%s); a very long list may hit "
                               "milter_content_timeout", self._queue_id(), e)

    def _owners(self, list_address: str) -> tuple[str, ...]:
        """Who <list>-owner@ reaches: the owners, or the site admin for a list without."""
        return self.config.owners(self._list(list_address).settings)

    def _eom(self, queue_id: str) -> int:
        killpoint.reached("eom")
        split = self.split
        assert split is not None
        # Look up what the plan needs; everything that can fail comes before the first change.
        in_place, url_for, fanout_address = None, None, None
        nested: list[str] = []
        post_id, now = _post_id(queue_id), time.time()
        if split.in_place_list and not split.reject_reason and self.fanout:
            # Members, links, DMARC and archive are the fan-out's business (app/fanout.py).
            ls = self._settings(split.in_place_list)
            in_place = plan.InPlace(ls, [], True, None, self._hold_at_end(ls.address))
            fanout_address = fanout.address(ls.address, post_id, now, self.runtime.secret)
        elif split.in_place_list and not split.reject_reason:
            ls = self._settings(split.in_place_list)
            found, nested, epochs = app_fanout.post_members(self.store, ls.address, self.personal)
            in_place = plan.InPlace(ls, [m for m, _ in found], self.personal, self._dmarc(queue_id, ls),
                                    self._hold_at_end(ls.address))
            if self.personal:
                one_click = self.config.list_settings(self._list(ls.address).settings).one_click
                link = app_fanout.unsubscribe_links(self.config.web.base_url if one_click else None,
                                                    self.runtime.secret, epochs)
                found_on = dict(found)
                url_for = lambda member: link(member, found_on[member])  # noqa: E731
        inner = " ".join(f"<{a}>" for a in nested) or None
        owners = {r.list_address: self._owners(r.list_address) for r in split.owners}
        todo = plan.end_of_message(self.recipients, split, in_place, owners, self.headers,
                                   b"".join(self.body_chunks), post_id, self.runtime.secret,
                                   url_for, now, fanout_address)
        if todo.reject:
            return self._refuse(todo.reject)
        if todo.discard:
            return Milter.DISCARD       # logged at DATA, recipient by recipient
        if todo.hold:
            self._record_hold(queue_id, split.in_place_list or "", todo.hold)

        original = self._original_message() if todo.resubmit else b""
        resubmitted: list[str] = []     # queue ids, in the order of the messages given
        outgoing.send_many(self.config.outgoing,
                           [(self.sender, [list_address], original) for list_address in todo.resubmit]
                           + [("", [self.sender], notices.refusal(r.list_address, self.sender, r.reason,
                                                                  self.headers)) for r in todo.refusals],
                           resubmitted)
        if todo.copies is not None:
            # Every copy is queued by the MTA before the original goes; any failure tempfails
            # the whole message (outgoing.OutgoingError -> 451), never a discard.
            copies = todo.copies
            started = time.monotonic()
            queued: list[str] = []
            for note in copies.notes:
                self._log(queue_id, note, split.in_place_list)
            refused = outgoing.send_copies(self.config.outgoing, copies.sender, copies.mail_options,
                                           copies.envid, copies.copies, self._keepalive, queue_ids=queued,
                                           senders=copies.senders)
            for member, reply in refused.items():
                # In place, the MTA would have bounced it to <list>-bounces@ later; here it says so now.
                self._log(queue_id, f"member refused ({reply})", split.in_place_list, level=logging.WARNING,
                          to=f"<{member}>")
            self._log_resubmitted(queue_id, todo, resubmitted)
            self._log(queue_id, "expanded (personal copies)", split.in_place_list, client=True,
                      members=len(copies.copies) - len(refused), nested=inner,
                      seconds=f"{time.monotonic() - started:.2f}", envid=copies.envid)
            assert split.in_place_list is not None     # personal copies are of the in-place list
            log_queue_ids(queue_id, split.in_place_list, queued)
            self._record_post(queue_id, split.in_place_list, len(copies.copies) - len(refused), len(refused))
            self._archive(queue_id, split.in_place_list)
            # Only list recipients were left in this message: nothing more to deliver.
            return Milter.DISCARD

        if todo.fanout:
            # Before any recipient changes: the fan-out logs under the queue id it names.
            self.addheader(app_fanout.POST_ID_HEADER, post_id)
        for note in todo.notes:
            self._log(queue_id, note, split.in_place_list)
        for step, args in plan.edit_steps(todo.edits):
            getattr(self, step)(*args)      # in plan's order: safe to stop after any step
        killpoint.reached("eom-edited")
        self._log_resubmitted(queue_id, todo, resubmitted)
        if todo.fanout:
            assert split.in_place_list is not None
            self._log(queue_id, "queued for fan-out (personal copies)", split.in_place_list, client=True,
                      fanout=f"<{todo.fanout}>")
        if todo.hold:
            # Not archived: the post is not sent yet, and may never be (docs/moderation.md, "Limits").
            self._quarantine(queue_id, split.in_place_list or "", todo.hold)
            # Counted as it is held (its members are added already); a post that is never
            # released leaves the report again (app/held.py). A held fan-out counts when released.
            for list_address, count, _ in todo.expanded:
                self._record_post(queue_id, list_address, count)
            return Milter.ACCEPT
        for list_address, count, envid_text in todo.expanded:
            self._log(queue_id, "expanded", list_address, client=True, members=count, nested=inner,
                      envid=envid_text)
            self._record_post(queue_id, list_address, count)
            self._archive(queue_id, list_address)
        return Milter.ACCEPT

    # -- moderation (core/moderation.py, app/held.py) ------------------------------------
    def _hold_reason(self, list_address: str) -> str:
        """Why the post to this list is held, as decided at RCPT ("" for none yet)."""
        return next((r.hold for r in self.recipients
                     if r.kind == LIST and r.list_address == list_address and r.hold), "")

    def _size(self) -> int:
        return len(self._original_message())

    def _hold_at_end(self, list_address: str) -> str:
        """The hold reason at end of message: RCPT's, else the size against max_message_size."""
        reason = self._hold_reason(list_address)
        if reason:
            return reason
        eff = self.config.list_settings(self._list(list_address).settings)
        if not eff.max_message_size:
            return ""
        decision = moderation.decide(moderation.rules_of(eff), list_address, self.sender, True, self._size())
        return decision.reason if decision.action == moderation.HOLD else ""

    def _record_hold(self, queue_id: str, list_address: str, reason: str) -> None:
        """Before any edit: the held post's record and the owners' notice (a failure is a 451)."""
        eff = self.config.list_settings(self._list(list_address).settings)
        if not (queue_id.isalnum() and queue_id != "NOQUEUE"):
            raise held.QueueError("no queue id for a post to hold ({i} macro not sent)")
        pending = open_pending(self.config)
        try:
            held.hold(self.config, pending, queue_id, list_address, self._owners(list_address), self.sender,
                      reason, self.headers, b"".join(self.body_chunks), self._size(), eff.hold_days, eff.templates)
        finally:
            pending.close()

    def _quarantine(self, queue_id: str, list_address: str, reason: str) -> None:
        """After the edits: the expanded post goes on the MTA's hold queue (Postfix: `postqueue -p`
        shows it with !; Sendmail: `mailq -qQ`); approving it releases it to the members added above."""
        self.quarantine(f"listmilter: held for the owners of {list_address}: {reason}"[:200])
        self._log(queue_id, f"held ({reason})", list_address, client=True)

    def _dmarc(self, queue_id: str, ls: plan.ListSettings) -> dmarc.Verdict | None:
        """The From domain's DMARC policy, for a list post that may need a DMARC-safe From.

        Looked up here, at end of message and only for a post expanded in place:
        every other message (and a list with dmarc_mitigation none) costs no DNS
        query, and a post split to several lists is looked up once per copy, the
        cache answering all but the first. Never raises: a failure is the safe side.
        """
        if not ls.wants_dmarc():
            return None
        started = time.monotonic()
        verdict = dmarc_lookup.post_verdict(self.config.dns_nameservers, self.headers)
        status = dmarc.log_status(verdict, ls.dmarc_mitigation, ls.dmarc_policies)
        if status and verdict.policy == dmarc.UNKNOWN:
            self._log(queue_id, status, ls.address, level=logging.WARNING)
        elif status:
            self._log(queue_id, status, ls.address, seconds=f"{time.monotonic() - started:.3f}")
        self.verdict = verdict
        return verdict

    def _archive(self, queue_id: str, list_address: str) -> None:
        """Keep the post in its list's archive; a failure is logged and never holds the post up."""
        if not self.archive:
            return
        try:
            data = plan.archived_copy(self._settings(list_address), self.headers, b"".join(self.body_chunks),
                                      _post_id(queue_id), self.runtime.secret, time.time(), self.verdict,
                                      in_place_footer=not self.personal)
            archive.add(self.config.state_dir, list_address, data, _post_id(queue_id))
        except Exception as e:      # a full disk, a folder of the wrong owner: the post goes all the same
            self._log(queue_id, f"not archived ({e.__class__.__name__}: {e}); the post went out",
                      list_address, level=logging.ERROR)

    def _record_post(self, queue_id: str, list_address: str, recipients: int, refused: int = 0) -> None:
        """The post's row for the delivery reports (core/report.py); a failure is logged and never
        holds the post up: the report lacks one post, the members get it."""
        try:
            self.store.record_post(list_address, _post_id(queue_id), time.time(), recipients, refused)
        except Exception as e:
            self._log(queue_id, f"not recorded for the delivery report ({e.__class__.__name__}: {e}); "
                      "the post went out", list_address, level=logging.ERROR)

    def _log_resubmitted(self, queue_id: str, todo: plan.EndOfMessage, ids: list[str]) -> None:
        """The queue id each split-off copy and refusal notice got (`listmilter trace` follows them)."""
        queued = iter(ids)
        for list_address in todo.resubmit:
            self._log(queue_id, "split (re-submitted as a message of its own)", list_address,
                      queued_as=next(queued, outgoing.UNKNOWN_ID))
        for r in todo.refusals:
            self._log(queue_id, "refusal notice sent to the sender", r.list_address,
                      queued_as=next(queued, outgoing.UNKNOWN_ID))

    def _original_message(self) -> bytes:
        head = "".join(f"{n}: {v}\r\n" for n, v in self.headers).replace("\r\n", "\n").replace("\n", "\r\n")
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + b"".join(self.body_chunks)


def _post_id(queue_id: str) -> str:
    if queue_id.isalnum() and queue_id != "NOQUEUE":
        return queue_id
    import secrets
    return secrets.token_hex(6)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGHUP}


def run(runtime: Runtime, socket: str, timeout: int = 600, grace: float = 30.0,
        on_reload=None) -> None:
    """Serve milter connections until SIGTERM or SIGHUP (messages in flight get
    up to `grace` seconds to finish) or SIGINT (at once); SIGUSR1 calls on_reload.

    The caller has blocked these signals in every thread. libmilter runs in
    its own thread and would stop on them itself, abandoning the sessions it
    serves; this (main) thread waits for them instead, and the kernel hands a
    process signal to the main thread first when it is waiting for it.
    """
    ListMilter.runtime = runtime
    Milter.factory = ListMilter
    Milter.set_flags(ACTIONS)
    failed: list[Exception] = []

    def serve() -> None:
        try:
            Milter.runmilter("listmilter", socket, timeout)
        except Exception as e:     # e.g. libmilter could not open its socket
            failed.append(e)

    thread = threading.Thread(target=serve, name="libmilter", daemon=True)
    thread.start()
    while thread.is_alive():
        info = signal.sigtimedwait(STOP_SIGNALS | {signal.SIGUSR1, signal.SIGINT}, 1.0)
        if info is None:
            continue
        if info.si_signo == signal.SIGUSR1:
            if on_reload:
                on_reload()
            continue
        if info.si_signo in STOP_SIGNALS:
            _drain(grace)
        _stop_libmilter(socket, thread)
    kind, _, path = socket.partition(":")
    if kind in ("unix", "local"):
        # Gone at once, so nothing mistakes a dead socket for a running milter.
        try:
            os.unlink(path)
        except OSError:
            pass
    if failed:
        raise failed[0]


def _stop_libmilter(spec: str, thread: threading.Thread) -> None:
    """smfi_stop() waits for libmilter's listener, which holds its lock through waits of up
    to 5 s for a new connection: connections of our own end those waits, so a stop (and a
    restart) is not 5 s longer than it needs to be."""
    done = threading.Event()

    def poke() -> None:
        while not done.wait(0.05):
            _wake(spec)
    threading.Thread(target=poke, name="milter-stop", daemon=True).start()
    try:
        Milter.milter.stop()
        thread.join()
    finally:
        done.set()


def _wake(spec: str) -> None:
    """One connection to the milter's own socket, closed at once."""
    try:
        family, address = parse_socket(spec)
        if isinstance(address, str):
            conn = sockets.socket(sockets.AF_UNIX)
        else:
            host, port = address
            address = ({"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port)
            conn = sockets.socket(sockets.AF_INET6 if family == "inet6" else sockets.AF_INET)
        with conn:
            conn.settimeout(1.0)
            conn.connect(address)
    except (OSError, ValueError):
        pass        # libmilter then notices within 5 s on its own


def _drain(grace: float) -> None:
    pending = ListMilter.in_flight.count
    logger.info("stopping: new messages get 4xx; waiting up to %ds for %d messages in flight",
                grace, pending)
    left = ListMilter.in_flight.drain(grace)
    if left:
        logger.warning("warning: stopping with %d messages unfinished; Postfix applies "
                       "milter_default_action to them (accept: the pipe transport re-submits list mail)", left)
