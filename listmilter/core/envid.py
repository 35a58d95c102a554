"""The ENVID (RFC 3461) listmilter gives every list post.

Format: POSTID.TIME.MAC.LIST, e.g.
`4XyZ1s2B3c.tpaigw.eu3p4hllft3qkivtjwtbwdk4vm.dev@example.org`, where POSTID
is the Postfix queue id (what admins grep for), TIME the post's Unix time in
base 36, and MAC 26 base32 characters (128 bits) of core/mac.py's MAC of
POSTID, TIME and the list under the site's current key derived for "envid";
any key still accepted verifies one. A DSN carrying it is tied to a post we
really sent, at a known time, so a bounce can be checked against who was a
member then. Only characters that need no xtext encoding are used, and it
stays within the 100 characters RFC 3461 allows; the list part is left out if
it would not fit (the bounce address names the list anyway).

The format before core/mac.py (a 16-hex-digit MAC of NUL-joined fields, key 0
used as it is) is still read, so that the DSNs of posts sent just before an
upgrade count: its MAC's length and alphabet tell it apart, and ENVIDs older
than 14 days count for nothing anyway (bounces.ENVID_MAX_AGE). The 0.1 format
(POSTID.MAC.LIST, no time) is no longer read: it never scored (no time to
check membership against), and it MACed bytes the later format could be made
to repeat. tests/data/reference/ pins the formats.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from listmilter.core import mac
from listmilter.core.keys import Keyring, keyring

MAX_LENGTH = 100
_SAFE = re.compile(r"[!-~]+")
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Post:
    post_id: str
    posted_at: float


USE = "envid"
_TIME = re.compile(r"[0-9a-z]{1,8}")
_TAG = re.compile(rf"[a-z2-7]{{{mac.FULL}}}")
_OLD_TAG = re.compile(r"[0-9a-f]{16}")


def _old_mac(secret: bytes, *parts: str) -> str:
    return hmac.new(secret, "\0".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def base36(n: int) -> str:
    """n in lower-case base 36 (the ENVID's and the VERP code's time)."""
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = _DIGITS[r] + out
        if not n:
            return out


def make(post_id: str, list_address: str, secret: Keyring | bytes, posted_at: float) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", post_id):
        raise ValueError(f"post id must be alphanumeric: {post_id!r}")
    ring = keyring(secret)
    when = base36(int(posted_at))
    tag = mac.tag(ring.own_key(ring.current_id, USE), post_id, when, list_address.lower())
    envid = f"{post_id}.{when}.{tag}"
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
    if len(parts) < 3 or not _TIME.fullmatch(parts[1]):
        return None
    post_id, when, given = parts[0], parts[1], parts[2]
    if _TAG.fullmatch(given):
        ok = any(mac.same(given, mac.tag(ring.own_key(kid, USE), post_id, when, list_key)) for kid in ring.ids)
    elif _OLD_TAG.fullmatch(given):     # made before core/mac.py
        ok = any(mac.same(given, _old_mac(ring.own_mac_key(kid, USE), post_id, when, list_key)) for kid in ring.ids)
    else:
        return None
    if not ok or (len(parts) == 4 and parts[3].lower() != list_key):
        return None
    return Post(post_id, float(int(when, 36)))
