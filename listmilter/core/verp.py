"""VERP: each personal copy's envelope sender names its member and its post.

A personal copy of a post goes out from `<list-local>-bounces+CODE@domain`,
CODE = POSTID-TIME-MAC, e.g. `dev-bounces+4fx2q1z0d3-tpe8id-ycig2rblyma5w@example.org`:
POSTID the post's queue id, TIME its Unix time in base 36 (as in the ENVID,
core/envid.py), MAC the first 13 base32 characters (65 bits: what the 64
characters of a local part leave) of core/mac.py's MAC of list, member, POSTID
and TIME under a key derived for "verp" from a site key (core/keys.py); any
key still accepted verifies one.

Anything that bounces to that address, from any MTA, a DSN or not, with the
ENVID kept or dropped, names its member by the address it was sent to. The
code does not carry the member's address (it would not fit the 64 characters
of a local part): the reader checks the MAC against the addresses the bounce
names, and else against the list's members (`find`).

Only lower-case letters, digits and `-`: some MTAs lower-case local parts,
and Postfix's own lookups do (addresses.candidates), so POSTID is lower-cased
before the MAC is made. When the local part would exceed 64 characters the
copy goes from the plain `<list>-bounces@` (`make` returns None).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass

from listmilter.core import addresses, bounces, envid, mac
from listmilter.core.keys import Keyring, keyring

USE = "verp"
MAX_LOCAL = 64
# A bounce comes back within Postfix's maximal_queue_lifetime (5 days by default) of the
# post; later ones, and codes dated in the future, are no copy of ours worth a look.
MAX_AGE = 30 * 86400
MAX_SKEW = 3600
MAC_LENGTH = 13
_CODE = re.compile(rf"([0-9a-z]{{1,20}})-([0-9a-z]{{1,8}})-([a-z2-7]{{{MAC_LENGTH}}})")


@dataclass(frozen=True)
class Code:
    """A code's parts as read from an address (not yet verified)."""
    post_id: str
    time: str
    mac: str

    @property
    def posted_at(self) -> float:
        return float(int(self.time, 36))


@dataclass(frozen=True)
class Bound:
    """A verified code: the member and the post it was made for."""
    member: str
    post_id: str
    posted_at: float


def _mac(key: bytes, list_address: str, member: str, post_id: str, when: str) -> str:
    return mac.tag(key, addresses.key(list_address), addresses.key(member), post_id, when, length=MAC_LENGTH)


def _old_mac(key: bytes, list_address: str, member: str, post_id: str, when: str) -> str:
    """The MAC before core/mac.py (NUL-joined fields), of the same length: copies and fan-out
    posts queued at an upgrade carry it. POSTID and TIME are letters and digits and an
    address holds no NUL, so the joined input cannot be made to repeat another code's; and
    no such code is fresh() 30 days after the upgrade. Remove it in the release after."""
    text = "\0".join((USE, addresses.key(list_address), addresses.key(member), post_id, when))
    digest = hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.b32encode(digest).decode().lower()[:MAC_LENGTH]


def code(list_address: str, member: str, post_id: str, posted_at: float, secret: Keyring | bytes,
         use: str = USE) -> str:
    """The code for one member's copy of one post, under the current key (of `use`:
    core/fanout.py makes its codes here under a key of its own)."""
    if not re.fullmatch(r"[A-Za-z0-9]{1,20}", post_id):
        raise ValueError(f"post id must be 1-20 letters and digits: {post_id!r}")
    ring = keyring(secret)
    post, when = post_id.lower(), envid.base36(int(posted_at))
    return f"{post}-{when}-{_mac(ring.own_key(ring.current_id, use), list_address, member, post, when)}"


def make(list_address: str, member: str, post_id: str, posted_at: float, secret: Keyring | bytes) -> str | None:
    """The envelope sender of `member`'s copy; None if it would not fit in a local part
    (the caller then sends from the plain bounces address, and says so), or for a post id
    that is no 1-20 letters and digits."""
    if not re.fullmatch(r"[A-Za-z0-9]{1,20}", post_id):
        return None
    address = addresses.role_address(list_address, "bounces",
                                      code(list_address, member, post_id, posted_at, secret))
    if len(address.rpartition("@")[0]) > MAX_LOCAL or not addresses.is_valid(address):
        return None
    return address


