"""The ENVID (RFC 3461) listmilter gives every list post.

Format: POSTID.TIME.MAC.LIST, e.g. `4XyZ1s2B3c.t4k2x1.9f2a61c0d4e5b6a7.dev@example.org`,
where POSTID is the Postfix queue id (what admins grep for), TIME the post's
Unix time in base 36, and MAC an HMAC of the three under the site secret. A
DSN carrying it is tied to a post we really sent, at a known time, so a
bounce can be checked against who was a member then. Only characters that
need no xtext encoding are used, and it stays within the 100 characters RFC
3461 allows; the list part is left out if it would not fit (the bounce
address names the list anyway).

ENVIDs of listmilter 0.1 (POSTID.MAC.LIST, no time) still verify.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

MAX_LENGTH = 100
_SAFE = re.compile(r"[!-~]+")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Post:
    post_id: str
    posted_at: float | None      # None for a 0.1 ENVID


def _mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()[:16]


def _base36(n: int) -> str:
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def make(post_id: str, list_address: str, secret: bytes, posted_at: float) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", post_id):
        raise ValueError(f"post id must be alphanumeric: {post_id!r}")
    when = _base36(int(posted_at))
    envid = f"{post_id}.{when}.{_mac(secret, post_id, when, list_address.lower())}"
    tail = "." + list_address
    if _SAFE.fullmatch(list_address) and "+" not in list_address and "=" not in list_address \
            and len(envid) + len(tail) <= MAX_LENGTH:
        envid += tail
    return envid


def parse(envid: str, list_address: str, secret: bytes) -> Post | None:
    """The post, if `envid` is one we issued for `list_address`; else None."""
    list_key = list_address.lower()
    parts = envid.strip().split(".", 3)
    if len(parts) >= 3 and re.fullmatch(r"[0-9a-z]{1,8}", parts[1]) \
            and hmac.compare_digest(parts[2], _mac(secret, parts[0], parts[1], list_key)):
        if len(parts) == 4 and parts[3].lower() != list_key:
            return None
        return Post(parts[0], float(int(parts[1], 36)))
    # listmilter 0.1: POSTID.MAC[.LIST]
    old = envid.strip().split(".", 2)
    if len(old) >= 2 and hmac.compare_digest(old[1], _mac(secret, old[0], list_key)):
        if len(old) == 3 and old[2].lower() != list_key:
            return None
        return Post(old[0], None)
    return None
