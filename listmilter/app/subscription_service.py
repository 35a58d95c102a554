"""Subscriptions, applied: the thin edge between listmilter.core.subscriptions (decisions)
and the store, the pending database, templates and `outgoing:`.

Used by the pipe transport (`deliver`, for -request@, -subscribe@,
-unsubscribe@, -confirm+TOKEN@), by `listmilter web` (one-click unsubscribe,
confirmation links) and by the CLI (approve, reject). Store and outgoing
errors propagate (the pipe transport exits 75 and Postfix retries); what was
claimed or created for a failed attempt is undone first, so the retry finds
the same state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from listmilter.app import notices, outgoing
from listmilter.core import addresses, commands, mailparse, moderation, plan, subscriptions, tokens
from listmilter.core.keys import Keyring
from listmilter.core.model import MailingList, Member
from listmilter.core.subscriptions import OWNERS, SENDER, Outcome, Request, State
from listmilter.log import fields, logger
from listmilter.store import open_pending, site_secret
from listmilter.store.pending import PendingDB

MAX_BODY = 64 * 1024        # of a command message, read for the command words

INVALID_LINK = "This unsubscribe link is not valid."
OLD_LINK = ("This unsubscribe link is too old and no longer accepted. To leave {list}, use the link in "
            "a recent message from the list, or send any message to {unsubscribe}.")
ENDED_LINK = ("This unsubscribe link belongs to an earlier subscription of this address to {list}, which "
              "has ended; it does not end the current one. Use the link in a recent message from the list, "
              "or send any message to {unsubscribe}.")


@dataclass
class Context:
    """Who and how, for one command."""
    how: str                      # mail, web, cli, owner
    who: str                      # Message-ID, client IP, admin user
    sender: str | None            # where SENDER mails go (None: nowhere, e.g. the web)
    address: str                  # the member address concerned
    name: str = ""
    hash: str | None = None       # the pending request being used
    in_reply_to: str = ""
    detail: str = ""
    client: str = ""              # the SMTP client's IP address, for the rate-limit counters


class Service:
    def __init__(self, config, store, secret: Keyring, pending: PendingDB | None = None):
        self.config, self.store, self.secret = config, store, secret
        self.pending = pending or open_pending(config)

    def close(self) -> None:
        self.pending.close()

    # -- list facts ------------------------------------------------------------
    def policy(self, mlist: MailingList) -> subscriptions.Policy:
        return subscriptions.policy_from(self.config.list_settings(mlist.settings))

    def owners(self, mlist: MailingList) -> tuple[str, ...]:
        return self.config.owners(mlist.settings)

    def unsubscribe_url(self, list_address: str, address: str) -> str:
        """The member's one-click link ("" without web.base_url, or for someone who is no member)."""
        base = self.config.web.base_url
        member = self.store.member(list_address, address) if base else None
        if member is None:
            return ""
        return f"{base}/u/{tokens.unsubscribe_token(self.secret, list_address, member.address, member.added)}"

    def confirm_url(self, token: str) -> str:
        base = self.config.web.base_url
        return f"{base}/confirm/{token}" if base and token else ""

    def state(self, mlist: MailingList, request: Request) -> State:
        return State(is_member=self.store.member(mlist.address, request.address) is not None,
                     pending=self.pending.open_request(mlist.address, request.address),
                     sent=self.pending.sent_counts(mlist.address, request))

    # -- mail to a role address --------------------------------------------------
    def handle_mail(self, mlist: MailingList, role: addresses.RoleAddress, sender: str, data: bytes,
                    dmarc_pass: bool = False) -> str:
        """A message to -request@, -subscribe@, -unsubscribe@ or -confirm+TOKEN@; the log status.

        `dmarc_pass`: the message passed DMARC for its From: domain, so From: may act
        as the envelope sender would (core.subscriptions.Request); no edge checks DMARC yet."""
        msg = mailparse.parse(data)
        heads: dict[str, list[str]] = {}
        for name, value in msg.items():
            heads.setdefault(name.lower(), []).append(value)
        ls = plan.effective_settings(mlist.address, self.config.list_settings(mlist.settings))
        client = commands.received_client(data)
        base = {"to": f"<{addresses.role_address(mlist.address, role.role, role.extension)}>",
                "from": f"<{sender}>", "size": len(data), "list": f"<{mlist.address}>", "role": role.role,
                "client": client or "unknown"}
        reason = commands.ignore_reason(sender, heads, ls.list_id)
        if reason is None and _is_own(mlist.address, sender):
            reason = "mail from this list's own addresses"
        if reason is None and not addresses.is_valid(sender):
            # Replies go to the envelope sender; one that is no plain address (8-bit,
            # SMTPUTF8, garbage) could never take them, and a retry would not change that.
            reason = "the envelope sender is no address listmilter can answer"
        if reason:
            logger.info("deliver: %s", fields(**base, status=f"ignored ({reason})"))
            return "ignored"
        subject = _header_text(msg.get("Subject"))
        if role.role == "request":
            # An owner's reply to a held post's notice (app/held.py): "approve CODE" in the Subject.
            decision = moderation.reply_decision(subject, commands.body_lines(_body_text(data)))
            if decision is not None:
                return self._held_reply(mlist, sender, _header_text(msg.get("From")), decision, base)
        cmd = commands.parse(role.role, role.extension, sender, _header_text(msg.get("From")), subject,
                             _body_text(data), mailparse.message_id(msg.get("Message-ID")))
        if not addresses.is_valid(cmd.address):
            logger.info("deliver: %s", fields(**base, status=f"ignored (no valid address: {cmd.address!r})"))
            return "ignored"
        request = Request(sender, cmd.address, client, dmarc_pass)
        with self.pending.serialized():
            return self._command(mlist, sender, msg, data, cmd, subject, base, request)

    def _command(self, mlist, sender, msg, data, cmd, subject, base, request: Request) -> str:
        self.pending.purge()
        ctx = Context("mail", cmd.message_id or f"<from {sender}>", sender, cmd.address, cmd.name,
                      in_reply_to=cmd.message_id, client=request.client)
        if cmd.kind == commands.CONFIRM:
            pending = self.pending.lookup(cmd.token) if cmd.token else None
            owners = {addresses.key(o) for o in self.owners(mlist)}
            is_owner = addresses.key(sender) in owners or addresses.key(cmd.address) in owners
            reject = _says_reject(subject, _body_text(data))
            outcome = subscriptions.on_token(
                pending, mlist.address, self.policy(mlist), time.time(), sender_is_owner=is_owner,
                reject=reject, state=self.state(mlist, request), request=request)
            if pending is not None and not outcome.refused:
                ctx.address, ctx.name, ctx.hash = pending.address, pending.name, pending.hash
                if pending.kind == tokens.MODERATE:
                    ctx.how, ctx.who = "owner", sender
                    ctx.detail = f"{'rejected' if reject else 'approved'} by reply {cmd.message_id}"
                else:
                    ctx.detail = f"confirmed by reply from {sender}"
        else:
            outcome = subscriptions.on_command(cmd.kind, self.policy(mlist), self.state(mlist, request), request)
            ctx.detail = f"{cmd.kind} by mail from {sender}"
        self.apply(mlist, outcome, ctx)
        level = logging.WARNING if outcome.refused or outcome.limit else logging.INFO
        logger.log(level, "deliver: %s", fields(**base, command=cmd.kind, address=f"<{ctx.address}>",
                                                 status=outcome.status))
        return outcome.status

    def _held_reply(self, mlist: MailingList, sender: str, from_header: str, decision: tuple[str, str],
                    base: dict) -> str:
        """approve|reject|discard CODE from an owner: the code names the post, and only the owners got it."""
        from listmilter.app import held
        verb, code = decision
        post = self.pending.held_by_code(code)
        from_address, _ = commands.who(sender, from_header)
        owners = {addresses.key(o) for o in self.owners(mlist)}
        if post is None or post.list != addresses.key(mlist.address):
            status, level = "refused (no held post has this code)", logging.WARNING
        elif addresses.key(sender) not in owners and addresses.key(from_address) not in owners:
            status, level = "refused (the reply is not from an owner)", logging.WARNING
        else:
            status, level = held.decide(self.config, self.store, self.pending, held.queue_for(self.config),
                                        post.queue_id, verb, f"reply from {sender}"), logging.INFO
        logger.log(level, "deliver: %s", fields(**base, command=f"held {verb}", status=status))
        return status

    # -- the web -------------------------------------------------------------------
    def check_link(self, token: str, client: str) -> tuple[int, tokens.UnsubscribeLink | None, str]:
        """(HTTP status, link, text): 200 and the link if it may unsubscribe; else why not, logged.

        The web's GET page asks this before it shows its button; the POST asks again.
        """
        status, link, _, text = self._link(token, client)
        return status, link, text

    def _link(self, token: str, client: str):
        """(HTTP status, link, list, text), as check_link.

        400: not a link we made (or made with a key past its grace period); 404:
        the list is gone; 410: a link of the old format after web.old_links_until,
        or one made for a membership that has ended (the address left and joined
        again: the new membership has another `added`).
        """
        link = tokens.read_unsubscribe_token(self.secret, token)
        if link is None:
            logger.warning("web: %s", fields(client=client, status="refused (forged or damaged unsubscribe link)"))
            return 400, None, None, INVALID_LINK
        mlist = self.store.get_list(link.list)
        if mlist is None:
            logger.warning("web: %s", fields(list=f"<{link.list}>", client=client, status="refused (no such list)"))
            return 404, link, None, "This mailing list does not exist (any more)."
        texts = {"list": mlist.address, "unsubscribe": addresses.role_address(mlist.address, "unsubscribe")}
        if link.format == tokens.U1 and not self.config.web.accepts_old_links(time.time()):
            logger.warning("web: %s", fields(list=f"<{mlist.address}>", address=f"<{link.address}>", client=client,
                                             status="refused (old-format link after web.old_links_until)"))
            return 410, link, mlist, OLD_LINK.format(**texts)
        if link.epoch is not None:
            member = self.store.member(mlist.address, link.address)
            if member is not None and member.added != link.epoch:
                logger.warning("web: %s", fields(list=f"<{mlist.address}>", address=f"<{link.address}>",
                                                 client=client, status="refused (link of an ended membership)"))
                return 410, link, mlist, ENDED_LINK.format(**texts)
        return 200, link, mlist, ""

    def one_click(self, token: str, client: str) -> tuple[int, str, str]:
        """RFC 8058 POST: (HTTP status, list address or "", what happened)."""
        status, link, mlist, text = self._link(token, client)
        if status != 200:
            return status, link.list if link else "", text
        address = link.address
        removed = self.store.unsubscribe(mlist.address, address, "web", client, "one-click unsubscribe")
        outcome = subscriptions.on_one_click(removed, self.policy(mlist))
        logger.info("web: %s", fields(list=f"<{mlist.address}>", address=f"<{address}>", client=client,
                                       status=outcome.status))
        if not removed:
            return 200, mlist.address, "This address is not subscribed (any more)."
        try:
            self.apply(mlist, outcome, Context("web", client, None, address, detail="one-click unsubscribe"))
        except outgoing.OutgoingError as e:   # the unsubscription stands; only the notice is lost
            logger.error("web: %s", fields(list=f"<{mlist.address}>", status=f"goodbye not sent ({e})"))
        return 200, mlist.address, "You have been unsubscribed."

    def confirm_info(self, token: str) -> tokens.Pending | None:
        """A usable confirmation request for the web page (None: not usable)."""
        pending = self.pending.lookup(token) if tokens.TOKEN_RE.fullmatch(token or "") else None
        if pending is None or pending.kind != tokens.CONFIRM or pending.state(time.time()) != "pending":
            return None
        return pending

    def web_confirm(self, token: str, client: str) -> tuple[int, str]:
        pending = self.pending.lookup(token) if tokens.TOKEN_RE.fullmatch(token or "") else None
        mlist = self.store.get_list(pending.list) if pending else None
        if pending is None or mlist is None:
            logger.warning("web: %s", fields(client=client, status="refused (token unknown)"))
            return 404, subscriptions.REFUSAL_TEXT["unknown"]
        outcome = subscriptions.on_web_token(pending, mlist.address, self.policy(mlist), time.time())
        ctx = Context("web", client, None, pending.address, pending.name, pending.hash,
                      detail="confirmed by link")
        self.apply(mlist, outcome, ctx)
        level = logging.WARNING if outcome.refused else logging.INFO
        logger.log(level, "web: %s", fields(list=f"<{mlist.address}>", address=f"<{pending.address}>",
                                             client=client, status=outcome.status))
        if outcome.refused:
            return 400, subscriptions.REFUSAL_TEXT.get(outcome.reason, "This request cannot be confirmed here.")
        return 200, _done_text(outcome, mlist.address)

    # -- the CLI -------------------------------------------------------------------
    def decide(self, mlist: MailingList, address: str, approve: bool, who: str) -> Outcome | None:
        """An owner's approve/reject of a waiting request; None if there is none."""
        pending = self.pending.open_request(mlist.address, address, kind=tokens.MODERATE)
        if pending is None:
            return None
        outcome = subscriptions.on_decision(pending, self.policy(mlist), approve)
        ctx = Context("owner", who, None, pending.address, pending.name, pending.hash,
                      detail="approved with the CLI" if approve else "rejected with the CLI")
        self.apply(mlist, outcome, ctx)
        logger.info("cli: %s", fields(list=f"<{mlist.address}>", address=f"<{pending.address}>",
                                       status=outcome.status, by=who))
        return outcome

    # -- applying an outcome ---------------------------------------------------------
    def apply(self, mlist: MailingList, outcome: Outcome, ctx: Context) -> None:
        if outcome.ignored:
            return
        claimed = joined = False
        new_token = None
        if outcome.close and ctx.hash:
            if not self.pending.claim(ctx.hash, outcome.close):
                # Someone used it a moment ago (a reply and a click at once): nothing more to do.
                logger.info("%s", fields(list=f"<{mlist.address}>", address=f"<{ctx.address}>",
                                         status="ignored (request used meanwhile)"))
                return
            claimed = True
        try:
            if outcome.create:
                kind, action = outcome.create
                days = tokens.MODERATION_DAYS if kind == tokens.MODERATE else self.policy(mlist).confirm_days
                new_token = self.pending.create(kind, mlist.address, ctx.address, action, days, ctx.name,
                                                ctx.how, ctx.who)
            if outcome.change == "unsubscribe":
                # The goodbye first: if the MTA does not take it, the member is still there for
                # the retry, which says goodbye (and tells the owners) instead of "not a member".
                # A store that fails after it was sent costs a second goodbye, never a lost one.
                self._send(mlist, outcome.mails, ctx, new_token, reason=outcome.reason, budget=outcome.budget)
                self.store.unsubscribe(mlist.address, ctx.address, ctx.how, ctx.who, ctx.detail)
                return
            if outcome.change == "subscribe":
                # The welcome after: it carries the new membership's one-click link.
                joined = self.store.subscribe(mlist.address, Member(ctx.address, ctx.name), ctx.how, ctx.who,
                                              ctx.detail)
            self._send(mlist, outcome.mails, ctx, new_token, reason=outcome.reason, budget=outcome.budget)
        except BaseException as e:
            if new_token:
                self.pending.drop(new_token)
            if claimed:
                self.pending.release(ctx.hash)
            if joined and isinstance(e, outgoing.OutgoingError):
                # The MTA did not take the welcome: a retry that found a member would answer
                # "already a member", and the welcome and the owners' notice would never go.
                self.store.unsubscribe(mlist.address, ctx.address, ctx.how, ctx.who,
                                       "undone: the welcome could not be sent (retried)")
            raise

    def _send(self, mlist: MailingList, mails, ctx: Context, token: str | None, reason: str = "",
              budget: str | None = None) -> None:
        request = addresses.role_address(mlist.address, "request")
        eff = self.config.list_settings(mlist.settings)
        owners = self.owners(mlist)
        values = {
            "list": mlist.address, "address": ctx.address, "name": ctx.name,
            "description": eff.description,
            "request_address": request,
            "subscribe_address": addresses.role_address(mlist.address, "subscribe"),
            "unsubscribe_address": addresses.role_address(mlist.address, "unsubscribe"),
            "owner_address": addresses.role_address(mlist.address, "owner"),
            "token": token or "", "confirm_url": self.confirm_url(token or ""),
            "confirm_address": addresses.role_address(mlist.address, "confirm", token) if token else "",
            "unsubscribe_url": self.unsubscribe_url(mlist.address, ctx.address),
            "days": str(tokens.MODERATION_DAYS if any(m.template == "moderation_request" for m in mails)
                        else eff.confirm_days),
            "reason": subscriptions.REFUSAL_TEXT.get(reason, ""),
            "how": {"mail": "by mail", "web": "on the web", "cli": "by the admin",
                    "owner": "approved by an owner"}.get(ctx.how, ctx.how),
            "policy_text": _policy_text(eff.subscribe_policy),
        }
        batch: list = []
        to_owners: list = []
        counted = []
        for mail in mails:
            if mail.to == OWNERS:
                targets = list(owners)
            elif mail.to == SENDER:
                if not ctx.sender:
                    continue
                targets = [ctx.sender]
            else:
                targets = [ctx.address]
            subject, text = notices.render(notices.template_text(mail.template, eff.templates), values)
            reply_to = values["confirm_address"] if token and mail.template in (
                "confirm_subscribe", "confirm_unsubscribe", "moderation_request") else None
            for to in targets:
                message = notices.command_reply(request, to, subject, text, reply_to,
                                                ctx.in_reply_to if mail.to != OWNERS else "")
                if mail.to == OWNERS:
                    to_owners.append(("", [to], message))
                else:
                    batch.append(("", [to], message))
                    if budget:
                        counted.append((to, mail.template))
        outgoing.send_many(self.config.outgoing, batch)
        for to, template in counted:
            self.pending.record_sent(mlist.address, to, template, budget=budget, sender=ctx.sender or "",
                                     client=ctx.client)
        # Owner notices are a courtesy: one that cannot be sent is logged, and the
        # member's change and mail stand (a retry would repeat the member's mail).
        for item in to_owners:
            try:
                outgoing.send_many(self.config.outgoing, [item])
            except outgoing.OutgoingError as e:
                logger.error("%s", fields(list=f"<{mlist.address}>", to=f"<{item[1][0]}>",
                                          status=f"owner notice not sent ({e})"))


