"""What a subscription command leads to. Pure functions over plain data.

Given the list's policy, what is pending for the address and how much mail
was already sent today, `on_command` decides what a subscribe, unsubscribe
or help request does, `on_token` what a confirmation token does (a reply by
mail, a click on the confirmation link, or an owner's approval), and
`on_decision` what an owner's approve/reject from the CLI does. The caller
(listmilter.app.subscription_service) applies the Outcome: store changes, pending requests,
mails through `outgoing:`.

Policies (setting `subscribe_policy`):
    open               subscribe at once
    confirm            double opt-in: the address confirms first (default)
    moderate           an owner approves
    confirm+moderate   the address confirms, then an owner approves
Leaving is never moderated; `unsubscribe_confirm: false` makes it immediate.

Who is trusted: a command acts on its From: address, and only the envelope
sender gets the replies it asks for without proof. So a change that needs
no confirmation (`open`, `unsubscribe_confirm: false`) happens at once only
when From: is the envelope sender (Request.trusted); otherwise a
confirmation goes to the From: address, which proves that it wants the
change. `moderate` likewise asks the From: address first, so owners never
approve someone who did not ask.

Budgets: a reply that goes to an address other than the envelope sender
(a confirmation for a forged or foreign From:) is mail to a third party. It
counts toward its own budget (UNVERIFIED), limited per address, per envelope
sender, per client address and per list; replies to the envelope sender
itself count toward OWN, limited per address only. A flood of forged
requests therefore never uses up what a member's unsubscribe or a real
subscriber's confirmation needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from listmilter.core import addresses, commands, settings
from listmilter.core.tokens import CONFIRM, MODERATE, Pending

POLICIES = ("open", "confirm", "moderate", "confirm+moderate")


class To(StrEnum):
    """Who a mail of an Outcome goes to."""
    MEMBER = "member"     # the address the request is about
    SENDER = "sender"     # whoever sent the command (may differ for a token reply)
    OWNERS = "owners"


MEMBER, SENDER, OWNERS = To.MEMBER, To.SENDER, To.OWNERS


# Replies to requests nobody has proven to own the address for. What counts toward the
# daily limits is every mail of an Outcome with a `budget` (on_command and token refusals);
# mails that follow a valid token or an owner's decision (welcome, goodbye, rejected) do not.
LIMITED = frozenset({"confirm_subscribe", "confirm_unsubscribe", "help", "already_member", "not_member",
                     "token_refused", "moderation_waiting"})


@dataclass(frozen=True)
class Policy:
    subscribe: str = "confirm"
    unsubscribe_confirm: bool = True
    owner_notices: bool = False
    confirm_days: int = 3
    limit_address: int = 3
    limit_list: int = 100
    limit_sender: int = 3
    limit_client: int = 10


class Budget(StrEnum):
    """Which limits a reply counts toward (see the module text)."""
    OWN = "own"                  # replies to the envelope sender (or to a From: it vouches for)
    UNVERIFIED = "unverified"    # mail to an address other than the envelope sender


OWN, UNVERIFIED = Budget.OWN, Budget.UNVERIFIED


@dataclass(frozen=True)
class Request:
    """Who sent a command, as far as the edge can tell."""
    sender: str = ""             # the envelope sender: where SENDER mails go
    address: str = ""            # the address the command is about: From:, else the envelope sender
    client: str = ""             # the SMTP client's IP address ("" when unknown)
    dmarc_pass: bool = False     # the mail passed DMARC for its From: domain (no lookup yet: False)

    @property
    def trusted(self) -> bool:
        """May the command change `address` without a confirmation from that address?"""
        return self.dmarc_pass or addresses.key(self.address) == addresses.key(self.sender)


@dataclass(frozen=True)
class Sent:
    """Replies for this list in the last 24 h that the limits count (the pending database)."""
    to_sender: int = 0               # OWN: to the envelope sender
    to_address: int = 0              # OWN: to the address the command is about
    unverified_to_address: int = 0   # UNVERIFIED: to the address the command is about
    unverified_sender: int = 0       # UNVERIFIED: asked for by this envelope sender
    unverified_client: int = 0       # UNVERIFIED: asked for from this client address
    unverified_list: int = 0         # UNVERIFIED: all of this list's


@dataclass(frozen=True)
class State:
    """What the store and the pending database say about one address on one list."""
    is_member: bool
    pending: Pending | None = None       # an open request of this address (any kind)
    sent: Sent = Sent()


@dataclass(frozen=True)
class Mail:
    template: str
    to: str          # MEMBER, SENDER or OWNERS


@dataclass(frozen=True)
class Outcome:
    status: str                                  # for the log line
    change: str | None = None                    # subscribe | unsubscribe: apply to the member now
    create: tuple[str, str] | None = None        # (kind, action): a new pending request
    mails: tuple[Mail, ...] = ()
    close: str | None = None                     # the used token's outcome: confirmed, approved, rejected
    refused: bool = False                        # a refused token or request (logged as such)
    ignored: bool = False                        # nothing is done and nothing is sent
    reason: str = ""                             # refused: a key of REFUSAL_TEXT
    budget: str | None = None                    # OWN or UNVERIFIED: its mails count toward that budget
    limit: str = ""                              # ignored: the setting whose limit was reached

    @property
    def answered(self) -> bool:
        return bool(self.mails)


def budget_of(outcome: Outcome, request: Request) -> str | None:
    """Which budget an outcome's replies count toward (None: it sends nothing to count)."""
    to = {mail.to for mail in outcome.mails if mail.to != OWNERS}
    if not to:
        return None
    return UNVERIFIED if MEMBER in to and not request.trusted else OWN


