"""The site's keys: which secret makes what, and which are still accepted.

A Keyring holds the current key, which makes every new link, ENVID and
code, and the older keys still accepted when checking one (for a grace
period after `listmilter secret rotate`, listmilter.store.secret). Keys are
numbered: key 0 is the `secret` file every listmilter so far has made; a
rotation adds 1, 2, ...

Each use gets its own key, derived with HKDF-SHA256 (RFC 5869) from the key
and the use's name, so a value made for one use never passes as another.
The formats that existed before key ids (ENVIDs, the owner's bounce
decision codes, "u1" unsubscribe links) keep using key 0's bytes as they
are: what was sent before an upgrade still verifies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

MIN_LENGTH = 32          # bytes; shorter secrets are refused (listmilter.store.secret)
LEGACY = 0               # the key id of the `secret` file


@dataclass(frozen=True)
class Keyring:
    keys: tuple[tuple[int, bytes], ...]     # (key id, secret): the current key first, then older ones

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one key")
        for kid, secret in self.keys:
            if not isinstance(secret, bytes) or len(secret) < MIN_LENGTH:
                raise ValueError(f"key {kid} is shorter than {MIN_LENGTH} bytes")
            if not 0 <= kid <= 0xFFFF:
                raise ValueError(f"key id {kid} is out of range")

    @property
    def current_id(self) -> int:
        return self.keys[0][0]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(kid for kid, _ in self.keys)

    def secret(self, kid: int) -> bytes | None:
        """Key `kid`'s bytes, if it is accepted (None: unknown or past its grace period)."""
        return next((s for k, s in self.keys if k == kid), None)

    def derive(self, kid: int, use: str, length: int = 32) -> bytes | None:
        """The key for one use (HKDF-SHA256, info "listmilter USE"); None if `kid` is not accepted."""
        secret = self.secret(kid)
        return None if secret is None else _hkdf(secret, use, length)

    def mac_key(self, kid: int, use: str) -> bytes | None:
        """The HMAC key of a pre-key-id format (ENVID, decision code): key 0 as it is, later keys derived."""
        if kid == LEGACY:
            return self.secret(kid)
        return self.derive(kid, use)

    # For making a value, or checking one against each of `ids`: the id is the ring's own, so
    # a missing key is a caller's bug, not a forged input.
    def own_key(self, kid: int, use: str, length: int = 32) -> bytes:
        """derive() for one of this ring's ids."""
        return _own(self.derive(kid, use, length), kid)

    def own_mac_key(self, kid: int, use: str) -> bytes:
        """mac_key() for one of this ring's ids."""
        return _own(self.mac_key(kid, use), kid)


def _own(key: bytes | None, kid: int) -> bytes:
    if key is None:
        raise TypeError(f"key {kid} is not in the keyring")
    return key


def keyring(secret: Keyring | bytes) -> Keyring:
    """A Keyring; raw bytes are the `secret` file's contents, i.e. key 0 alone."""
    return secret if isinstance(secret, Keyring) else Keyring(((LEGACY, secret),))


@functools.lru_cache(maxsize=64)
def _hkdf(secret: bytes, use: str, length: int) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=f"listmilter {use}".encode()).derive(secret)
