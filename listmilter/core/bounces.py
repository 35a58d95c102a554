"""What a message to <list>-bounces@ says, and what it does to a member's score.

Plain functions over plain data; listmilter.app.bounce_processing applies them.

A message to the bounce address is one of:
- a DSN (RFC 3464 multipart/report): each per-recipient block names the
  member by the ORCPT we gave it (Original-Recipient), else by
  Final-Recipient; the ENVID (Original-Envelope-Id) ties it to a post;
- a non-standard bounce from the null sender, read by flufl.bounce's
  detectors (no ENVID: it cannot be tied to a post, so it is never scored);
- an auto-response (vacation reply and the like: RFC 3834 markers), which is
  no bounce at all;
- anything else: unrecognised, kept for the owner.

Every header is read through listmilter.core.mailparse.text, so a message parsed
with any policy (8-bit, folded, Header objects) reads the same and never raises.
"""

from __future__ import annotations

import email.message
import email.parser
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum

from listmilter.core import addresses, mailparse, settings


class Kind(StrEnum):
    """What a message to the bounce address is."""
    DSN = "dsn"
    HEURISTIC = "heuristic"
    AUTORESPONSE = "autoresponse"
    UNRECOGNISED = "unrecognised"
    UNREADABLE = "unreadable"         # reading it failed (a bug): kept for the owner like UNRECOGNISED


DSN, HEURISTIC, AUTORESPONSE, UNRECOGNISED = Kind.DSN, Kind.HEURISTIC, Kind.AUTORESPONSE, Kind.UNRECOGNISED
UNREADABLE = Kind.UNREADABLE


class Verdict(StrEnum):
    """What one failure did to a member's score (recorded with every failure)."""
    SCORED = "scored"
    COUNTED_TODAY = "counted-today"   # permanent, but the member scored already today
    TEMPORARY = "temporary"
    NOT_MEMBER = "not-member"
    NOT_RECIPIENT = "not-recipient"   # a member, but not one the post went to (joined later, disabled)
    UNVERIFIED = "unverified"         # no ENVID we issued: cannot be tied to a post
    DUPLICATE = "duplicate"           # the same failure of the same post, seen before
    UNRECOGNISED = "unrecognised"     # nothing recognisable: the message is kept for the owner


# Verdicts that leave the message for the owner to look at, and why.
FOR_OWNER = {
    Verdict.NOT_MEMBER: "not a member of the list",
    Verdict.UNVERIFIED: "not a DSN with an envelope id listmilter issued, so it cannot be tied to a post",
    Verdict.NOT_RECIPIENT: "a member, but not a recipient of that post (joined later, or disabled)",
}


class Action(StrEnum):
    """What a score at the threshold leads to (the `bounce_action` setting)."""
    REMOVE = "remove"
    DISABLE = "disable"
    NOTIFY = "notify"

DAY = 86400.0


@dataclass(frozen=True)
class Failure:
    address: str          # as we addressed the member (ORCPT), else the final recipient
    permanent: bool       # Action: failed; a delay only is temporary
    status: str = ""      # RFC 3463 code, e.g. 5.1.1
    diagnostic: str = ""  # the remote server's words, one line


@dataclass(frozen=True)
class Report:
    kind: str
    envid: str = ""
    failures: tuple[Failure, ...] = ()


# -- reading -------------------------------------------------------------------
_AUTO_SUBJECT = re.compile(r"^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|"
                           r"abwesenheit|absence|vacation|on leave|r[ée]ponse automatique)",
                           re.IGNORECASE)


def is_auto_response(msg: email.message.Message) -> bool:
    """RFC 3834 and the common de-facto markers of vacation replies."""
    auto = mailparse.text(msg.get("Auto-Submitted")).strip().lower()
    if auto and not auto.startswith("no"):
        return True
    if any(msg.get(h) is not None for h in ("X-Autoreply", "X-Autorespond", "X-Auto-Response-Suppress")):
        return True
    if mailparse.text(msg.get("Precedence")).strip().lower() in ("auto_reply", "auto-reply"):
        return True
    return bool(_AUTO_SUBJECT.match(mailparse.text(msg.get("Subject"))))