def over_limit(policy: Policy, request: Request, sent: Sent, budget: str,
               to_member: bool) -> tuple[str, str] | None:
    """(setting, what was reached) when a reply in `budget` would exceed a daily limit."""
    if budget == UNVERIFIED:
        checks = [("confirm_limit_per_address", sent.unverified_to_address, policy.limit_address,
                   "mails to this address asked for by others"),
                  ("confirm_limit_per_sender", sent.unverified_sender, policy.limit_sender,
                   "mails to others asked for by this sender")]
        if request.client:      # unknown (mail submitted on this host): the other limits still hold
            checks.append(("confirm_limit_per_client", sent.unverified_client, policy.limit_client,
                           f"mails to others asked for from {request.client}"))
        checks.append(("confirm_limit_per_list", sent.unverified_list, policy.limit_list,
                       "mails to others for this list"))
    else:
        count = sent.to_address if to_member else sent.to_sender
        checks = [("confirm_limit_per_address", count, policy.limit_address, "replies to this address")]
    for name, count, limit, what in checks:
        if count >= limit:
            return name, f"{count} {what} today"
    return None


def _limited(policy: Policy, request: Request, state: State, outcome: Outcome) -> Outcome:
    """Replies to unverified commands count toward the daily limits; over one, nothing happens."""
    budget = budget_of(outcome, request)
    if budget is None:
        return outcome
    to_member = any(mail.to == MEMBER for mail in outcome.mails)
    hit = over_limit(policy, request, state.sent, budget, to_member)
    if hit:
        name, what = hit
        return Outcome(f"ignored (limit {name}: {what})", ignored=True, limit=name)
    return replace(outcome, budget=budget)


UNTRUSTED = " (From: is not the envelope sender)"


def on_command(kind: str, policy: Policy, state: State, request: Request) -> Outcome:
    """A subscribe, unsubscribe or help request (not a token) from `request`."""
    if kind == commands.HELP:
        return _limited(policy, request, state, Outcome("help sent", mails=(Mail("help", SENDER),)))
    trusted = request.trusted
    if kind == commands.SUBSCRIBE:
        if state.is_member:
            return _limited(policy, request, state, Outcome("already a member",
                                                            mails=(Mail("already_member", MEMBER),)))
        if state.pending is not None and state.pending.action == "subscribe":
            what = "approval" if state.pending.kind == MODERATE else "confirmation"
            return Outcome(f"ignored ({what} already pending)", ignored=True)
        if policy.subscribe == "open" and trusted:
            return _limited(policy, request, state, _joined("subscribed", policy))
        if policy.subscribe == "moderate" and trusted:
            return _limited(policy, request, state, _moderation())
        # confirm, confirm+moderate, or anyone asking for another address: the address confirms
        # first (then on_token applies the policy).
        why = UNTRUSTED if policy.subscribe in ("open", "moderate") else ""
        return _limited(policy, request, state, Outcome(
            "confirmation sent" + why, create=(CONFIRM, "subscribe"), mails=(Mail("confirm_subscribe", MEMBER),)))
    if kind == commands.UNSUBSCRIBE:
        if not state.is_member:
            return _limited(policy, request, state, Outcome("not a member", mails=(Mail("not_member", MEMBER),)))
        if state.pending is not None and state.pending.action == "unsubscribe":
            return Outcome("ignored (confirmation already pending)", ignored=True)
        if not policy.unsubscribe_confirm and trusted:
            return _limited(policy, request, state, _left("unsubscribed", policy))
        why = UNTRUSTED if not policy.unsubscribe_confirm else ""
        return _limited(policy, request, state, Outcome(
            "confirmation sent" + why, create=(CONFIRM, "unsubscribe"), mails=(Mail("confirm_unsubscribe", MEMBER),)))
    raise ValueError(f"unknown command {kind!r}")