def _is_own(list_address: str, sender: str) -> bool:
    if not sender:
        return False
    if addresses.key(sender) == addresses.key(list_address):
        return True
    return any(role and role.list_key == addresses.key(list_address)
               for _, role in addresses.candidates(sender))


def _header_text(value) -> str:
    from listmilter.core.headers import decode
    return decode(mailparse.text(value))


def _body_text(data: bytes) -> str:
    return mailparse.body_text(data[:MAX_BODY * 2], MAX_BODY)


def _says_reject(subject: str, body: str) -> bool:
    lines = commands.body_lines(body)
    first = lines[0].split()[0].lower().strip(".,!:") if lines and lines[0].split() else ""
    return first in ("reject", "deny", "no")


def _policy_text(policy: str) -> str:
    return {
        "open": "Anyone may join at once.",
        "confirm": "Joining needs a confirmation from the address that joins.",
        "moderate": "Joining needs the approval of a list owner.",
        "confirm+moderate": "Joining needs a confirmation from the address, then an owner's approval.",
    }.get(policy, "")


def _done_text(outcome: Outcome, list_address: str) -> str:
    if outcome.change == "subscribe":
        return f"You are now subscribed to {list_address}."
    if outcome.change == "unsubscribe":
        return f"You have been unsubscribed from {list_address}."
    if outcome.create and outcome.create[0] == tokens.MODERATE:
        return f"Thank you. Your request to join {list_address} now waits for the owners' approval."
    return outcome.status


def deliver_command(config, store, mlist: MailingList, role: addresses.RoleAddress, sender: str,
                    data: bytes) -> int:
    """The pipe transport's part: 0 when handled (answered or ignored); errors propagate (exit 75)."""
    service = Service(config, store, site_secret(config))
    try:
        service.handle_mail(mlist, role, sender, data)
    finally:
        service.close()
    return 0