def parse(extension: str) -> Code | None:
    """The parts of a code (the text after `-bounces+`), or None if it is not one (never raises)."""
    if not isinstance(extension, str) or len(extension) > MAX_LOCAL:
        return None
    m = _CODE.fullmatch(extension.strip().lower())
    return Code(m.group(1), m.group(2), m.group(3)) if m else None


def fresh(parsed: Code, now: float) -> bool:
    """Is the code's time one a bounce of our copy can carry (not too old, not in the future)?"""
    return now - MAX_AGE <= parsed.posted_at <= now + MAX_SKEW


def verify(parsed: Code, list_address: str, member: str, secret: Keyring | bytes, use: str = USE) -> bool:
    """Was `parsed` made for `member` of `list_address` with a key (of `use`) still accepted?"""
    ring = keyring(secret)
    return _verify(parsed, list_address, member, [ring.own_key(kid, use) for kid in ring.ids])


def _verify(parsed: Code, list_address: str, member: str, keys: list[bytes]) -> bool:
    return any(mac.same(parsed.mac, _mac(key, list_address, member, parsed.post_id, parsed.time))
               or mac.same(parsed.mac, _old_mac(key, list_address, member, parsed.post_id, parsed.time))
               for key in keys)


def find(extension: str, list_address: str, candidates: Iterable[str], secret: Keyring | bytes) -> Bound | None:
    """The member among `candidates` that the code in `extension` was made for (None: not a
    code, forged, made for someone else or under a key no longer accepted). Never raises.

    Costs one HMAC per candidate and accepted key: callers pass the addresses the bounce
    names first, and the list's members only when none of those is it."""
    parsed = parse(extension)
    if parsed is None:
        return None
    ring = keyring(secret)
    keys = [ring.own_key(kid, USE) for kid in ring.ids]
    for member in candidates:
        if isinstance(member, str) and member.isascii() and _verify(parsed, list_address, member, keys):
            return Bound(member, parsed.post_id, parsed.posted_at)
    return None


# -- what a bounce to a VERP address says ------------------------------------------
NON_DSN = "a bounce to the member's VERP address that names no failure (not a DSN)"


def failure_of(report: bounces.Report, member: str, null_sender: bool) -> bounces.Failure | None:
    """The failure a message that reached `member`'s verified VERP address reports for that
    member, None if it reports none. The address it was sent to names the member, so:

    - any failure it names (a DSN or a bounce flufl.bounce reads, the ENVID kept or not) is
      the member's, whatever address it names (forwarding, rewriting); a permanent one first;
    - a message from the null sender that names no failure is a bounce all the same (a
      non-DSN bounce in words only a person reads): a permanent failure of the member;
    - an auto-response, a DSN that reports no failure (delivered, relayed), or mail from
      anyone else that names no failure is none.
    """
    if report.kind == bounces.AUTORESPONSE:
        return None
    if report.failures:
        own = [f for f in report.failures if addresses.key(f.address) == addresses.key(member)]
        named = own or list(report.failures)
        first = next((f for f in named if f.permanent), named[0])
        return bounces.Failure(member, first.permanent, first.status, first.diagnostic)
    if null_sender and report.kind != bounces.DSN:
        return bounces.Failure(member, True, "", NON_DSN)
    return None


def explain(report: bounces.Report, member: str, null_sender: bool, posted_at: float,
            member_added: float | None, member_active: bool) -> bounces.Explanation:
    """What a message that reached `member`'s verified VERP address says (`bounces --explain`),
    as listmilter.app.verp_bounces scores it: the failure is the member's, bound by the address."""
    failure = failure_of(report, member, null_sender)
    if failure is None:
        return bounces.Explanation(report.kind, report.envid, ())
    v = bounces.verdict(failure, bounces.DSN, posted_at, member_added, member_active)
    return bounces.Explanation(report.kind, report.envid, (bounces.Explained(
        failure.address, failure.status, failure.permanent, "verp", v, bounces.WHY.get(v, str(v))),))