def _joined(status: str, policy: Policy, close: str | None = None) -> Outcome:
    mails = (Mail("welcome", MEMBER),) + ((Mail("owner_joined", OWNERS),) if policy.owner_notices else ())
    return Outcome(status, change="subscribe", mails=mails, close=close)


def _left(status: str, policy: Policy, close: str | None = None) -> Outcome:
    mails = (Mail("goodbye", MEMBER),) + ((Mail("owner_left", OWNERS),) if policy.owner_notices else ())
    return Outcome(status, change="unsubscribe", mails=mails, close=close)


def _moderation(close: str | None = None) -> Outcome:
    return Outcome("waiting for approval", create=(MODERATE, "subscribe"), close=close,
                   mails=(Mail("moderation_waiting", MEMBER), Mail("moderation_request", OWNERS)))


def token_refusal(pending: Pending | None, list_key: str, now: float) -> str | None:
    """Why a token cannot be used now (None: it can)."""
    if pending is None:
        return "unknown"
    if pending.list != list_key:
        return "mismatch"            # a token of another list
    state = pending.state(now)
    if state == "used":
        return "used"
    if state == "expired":
        return "expired"
    return None


REFUSAL_TEXT = {
    "unknown": "this confirmation code is not one we issued (mistyped, or forged)",
    "mismatch": "this confirmation code does not belong to this list",
    "used": "this confirmation code was already used",
    "expired": "this confirmation code has expired; please send your request again",
    "not owner": "only a list owner may approve this request",
}


def on_token(pending: Pending | None, list_key: str, policy: Policy, now: float,
             sender_is_owner: bool = False, reject: bool = False, state: State | None = None,
             request: Request | None = None) -> Outcome:
    """A confirmation token was presented (by mail, with `state` and `request`, or on the web)."""
    request = request or Request()      # a refusal goes to the sender only: OWN whoever asked
    reason = token_refusal(pending, list_key, now)
    if reason:
        refusal = Outcome(f"refused (token {reason})", mails=(Mail("token_refused", SENDER),), refused=True,
                          reason=reason)
        return _limited(policy, request, state, refusal) if state else refusal
    assert pending is not None      # token_refusal names a missing request
    if pending.kind == MODERATE:
        if not sender_is_owner:
            refusal = Outcome("refused (approval from a non-owner)", mails=(Mail("token_refused", SENDER),),
                              refused=True, reason="not owner")
            return _limited(policy, request, state, refusal) if state else refusal
        return on_decision(pending, policy, approve=not reject)
    if pending.action == "unsubscribe":
        return _left("unsubscribed (confirmed)", policy, close="confirmed")
    if policy.subscribe in ("moderate", "confirm+moderate"):
        return _moderation(close="confirmed")
    return _joined("subscribed (confirmed)", policy, close="confirmed")


def on_web_token(pending: Pending | None, list_key: str, policy: Policy, now: float) -> Outcome:
    """A confirmation link was followed. The web cannot tell who clicks, so a
    moderation request is never approved there: owners answer by mail or the CLI."""
    outcome = on_token(pending, list_key, policy, now)
    if pending is not None and pending.kind == MODERATE:
        return Outcome("refused (approval on the web)", refused=True, reason="not owner")
    return outcome


def on_one_click(removed: bool, policy: Policy) -> Outcome:
    """RFC 8058 one-click unsubscribe, after the store removed the member (`removed`)
    or found nobody to remove: the member leaves at once, without confirmation (the
    link is proof enough), and hears of it as after any unsubscription."""
    if not removed:
        return Outcome("not a member (one-click)")
    left = _left("unsubscribed (one-click)", policy)
    return replace(left, change=None)        # done already: the store's removal was the decision


def on_decision(pending: Pending, policy: Policy, approve: bool) -> Outcome:
    """An owner approves or rejects a moderation request."""
    if not approve:
        return Outcome("rejected by the owner", close="rejected", mails=(Mail("rejected", MEMBER),))
    if pending.action == "unsubscribe":
        return _left("unsubscribed (approved)", policy, close="approved")
    return _joined("subscribed (approved)", policy, close="approved")


def policy_from(s: settings.ListSettings) -> Policy:
    """The Policy of a list, from its settings."""
    return Policy(subscribe=s.subscribe_policy, unsubscribe_confirm=s.unsubscribe_confirm,
                  owner_notices=s.owner_notices, confirm_days=s.confirm_days,
                  limit_address=s.confirm_limit_per_address, limit_list=s.confirm_limit_per_list,
                  limit_sender=s.confirm_limit_per_sender, limit_client=s.confirm_limit_per_client)

