"""Is a post held for the owners, refused, dropped or sent? Why? Pure functions.

A held post is expanded as usual and then put on the MTA's hold queue by the
milter (quarantine): approving it is releasing it from there, rejecting or
discarding it is deleting it. What the owners are sent about it (summary),
and what a reply to that notice means (parse_decision), are here too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from listmilter.core import addresses, policy, settings, tokens


class Action(StrEnum):
    ACCEPT = "accept"
    HOLD = "hold"
    REJECT = "reject"
    DISCARD = "discard"


ACCEPT, HOLD, REJECT, DISCARD = Action.ACCEPT, Action.HOLD, Action.REJECT, Action.DISCARD


@dataclass(frozen=True)
class Rules:
    """The settings the decision reads (settings.ListSettings has them all)."""
    posting: str                                  # open | members | announce
    owners: tuple[str, ...] = ()
    moderated: bool = False
    nonmember_action: str = "hold"
    accept_nonmembers: tuple[str, ...] = ()       # addresses, or ^regular expressions
    moderated_members: tuple[str, ...] = ()
    max_message_size: int = 0                     # 0: no limit


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""          # for the log, the owners' notice, a 550 reply


def rules_of(s: settings.ListSettings) -> Rules:
    return Rules(s.posting, tuple(s.owners), s.moderated, s.nonmember_action, tuple(s.accept_nonmembers),
                 tuple(s.moderated_members), s.max_message_size)


def matches(sender: str, patterns: tuple[str, ...]) -> bool:
    """Is `sender` one of the addresses, or matched whole by one of the ^expressions?"""
    key = addresses.key(sender)
    for p in patterns:
        if p.startswith("^"):
            try:
                if re.fullmatch(p, sender, re.IGNORECASE):
                    return True
            except re.error:        # checked when the setting was read; never a traceback here
                continue
        elif addresses.key(p) == key:
            return True
    return False


def decide(rules: Rules, list_address: str, sender: str, is_member: bool, size: int | None = None) -> Decision:
    """What happens to a post from `sender` (the envelope sender); `size` in bytes when known
    (at end of message; None at RCPT time, when only who posts is known)."""
    if sender and addresses.key(sender) in {addresses.key(o) for o in rules.owners}:
        return Decision(ACCEPT)             # owners may always post, as before
    if rules.posting == "announce":
        return Decision(REJECT, f"{list_address} is an announcement list; only its owners may post to it")
    if rules.posting == "members" and not is_member and not matches(sender, rules.accept_nonmembers):
        action = Action(rules.nonmember_action)
        if action == REJECT:
            return Decision(REJECT, policy.posting_refusal("members", list_address, sender, False, ()) or "")
        if action != ACCEPT:
            return Decision(action, f"{sender or '<>'} is not a member of {list_address}")
    if rules.moderated:
        return Decision(HOLD, f"{list_address} is moderated: every post waits for an owner")
    if sender and matches(sender, rules.moderated_members):
        return Decision(HOLD, f"posts from {sender} are moderated on {list_address}")
    if size is not None and rules.max_message_size and size > rules.max_message_size:
        return Decision(HOLD, f"the message is {size} bytes, over the list's max_message_size "
                              f"of {rules.max_message_size}")
    return Decision(ACCEPT)


# -- the owners' notice and their reply -----------------------------------------------
SUMMARY_LINES = 10
SUMMARY_WIDTH = 200


def first_lines(body: str, count: int = SUMMARY_LINES) -> list[str]:
    """The first non-empty lines of a text, cut to a readable width, control characters out."""
    out = []
    for line in body.splitlines():
        line = "".join(c if c.isprintable() else " " for c in line).rstrip()
        if not line.strip():
            continue
        out.append(line[:SUMMARY_WIDTH])
        if len(out) >= count:
            break
    return out


_DECISION = re.compile(r"\b(approve|reject|discard)[\s:+=-]+([A-Za-z2-7]{24})\b", re.IGNORECASE | re.ASCII)
VERBS = ("approve", "reject", "discard")


def parse_decision(text: str) -> tuple[str, str] | None:
    """("approve"|"reject"|"discard", code) from a line such as a reply's Subject
    "Re: Held: ... (approve CODE)" edited to "reject CODE"; None if there is none.
    The code must be one we made: tokens.TOKEN_RE, lower case."""
    # The last one: the notice puts its code at the end, after the post's own Subject,
    # which may carry a look-alike "(approve ...)" of the poster's making.
    found = list(_DECISION.finditer(text or ""))
    if not found:
        return None
    m = found[-1]
    code = m.group(2).lower()
    if not tokens.TOKEN_RE.fullmatch(code):
        return None
    return m.group(1).lower(), code


def expired(held_at: float, hold_days: int, now: float) -> bool:
    return now >= held_at + hold_days * tokens.DAY


def reply_decision(subject: str, body_lines: list[str]) -> tuple[str, str] | None:
    """What an owner's reply to a moderation notice decides: (verb, code), or None.

    The notice's Subject ends "(approve CODE)": a plain reply approves. A first body
    line that starts with reject, discard or approve overrides the Subject's verb (so a
    reply can reject without editing the Subject); the code may also be in the body."""
    found = parse_decision(subject)
    for line in body_lines[:1]:
        words = line.split()
        verb = words[0].strip(":,.!").lower() if words else ""
        if verb in VERBS:
            in_line = parse_decision(line)
            code = in_line[1] if in_line else (found[1] if found else None)
            return (verb, code) if code else None
    if found is None:
        for line in body_lines:
            found = parse_decision(line)
            if found:
                break
    return found
