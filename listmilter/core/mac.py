"""The one MAC behind every code listmilter puts in mail: ENVIDs, VERP and fan-out
senders, bounce probes and the owners' decision codes.

HMAC-SHA256 over the code's fields, each preceded by its length (4 bytes, big
endian), under a key derived from a site key for that one purpose (HKDF,
core/keys.py). The length prefixes make the input unambiguous whatever a field
holds: no choice of post id, time or address moves a boundary between fields,
so no code reads as another with different fields. The purpose key makes a
code made for one use worthless for any other.

The tag is cut to what the code's place allows: 128 bits (26 base32
characters) where it fits, fewer only inside an envelope sender's local part
(64 characters, RFC 5321): a VERP code keeps 65 bits, a probe's 80. Those are
checked online only (each guess is a message sent to us, and the site key never
leaves the host), where 2^65 tries are out of reach.

One-click and confirmation tokens are not made here: they are encrypted and
authenticated together (AES-SIV, core/tokens.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

FULL = 26          # base32 characters of a full-length tag (130 bits: 128 and change)


def digest(key: bytes, *fields: str) -> bytes:
    """HMAC-SHA256 of the length-prefixed fields (text from mail may hold anything:
    surrogates are kept, not refused)."""
    data = bytearray()
    for field in fields:
        raw = field.encode("utf-8", "surrogatepass")
        data += len(raw).to_bytes(4, "big") + raw
    return hmac.new(key, bytes(data), hashlib.sha256).digest()


def tag(key: bytes, *fields: str, length: int = FULL) -> str:
    """The first `length` lower-case base32 characters of digest()."""
    return base64.b32encode(digest(key, *fields)).decode("ascii").lower()[:length]


def same(given: object, expected: str) -> bool:
    """Does `given` (read from mail: any object, any text) equal `expected`, in constant time?"""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("ascii"))
