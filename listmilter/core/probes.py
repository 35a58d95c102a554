"""Bounce probes: trust a failure only when it is bound to the member.

A failure bound to the member by its VERP address scores at once (core/verp.py).
A failure in mail to the plain bounce address, bound to a post (our ENVID) or to
nothing, is a suspicion (bounces.suspicion): anyone who sees a post's ENVID can
forge a DSN naming any member, and anyone at all a bounce without one. Before
anything is done about it, the member gets one probe message from a one-time return path,
`<list-local>-bounces+probe-TIME-MAC@domain`: TIME the probe's Unix time in base
36, MAC the first 16 base32 characters (80 bits: what a local part leaves) of
core/mac.py's MAC of list, member and TIME under a key derived for "probe". Whatever comes
back there from the null sender, DSN or not, says the member's address is dead:
the list's bounce_action is taken then. A probe that does not bounce within
bounce_probe_days clears the suspicion. One probe in flight per member, and at most
bounce_probes_per_day probes a day for reports that came from another host: a forged
report naming every member must not make the list mail every member.

Pure decisions only; listmilter.app.probes sends and records.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from listmilter.core import addresses, bounces, envid, mac
from listmilter.core.bounces import Failure
from listmilter.core.keys import Keyring, keyring

USE = "probe"
PREFIX = "probe-"
MAX_LOCAL = 64
MAC_LENGTH = 16
_CODE = re.compile(rf"probe-([0-9a-z]{{1,8}})-([a-z2-7]{{{MAC_LENGTH}}})")


@dataclass(frozen=True)
class Bound:
    """A verified probe code: the member it was sent to and when."""
    member: str
    sent_at: float


def _mac(key: bytes, list_address: str, member: str, when: str) -> str:
    return mac.tag(key, addresses.key(list_address), addresses.key(member), when, length=MAC_LENGTH)


def code(list_address: str, member: str, sent_at: float, secret: Keyring | bytes) -> str:
    """The extension (after `-bounces+`) of the probe sent to `member` at `sent_at`."""
    ring = keyring(secret)
    when = envid.base36(int(sent_at))
    return f"{PREFIX}{when}-{_mac(ring.own_key(ring.current_id, USE), list_address, member, when)}"


def make(list_address: str, member: str, sent_at: float, secret: Keyring | bytes) -> str | None:
    """The probe's envelope sender; None if it would not fit in a local part."""
    address = addresses.role_address(list_address, "bounces", code(list_address, member, sent_at, secret))
    if len(address.rpartition("@")[0]) > MAX_LOCAL or not addresses.is_valid(address):
        return None
    return address


def is_code(extension: object) -> bool:
    """Does the extension look like a probe code (not yet verified)? Never raises."""
    return isinstance(extension, str) and len(extension) <= MAX_LOCAL \
        and _CODE.fullmatch(extension.strip().lower()) is not None


def find(extension: str, list_address: str, candidates: Iterable[str], secret: Keyring | bytes) -> Bound | None:
    """The member among `candidates` (those with a probe in flight) the code was made for;
    None for a forged or garbled code, one made for another list or member, or under a
    key no longer accepted. Never raises."""
    if not is_code(extension):
        return None
    m = _CODE.fullmatch(extension.strip().lower())
    assert m is not None
    when, given = m.group(1), m.group(2)
    ring = keyring(secret)
    keys = [ring.own_key(kid, USE) for kid in ring.ids]
    for member in candidates:
        if isinstance(member, str) and member.isascii() and any(
                mac.same(given, _mac(key, list_address, member, when)) for key in keys):
            return Bound(member, float(int(when, 36)))
    return None


# -- decisions -------------------------------------------------------------------
class Start(StrEnum):
    """What a new suspicion of a member gets."""
    PROBE = "probe"                # a probe, sent now
    IN_FLIGHT = "in flight"        # nothing: the probe sent for an earlier one decides
    OVER_BUDGET = "over budget"    # nothing: the list's probes for reports from other hosts are spent


def should_probe(in_flight_since: float | None, now: float, probe_days: int) -> bool:
    """Send a probe for a new suspicion? Not while one is in flight (one per member)."""
    return in_flight_since is None or expired(in_flight_since, now, probe_days)


def start(in_flight_since: float | None, now: float, probe_days: int, sent_last_day: int,
          per_day: int) -> Start:
    """One probe in flight per member; and, for a report from another host (`per_day` is the
    list's bounce_probes_per_day then, 0 for no limit), at most `per_day` of the list's probes
    in flight that were sent in the last day. A report that really comes from a remote MTA names
    the recipients of one domain; one naming thousands is someone making the list mail every
    member. The local MTA's own reports pass 0: they name whatever failed."""
    if not should_probe(in_flight_since, now, probe_days):
        return Start.IN_FLIGHT
    if per_day and sent_last_day >= per_day:
        return Start.OVER_BUDGET
    return Start.PROBE


def expired(sent_at: float, now: float, probe_days: int) -> bool:
    """A probe that did not bounce within probe_days: the suspicion is cleared."""
    return now - sent_at > probe_days * bounces.DAY


def suspect_report(failures: Iterable[Failure], from_client: bool = True) -> bool:
    """Permanent failures at several receiving domains in a report that came from an SMTP
    client (`from_client`): a remote MTA only gets one post's copy for its own domain's
    recipients, so its real report names one. The local MTA's own reports (no client)
    name whatever failed."""
    return from_client and len({addresses.key(f.address).rpartition("@")[2]
                                for f in failures if f.permanent}) > 1


DEAD = "dead"


def failure_of(report: bounces.Report, member: str) -> Failure:
    """The member's failure that a bounce of their probe reports: the address it was sent to
    names the member, whatever address the bounce names; the first permanent failure's
    status and words, if it has one."""
    first = next((f for f in report.failures if f.permanent), None)
    return Failure(member, True, first.status if first else "", first.diagnostic if first else "the probe bounced")


def explain(report: bounces.Report, bound: Bound, in_flight_since: float | None,
            null_sender: bool) -> bounces.Explanation:
    """What a message delivered to a verified probe address says (`bounces --explain`), as
    listmilter.app.probe_bounces acts on it: the member's failure if on_bounce says DEAD,
    else none."""
    if on_bounce(in_flight_since, bound, null_sender, report.kind) != DEAD:
        return bounces.Explanation(report.kind, report.envid, ())
    failure = failure_of(report, bound.member)
    return bounces.Explanation(report.kind, report.envid, (bounces.Explained(
        failure.address, failure.status, True, "probe", bounces.Verdict.PROBE_BOUNCED,
        bounces.WHY[bounces.Verdict.PROBE_BOUNCED]),))


def on_bounce(in_flight_since: float | None, bound: Bound, null_sender: bool, kind: str) -> str:
    """What mail to a verified probe address says: DEAD (the member's address failed),
    else why it is ignored."""
    if kind == bounces.AUTORESPONSE:
        return "ignored (an automatic reply to the probe)"
    if not null_sender:
        return "ignored (not from the null sender: a reply, not a bounce)"
    if in_flight_since is None or int(in_flight_since) != int(bound.sent_at):
        return "ignored (no probe in flight with this code: cleared or answered already)"
    return DEAD
