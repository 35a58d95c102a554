"""Confirmation tokens and one-click unsubscribe tokens: the pure half.

A confirmation token is 120 random bits, written as 24 lower-case base32
characters (mail addresses are compared case-insensitively, so
dev-confirm+TOKEN@ must survive lower-casing); the pending database
(listmilter.store.pending) keeps only its SHA-256. A token is used at most
once and expires (settings `confirm_days`; moderation requests
MODERATION_DAYS).

The one-click unsubscribe token (`unsubscribe_token`) needs no row: it is
the list and the member's address, encrypted and authenticated under the
site secret (a deterministic SIV-like construction with HMAC-SHA256 as the
PRF), so a URL identifies one member of one list without showing the address
and cannot be forged or altered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from enum import StrEnum

from listmilter.core import addresses

DAY = 86400.0
MODERATION_DAYS = 30
KEEP_DAYS = 2          # used and expired rows are kept this long after expiry (refusal replies, counters)

class Kind(StrEnum):
    """Who a pending request waits for."""
    CONFIRM = "confirm"      # the address's owner
    MODERATE = "moderate"    # a list owner


CONFIRM, MODERATE = Kind.CONFIRM, Kind.MODERATE

TOKEN_RE = re.compile(r"[a-z2-7]{24}")


@dataclass(frozen=True)
class Pending:
    kind: str
    list: str
    address: str
    name: str
    action: str
    how: str
    who: str
    created: float
    expires: float
    done: float | None
    outcome: str
    hash: str = ""

    def state(self, now: float) -> str:
        """pending, used or expired."""
        if self.done is not None:
            return "used"
        if now >= self.expires:
            return "expired"
        return "pending"


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(15)).decode().lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.lower().encode()).hexdigest()


def find_token(text: str) -> str | None:
    """A token in free text, e.g. the Subject of a reply: "Re: ... (confirm TOKEN)"."""
    m = re.search(r"confirm[\s:+=-]+([A-Za-z2-7]{24})\b", text or "", re.IGNORECASE)
    return m.group(1).lower() if m else None


# -- one-click unsubscribe tokens ---------------------------------------------------
_UNSUB_VERSION = b"u1"
_TAG = 16


def _key(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"listmilter unsubscribe " + label, hashlib.sha256).digest()


def _stream(key: bytes, iv: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hmac.new(key, iv + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1
    return out[:length]


def unsubscribe_token(secret: bytes, list_address: str, address: str) -> str:
    """URL-safe text naming one member of one list; unreadable and unforgeable without the secret."""
    plain = f"{addresses.key(list_address)}\0{address}".encode()
    tag = hmac.new(_key(secret, b"mac"), _UNSUB_VERSION + plain, hashlib.sha256).digest()[:_TAG]
    cipher = bytes(a ^ b for a, b in zip(plain, _stream(_key(secret, b"enc"), tag, len(plain))))
    return base64.urlsafe_b64encode(tag + cipher).decode().rstrip("=")


def read_unsubscribe_token(secret: bytes, token: str) -> tuple[str, str] | None:
    """(list key, address) if `token` is one we made, else None."""
    if not token or len(token) > 800 or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        return None
    if len(raw) <= _TAG:
        return None
    tag, cipher = raw[:_TAG], raw[_TAG:]
    plain = bytes(a ^ b for a, b in zip(cipher, _stream(_key(secret, b"enc"), tag, len(cipher))))
    expected = hmac.new(_key(secret, b"mac"), _UNSUB_VERSION + plain, hashlib.sha256).digest()[:_TAG]
    if not hmac.compare_digest(tag, expected):
        return None
    list_key, sep, address = plain.decode("utf-8", "replace").partition("\0")
    if not sep:
        return None
    return list_key, address
