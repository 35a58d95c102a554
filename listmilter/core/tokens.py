"""Confirmation tokens and one-click unsubscribe tokens: the pure half.

A confirmation token is 120 random bits, written as 24 lower-case base32
characters (mail addresses are compared case-insensitively, so
dev-confirm+TOKEN@ must survive lower-casing); the pending database
(listmilter.store.pending) keeps only its SHA-256. A token is used at most
once and expires (settings `confirm_days`; moderation requests
MODERATION_DAYS).

The one-click unsubscribe token (`unsubscribe_token`) needs no row: it is
the list, the member's address and the start of their membership, encrypted
and authenticated with AES-SIV under a key derived from the site's current
key, so a URL identifies one membership of one list without showing the
address (nor its length), cannot be forged or altered, and stops working
when that membership ends. Only the canonical spelling of a token is read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import struct
from dataclasses import dataclass
from enum import StrEnum

from listmilter.core import addresses
from listmilter.core.keys import LEGACY, Keyring

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


@dataclass(frozen=True)
class HeldPost:
    """A post on the MTA's hold queue, as the pending database records it."""
    queue_id: str
    list: str
    sender: str
    reason: str
    subject: str
    size: int
    held: float
    decision: str          # "" until someone decides: approve | reject | discard | expire
    decided_by: str
    done: float | None     # when the decision was carried out on the queue


def new_token() -> str:
    return base64.b32encode(secrets.token_bytes(15)).decode().lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.lower().encode()).hexdigest()


def find_token(text: str) -> str | None:
    """A token in free text, e.g. the Subject of a reply: "Re: ... (confirm TOKEN)"."""
    # ASCII: with IGNORECASE alone, [A-Za-z] would also match the Kelvin sign and the long s.
    m = re.search(r"confirm[\s:+=-]+([A-Za-z2-7]{24})\b", text or "", re.IGNORECASE | re.ASCII)
    return m.group(1).lower() if m else None


# -- one-click unsubscribe tokens ---------------------------------------------------
# "u2" (since key ids): VERSION (1 byte) + KEY ID (2 bytes) + AES-SIV (RFC 5297,
# the `cryptography` package) of EPOCH (8 bytes, the member's `added` as an IEEE
# double) + LIST KEY + NUL + ADDRESS, NUL-padded to a multiple of BUCKET bytes.
# Version and key id are authenticated as associated data. SIV is deterministic
# (one link per membership, no nonce to keep) and any change fails its tag.
#
# "u1" (before key ids): TAG (16 bytes) + CIPHER, an HMAC-SHA256 SIV-like
# construction under key 0, no epoch. Read only, during the transition that
# docs/upgrade.md describes; the web decides whether to accept it.
U1, U2 = "u1", "u2"
_V2 = 2
_BUCKET = 128            # 128 bytes hold a list and an address of 119 characters together
_SIV_TAG = 16
_U1_TAG = 16
MAX_TOKEN = 1200         # characters; a 254-character list and address need 879


@dataclass(frozen=True)
class UnsubscribeLink:
    """What a one-click token says: this member of this list, in the membership that began at `epoch`."""
    list: str                    # the list's key (lower case)
    address: str
    epoch: float | None          # the member's `added` when the link was made; None for a u1 link
    format: str                  # U1 or U2
    key_id: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(token: object) -> bytes | None:
    """The bytes of an unpadded base64url text, only if it is the one canonical spelling of them."""
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN \
            or not re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError):
        return None
    # The last character may carry unused bits: four spellings, one value. Only ours counts.
    return raw if _b64(raw) == token else None


def unsubscribe_token(keys: Keyring, list_address: str, address: str, epoch: float) -> str:
    """URL-safe text naming one membership of one list; unreadable and unforgeable without the keys.

    `epoch` is the member's `added` (listmilter.core.model.Member): when the
    membership ends and a new one begins, the new one has another, and the
    link no longer matches it.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV
    list_key = addresses.key(list_address).encode()
    addr = address.encode()
    if b"\0" in list_key + addr:
        raise ValueError("addresses cannot hold NUL")
    plain = struct.pack(">d", epoch) + list_key + b"\0" + addr
    plain += b"\0" * (-len(plain) % _BUCKET)
    kid = keys.current_id
    key = keys.own_key(kid, "unsubscribe link", 64)
    head = bytes((_V2,)) + kid.to_bytes(2, "big")
    return _b64(head + AESSIV(key).encrypt(plain, [head]))


def read_unsubscribe_token(keys: Keyring, token: object) -> UnsubscribeLink | None:
    """What `token` says, if we made it with a key still accepted; else None. Never raises."""
    raw = _unb64(token)
    if raw is None:
        return None
    return _read_u2(keys, raw) or _read_u1(keys, raw)


def _read_u2(keys: Keyring, raw: bytes) -> UnsubscribeLink | None:
    if len(raw) < 3 + _SIV_TAG + _BUCKET or raw[0] != _V2 or (len(raw) - 3 - _SIV_TAG) % _BUCKET:
        return None
    kid = int.from_bytes(raw[1:3], "big")
    key = keys.derive(kid, "unsubscribe link", 64)
    if key is None:
        return None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV
    try:
        plain = AESSIV(key).decrypt(raw[3:], [raw[:3]])
    except InvalidTag:
        return None
    (epoch,) = struct.unpack(">d", plain[:8])
    fields = plain[8:].rstrip(b"\0").split(b"\0")
    if len(fields) != 2:
        return None
    try:
        list_key, address = (f.decode() for f in fields)
    except UnicodeDecodeError:
        return None
    return UnsubscribeLink(list_key, address, epoch, U2, kid)


def _u1_key(secret: bytes, label: bytes) -> bytes:
    return hmac.new(secret, b"listmilter unsubscribe " + label, hashlib.sha256).digest()


def _u1_stream(key: bytes, iv: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hmac.new(key, iv + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        counter += 1
    return out[:length]


def _read_u1(keys: Keyring, raw: bytes) -> UnsubscribeLink | None:
    secret = keys.secret(LEGACY)          # u1 links were only ever made with key 0
    if secret is None or len(raw) <= _U1_TAG:
        return None
    tag, cipher = raw[:_U1_TAG], raw[_U1_TAG:]
    stream = _u1_stream(_u1_key(secret, b"enc"), tag, len(cipher))
    # XOR as one integer: every token that is no u2 one (a forged or mistyped link) is tried here,
    # and a byte-by-byte generator was most of its cost.
    plain = (int.from_bytes(cipher, "big") ^ int.from_bytes(stream, "big")).to_bytes(len(cipher), "big")
    expected = hmac.new(_u1_key(secret, b"mac"), b"u1" + plain, hashlib.sha256).digest()[:_U1_TAG]
    if not hmac.compare_digest(tag, expected):
        return None
    list_key, sep, address = plain.decode("utf-8", "replace").partition("\0")
    if not sep:
        return None
    return UnsubscribeLink(list_key, address, None, U1, LEGACY)
