"""The ENVID (RFC 3461) listmilter gives every list post.

Format: POSTID.TIME.MAC.LIST, e.g. `4XyZ1s2B3c.t4k2x1.9f2a61c0d4e5b6a7.dev@example.org`,
where POSTID is the Postfix queue id (what admins grep for), TIME the post's
Unix time in base 36, and MAC an HMAC of the three under the site's current
key (listmilter.core.keys: key 0 as it is, a rotated key derived for
"envid"); any key still accepted verifies one. A
DSN carrying it is tied to a post we really sent, at a known time, so a
bounce can be checked against who was a member then. Only characters that
need no xtext encoding are used, and it stays within the 100 characters RFC
3461 allows; the list part is left out if it would not fit (the bounce
address names the list anyway).

ENVIDs of listmilter 0.1 (POSTID.MAC.LIST, no time, key 0) still verify.
tests/data/reference/ pins both formats.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from listmilter.core.keys import LEGACY, Keyring, keyring

MAX_LENGTH = 100
_SAFE = re.compile(r"[!-~]+")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Post:
    post_id: str
    posted_at: float | None      # None for a 0.1 ENVID


def _mac(secret: bytes, *parts: str) -> str:
    # surrogatepass: a post id read from a hostile DSN may hold anything; valid text encodes as UTF-8.
    return hmac.new(secret, "\0".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def base36(n: int) -> str:
    """n in lower-case base 36 (the ENVID's and the VERP code's time)."""
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def _same(a: str, b: str) -> bool:
    # compare_digest refuses non-ASCII str; what comes from a DSN may be anything.
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode())


def make(post_id: str, list_address: str, secret: Keyring | bytes, posted_at: float) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", post_id):
        raise ValueError(f"post id must be alphanumeric: {post_id!r}")
    ring = keyring(secret)
    when = base36(int(posted_at))
    mac = _mac(ring.own_mac_key(ring.current_id, "envid"), post_id, when, list_address.lower())
    envid = f"{post_id}.{when}.{mac}"
    tail = "." + list_address
    if _SAFE.fullmatch(list_address) and "+" not in list_address and "=" not in list_address \
            and len(envid) + len(tail) <= MAX_LENGTH:
        envid += tail
    return envid


def parse(envid: str, list_address: str, secret: Keyring | bytes) -> Post | None:
    """The post, if `envid` is one we issued for `list_address` with a key still accepted;
    else None (never raises)."""
    envid = envid.strip()
    if len(envid) > MAX_LENGTH or not _SAFE.fullmatch(envid):
        return None     # not what make() writes: 8-bit, spaces, controls, too long
    ring = keyring(secret)
    list_key = list_address.lower()
    parts = envid.split(".", 3)
    if len(parts) >= 3 and re.fullmatch(r"[0-9a-z]{1,8}", parts[1]) \
            and any(_same(parts[2], _mac(ring.own_mac_key(kid, "envid"), parts[0], parts[1], list_key))
                    for kid in ring.ids):
        if len(parts) == 4 and parts[3].lower() != list_key:
            return None
        return Post(parts[0], float(int(parts[1], 36)))
    # listmilter 0.1: POSTID.MAC[.LIST], made with key 0 (there was no other)
    old = envid.split(".", 2)
    legacy = ring.secret(LEGACY)
    if len(old) >= 2 and legacy is not None and _same(old[1], _mac(legacy, old[0], list_key)):
        if len(old) == 3 and old[2].lower() != list_key:
            return None
        return Post(old[0], None)
    return None
