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
"""

from __future__ import annotations

from dataclasses import dataclass

from listmilter.core import commands
from listmilter.core.tokens import CONFIRM, MODERATE, Pending

POLICIES = ("open", "confirm", "moderate", "confirm+moderate")

# Mail recipients
MEMBER = "member"     # the address the request is about
SENDER = "sender"     # whoever sent the command (may differ for a token reply)
OWNERS = "owners"


# Replies to requests nobody has proven to own the address for: these count toward the
# daily limits (confirm_limit_per_address, confirm_limit_per_list). Mails that follow a
# valid token or an owner's decision (welcome, goodbye, rejected) do not.
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


@dataclass(frozen=True)
class State:
    """What the store and the pending database say about one address on one list."""
    is_member: bool
    pending: Pending | None = None       # an open request of this address (any kind)
    sent_address: int = 0                # replies sent to this address for this list in 24 h
    sent_list: int = 0                   # replies sent for this list in 24 h


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

    @property
    def answered(self) -> bool:
        return bool(self.mails)


def _over_limit(policy: Policy, state: State) -> str | None:
    if state.sent_address >= policy.limit_address:
        return f"ignored (limit: {state.sent_address} replies to this address today)"
    if state.sent_list >= policy.limit_list:
        return f"ignored (limit: {state.sent_list} replies for this list today)"
    return None


def _limited(policy: Policy, state: State, outcome: Outcome) -> Outcome:
    """Replies to unverified commands count toward the daily limits; over them, nothing happens."""
    reason = _over_limit(policy, state)
    if reason:
        return Outcome(reason, ignored=True)
    return outcome


def on_command(kind: str, policy: Policy, state: State) -> Outcome:
    """A subscribe, unsubscribe or help request (not a token)."""
    if kind == commands.HELP:
        return _limited(policy, state, Outcome("help sent", mails=(Mail("help", SENDER),)))
    if kind == commands.SUBSCRIBE:
        if state.is_member:
            return _limited(policy, state, Outcome("already a member",
                                                   mails=(Mail("already_member", MEMBER),)))
        if state.pending is not None and state.pending.action == "subscribe":
            what = "approval" if state.pending.kind == MODERATE else "confirmation"
            return Outcome(f"ignored ({what} already pending)", ignored=True)
        if policy.subscribe == "open":
            return _limited(policy, state, _joined("subscribed", policy))
        if policy.subscribe == "moderate":
            return _limited(policy, state, _moderation())
        return _limited(policy, state, Outcome(
            "confirmation sent", create=(CONFIRM, "subscribe"), mails=(Mail("confirm_subscribe", MEMBER),)))
    if kind == commands.UNSUBSCRIBE:
        if not state.is_member:
            return _limited(policy, state, Outcome("not a member", mails=(Mail("not_member", MEMBER),)))
        if state.pending is not None and state.pending.action == "unsubscribe":
            return Outcome("ignored (confirmation already pending)", ignored=True)
        if not policy.unsubscribe_confirm:
            return _limited(policy, state, _left("unsubscribed", policy))
        return _limited(policy, state, Outcome(
            "confirmation sent", create=(CONFIRM, "unsubscribe"), mails=(Mail("confirm_unsubscribe", MEMBER),)))
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
             sender_is_owner: bool = False, reject: bool = False, state: State | None = None) -> Outcome:
    """A confirmation token was presented (by mail or on the web)."""
    reason = token_refusal(pending, list_key, now)
    if reason:
        refusal = Outcome(f"refused (token {reason})", mails=(Mail("token_refused", SENDER),), refused=True,
                          reason=reason)
        return _limited(policy, state, refusal) if state else refusal
    if pending.kind == MODERATE:
        if not sender_is_owner:
            refusal = Outcome("refused (approval from a non-owner)", mails=(Mail("token_refused", SENDER),),
                              refused=True, reason="not owner")
            return _limited(policy, state, refusal) if state else refusal
        return on_decision(pending, policy, approve=not reject)
    if pending.action == "unsubscribe":
        return _left("unsubscribed (confirmed)", policy, close="confirmed")
    if policy.subscribe in ("moderate", "confirm+moderate"):
        return _moderation(close="confirmed")
    return _joined("subscribed (confirmed)", policy, close="confirmed")


def on_decision(pending: Pending, policy: Policy, approve: bool) -> Outcome:
    """An owner approves or rejects a moderation request."""
    if not approve:
        return Outcome("rejected by the owner", close="rejected", mails=(Mail("rejected", MEMBER),))
    if pending.action == "unsubscribe":
        return _left("unsubscribed (approved)", policy, close="approved")
    return _joined("subscribed (approved)", policy, close="approved")


def policy_from(effective) -> Policy:
    """The Policy of a list; `effective(name)` gives a setting's effective value."""
    return Policy(subscribe=effective("subscribe_policy"),
                  unsubscribe_confirm=effective("unsubscribe_confirm"),
                  owner_notices=effective("owner_notices"),
                  confirm_days=effective("confirm_days"),
                  limit_address=effective("confirm_limit_per_address"),
                  limit_list=effective("confirm_limit_per_list"))

