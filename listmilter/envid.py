"""The ENVID (RFC 3461) listmilter gives every list post.

Format: POSTID.MAC.LIST, e.g. `4XyZ1s2B3c.9f2a61c0d4.dev@example.org`, where
POSTID is the Postfix queue id (what admins grep for), MAC an HMAC of
POSTID and LIST under the site secret, so a DSN can be tied to a post we
really sent. Only characters that need no xtext encoding are used, and it
stays within the 100 characters RFC 3461 allows; the list part is left out
if it would not fit (the bounce address names the list anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import re

MAX_LENGTH = 100
_SAFE = re.compile(r"[!-~]+")


def _mac(secret: bytes, post_id: str, list_address: str) -> str:
    return hmac.new(secret, f"{post_id}\0{list_address}".encode(), hashlib.sha256).hexdigest()[:16]


def make(post_id: str, list_address: str, secret: bytes) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", post_id):
        raise ValueError(f"post id must be alphanumeric: {post_id!r}")
    envid = f"{post_id}.{_mac(secret, post_id, list_address)}"
    tail = "." + list_address
    if _SAFE.fullmatch(list_address) and "+" not in list_address and "=" not in list_address \
            and len(envid) + len(tail) <= MAX_LENGTH:
        envid += tail
    return envid


def parse(envid: str, list_address: str, secret: bytes) -> str | None:
    """The post id if `envid` is one we issued for `list_address`, else None."""
    parts = envid.split(".", 2)
    if len(parts) < 2:
        return None
    post_id, mac = parts[0], parts[1]
    if len(parts) == 3 and parts[2].lower() != list_address.lower():
        return None
    if not hmac.compare_digest(mac, _mac(secret, post_id, list_address.lower())):
        return None
    return post_id