def _one_line(value: object, limit: int = 300) -> str:
    return " ".join(mailparse.text(value).split())[:limit]


def _address_field(value: object) -> str:
    """`rfc822;bob@example.net` -> bob@example.net ('' for other address types)."""
    kind, sep, address = mailparse.text(value).partition(";")
    if not sep:
        return ""
    if kind.strip().lower() not in ("rfc822", "utf-8"):
        return ""
    return address.strip().strip("<>").strip()


def _delivery_status(msg: email.message.Message) -> email.message.Message | None:
    if msg.get_content_type() != "multipart/report":
        return None
    for part in msg.walk():
        if part.get_content_type() in ("message/delivery-status", "message/global-delivery-status"):
            return part
    return None


def _status_blocks(part: email.message.Message) -> list[email.message.Message]:
    if part.is_multipart():
        return [p for p in part.get_payload() if isinstance(p, email.message.Message)]
    # message/global-delivery-status is left as text by the email package.
    text = mailparse.payload_text(part)
    blocks = re.split(r"\r?\n\s*\r?\n", text.strip())
    return [email.parser.HeaderParser(policy=mailparse.POLICY).parsestr(b + "\n") for b in blocks if b.strip()]


def read_dsn(msg: email.message.Message) -> Report | None:
    """The failures an RFC 3464 DSN reports, or None if `msg` is no DSN."""
    part = _delivery_status(msg)
    if part is None:
        return None
    blocks = _status_blocks(part)
    if not blocks:
        return Report(DSN)
    envid = _one_line(blocks[0].get("Original-Envelope-Id"), 100)
    failures = []
    for block in blocks[1:]:
        # Real DSNs say "failure" or "failed (reason)" too.
        action = mailparse.text(block.get("Action")).strip().lower()
        status = _one_line(block.get("Status"), 40).partition(" ")[0]
        if action.startswith("fail"):
            permanent = True
        elif action.startswith("delay"):
            permanent = False
        else:
            continue          # delivered, relayed, expanded: no failure
        address = _address_field(block.get("Original-Recipient")) or \
            _address_field(block.get("Final-Recipient"))
        if not addresses.is_valid(address):
            continue
        failures.append(Failure(address, permanent, status, _one_line(block.get("Diagnostic-Code"))))
    return Report(DSN, envid, tuple(failures))


def read(msg: email.message.Message, null_sender: bool) -> Report:
    """What a message that reached the bounce address is."""
    report = read_dsn(msg)
    if report is not None and report.failures:
        return report
    if is_auto_response(msg) and not null_sender:
        return Report(AUTORESPONSE)
    if null_sender:
        # flufl.bounce's heuristics find addresses quoted in any text; only
        # mail from the null sender is a bounce at all.
        temporary, permanent = _flufl_failures(msg)
        failures = tuple(Failure(a, True) for a in sorted(permanent) if addresses.is_valid(a)) + \
            tuple(Failure(a, False) for a in sorted(temporary - permanent) if addresses.is_valid(a))
        if failures:
            return Report(HEURISTIC, report.envid if report else "", failures)
    if report is not None:
        return report         # a DSN that names no failure (a success notice, or unreadable)
    if is_auto_response(msg):
        return Report(AUTORESPONSE)
    return Report(UNRECOGNISED)


def _flufl_failures(msg: email.message.Message) -> tuple[set[str], set[str]]:
    from flufl.bounce import all_failures
    try:
        temporary, permanent = all_failures(msg)
    except Exception:   # flufl.bounce 6 raises IndexError on some plain messages
        return set(), set()
    def decode(items: Iterable[object]) -> set[str]:
        return {a.decode("utf-8", "replace") if isinstance(a, bytes) else str(a) for a in items}
    return decode(temporary), decode(permanent)


# -- scoring -------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """The bounce_* settings of one list."""
    action: str = "disable"
    threshold: int = 5
    stale_days: int = 7
    warnings: int = 3
    warning_interval_days: int = 7

    @classmethod
    def of(cls, s: settings.ListSettings) -> Policy:
        return cls(s.bounce_action, s.bounce_threshold, s.bounce_stale_days, s.bounce_warnings,
                   s.bounce_warning_interval_days)


@dataclass(frozen=True)
class Score:
    score: int = 0
    last_scored: float = 0.0     # time of the last bounce that counted
    last_bounce: float = 0.0     # time of the last permanent bounce, counted or not


def _day(t: float) -> int:
    return int(t // DAY)


def add_bounce(current: Score, now: float, policy: Policy) -> tuple[Score, bool]:
    """The score after a permanent bounce at `now`, and whether this bounce counted.

    A score with no bounce for `stale_days` starts again; bounces count at most
    once per (UTC) day, so a dead address scores once for a day's posts.
    """
    score = current
    if score.last_bounce and now - score.last_bounce > policy.stale_days * DAY:
        score = Score()
    if score.last_scored and _day(score.last_scored) == _day(now):
        return replace(score, last_bounce=max(now, score.last_bounce)), False
    return Score(score.score + 1, now, max(now, score.last_bounce)), True


def due(score: Score, now: float, policy: Policy) -> bool:
    """Does a score call for the list's bounce_action now?

    Checked at every bounce and by the hourly run, so a threshold lowered
    after a member scored applies to the score they have; a stale score
    (no bounce for stale_days) does not count.
    """
    if score.last_bounce and now - score.last_bounce > policy.stale_days * DAY:
        return False
    return score.score >= policy.threshold


def score_bounce(current: Score, now: float, policy: Policy, pending: str = "",
                 acted: bool = False) -> tuple[Score, bool, str]:
    """A scored permanent failure: the new score, whether it counted, and the action
    now pending (the policy's action once the score reaches the threshold, unless an
    action is pending or was taken already)."""
    new, counted = add_bounce(current, now, policy)
    if not pending and not acted and due(new, now, policy):
        pending = policy.action     # also for a failure counted today, after a lowered threshold
    return new, counted, pending


def verdict(failure: Failure, kind: str, posted_at: float | None, member_added: float | None,
            member_active: bool) -> Verdict:
    """Whether a failure may score the member: only a permanent failure, of a member,
    in a DSN carrying an ENVID we issued (`posted_at` is the post's time from it),
    of a member the post went to. `member_added` is None for a non-member."""
    if not failure.permanent:
        return Verdict.TEMPORARY
    if member_added is None:
        return Verdict.NOT_MEMBER
    if kind != Kind.DSN or posted_at is None:
        return Verdict.UNVERIFIED
    if not was_recipient(member_added, member_active, posted_at):
        return Verdict.NOT_RECIPIENT
    return Verdict.SCORED


@dataclass(frozen=True)
class Steps:
    """How an action is carried out, in order: the membership change, the owners'
    notice (with keep/remove links or not), a first warning to the member, and what
    the bounce record says afterwards."""
    membership: str | None         # "unsubscribe", "disable" or None
    owner_notice: str              # the notice's kind: remove, disable, notify
    decision_links: bool           # the owners may answer keep or remove
    warn_member: bool              # the first of the policy's warnings (if it has any)
    record: str                    # "forget", "disabled" or "reported"
    logged_as: str


STEPS = {
    Action.REMOVE: Steps("unsubscribe", "remove", False, False, "forget", "removed"),
    Action.DISABLE: Steps("disable", "disable", True, True, "disabled", "disabled"),
    Action.NOTIFY: Steps(None, "notify", True, False, "reported", "reported to owner"),
}


def was_recipient(member_added: float, member_active: bool, posted_at: float | None) -> bool:
    """Could the member have received the post a DSN refers to?

    Joined after the post (a minute's slack for clocks), or disabled now: the
    bounce is not theirs to score.
    """
    if not member_active:
        return False
    if posted_at is None or not member_added:
        return True
    return member_added <= posted_at + 60


def next_step(warnings_sent: int, next_warning: float, now: float, policy: Policy) -> str | None:
    """For a member disabled by bounces: 'warn', 'remove' or None (nothing due yet)."""
    if now < next_warning:
        return None
    return "warn" if warnings_sent < policy.warnings else "remove"


def fmt_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) + " UTC" if t else "-"

